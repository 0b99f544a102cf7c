"""The blocking client against a real daemon over a real socket."""

from __future__ import annotations

import errno
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from lvz.clients import (
    ConnectionLost,
    DaemonUnreachable,
    EventsLost,
    IrqEvent,
    Kvm,
    KvmError,
    PhyidMap,
    regs,
)

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


def test_named_vm_is_shared_between_connections(kvm: Kvm, lvz_socket: Path,
                                                vm_name: str) -> None:
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
        (2, INT_IPI, 1), (2, INT_IPI, 0)] * 3 + [(2, INT_IPI, 1)]
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
    assert order == [(vm1.handle, INT_TI, 1), (vm2.handle, INT_SWI1, 1),
                     (vm1.handle, INT_TI, 0)]


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
