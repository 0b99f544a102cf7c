"""Exits to the VMM with the trio client, against a real daemon: KVM's run loop (issue 14).

The guest is one connection's call, the VMM another's ``vcpu.run``; the kernel functions each
test follows are named in its docstring (arch/loongarch/kvm/exit.c, vcpu.c).
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

from lvz.clients import AsyncKvm, AsyncVcpu, AsyncVm, KvmError, RunResult, abi, open_kvm
from lvz.daemon import exits

if TYPE_CHECKING:
    from lvz.daemon.server import Daemon
    from tests.daemon_fixtures import DaemonProcess

pytest_plugins = ["tests.daemon_fixtures"]

UART = abi.VIRT_UART_BASE
FEATURES = abi.KVM_FEATURE_IPI | abi.KVM_FEATURE_USER_HCALL | abi.KVM_FEATURE_CRASH
U64 = (1 << 64) - 1
#: Generous bound on any wait that must end for the test to pass (never a timing assertion).
LONG = 10


@dataclass
class Pair:
    """One VM seen from two connections: ``vmm`` runs vCPU 0, ``guest`` makes its accesses."""

    vmm_kvm: AsyncKvm
    guest_kvm: AsyncKvm
    vm: AsyncVm
    vmm: AsyncVcpu
    guest: AsyncVcpu


@pytest.fixture
async def pair(lvz_socket: Path, vm_name: str) -> AsyncIterator[Pair]:
    async with open_kvm(lvz_socket) as vmm_kvm, open_kvm(lvz_socket) as guest_kvm:
        vm = await vmm_kvm.create_vm(name=vm_name)
        vmm = await vm.create_vcpu(0)
        guest = await (await guest_kvm.open_vm(vm_name)).open_vcpu(0)
        try:
            yield Pair(vmm_kvm, guest_kvm, vm, vmm, guest)
        finally:
            try:
                await vm.destroy()
            except KvmError:
                pass  # the test destroyed it


class Guest:
    """A guest call running in the background; ``result()`` once it has been answered."""

    def __init__(self, nursery: trio.Nursery, call: Callable[[], Awaitable[Any]]) -> None:
        self.done = trio.Event()
        self.value: Any = None
        self.error: KvmError | None = None
        nursery.start_soon(self._run, call)

    async def _run(self, call: Callable[[], Awaitable[Any]]) -> None:
        try:
            self.value = await call()
        except KvmError as err:
            self.error = err
        self.done.set()

    async def result(self) -> Any:
        with trio.fail_after(LONG):
            await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


async def settle(vcpu: AsyncVcpu) -> None:
    """Until the daemon has read what this test's tasks sent on ``vcpu``'s connection: they
    are all blocked on answers, and one more round trip there comes after their requests."""
    await trio.testing.wait_all_tasks_blocked()
    await vcpu.get_one_reg(abi.CPUID)


async def take(vcpu: AsyncVcpu, **completion: int) -> RunResult:
    """A VMM's run that must return an exit (the guest call may still be on its way)."""
    with trio.fail_after(LONG):
        return await vcpu.run(LONG, **completion)


async def finish(vcpu: AsyncVcpu, **completion: int) -> RunResult:
    """A VMM's run that completes the exit it holds and does not wait for another."""
    return await vcpu.run(0, **completion)


# ---------------------------------------------------------------- MMIO ------------------------


@pytest.mark.parametrize(
    ("size", "data", "value"),
    [
        (1, 0x7F, 0x7F),
        (1, 0x80, U64 ^ 0x7F),  # sign-extended from bit 7
        (2, 0x12348001, U64 ^ 0x7FFE),  # only the low len bytes count
        (4, 0x80000001, 0xFFFFFFFF80000001),
        (8, 0x8000000000000002, 0x8000000000000002),
    ],
)
async def test_mmio_read_exits_and_returns_the_vmms_data_sign_extended(
    pair: Pair, size: int, data: int, value: int
) -> None:
    """kvm_emu_mmio_read: an access nobody claims leaves KVM_RUN as KVM_EXIT_MMIO;
    kvm_complete_mmio_read loads run->mmio.data into the register on the next KVM_RUN."""
    async with trio.open_nursery() as nursery:
        read = Guest(nursery, partial(pair.guest.mmio_read, UART + 8, size, timeout=LONG))
        exit = await take(pair.vmm)
        assert exit.exit_reason == "mmio"
        assert exit.mmio is not None and exit.iocsr_io is None and exit.hypercall is None
        assert (exit.mmio.phys_addr, exit.mmio.len, exit.mmio.is_write) == (UART + 8, size, False)
        assert exit.mmio.data == 0
        assert not read.done.is_set()  # it waits for the completion
        assert (await finish(pair.vmm, data=data)).exit_reason == "timeout"
        assert await read.result() == value


