"""A PCH-PIC pin reaches the vCPU whose CPUID its EIOINTC coremap byte names."""
from lvz.clients import IrqEvent, abi

PHYIDS = [0, 3, 8, 17, 42, 99, 128, 255]  # vcpu_id i gets CPUID PHYIDS[i]: sparse on purpose
PCH_BASE = abi.VIRT_PCH_PIC_BASE          # where the VMM maps PCH-PIC's registers
PIN, TARGET = 5, 42                       # route pin 5 to CPUID 42, i.e. to vCPU 4
EIO, EIO_VIRT = abi.EIOINTC_BASE, abi.EIOINTC_VIRT_BASE  # IOCSR windows


def test_pin_goes_to_the_vcpu_with_that_cpuid(vm):
    vcpus = [vm.create_vcpu(i) for i in range(8)]
    for vcpu, phyid in zip(vcpus, PHYIDS, strict=True):
        vcpu.set_one_reg(abi.CPUID, phyid)
    vm.create_device(abi.DEV_IPI)         # the in-kernel irqchip set, as a VMM creates it
    eio = vm.create_device(abi.DEV_EIOINTC)  # CPU-encoded coremap bytes reach CPUIDs above 3,
    eio.set_attr(abi.KVM_DEV_LOONGARCH_EXTIOI_GRP_CTRL,  # but only with the virt extension
                 abi.KVM_DEV_LOONGARCH_EXTIOI_CTRL_INIT_FEATURE, abi.EIOINTC_HAS_VIRT_EXTENSION
                 | abi.EIOINTC_HAS_ENABLE_OPTION | abi.EIOINTC_HAS_CPU_ENCODE)
    pch = vm.create_device(abi.DEV_PCHPIC)
    pch.set_attr(abi.KVM_DEV_LOONGARCH_PCH_PIC_GRP_CTRL, abi.KVM_DEV_LOONGARCH_PCH_PIC_CTRL_INIT,
                 PCH_BASE)
    guest = vcpus[0]                      # the guest kernel's irqchip set-up, on vCPU 0
    guest.iocsr_write(EIO_VIRT + abi.EIOINTC_VIRT_CONFIG, 4,
                      abi.EIOINTC_STATUS_ENABLE | abi.EIOINTC_STATUS_CPU_ENCODE)
    guest.iocsr_write(EIO + abi.EIOINTC_ENABLE, 4, 1 << PIN)
    guest.iocsr_write(EIO + abi.EIOINTC_COREMAP + PIN, 1, TARGET)
    guest.mmio_write(PCH_BASE + abi.PCH_PIC_MASK, 8, abi.U64_MAX & ~(1 << PIN))
    vm.subscribe()
    vm.irq_line(PIN, 1)
    raised = [(e.vcpu_id, e.irq) for e in vm.events() if isinstance(e, IrqEvent) and e.level]
    assert raised == [(PHYIDS.index(TARGET), abi.INT_HWI0)]  # IPMAP 0: EIOINTC ip 0 is HWI0
