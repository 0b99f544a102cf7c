"""The blocking client against a real daemon over a real socket."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from lvz.clients import (
    ConnectionLost,
    DaemonUnreachable,
    EventsLost,
    IrqEvent,
    Kvm,
    KvmError,
    PhyidMap,
    UntrustedDaemon,
    open_kvm,
    ops,
    regs,
)
from lvz.clients.cli import main as lvz_main

if TYPE_CHECKING:
    from tests.daemon_fixtures import DaemonProcess

pytest_plugins = ["tests.daemon_fixtures"]

INT_SWI1, INT_TI, INT_IPI = 1, 11, 12


@pytest.fixture
def kvm(lvz_socket: Path) -> Iterator[Kvm]:
    with Kvm.connect(lvz_socket) as kvm:
        yield kvm


def test_hello_and_system_calls(kvm: Kvm) -> None:
    assert kvm.info.protocol == 1
    assert kvm.info.api_version == 12
    assert "vm.phyid_map" in kvm.info.methods
    assert kvm.get_api_version() == 12
    assert kvm.check_extension("one_reg") == 1
    assert kvm.check_extension("no-such-cap") == 0


def test_phyid_map_rules_raise_kvm_error_with_errno(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        a, b = vm.create_vcpu(0), vm.create_vcpu(1)
        assert a.get_one_reg(regs.CPUID) == 256  # unset marker
        assert a.get_one_reg(regs.TMID) == 0
        a.set_one_reg(regs.CPUID, 5)
        a.set_one_reg(regs.CPUID, 5)  # same value again: no change, no error
        with pytest.raises(KvmError) as change:
            a.set_one_reg(regs.CPUID, 6)
        assert change.value.errno == errno.EINVAL
        assert change.value.name == "EINVAL"
        assert isinstance(change.value, OSError)
        with pytest.raises(KvmError) as share:
            b.set_one_reg(regs.CPUID, 5)
        assert share.value.errno == errno.EINVAL
        assert b.get_one_reg(regs.CPUID) == 256
        b.set_one_reg(regs.CPUID, 200)
        assert vm.phyid_map() == PhyidMap(limit=256, entries=((5, 0), (200, 1)))
        assert vm.phyid_lookup(200) == 1
        assert vm.phyid_lookup(6) is None
        assert vm.phyid_lookup(-1) is None
        b.destroy()
        assert vm.phyid_lookup(200) is None


def test_closed_handle_is_ebadf(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(3)
    vcpu.close()
    with pytest.raises(KvmError) as exc:
        vcpu.get_one_reg(regs.TMID)
    assert exc.value.errno == errno.EBADF
    with pytest.raises(KvmError) as again:
        vcpu.close()
    assert again.value.errno == errno.EBADF
    vm.close()


def test_named_vm_is_shared_between_connections(kvm: Kvm, lvz_socket: Path, vm_name: str) -> None:
    name = vm_name
    vm = kvm.create_vm(name=name, max_phyid=1024)
    vm.create_vcpu(7).set_one_reg(regs.CPUID, 1000)
    with Kvm.connect(lvz_socket) as other:
        theirs = other.open_vm(name)
        info = theirs.info()
        assert (info.name, info.max_phyid, info.vcpus) == (name, 1024, (7,))
        assert theirs.open_vcpu(7).get_one_reg(regs.CPUID) == 1000
        assert any(v.name == name and v.vcpus == 1 for v in other.list_vms())
        with pytest.raises(KvmError) as exc:
            theirs.open_vcpu(8)
        assert exc.value.errno == errno.ENOENT
    vm.destroy()
    with pytest.raises(KvmError) as gone:
        kvm.open_vm(name)
    assert gone.value.errno == errno.ENOENT


def test_unencodable_value_is_einval_before_sending(kvm: Kvm) -> None:
    vcpu = kvm.create_vm().create_vcpu(0)
    with pytest.raises(KvmError) as exc:
        vcpu.set_one_reg(regs.CPUID, 1 << 64)
    assert exc.value.errno == errno.EINVAL
    assert vcpu.get_one_reg(regs.TMID) == 0  # the connection is still in step


def test_events_are_buffered_while_calls_wait(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(2)
    vm.subscribe()
    for _ in range(3):
        vcpu.interrupt(INT_IPI)
        vcpu.interrupt(-INT_IPI)
    vcpu.interrupt(INT_IPI)  # down -> up: one more event
    vcpu.interrupt(INT_IPI)  # up while up: no change, no event
    assert vcpu.get_one_reg(regs.ESTAT) & (1 << INT_IPI)
    events = list(vm.events(timeout=0))
    assert all(isinstance(e, IrqEvent) for e in events)
    assert [(e.vcpu_id, e.irq, e.level) for e in events if isinstance(e, IrqEvent)] == [
        (2, INT_IPI, 1),
        (2, INT_IPI, 0),
    ] * 3 + [(2, INT_IPI, 1)]
    seqs = [e.seq for e in events if isinstance(e, IrqEvent)]
    assert seqs == list(range(seqs[0], seqs[0] + 7))
    assert all(e.vm == vm.handle for e in events)
    assert list(vm.events(timeout=0.05)) == []


def test_next_event_interleaves_vms_in_arrival_order(kvm: Kvm) -> None:
    vm1, vm2 = kvm.create_vm(), kvm.create_vm()
    c1, c2 = vm1.create_vcpu(0), vm2.create_vcpu(0)
    vm1.subscribe()
    vm2.subscribe()
    c1.interrupt(INT_TI)
    c2.interrupt(INT_SWI1)
    c1.interrupt(-INT_TI)
    order = []
    while (item := kvm.next_event(timeout=0.2)) is not None:
        assert isinstance(item, IrqEvent)
        order.append((item.vm, item.irq, item.level))
    assert order == [(vm1.handle, INT_TI, 1), (vm2.handle, INT_SWI1, 1), (vm1.handle, INT_TI, 0)]


def test_event_buffer_is_bounded_and_reports_losses(lvz_socket: Path) -> None:
    with Kvm.connect(lvz_socket, max_events=4) as kvm:
        vm = kvm.create_vm()
        vcpu = vm.create_vcpu(0)
        vm.subscribe()
        for _ in range(5):
            vcpu.interrupt(INT_SWI1)
            vcpu.interrupt(-INT_SWI1)
        items = list(vm.events(timeout=0))
        assert [type(i) for i in items] == [IrqEvent] * 4 + [EventsLost]
        lost = items[-1]
        assert isinstance(lost, EventsLost) and lost.count == 6
        # Room again: new events are kept.
        vcpu.interrupt(INT_SWI1)
        assert [type(i) for i in vm.events(timeout=0)] == [IrqEvent]


def test_run_returns_when_a_line_is_up(kvm: Kvm) -> None:
    vcpu = kvm.create_vm().create_vcpu(0)
    timed_out = vcpu.run(timeout=0.05)
    assert timed_out.exit_reason == "timeout"
    vcpu.interrupt(INT_TI)
    result = vcpu.run(timeout=5)
    assert result.exit_reason == "irq"
    assert result.estat & (1 << INT_TI)


def test_unreachable_daemon_is_a_connection_error(tmp_path: Path) -> None:
    with pytest.raises(DaemonUnreachable) as exc:
        Kvm.connect(tmp_path / "nothing.sock")
    assert isinstance(exc.value, ConnectionError)
    assert "nothing.sock" in str(exc.value)


def test_socket_from_environment(lvz_socket: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LVZ_SOCKET", str(lvz_socket))
    with Kvm.connect() as kvm:
        assert kvm.path == str(lvz_socket)
        assert kvm.get_api_version() == 12


def test_daemon_going_away_fails_calls(own_daemon: DaemonProcess) -> None:
    daemon = own_daemon
    with Kvm.connect(daemon.socket) as kvm:
        vcpu = kvm.create_vm().create_vcpu(0)
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        with pytest.raises(ConnectionLost):
            vcpu.get_one_reg(regs.TMID)
        with pytest.raises(ConnectionLost):  # and stays failed, at once
            kvm.get_api_version()


def test_a_refused_message_reports_the_daemons_reason(lvz_socket: Path) -> None:
    """Over the size limit the daemon says E2BIG and hangs up, possibly while this client is
    still writing; the error must carry that reason, not just a broken pipe."""
    with Kvm.connect(lvz_socket) as kvm:
        with pytest.raises(ConnectionLost, match="E2BIG"):
            kvm.call("hello", {"protocol": 1, "client": "x" * (8 << 20)})
        with pytest.raises(ConnectionLost, match="E2BIG"):
            kvm.get_api_version()  # and the connection stays failed with that reason


def test_lines_names_the_raised_lines(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        assert vcpu.lines() == ()
        vcpu.interrupt(INT_IPI)
        vcpu.interrupt(INT_TI)
        assert vcpu.lines() == ("TI", "IPI")


def test_irq_events_carry_the_vcpus_phyid(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        a, b = vm.create_vcpu(0), vm.create_vcpu(1)
        a.set_one_reg(regs.CPUID, 42)
        vm.subscribe()
        a.interrupt(INT_IPI)
        b.interrupt(INT_IPI)  # no CPUID set: no phyid
        got = [(e.vcpu_id, e.phyid, e.line) for e in vm.events() if isinstance(e, IrqEvent)]
        assert got == [(0, 42, "IPI"), (1, None, "IPI")]


def test_wait_for_line(kvm: Kvm, lvz_socket: Path) -> None:
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(2)
        vcpu.set_one_reg(regs.CPUID, 7)
        with pytest.raises(TimeoutError, match="line IPI did not go to 1"):
            vm.wait_for_line(2, "IPI", timeout=0)
        vcpu.interrupt(INT_IPI)
        assert vm.wait_for_line(2, INT_IPI, timeout=0) is None  # already up
        got: list[IrqEvent | None] = []
        waiter = threading.Thread(target=lambda: got.append(vm.wait_for_line(2, "ipi", level=0)))
        waiter.start()
        while not (kvm._reading and not kvm.session.pending) and waiter.is_alive():
            time.sleep(0.001)  # until the waiter has read ESTAT and waits for events
        vcpu.interrupt(-INT_IPI)
        waiter.join(10)
        event = got[0]
        assert event is not None and (event.vcpu_id, event.irq, event.level) == (2, INT_IPI, 0)
        assert event.phyid == 7
        with pytest.raises(KvmError) as exc:
            vm.wait_for_line(9, "IPI", timeout=0)  # no such vCPU
        assert exc.value.name == "ENOENT"


def test_gather_pipelines_and_raises_the_first_refusal(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        vcpus = [vm.create_vcpu(i) for i in range(8)]
        assert kvm.gather([ops.get_one_reg(v, regs.TMID) for v in vcpus]) == list(range(8))
        assert kvm.gather([]) == []
        vcpus[3].close()
        with pytest.raises(KvmError) as exc:
            kvm.gather([ops.get_one_reg(v, regs.TMID) for v in vcpus])
        assert exc.value.name == "EBADF"
        assert kvm.get_api_version() == 12  # every answer was read: the stream is in step


def test_threads_pipeline_on_one_connection(kvm: Kvm) -> None:
    """A thread waiting in vcpu.run holds no lock: other threads' calls go on meanwhile."""
    with kvm.create_vm() as vm:
        sleeper, worker = vm.create_vcpu(0), vm.create_vcpu(1)
        result: list[object] = []
        runner = threading.Thread(target=lambda: result.append(sleeper.run(timeout=30)))
        runner.start()

        def hammer(i: int) -> None:
            vcpu = vm.create_vcpu(10 + i)
            for _ in range(50):
                assert vcpu.get_one_reg(regs.TMID) == 10 + i  # each answer goes to its caller

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert worker.get_one_reg(regs.TMID) == 1
        assert runner.is_alive()  # still waiting in the daemon, and nobody was held up
        sleeper.interrupt(INT_IPI)
        runner.join(10)
        assert result and result[0].exit_reason == "irq"  # type: ignore[attr-defined]