async def test_mmio_write_exit_carries_the_stored_bytes(pair: Pair) -> None:
    """kvm_emu_mmio_write: run->mmio.data is the source register cut to the access width."""
    async with trio.open_nursery() as nursery:
        write = Guest(nursery, partial(pair.guest.mmio_write, UART, 2, 0xABCD1234, timeout=LONG))
        exit = await take(pair.vmm)
        assert exit.exit_reason == "mmio" and exit.mmio is not None
        assert (exit.mmio.phys_addr, exit.mmio.len, exit.mmio.is_write, exit.mmio.data) == (
            UART,
            2,
            True,
            0x1234,
        )
        await finish(pair.vmm)
        assert await write.result() is None


async def test_mmio_read_completed_without_data_reads_zero(pair: Pair) -> None:
    async with trio.open_nursery() as nursery:
        read = Guest(nursery, partial(pair.guest.mmio_read, UART, 4, timeout=LONG))
        await take(pair.vmm)
        await finish(pair.vmm)
        assert await read.result() == 0


# ---------------------------------------------------------------- IOCSR -----------------------


async def test_iocsr_read_exit_is_sign_extended(pair: Pair) -> None:
    """kvm_emu_iocsr + kvm_complete_iocsr_read: KVM_EXIT_LOONGARCH_IOCSR, and the read always
    sign-extends (IOCSRRD has no unsigned form)."""
    async with trio.open_nursery() as nursery:
        read = Guest(
            nursery, partial(pair.guest.iocsr_read, abi.LOONGARCH_IOCSR_FEATURES, 4, timeout=LONG)
        )
        exit = await take(pair.vmm)
        assert exit.exit_reason == "iocsr" and exit.iocsr_io is not None and exit.mmio is None
        assert (exit.iocsr_io.phys_addr, exit.iocsr_io.len, exit.iocsr_io.is_write) == (
            abi.LOONGARCH_IOCSR_FEATURES,
            4,
            False,
        )
        await finish(pair.vmm, data=0xF000000F)
        assert await read.result() == 0xFFFFFFFFF000000F


async def test_iocsr_write_exit(pair: Pair) -> None:
    async with trio.open_nursery() as nursery:
        write = Guest(
            nursery,
            partial(pair.guest.iocsr_write, abi.LOONGARCH_IOCSR_FEATURES, 8, U64, timeout=LONG),
        )
        exit = await take(pair.vmm)
        assert exit.exit_reason == "iocsr" and exit.iocsr_io is not None
        assert (exit.iocsr_io.is_write, exit.iocsr_io.len, exit.iocsr_io.data) == (True, 8, U64)
        await finish(pair.vmm)
        assert await write.result() is None


async def test_iocsr_address_is_32_bit(pair: Pair) -> None:
    """kvm_emu_iocsr reads the address into a u32."""
    async with trio.open_nursery() as nursery:
        Guest(nursery, partial(pair.guest.iocsr_write, (1 << 40) | 0x10, 1, 1, timeout=LONG))
        exit = await take(pair.vmm)
        assert exit.iocsr_io is not None and exit.iocsr_io.phys_addr == 0x10
        await finish(pair.vmm)


async def test_a_claimed_address_never_exits(pair: Pair) -> None:
    """An access an in-kernel device claims is answered by it, VMM or not."""
    await pair.vm.create_device(abi.DEV_IPI)
    assert await pair.guest.iocsr_read(abi.IOCSR_IPI_BASE + abi.IPI_STATUS, 4) == 0
    assert (await finish(pair.vmm)).exit_reason == "timeout"


# ---------------------------------------------------------------- hypercalls ------------------


async def enable(pair: Pair, features: int = FEATURES) -> None:
    await pair.vmm.set_attr(abi.KVM_LOONGARCH_VCPU_CPUCFG, abi.CPUCFG_KVM_FEATURE, features)


