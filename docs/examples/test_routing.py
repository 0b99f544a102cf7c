"""A PCH-PIC pin reaches the vCPU whose CPUID its EIOINTC coremap byte names."""
from lvz.clients import IrqEvent, regs
from lvz.plugins import eiointc as E
from lvz.plugins import pchpic as P
from lvz.protocol.constants import DEV_EIOINTC, DEV_IPI, DEV_PCHPIC, INT_HWI0, U64_MAX

PHYIDS = [0, 3, 8, 17, 42, 99, 128, 255]  # vcpu_id i gets CPUID PHYIDS[i]: sparse on purpose
PCH_BASE = 0x10000000                     # where the VMM maps PCH-PIC's registers
PIN, TARGET = 5, 42                       # route pin 5 to CPUID 42, i.e. to vCPU 4


def test_pin_goes_to_the_vcpu_with_that_cpuid(vm):
    vcpus = [vm.create_vcpu(i) for i in range(8)]
    for vcpu, phyid in zip(vcpus, PHYIDS, strict=True):
        vcpu.set_one_reg(regs.CPUID, phyid)
    vm.create_device(DEV_IPI)             # the in-kernel irqchip set, as a VMM creates it
    eio = vm.create_device(DEV_EIOINTC)  # CPU-encoded coremap bytes reach CPUIDs above 3,
    eio.set_attr(E.GRP_CTRL, E.CTRL_INIT_FEATURE,  # but only with the virt extension
                 1 << E.HAS_VIRT_EXTENSION | 1 << E.HAS_ENABLE_OPTION | 1 << E.HAS_CPU_ENCODE)
    pch = vm.create_device(DEV_PCHPIC)
    pch.set_attr(P.GRP_CTRL, P.CTRL_INIT, PCH_BASE)
    guest = vcpus[0]                      # the guest kernel's irqchip set-up, on vCPU 0
    guest.iocsr_write(E.EIOINTC_VIRT_BASE + E.VIRT_CONFIG, 4,
                      1 << E.STATUS_ENABLE | 1 << E.STATUS_ENABLE_CPU_ENCODE)
    guest.iocsr_write(E.EIOINTC_BASE + E.ENABLE, 4, 1 << PIN)
    guest.iocsr_write(E.EIOINTC_BASE + E.COREMAP + PIN, 1, TARGET)
    guest.mmio_write(PCH_BASE + P.MASK, 8, U64_MAX & ~(1 << PIN))
    vm.subscribe()
    vm.irq_line(PIN, 1)
    raised = [(e.vcpu_id, e.irq) for e in vm.events() if isinstance(e, IrqEvent) and e.level]
    assert raised == [(PHYIDS.index(TARGET), INT_HWI0)]  # IPMAP 0: EIOINTC's ip 0 is HWI0
