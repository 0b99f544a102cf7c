"""Issue 14, behaviours 2-6: where lvz differed from the kernel at the boundary of the chips.

Each test names the kernel function it follows (arch/loongarch/kvm/*, virt/kvm/*; the sources
and commits are in docs/SEMANTICS.md and /work/research/fidelity.md) and runs against a real
daemon over its socket, as a VMM would.
"""

from __future__ import annotations

from collections.abc import Awaitable

import pytest

from lvz.clients import AsyncKvm, AsyncVm, KvmError, abi, open_kvm
from lvz.daemon.server import Daemon

IPI, EIO, PCH = abi.DEV_IPI, abi.DEV_EIOINTC, abi.DEV_PCHPIC
PVTIME, GPA = abi.KVM_LOONGARCH_VCPU_PVTIME_CTRL, abi.KVM_LOONGARCH_VCPU_PVTIME_GPA
CPUCFG, FEATURE = abi.KVM_LOONGARCH_VCPU_CPUCFG, abi.CPUCFG_KVM_FEATURE
SERVICE, NOTIFY = abi.KVM_HCALL_SERVICE, abi.KVM_HCALL_FUNC_NOTIFY
ST = abi.KVM_FEATURE_STEAL_TIME  # BIT(KVM_FEATURE_STEAL_TIME), the a1 kvm_save_notify wants
PCH_BASE = 0x10000000
U64 = abi.U64_MAX


async def expect_errno(name: str, call: Awaitable[object]) -> KvmError:
    with pytest.raises(KvmError) as info:
        await call
    assert info.value.name == name, info.value
    return info.value


async def vm_with(
    kvm: AsyncKvm,
    chips: tuple[str, ...] = (),
    *,
    pch_base: int = PCH_BASE,
    features: int | None = None,
) -> AsyncVm:
    vm = await kvm.create_vm()
    v0 = await vm.create_vcpu(0)
    await v0.set_one_reg(abi.CPUID, 0)
    if features is not None:
        await v0.set_attr(CPUCFG, FEATURE, features)
    for chip in chips:
        dev = await vm.create_device(chip)
        if chip == PCH:
            await dev.set_attr(
                abi.KVM_DEV_LOONGARCH_PCH_PIC_GRP_CTRL,
                abi.KVM_DEV_LOONGARCH_PCH_PIC_CTRL_INIT,
                pch_base,
            )
    return vm


# --- 2. steal-time registration: kvm_save_notify, kvm_loongarch_pvtime_{get,set}_attr ----------


async def test_func_notify_stores_the_callers_steal_time_address(daemon: Daemon) -> None:
    """kvm_save_notify: a1 = BIT(KVM_FEATURE_STEAL_TIME) stores a2 and answers 0."""
    async with open_kvm(daemon.config.socket) as kvm:
        vm = await vm_with(kvm, features=abi.KVM_FEATURE_IPI | ST)
        v0, v1 = await vm.open_vcpu(0), await vm.create_vcpu(1)
        gpa = 0x1234_5678_9ABC_DE40 | abi.KVM_STEAL_PHYS_VALID
        assert await v1.hypercall(SERVICE, NOTIFY, ST, gpa) == 0
        assert await v1.get_attr(PVTIME, GPA) == gpa
        assert await v0.get_attr(PVTIME, GPA) == 0  # per vCPU: vcpu->arch.st.guest_addr
        # Without the VALID bit the address is stored too: that is how a guest turns it off.
        assert await v1.hypercall(SERVICE, NOTIFY, ST, 0x40) == 0
        assert await v1.get_attr(PVTIME, GPA) == 0x40


@pytest.mark.parametrize("a2", [0x2, 0x20, 0x3E | 1, 0x1000_0004])
async def test_func_notify_with_bits_outside_the_mask_is_invalid_parameter(
    daemon: Daemon, a2: int
) -> None:
    """kvm_save_notify: a2 & ~(KVM_STEAL_PHYS_MASK | KVM_STEAL_PHYS_VALID) -> -2, no store."""
    async with open_kvm(daemon.config.socket) as kvm:
        vm = await vm_with(kvm, features=ST)
        v0 = await vm.open_vcpu(0)
        assert await v0.hypercall(SERVICE, NOTIFY, ST, a2) == abi.KVM_HCALL_INVALID_PARAMETER
        assert await v0.get_attr(PVTIME, GPA) == 0