@pytest.mark.parametrize(
    ("ret", "a0"),
    [
        ({"ret": 42}, 42),
        ({"ret": -5}, -5),
        ({"ret": U64 - 1}, -2),
        ({}, abi.KVM_HCALL_INVALID_CODE),  # KVM's preset, if the VMM sets none
    ],
)
async def test_user_hypercall_exits_and_ret_becomes_a0(
    pair: Pair, ret: dict[str, int], a0: int
) -> None:
    """kvm_handle_hypercall, KVM_HCALL_USER_SERVICE: KVM_EXIT_HYPERCALL with nr 0x102,
    args = a0..a5, ret preset to INVALID_CODE; kvm_complete_user_service writes a0 = ret."""
    await enable(pair)
    async with trio.open_nursery() as nursery:
        call = Guest(
            nursery,
            partial(pair.guest.hypercall, abi.KVM_HCALL_USER_SERVICE, 7, -1, 3, timeout=LONG),
        )
        exit = await take(pair.vmm)
        assert exit.exit_reason == "hypercall" and exit.hypercall is not None
        assert exit.hypercall.nr == abi.KVM_HCALL_USER_SERVICE
        assert exit.hypercall.args == (7, U64, 3, 0, 0, 0)
        assert (exit.hypercall.ret, exit.hypercall.flags) == (U64, 0)
        await finish(pair.vmm, **ret)
        assert await call.result() == a0


@pytest.mark.parametrize("code", [abi.KVM_HCALL_USER_SERVICE, abi.KVM_HCALL_CRASH])
async def test_without_the_feature_bit_no_hypercall_exits(pair: Pair, code: int) -> None:
    """Without KVM_FEATURE_USER_HCALL / KVM_FEATURE_CRASH: a0 = INVALID_CODE and no exit."""
    await enable(pair, abi.KVM_FEATURE_IPI)
    assert await pair.guest.hypercall(code, 1, 2, timeout=LONG) == abi.KVM_HCALL_INVALID_CODE
    assert (await finish(pair.vmm)).exit_reason == "timeout"


async def test_crash_is_a_system_event_that_repeats_until_the_vm_goes(pair: Pair) -> None:
    """KVM_HCALL_CRASH (maintainer tree) with KVM_FEATURE_CRASH: KVM_EXIT_SYSTEM_EVENT type
    CRASH, ndata 0; nothing completes it, the PC stays on the hvcl, so it exits again."""
    await enable(pair)
    async with trio.open_nursery() as nursery:
        crash = Guest(nursery, partial(pair.guest.hypercall, abi.KVM_HCALL_CRASH, timeout=LONG))
        for _ in range(2):
            exit = await take(pair.vmm)
            assert exit.exit_reason == "system_event" and exit.system_event is not None
            assert exit.system_event.type == abi.KVM_SYSTEM_EVENT_CRASH == 3
            assert (exit.system_event.ndata, exit.system_event.data) == (0, ())
        assert not crash.done.is_set()
        await pair.vm.destroy()  # what a VMM does with a crash
        with pytest.raises(KvmError) as info:
            await crash.result()
        assert info.value.name == "EBADF" and "destroyed" in info.value.message


async def test_a_completion_does_not_fit_a_crash(pair: Pair) -> None:
    await enable(pair)
    async with trio.open_nursery() as nursery:
        Guest(nursery, partial(pair.guest.hypercall, abi.KVM_HCALL_CRASH, timeout=LONG))
        await take(pair.vmm)
        with pytest.raises(KvmError) as info:
            await finish(pair.vmm, ret=0)
        assert info.value.name == "EINVAL" and "system event" in info.value.message
        await pair.vm.destroy()


# ---------------------------------------------------------------- no VMM ----------------------


@pytest.mark.parametrize(
    "call", ["mmio_read", "mmio_write", "iocsr_read", "iocsr_write", "hypercall"]
)
async def test_no_vmm_is_enxio_at_once(pair: Pair, call: str) -> None:
    """No run waits on the vCPU and no timeout says to wait for one: PROTOCOL.md's ENXIO."""
    await enable(pair)
    args: dict[str, tuple[int, ...]] = {
        "mmio_read": (UART, 1),
        "mmio_write": (UART, 1, 0),
        "iocsr_read": (8, 4),
        "iocsr_write": (8, 4, 0),
        "hypercall": (abi.KVM_HCALL_USER_SERVICE,),
    }
    with pytest.raises(KvmError) as info:
        await getattr(pair.guest, call)(*args[call])
    assert info.value.name == "ENXIO" and "no VMM runs vCPU 0" in info.value.message


async def test_no_vmm_within_the_timeout_is_etimedout(pair: Pair) -> None:
    with pytest.raises(KvmError) as info:
        await pair.guest.mmio_read(UART, 1, timeout=0.05)
    assert info.value.errno == errno.ETIMEDOUT
    assert "no VMM took an MMIO read of 1" in info.value.message
    assert (await finish(pair.vmm)).exit_reason == "timeout"  # withdrawn: nothing left