def test_close_wakes_a_thread_waiting_for_events(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    vm.subscribe()
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            vm.next_event(timeout=None)
        except ConnectionLost as exc:
            errors.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    while not kvm._reading and t.is_alive():
        time.sleep(0.001)
    kvm.close()
    t.join(10)
    assert not t.is_alive() and errors


def _impostor(path: Path, ready: int, told: int) -> None:
    """A listener as uid 65534 in a forked child; writes to ``told`` if a client sends bytes."""
    try:
        os.setgid(65534)
        os.setuid(65534)
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(os.fspath(path))
        sock.listen()
        os.write(ready, b"r")
        while True:
            conn, _ = sock.accept()
            if conn.recv(1 << 16):
                os.write(told, b"x")
    finally:
        os._exit(0)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run an impostor as uid 65534")
def test_a_daemon_of_another_user_is_refused_before_sending(
    capsys: pytest.CaptureFixture[str],
) -> None:
    where = Path(tempfile.mkdtemp(prefix="lvz-impostor-"))
    os.chmod(where, 0o777)  # the attacker's directory (issue 8)
    path = where / "lvz.sock"
    ready_r, ready_w = os.pipe()
    told_r, told_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _impostor(path, ready_w, told_w)
    try:
        assert os.read(ready_r, 1) == b"r"
        with pytest.raises(UntrustedDaemon) as exc:
            Kvm.connect(path)
        assert exc.value.uid == 65534 and "uid 65534" in str(exc.value)
        assert str(path) in str(exc.value)
        assert lvz_main(["vms", "--socket", str(path)]) == 125  # the CLI: lvz itself failed
        assert "served by uid 65534" in capsys.readouterr().err

        async def connect_async() -> None:
            async with open_kvm(path):
                pass

        with pytest.raises(UntrustedDaemon, match="uid 65534"):
            trio.run(connect_async)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        shutil.rmtree(where)
    os.set_blocking(told_r, False)
    with pytest.raises(BlockingIOError):
        os.read(told_r, 1)  # the impostor received not a single byte
    for fd in (ready_r, ready_w, told_r, told_w):
        os.close(fd)