@pytest.mark.parametrize("a1", [0, 1 << 1, 2, 1 << 25, U64])
async def test_func_notify_for_another_feature_is_invalid_code(daemon: Daemon, a1: int) -> None:
    """kvm_save_notify: ``default: return KVM_HCALL_INVALID_CODE``."""
    async with open_kvm(daemon.config.socket) as kvm:
        vm = await vm_with(kvm, features=ST)
        v0 = await vm.open_vcpu(0)
        assert await v0.hypercall(SERVICE, NOTIFY, a1, 0x40) == abi.KVM_HCALL_INVALID_CODE
        assert await v0.get_attr(PVTIME, GPA) == 0


async def test_without_the_steal_time_feature_notify_and_the_attr_are_absent(
    daemon: Daemon,
) -> None:
    """kvm_handle_service gates FUNC_NOTIFY, kvm_loongarch_pvtime_has_attr the attr (-ENXIO)."""
    async with open_kvm(daemon.config.socket) as kvm:
        vm = await vm_with(kvm)  # default PV features: IPI only
        v0 = await vm.open_vcpu(0)
        assert await v0.hypercall(SERVICE, NOTIFY, ST, 0x41) == abi.KVM_HCALL_INVALID_CODE
        await expect_errno("ENXIO", v0.get_attr(PVTIME, GPA))
        await expect_errno("ENXIO", v0.set_attr(PVTIME, GPA, 0x41))


async def test_pvtime_attr_is_settable_and_checked(daemon: Daemon) -> None:
    """kvm_loongarch_pvtime_set_attr: -EINVAL outside the mask; other attrs -ENXIO."""
    async with open_kvm(daemon.config.socket) as kvm:
        vm = await vm_with(kvm, features=ST)
        v0 = await vm.open_vcpu(0)
        await v0.set_attr(PVTIME, GPA, 0x8000_0000_0000_0041)
        assert await v0.get_attr(PVTIME, GPA) == 0x8000_0000_0000_0041
        await expect_errno("EINVAL", v0.set_attr(PVTIME, GPA, 0x42))
        assert await v0.get_attr(PVTIME, GPA) == 0x8000_0000_0000_0041
        await expect_errno("ENXIO", v0.get_attr(PVTIME, 1))
        await expect_errno("ENXIO", v0.set_attr(PVTIME, 1, 0))
        await expect_errno("ENXIO", v0.get_attr(2, 0))  # an unknown group


async def test_vcpu_reset_clears_the_steal_time_address(daemon: Daemon) -> None:
    """kvm_set_one_reg, KVM_REG_LOONGARCH_VCPU_RESET: ``vcpu->arch.st.guest_addr = 0``."""
    async with open_kvm(daemon.config.socket) as kvm:
        vm = await vm_with(kvm, features=ST)
        v0 = await vm.open_vcpu(0)
        assert await v0.hypercall(SERVICE, NOTIFY, ST, 0x81) == 0
        await v0.set_one_reg(abi.VCPU_RESET, 0)
        assert await v0.get_attr(PVTIME, GPA) == 0
        assert await v0.get_one_reg(abi.CPUID) == 0  # and the CPUID stays


async def test_steal_time_survives_a_snapshot(daemon: Daemon) -> None:
    """The registration is vCPU state: saved as a vCPU attr and set again on restore."""
    async with open_kvm(daemon.config.socket) as kvm:
        vm = await vm_with(kvm, features=abi.KVM_FEATURE_IPI | ST)
        v1 = await vm.create_vcpu(1)
        assert await v1.hypercall(SERVICE, NOTIFY, ST, 0xABC0_0001) == 0
        saved = await kvm.save_vm(vm)
        assert [v["attrs"] for v in saved["vcpus"]] == [
            [[PVTIME, GPA, 0]],
            [[PVTIME, GPA, 0xABC0_0001]],
        ]
        copy = await kvm.restore_vm(saved)
        assert await (await copy.open_vcpu(1)).get_attr(PVTIME, GPA) == 0xABC0_0001
        assert await (await copy.open_vcpu(0)).get_attr(PVTIME, GPA) == 0
        # A VM without steal time saves no such attr (ENXIO is "no state", not a failure).
        plain = await vm_with(kvm)
        assert [v["attrs"] for v in (await kvm.save_vm(plain))["vcpus"]] == [[]]