async def test_a_vmm_that_never_completes_times_the_guest_out_and_may_complete_late(
    pair: Pair,
) -> None:
    async with trio.open_nursery() as nursery:
        run = Guest(nursery, partial(pair.vmm.run, LONG))
        await settle(pair.vmm)  # the run waits: the exit is taken
        read = Guest(nursery, partial(pair.guest.mmio_read, UART, 1, timeout=0.05))
        assert (await run.result()).exit_reason == "mmio"
        with pytest.raises(KvmError) as info:
            await read.result()
        assert info.value.name == "ETIMEDOUT" and "did not complete" in info.value.message
        # The VMM's late completion is accepted (no race with the guest's timeout).
        assert (await finish(pair.vmm, data=1)).exit_reason == "timeout"


async def test_bad_timeout_is_einval(pair: Pair) -> None:
    with pytest.raises(KvmError) as info:
        await pair.guest.mmio_read(UART, 1, timeout=-1)
    assert info.value.name == "EINVAL" and "'timeout'" in info.value.message


# ---------------------------------------------------------------- the loop --------------------


async def test_guest_and_vmm_on_one_connection(pair: Pair) -> None:
    """The guest's wait does not hold back its connection: the same client completes it."""
    vcpu = pair.vmm
    async with trio.open_nursery() as nursery:
        read = Guest(nursery, partial(vcpu.mmio_read, UART, 8, timeout=LONG))
        exit = await take(vcpu)
        assert exit.mmio is not None and exit.mmio.len == 8
        assert await vcpu.get_one_reg(abi.CPUID) == 256  # other calls still answered
        await finish(vcpu, data=5)
        assert await read.result() == 5


async def test_exits_of_a_vcpu_come_one_at_a_time_oldest_first(pair: Pair) -> None:
    async with trio.open_nursery() as nursery:
        first = Guest(nursery, partial(pair.guest.mmio_read, UART, 1, timeout=LONG))
        exit = await take(pair.vmm)
        assert exit.mmio is not None and exit.mmio.phys_addr == UART
        second = Guest(nursery, partial(pair.guest.mmio_read, UART + 1, 1))  # a VMM holds one
        await settle(pair.guest)  # the second is queued
        exit = await take(pair.vmm, data=1)  # completes the first, returns the second at once
        assert exit.mmio is not None and exit.mmio.phys_addr == UART + 1
        assert await first.result() == 1
        await finish(pair.vmm, data=2)
        assert await second.result() == 2


async def test_exits_come_before_interrupt_lines(pair: Pair) -> None:
    """A line up makes run return at once; a waiting exit still comes first."""
    await pair.vmm.interrupt(abi.INT_SWI1)
    async with trio.open_nursery() as nursery:
        read = Guest(nursery, partial(pair.guest.mmio_read, UART, 1, timeout=LONG))
        await settle(pair.guest)
        assert (await finish(pair.vmm)).exit_reason == "mmio"
        exit = await finish(pair.vmm, data=3)
        assert exit.exit_reason == "irq" and exit.estat & 1 << abi.INT_SWI1
        assert await read.result() == 3


# ---------------------------------------------------------------- errors and endings ----------


@pytest.mark.parametrize(
    ("guest_call", "completion", "says"),
    [
        ("mmio_write", {"data": 1}, "MMIO write"),
        ("mmio_read", {"ret": 1}, "MMIO read"),
        ("hypercall", {"data": 1}, "hypercall 0x102"),
    ],
)
async def test_a_completion_that_does_not_fit_is_einval_and_changes_nothing(
    pair: Pair, guest_call: str, completion: dict[str, int], says: str
) -> None:
    await enable(pair)
    args: dict[str, tuple[int, ...]] = {
        "mmio_write": (UART, 1, 0),
        "mmio_read": (UART, 1),
        "hypercall": (abi.KVM_HCALL_USER_SERVICE,),
    }
    async with trio.open_nursery() as nursery:
        call = Guest(
            nursery, partial(getattr(pair.guest, guest_call), *args[guest_call], timeout=LONG)
        )
        await take(pair.vmm)
        with pytest.raises(KvmError) as info:
            await finish(pair.vmm, **completion)
        assert info.value.name == "EINVAL" and says in info.value.message
        assert not call.done.is_set()
        await finish(pair.vmm)  # a fitting completion still works
        await call.result()


