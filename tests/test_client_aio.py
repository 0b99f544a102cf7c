"""The trio client against a real daemon over a real socket: pipelining, errors, events, failure."""

from __future__ import annotations

import errno
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from lvz.clients import (
    AsyncKvm,
    AsyncVcpu,
    ConnectionLost,
    DaemonUnreachable,
    EventsLost,
    IrqEvent,
    KvmError,
    abi,
    open_kvm,
    ops,
)

if TYPE_CHECKING:
    from tests.daemon_fixtures import DaemonProcess

pytest_plugins = ["tests.daemon_fixtures"]

INT_SWI1, INT_TI, INT_IPI = 1, 11, 12


async def test_pipelined_calls_are_paired_by_msgid(lvz_socket: Path) -> None:
    async with open_kvm(lvz_socket) as kvm:
        vm = await kvm.create_vm()
        vcpus: list[AsyncVcpu] = []
        async with trio.open_nursery() as nursery:  # creation pipelined too

            async def create(i: int) -> None:
                vcpu = await vm.create_vcpu(i)
                await vcpu.set_one_reg(abi.CPUID, 255 - i)
                vcpus.append(vcpu)

            for i in range(32):
                nursery.start_soon(create, i)
        assert sorted(v.vcpu_id for v in vcpus) == list(range(32))

        answers: dict[tuple[int, int], int] = {}
        in_flight = 0

        async def read(vcpu: AsyncVcpu, reg: int) -> None:
            nonlocal in_flight
            in_flight = max(in_flight, len(kvm.session.pending) + 1)  # others already out
            answers[vcpu.vcpu_id, reg] = await vcpu.get_one_reg(reg)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    for vcpu in vcpus:
                        nursery.start_soon(read, vcpu, abi.TMID)
                        nursery.start_soon(read, vcpu, abi.CPUID)
        assert len(answers) == 64
        for vcpu in vcpus:
            assert answers[vcpu.vcpu_id, abi.TMID] == vcpu.vcpu_id
            assert answers[vcpu.vcpu_id, abi.CPUID] == 255 - vcpu.vcpu_id
        assert in_flight > 1, "the calls were not pipelined"
        assert not kvm.session.pending


async def test_errors_are_kvm_errors_with_errno(lvz_socket: Path) -> None:
    async with open_kvm(lvz_socket) as kvm:
        vm = await kvm.create_vm()
        vcpu = await vm.create_vcpu(0)
        await vcpu.set_one_reg(abi.CPUID, 9)
        with pytest.raises(KvmError) as exc:
            await vcpu.set_one_reg(abi.CPUID, 10)
        assert exc.value.errno == errno.EINVAL and exc.value.name == "EINVAL"
        assert await vcpu.get_one_reg(abi.CPUID) == 9
        with pytest.raises(KvmError) as dup:
            await vm.create_vcpu(0)
        assert dup.value.errno == errno.EEXIST
        await vcpu.close()
        with pytest.raises(KvmError) as closed:
            await vcpu.get_one_reg(abi.CPUID)
        assert closed.value.errno == errno.EBADF
        with pytest.raises(KvmError) as nodev:
            await vm.create_device("no-such-chip")
        assert nodev.value.errno == errno.ENODEV
        assert await vm.phyid_lookup(9) == 0  # the VM is fine; only the handle is gone


async def test_exception_from_the_block_is_not_wrapped(lvz_socket: Path, vm_name: str) -> None:
    with pytest.raises(KvmError) as exc:
        async with open_kvm(lvz_socket) as kvm:
            await kvm.open_vm(vm_name)
    assert exc.value.errno == errno.ENOENT


async def test_events_iterator_yields_in_order(lvz_socket: Path) -> None:
    async with open_kvm(lvz_socket) as kvm:
        vm = await kvm.create_vm()
        a, b = await vm.create_vcpu(0), await vm.create_vcpu(1)
        await vm.subscribe()
        script = [(a, INT_IPI), (b, INT_TI), (a, -INT_IPI), (b, INT_SWI1), (b, -INT_TI)]
        for vcpu, irq in script:
            await vcpu.interrupt(irq)
        expected = [(v.vcpu_id, abs(i), int(i > 0)) for v, i in script]
        got: list[IrqEvent] = []
        with trio.fail_after(5):
            async for item in vm.events():
                assert isinstance(item, IrqEvent)
                got.append(item)
                if len(got) == len(expected):
                    break
        assert [(e.vcpu_id, e.irq, e.level) for e in got] == expected
        assert [e.seq for e in got] == list(range(got[0].seq, got[0].seq + len(expected)))
        await vm.close()
        with trio.fail_after(5):  # closing the VM ends its stream
            assert [i async for i in vm.events()] == []


