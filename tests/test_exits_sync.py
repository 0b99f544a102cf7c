"""Exits to the VMM with the blocking client, against a real daemon (issue 14).

The blocking client makes one call at a time per connection, so here the guest's call runs in
a worker thread on its own connection while the test is the VMM; docs/vmm-loop.md's example is
run as it stands.
"""

from __future__ import annotations

import contextlib
import errno
import re
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lvz.clients import Kvm, KvmError, Vcpu, Vm, abi

pytest_plugins = ["tests.daemon_fixtures"]

DOC = Path(__file__).resolve().parent.parent / "docs" / "vmm-loop.md"
UART = abi.VIRT_UART_BASE
U64 = (1 << 64) - 1
LONG = 10


@dataclass
class Pair:
    vm: Vm
    vmm: Vcpu
    guest: Vcpu
    pool: ThreadPoolExecutor


@pytest.fixture
def pair(lvz_socket: Path, vm_name: str) -> Iterator[Pair]:
    with (
        Kvm.connect(lvz_socket) as vmm_kvm,
        Kvm.connect(lvz_socket) as guest_kvm,
        ThreadPoolExecutor(1) as pool,
    ):
        vm = vmm_kvm.create_vm(name=vm_name)
        vmm = vm.create_vcpu(0)
        vmm.set_attr(
            abi.KVM_LOONGARCH_VCPU_CPUCFG,
            abi.CPUCFG_KVM_FEATURE,
            abi.KVM_FEATURE_IPI | abi.KVM_FEATURE_USER_HCALL | abi.KVM_FEATURE_CRASH,
        )
        guest = guest_kvm.open_vm(vm_name).open_vcpu(0)
        try:
            yield Pair(vm, vmm, guest, pool)
        finally:
            with contextlib.suppress(KvmError):
                vm.destroy()


def failure(future: Future[Any]) -> KvmError:
    error = future.exception(timeout=LONG)
    assert isinstance(error, KvmError), error
    return error


def test_the_vmm_loop_example_runs_as_documented(
    lvz_socket: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    [code] = re.findall(r"```python\n(import threading\n.*?)```", DOC.read_text(), re.S)
    monkeypatch.setenv("LVZ_SOCKET", str(lvz_socket))
    exec(compile(code, str(DOC), "exec"), {"__name__": "vmm_loop_example"})
    assert capsys.readouterr().out == "b'hi\\n' 6\n"


def test_mmio_read_and_write(pair: Pair) -> None:
    """kvm_emu_mmio_read / _write and kvm_complete_mmio_read, through the blocking client."""
    read = pair.pool.submit(pair.guest.mmio_read, UART, 2, timeout=LONG)
    exit = pair.vmm.run(LONG)
    assert exit.exit_reason == "mmio" and exit.mmio is not None
    assert (exit.mmio.phys_addr, exit.mmio.len, exit.mmio.is_write) == (UART, 2, False)
    assert pair.vmm.run(0, data=0x8001).exit_reason == "timeout"
    assert read.result(timeout=LONG) == U64 ^ 0x7FFE

    write = pair.pool.submit(pair.guest.mmio_write, UART, 1, 0x1FF, timeout=LONG)
    exit = pair.vmm.run(LONG)
    assert exit.mmio is not None and (exit.mmio.is_write, exit.mmio.data) == (True, 0xFF)
    pair.vmm.run(0)
    assert write.result(timeout=LONG) is None


def test_iocsr_read_and_write(pair: Pair) -> None:
    """kvm_emu_iocsr and kvm_complete_iocsr_read (always sign-extended)."""
    read = pair.pool.submit(pair.guest.iocsr_read, abi.LOONGARCH_IOCSR_FEATURES, 1, timeout=LONG)
    exit = pair.vmm.run(LONG)
    assert exit.exit_reason == "iocsr" and exit.iocsr_io is not None
    assert (exit.iocsr_io.phys_addr, exit.iocsr_io.len) == (abi.LOONGARCH_IOCSR_FEATURES, 1)
    pair.vmm.run(0, data=0xFE)
    assert read.result(timeout=LONG) == U64 - 1

    write = pair.pool.submit(
        pair.guest.iocsr_write, abi.LOONGARCH_IOCSR_FEATURES, 4, 7, timeout=LONG
    )
    exit = pair.vmm.run(LONG)
    assert exit.iocsr_io is not None and (exit.iocsr_io.is_write, exit.iocsr_io.data) == (True, 7)
    pair.vmm.run(0)
    assert write.result(timeout=LONG) is None


def test_user_hypercall_ret_becomes_a0(pair: Pair) -> None:
    """kvm_handle_hypercall (USER_SERVICE) and kvm_complete_user_service."""
    call = pair.pool.submit(
        pair.guest.hypercall, abi.KVM_HCALL_USER_SERVICE, 1, 2, 3, 4, 5, 6, timeout=LONG
    )
    exit = pair.vmm.run(LONG)
    assert exit.exit_reason == "hypercall" and exit.hypercall is not None
    assert (exit.hypercall.nr, exit.hypercall.args) == (0x102, (1, 2, 3, 4, 5, 6))
    assert exit.hypercall.ret == U64
    pair.vmm.run(0, ret=-3)
    assert call.result(timeout=LONG) == -3


def test_crash_event(pair: Pair) -> None:
    """KVM_HCALL_CRASH (maintainer tree): KVM_EXIT_SYSTEM_EVENT, type CRASH, again each run."""
    call = pair.pool.submit(pair.guest.hypercall, abi.KVM_HCALL_CRASH, timeout=LONG)
    for _ in range(2):
        exit = pair.vmm.run(LONG)
        assert exit.exit_reason == "system_event" and exit.system_event is not None
        assert exit.system_event.type == abi.KVM_SYSTEM_EVENT_CRASH
    pair.vm.destroy()
    assert failure(call).name == "EBADF"


def test_timeout_with_no_vmm(pair: Pair) -> None:
    with pytest.raises(KvmError) as info:
        pair.guest.mmio_write(UART, 4, 1)
    assert info.value.errno == errno.ENXIO
    with pytest.raises(KvmError) as info:
        pair.guest.hypercall(abi.KVM_HCALL_USER_SERVICE, timeout=0.05)
    assert info.value.errno == errno.ETIMEDOUT
    assert "no VMM took a hypercall 0x102" in info.value.message
