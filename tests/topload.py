"""A VM with every kind of interrupt traffic, for ``lvz top``'s tests (and a look by hand:
``python -m tests.topload SOCKET`` keeps it going until Ctrl-C)."""

from __future__ import annotations

import sys
import time

from lvz.clients import Kvm, Vm, regs
from lvz.protocol import abi

PIN = 5  # a PCH-PIC pin routed to EIOINTC irq 5, then to phyid 0
MSI_IRQ = 66  # an EIOINTC irq routed to phyid 2
PCHPIC_BASE = 0x10000000


def build(kvm: Kvm, name: str, vcpus: int = 3) -> Vm:
    """``name`` with vCPUs 0.. holding phyids 0, 1, 2, …, all three irqchips, routes set up."""
    vm = kvm.create_vm(name=name)
    cpus = [vm.create_vcpu(i) for i in range(vcpus)]
    for i, c in enumerate(cpus):
        c.set_one_reg(regs.CPUID, i)
    vm.create_device(abi.DEV_IPI)
    vm.create_device(abi.DEV_EIOINTC)
    pch = vm.create_device(abi.DEV_PCHPIC)
    pch.set_attr(
        abi.KVM_DEV_LOONGARCH_PCH_PIC_GRP_CTRL, abi.KVM_DEV_LOONGARCH_PCH_PIC_CTRL_INIT, PCHPIC_BASE
    )
    c0 = cpus[0]
    c0.mmio_write(PCHPIC_BASE + abi.PCH_PIC_MASK, 8, abi.U64_MAX & ~(1 << PIN))
    enable = abi.EIOINTC_BASE + abi.EIOINTC_ENABLE
    coremap = abi.EIOINTC_BASE + abi.EIOINTC_COREMAP
    c0.iocsr_write(enable, 4, 1 << PIN)
    c0.iocsr_write(enable + MSI_IRQ // 32 * 4, 4, 1 << (MSI_IRQ % 32))
    c0.iocsr_write(coremap + PIN, 1, 1 << 0)
    c0.iocsr_write(coremap + MSI_IRQ, 1, 1 << 2)
    c0.set_attr(abi.KVM_LOONGARCH_VCPU_CPUCFG, abi.CPUCFG_KVM_FEATURE, abi.KVM_FEATURE_IPI)
    return vm


def drive(vm: Vm, rounds: int) -> None:
    """``rounds`` of: a device pin up and down, an MSI, an IPI to phyid 1 and a PV IPI to
    phyids 0-2, each line lowered again so the next round raises it anew."""
    c0, c1, c2 = (vm.open_vcpu(i) for i in range(3))
    send = abi.IOCSR_IPI_BASE + abi.IPI_SEND
    clear = abi.IOCSR_IPI_BASE + abi.IPI_CLEAR
    # The guest's end of interrupt for the MSI: clear its bit in vCPU 2's COREISR.
    eoi = abi.EIOINTC_BASE + abi.EIOINTC_COREISR + MSI_IRQ // 64 * 8
    for _ in range(rounds):
        vm.irq_line(PIN, 1)
        vm.irq_line(PIN, 0)
        vm.signal_msi(0x2FF00000, MSI_IRQ)
        c0.iocsr_write(send, 4, (1 << abi.IPI_SEND_CPU_SHIFT) | 3)
        c1.iocsr_write(clear, 4, 1 << 3)
        c0.hypercall(abi.KVM_HCALL_SERVICE, abi.KVM_HCALL_FUNC_IPI, 0b111, 0, 0)
        for c in (c0, c1, c2):
            c.csr_xchg(abi.CSR_ESTAT, 0, 1 << abi.INT_SWI0)  # the guest clears SWI0
        c2.iocsr_write(eoi, 8, 1 << (MSI_IRQ % 64))


if __name__ == "__main__":
    with Kvm.connect(sys.argv[1]) as kvm:
        vm = build(kvm, sys.argv[2] if len(sys.argv) > 2 else "lab")
        while True:
            drive(vm, 10)
            time.sleep(0.05)