async def test_events_arrive_while_the_reader_waits(lvz_socket: Path) -> None:
    async with open_kvm(lvz_socket) as kvm:
        vm = await kvm.create_vm()
        vcpu = await vm.create_vcpu(4)
        await vm.subscribe()
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(vcpu.interrupt, INT_TI)
                item = await vm.next_event()
        assert isinstance(item, IrqEvent)
        assert (item.vcpu_id, item.irq, item.level) == (4, INT_TI, 1)


async def test_event_queue_is_bounded(lvz_socket: Path) -> None:
    async with open_kvm(lvz_socket, max_events=3) as kvm:
        vm = await kvm.create_vm()
        vcpu = await vm.create_vcpu(0)
        await vm.subscribe()
        for _ in range(4):
            await vcpu.interrupt(INT_SWI1)
            await vcpu.interrupt(-INT_SWI1)
        items = [await vm.next_event() for _ in range(4)]
        assert [type(i) for i in items] == [IrqEvent] * 3 + [EventsLost]
        assert isinstance(items[-1], EventsLost) and items[-1].count == 5


async def test_run_waits_without_blocking_other_calls(lvz_socket: Path) -> None:
    async with open_kvm(lvz_socket) as kvm:
        vm = await kvm.create_vm()
        sleeper, waker = await vm.create_vcpu(0), await vm.create_vcpu(1)
        await sleeper.set_one_reg(abi.CPUID, 3)
        await waker.set_one_reg(abi.CPUID, 4)
        results = []
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def run() -> None:
                    results.append(await sleeper.run(timeout=30))

                nursery.start_soon(run)
                await trio.testing.wait_all_tasks_blocked()
                assert await kvm.get_api_version() == 12  # answered while run waits
                await sleeper.interrupt(INT_TI)
        assert results[0].exit_reason == "irq"
        assert results[0].estat & (1 << INT_TI)


async def test_system_calls_and_hello(lvz_socket: Path, vm_name: str) -> None:
    async with open_kvm(lvz_socket) as kvm:
        assert kvm.info.api_version == 12
        assert "loongarch-ipi" in kvm.info.device_types
        assert await kvm.check_extension("irqchip") == 1
        vm = await kvm.create_vm(name=vm_name)
        dev = await vm.create_device("loongarch-ipi")
        again = await vm.open_device("loongarch-ipi")
        assert again.handle != dev.handle
        info = await vm.info()
        assert info.devices == ("loongarch-ipi",)
        assert any(v.name == vm_name for v in await kvm.list_vms())
        plugins = await kvm.list_plugins()
        assert any("loongarch-ipi" in p.device_types for p in plugins)
        await vm.destroy()
        with pytest.raises(KvmError) as exc:
            await dev.get_attr(0x40000001, 0)
        assert exc.value.errno == errno.EBADF


async def test_unreachable_daemon(tmp_path: Path) -> None:
    with pytest.raises(DaemonUnreachable):
        async with open_kvm(tmp_path / "nothing.sock"):
            pass  # pragma: no cover


async def _pending_run(kvm: AsyncKvm, task_status: trio.TaskStatus[None]) -> None:
    vcpu = await (await kvm.create_vm()).create_vcpu(0)
    task_status.started()
    with pytest.raises(ConnectionLost):
        await vcpu.run(timeout=60)


async def test_daemon_going_away_fails_pending_calls_and_streams(
    own_daemon: DaemonProcess,
) -> None:
    async with open_kvm(own_daemon.socket) as kvm:
        vm = await kvm.create_vm()
        await vm.subscribe()
        stream_error: list[BaseException] = []

        async def read_events() -> None:
            try:
                async for _ in vm.events():
                    pass
            except ConnectionLost as exc:
                stream_error.append(exc)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(_pending_run, kvm)
                nursery.start_soon(read_events)
                await trio.testing.wait_all_tasks_blocked()  # run is in flight, reader waits
                assert len(kvm.session.pending) == 1
                own_daemon.proc.send_signal(signal.SIGKILL)
        assert stream_error
        with pytest.raises(ConnectionLost):
            await kvm.get_api_version()