# --- 3. SIGNAL_MSI needs the whole in-kernel irqchip: kvm_send_userspace_msi -------------------


@pytest.mark.parametrize("chips", [(EIO,), (IPI, EIO), (EIO, PCH)], ids="+".join)
async def test_signal_msi_without_the_whole_irqchip_is_einval(
    daemon: Daemon, chips: tuple[str, ...]
) -> None:
    """kvm_send_userspace_msi: ``if (!kvm_arch_irqchip_in_kernel(kvm)) return -EINVAL``, and
    kvm_arch_irqchip_in_kernel wants IPI, EIOINTC and PCH-PIC; nothing is delivered."""
    async with open_kvm(daemon.config.socket) as kvm:
        vm = await vm_with(kvm, chips)
        eio = await vm.open_device(EIO)
        await expect_errno("EINVAL", vm.signal_msi(0, 3))
        assert await eio.get_attr(abi.KVM_DEV_LOONGARCH_EXTIOI_GRP_REGS, abi.EIOINTC_ISR) == 0
        for chip in (IPI, PCH):
            if chip not in chips:
                await vm.create_device(chip)
        await vm.signal_msi(0, 3)  # whole now: delivered to EIOINTC irq 3
        assert await eio.get_attr(abi.KVM_DEV_LOONGARCH_EXTIOI_GRP_REGS, abi.EIOINTC_ISR) == 1 << 3


@pytest.mark.parametrize("chips", [(), (IPI,), (IPI, PCH)], ids=lambda c: "+".join(c) or "none")
async def test_signal_msi_without_eiointc_stays_enxio(
    daemon: Daemon, chips: tuple[str, ...]
) -> None:
    """PROTOCOL.md §4 fixes ENXIO here (the kernel says EINVAL): SEMANTICS decision 10."""
    async with open_kvm(daemon.config.socket) as kvm:
        vm = await vm_with(kvm, chips)
        await expect_errno("ENXIO", vm.signal_msi(0, 3))


# --- 4. MMIO addresses are 64-bit: kvm_emu_mmio_read / kvm_emu_mmio_write --------------------


async def test_mmio_4_gib_above_a_window_misses_it(daemon: Daemon) -> None:
    """kvm_emu_mmio_read routes ``vcpu->arch.badv`` whole: no truncation to 32 bits."""
    async with open_kvm(daemon.config.socket) as kvm:
        vm = await vm_with(kvm, (IPI, EIO, PCH))
        v0 = await vm.open_vcpu(0)
        assert await v0.mmio_read(PCH_BASE + abi.PCH_PIC_MASK, 8) == U64
        for addr in (PCH_BASE + (1 << 32) + abi.PCH_PIC_MASK, PCH_BASE | (1 << 63)):
            await expect_errno("ENXIO", v0.mmio_read(addr, 8))
            await expect_errno("ENXIO", v0.mmio_write(addr, 8, 0))
        assert await v0.mmio_read(PCH_BASE + abi.PCH_PIC_MASK, 8) == U64  # nothing unmasked


async def test_a_pch_pic_above_4_gib_is_reachable(daemon: Daemon) -> None:
    """A 64-bit CTRL_INIT base (kvm_pch_pic_init takes a u64) is reached by its full address."""
    high = (1 << 40) + PCH_BASE
    async with open_kvm(daemon.config.socket) as kvm:
        vm = await vm_with(kvm, (IPI, EIO, PCH), pch_base=high)
        v0 = await vm.open_vcpu(0)
        await v0.mmio_write(high + abi.PCH_PIC_MASK, 8, U64 ^ 0b110)
        assert await v0.mmio_read(high + abi.PCH_PIC_MASK, 8) == U64 ^ 0b110
        await expect_errno("ENXIO", v0.mmio_read(PCH_BASE + abi.PCH_PIC_MASK, 8))


async def test_iocsr_addresses_stay_32_bit(daemon: Daemon) -> None:
    """kvm_emu_iocsr: ``u32 addr``, so IOCSR (unlike MMIO) is taken modulo 2^32."""
    async with open_kvm(daemon.config.socket) as kvm:
        vm = await vm_with(kvm, (IPI,))
        v0 = await vm.open_vcpu(0)
        await v0.iocsr_write((1 << 32) + abi.IOCSR_IPI_BASE + abi.IPI_EN, 4, 0x5A)
        assert await v0.iocsr_read(abi.IOCSR_IPI_BASE + abi.IPI_EN, 4) == 0x5A