@pytest.mark.parametrize("completion", [{"data": 1}, {"ret": 0}])
async def test_completing_with_no_exit_held_is_einval(
    pair: Pair, completion: dict[str, int]
) -> None:
    with pytest.raises(KvmError) as info:
        await finish(pair.vmm, **completion)
    assert info.value.name == "EINVAL" and "no exit is pending" in info.value.message


async def test_an_exit_whose_vmm_goes_away_is_offered_to_the_next(
    pair: Pair, lvz_socket: Path, vm_name: str
) -> None:
    """A VMM that closes the handle it holds an exit through (or its connection, which closes
    them all) gives the exit back: the next run, from any connection, returns it again."""
    async with trio.open_nursery() as nursery:
        read = Guest(nursery, partial(pair.guest.mmio_read, UART, 2, timeout=LONG))
        async with open_kvm(lvz_socket) as first:
            vcpu = await (await first.open_vm(vm_name)).open_vcpu(0)
            exit = await take(vcpu)
            assert exit.mmio is not None
            await vcpu.close()  # answered: the daemon has given the exit back
            exit = await take(pair.vmm)  # the same exit, again
        assert exit.mmio is not None and (exit.mmio.phys_addr, exit.mmio.len) == (UART, 2)
        await finish(pair.vmm, data=9)
        assert await read.result() == 9


async def test_closing_the_guests_handle_ends_its_call_with_ebadf(pair: Pair) -> None:
    async with trio.open_nursery() as nursery:
        read = Guest(nursery, partial(pair.guest.mmio_read, UART, 1, timeout=LONG))
        await take(pair.vmm)
        await pair.guest.close()
        with pytest.raises(KvmError) as info:
            await read.result()
        assert info.value.name == "EBADF" and "handle was closed" in info.value.message
        await finish(pair.vmm, data=0)  # abandoned: accepted, answers nobody


async def test_destroying_the_vcpu_ends_the_guests_call(pair: Pair) -> None:
    async with trio.open_nursery() as nursery:
        read = Guest(nursery, partial(pair.guest.mmio_read, UART, 1, timeout=LONG))
        await take(pair.vmm)
        await pair.vmm.destroy()
        with pytest.raises(KvmError) as info:
            await read.result()
        assert info.value.name == "EBADF" and "vCPU was destroyed" in info.value.message


async def test_shutdown_ends_a_waiting_guest_call_with_ebadf(own_daemon: DaemonProcess) -> None:
    async with open_kvm(own_daemon.socket) as kvm:
        vm = await kvm.create_vm()
        vcpu = await vm.create_vcpu(0)
        async with trio.open_nursery() as nursery:
            read = Guest(nursery, partial(vcpu.mmio_read, UART, 1, timeout=LONG))
            await take(vcpu)
            await trio.to_thread.run_sync(own_daemon.stop)
            with pytest.raises(KvmError) as info:
                await read.result()
            assert info.value.name == "EBADF" and "shutting down" in info.value.message


async def test_a_vcpu_holds_a_bounded_number_of_waiting_exits(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond MAX_WAITING queued exits a guest call is EBUSY: no client can make the daemon
    hold an unbounded queue."""
    monkeypatch.setattr(exits, "MAX_WAITING", 2)
    async with open_kvm(daemon.config.socket) as kvm:
        vm = await kvm.create_vm()
        vcpu = await vm.create_vcpu(0)
        async with trio.open_nursery() as nursery:
            waiting = [
                Guest(nursery, partial(vcpu.mmio_read, UART, 1, timeout=LONG)) for _ in range(2)
            ]
            await settle(vcpu)
            with pytest.raises(KvmError) as info:
                await vcpu.mmio_write(UART, 1, 0, timeout=LONG)
            assert info.value.name == "EBUSY" and "2 exits waiting" in info.value.message
            await vm.destroy()
            for guest in waiting:
                with pytest.raises(KvmError):
                    await guest.result()


async def test_a_user_hypercall_counts_in_the_hypercalls_stat(pair: Pair) -> None:
    await enable(pair)
    async with trio.open_nursery() as nursery:
        call = Guest(
            nursery, partial(pair.guest.hypercall, abi.KVM_HCALL_USER_SERVICE, timeout=LONG)
        )
        await take(pair.vmm)
        await finish(pair.vmm, ret=0)
        assert await call.result() == 0
    stats = await pair.vmm_kvm.call("vm.stats", {"vm": pair.vm.handle})
    names = [d["name"] for d in stats["descriptors"] if d["scope"] == "vcpu"]
    [vcpu0] = stats["vcpus"]
    assert vcpu0["values"][names.index("hypercalls")] == 1