async def test_protocol_error_fails_the_connection(lvz_socket: Path) -> None:
    async with open_kvm(lvz_socket) as kvm:
        vcpu = await (await kvm.create_vm()).create_vcpu(0)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(_pending_run, kvm)
                await trio.testing.wait_all_tasks_blocked()  # the run request is out
                kvm._send(b"\xc1")  # as a request would, so bytes never interleave
        with pytest.raises(ConnectionLost) as exc:
            await vcpu.get_one_reg(abi.TMID)
        assert "protocol error" in str(exc.value)


async def test_a_cancelled_run_frees_the_vcpu_at_once(lvz_socket: Path) -> None:
    """Cancelling run() on this side kicks the daemon's wait, so the next run is not EBUSY."""
    async with open_kvm(lvz_socket) as kvm:
        vm = await kvm.create_vm()
        vcpu = await vm.create_vcpu(0)
        with trio.move_on_after(0.1) as scope:
            await vcpu.run(60)
        assert scope.cancelled_caught
        with trio.fail_after(5):
            result = await vcpu.run(0.01)  # EBUSY here before vcpu.kick existed
        assert result.exit_reason == "timeout"


async def test_lines_gather_and_wait_for_line(lvz_socket: Path) -> None:
    async with open_kvm(lvz_socket) as kvm:
        vm = await kvm.create_vm()
        vcpus = [await vm.create_vcpu(i) for i in range(4)]
        await vcpus[1].set_one_reg(abi.CPUID, 33)
        assert await kvm.gather([ops.get_one_reg(v, abi.TMID) for v in vcpus]) == [0, 1, 2, 3]
        assert await vcpus[1].lines() == ()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                got: list[IrqEvent | None] = []

                async def wait() -> None:
                    got.append(await vm.wait_for_line(1, "IPI"))

                nursery.start_soon(wait)
                while kvm._events.statistics().tasks_waiting == 0:
                    await trio.testing.wait_all_tasks_blocked()  # until it waits for events
                await vcpus[1].interrupt(INT_IPI)
        event = got[0]
        assert event is not None and (event.vcpu_id, event.line, event.phyid) == (1, "IPI", 33)
        assert await vcpus[1].lines() == ("IPI",)
        assert await vm.wait_for_line(1, INT_IPI, timeout=0) is None  # already up
        with pytest.raises(TimeoutError):
            await vm.wait_for_line(2, "TI", timeout=0)
        await vcpus[2].close()
        with pytest.raises(KvmError) as exc:
            await kvm.gather([ops.get_one_reg(v, abi.TMID) for v in vcpus])
        assert exc.value.name == "EBADF"
        assert await kvm.get_api_version() == 12  # the stream is still in step


async def test_a_cancelled_call_leaves_nothing_behind(lvz_socket: Path) -> None:
    async with open_kvm(lvz_socket) as kvm:
        vm = await kvm.create_vm()
        vcpu = await vm.create_vcpu(0)
        with trio.move_on_after(0):
            await kvm.gather([ops.get_one_reg(vcpu, abi.TMID)] * 100)
        assert not kvm.session.pending  # answers that still come are dropped
        assert await vcpu.get_one_reg(abi.TMID) == 0
        with trio.move_on_after(0) as scope:  # one call: it sends, then parks and is cancelled
            await vcpu.get_one_reg(abi.TMID)
        assert scope.cancelled_caught
        assert not kvm.session.pending
        assert await vcpu.get_one_reg(abi.TMID) == 0


async def test_a_batch_bigger_than_the_socket_buffer_goes_out_whole(lvz_socket: Path) -> None:
    """What the kernel does not take at once is finished by the writer task, in order."""
    async with open_kvm(lvz_socket) as kvm:
        vm = await kvm.create_vm()
        vcpu = await vm.create_vcpu(5)
        with trio.fail_after(30):
            calls = [ops.get_one_reg(vcpu, abi.TMID)] * 20_000
            results, tmid = await kvm.gather(calls), await vcpu.get_one_reg(abi.TMID)
        assert results == [5] * 20_000 and tmid == 5
        assert not kvm._outbox and not kvm.session.pending