# --- 5. PCH-PIC CTRL_INIT twice: kvm_pch_pic_init --------------------------------------------


async def test_a_second_ctrl_init_keeps_the_old_window_answering(daemon: Daemon) -> None:
    """kvm_pch_pic_init calls kvm_io_bus_register_dev for the new base without unregistering
    the old range, and loongarch_pch_pic_read/_write compute ``addr - s->pch_pic_base`` from
    the new base: the old window still answers, with offsets from the new base."""
    new = PCH_BASE + 0x10000
    async with open_kvm(daemon.config.socket) as kvm:
        vm = await vm_with(kvm, (IPI, EIO, PCH))
        pch = await vm.open_device(PCH)
        v0 = await vm.open_vcpu(0)
        await pch.set_attr(
            abi.KVM_DEV_LOONGARCH_PCH_PIC_GRP_CTRL, abi.KVM_DEV_LOONGARCH_PCH_PIC_CTRL_INIT, new
        )
        assert (
            await pch.get_attr(
                abi.KVM_DEV_LOONGARCH_PCH_PIC_GRP_CTRL, abi.KVM_DEV_LOONGARCH_PCH_PIC_CTRL_INIT
            )
            == new
        )
        assert await v0.mmio_read(new + abi.PCH_PIC_MASK, 8) == U64
        # Through the old window the offset is negative from the new base: no register, so
        # the newest kernel reads 0 and drops the store (2faec60a4858). It is not unclaimed.
        assert await v0.mmio_read(PCH_BASE + abi.PCH_PIC_MASK, 8) == 0
        await v0.mmio_write(PCH_BASE + abi.PCH_PIC_MASK, 8, 0)
        assert await v0.mmio_read(new + abi.PCH_PIC_MASK, 8) == U64
        # Snapshots replay every CTRL_INIT, oldest first, so the copy has both windows.
        copy = await kvm.restore_vm(await kvm.save_vm(vm))
        c0 = await copy.open_vcpu(0)
        assert await c0.mmio_read(PCH_BASE + abi.PCH_PIC_MASK, 8) == 0
        assert await c0.mmio_read(new + abi.PCH_PIC_MASK, 8) == U64


# --- 6. IRQ_LINE: kvm_vm_ioctl_irq_line -> kvm_set_irq -> pch_pic_set_irq ----------------------


@pytest.mark.parametrize("level", [1, 2, 0x8000_0000, abi.U32_MAX, -1])
async def test_irq_line_any_non_zero_level_raises_the_pin(daemon: Daemon, level: int) -> None:
    """pch_pic_set_irq: ``if (level) s->irr |= mask``; level 0 lowers a level pin."""
    async with open_kvm(daemon.config.socket) as kvm:
        vm = await vm_with(kvm, (IPI, EIO, PCH))
        pch = await vm.open_device(PCH)
        await vm.irq_line(5, level)
        irr = abi.KVM_DEV_LOONGARCH_PCH_PIC_GRP_REGS, abi.PCH_PIC_INT_IRR
        assert await pch.get_attr(*irr) == 1 << 5
        await vm.irq_line(5, 0)
        assert await pch.get_attr(*irr) == 0


async def test_irq_line_decisions_kept_by_the_contract(daemon: Daemon) -> None:
    """gsi >= 64 stays EINVAL (PROTOCOL.md §4; the kernel's kvm_set_irq finds no route and
    returns 0), and a level no __u32 holds is EINVAL: SEMANTICS decision 10."""
    async with open_kvm(daemon.config.socket) as kvm:
        vm = await vm_with(kvm, (IPI, EIO, PCH))
        pch = await vm.open_device(PCH)
        for gsi in (64, 4095):
            await expect_errno("EINVAL", vm.irq_line(gsi, 1))
        for level in (1 << 32, -(1 << 31) - 1):
            await expect_errno("EINVAL", vm.irq_line(5, level))
        assert await pch.get_attr(abi.KVM_DEV_LOONGARCH_PCH_PIC_GRP_REGS, abi.PCH_PIC_INT_IRR) == 0
