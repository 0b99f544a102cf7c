"""Conformance of PV IPI, the IPI device, EIOINTC and PCH-PIC/MSI through the client.

SEMANTICS.md §13 cases 14-40 (with §7-§10 and the "Decisions for lvz"), each checked against a
real daemon over a real Unix socket, where every physical CPUID goes through the VM's real phyid
map. vcpu_ids and phyids differ on purpose so that a chip addressing vCPUs by the wrong key
fails. What is asserted is what a VMM or guest can see: ESTAT via ONE_REG, ``irq`` events (the
vCPU, line and level of each change, in order), guest IOCSR/MMIO loads (sign-extended, decision
7), device attrs and errno names. Tests are named ``test_case_NN_...`` after the §13 case.
Register offsets and attr numbers are spelled from the spec, not imported from the chips.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable

import pytest
import trio

from lvz.clients import AsyncDevice, AsyncKvm, AsyncVcpu, AsyncVm, IrqEvent, KvmError, open_kvm
from lvz.daemon.server import Daemon

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
ESTAT = 0x9030000000010028
CPUID = 0x9030000000010100
CSR_ESTAT = 0x5
INT_SWI0, INT_HWI0, INT_IPI = 0, 2, 12

# PV IPI (§7) and the PV feature word (§5).
HCALL_SERVICE, FUNC_IPI = 0x100, 1
VCPU_CPUCFG, CPUCFG_KVM_FEATURE, FEATURE_IPI_BIT = 0, 0x40000004, 1 << 1

# IPI device (§8), IOCSR addresses.
IPI, EIOINTC, PCHPIC = "loongarch-ipi", "loongarch-eiointc", "loongarch-pchpic"
#: What a VM needs for KVM_SIGNAL_MSI: kvm_send_userspace_msi (virt/kvm/irqchip.c) is EINVAL
#: unless kvm_arch_irqchip_in_kernel (arch/loongarch/kvm/vm.c): IPI, EIOINTC and PCH-PIC all
#: created. The EIOINTC tests below drive irqs by MSI, so they create all three.
MSI_CHIPS = (IPI, EIOINTC, PCHPIC)
IPI_STATUS, IPI_EN, IPI_SET, IPI_CLEAR, IPI_BUF = 0x1000, 0x1004, 0x1008, 0x100C, 0x1020
IPI_SEND, MAIL_SEND, ANY_SEND = 0x1040, 0x1048, 0x1158
IPI_GRP_REGS = 0x40000001

# EIOINTC (§9): guest IOCSR addresses, attr offsets and groups.
EIO_IPMAP, EIO_ENABLE, EIO_COREISR, EIO_COREMAP = 0x14C0, 0x1600, 0x1800, 0x1C00
EIO_FEATURES, EIO_CONFIG = 0x40000000, 0x40000004
EIO_OFF_ENABLE, EIO_OFF_ISR, EIO_OFF_COREISR, EIO_OFF_COREMAP = 0x200, 0x300, 0x400, 0x800
EIO_GRP_REGS, EIO_GRP_SW_STATUS, EIO_GRP_CTRL = 0x40000002, 0x40000003, 0x40000004
INIT_NUM_CPU, INIT_FEATURE, LOAD_FINISHED = 0, 1, 3
SW_NUM_CPU, SW_STATE = 0, 2
HAS_VIRT_EXTENSION, HAS_ENABLE_OPTION, HAS_INT_ENCODE, HAS_CPU_ENCODE = 1, 2, 4, 8
STATUS_ENABLE, STATUS_CPU_ENCODE = 1 << 1, 1 << 3

# PCH-PIC (§10): MMIO offsets from its base, attr groups.
PCH_BASE = 0x10000000
PCH_MASK, PCH_EDGE, PCH_CLEAR, PCH_HTMSI_VEC = 0x20, 0x60, 0x80, 0x200
PCH_IRR, PCH_ISR = 0x380, 0x3A0
PCH_GRP_REGS, PCH_GRP_CTRL = 0x40000005, 0x40000006

#: The longest a drain waits for one more event after the last one it found. Events a request
#: causes reach the client before its response (PROTOCOL §5), so this only bounds the quiet tail.
QUIET = 0.005

Line = tuple[int, int, int]  # (vcpu_id, irq, level)


# --- helpers -------------------------------------------------------------------------------------


class Guest:
    """A VM under test: its vCPUs by vcpu_id, its devices by type, its event stream."""

    def __init__(
        self, vm: AsyncVm, vcpus: dict[int, AsyncVcpu], devices: dict[str, AsyncDevice]
    ) -> None:
        self.vm = vm
        self.v = vcpus
        self.dev = devices
        self.last_seq: int | None = None

    async def drain(self) -> list[Line]:
        """Every event queued so far, as (vcpu_id, irq, level); seq must have no gaps."""
        out: list[Line] = []
        while True:
            ev = None
            with trio.move_on_after(QUIET):
                ev = await self.vm.next_event()
            if ev is None:
                return out
            assert isinstance(ev, IrqEvent), ev  # EventsLost: the daemon dropped events
            if self.last_seq is not None:
                assert ev.seq == self.last_seq + 1, f"event gap before {ev}"
            self.last_seq = ev.seq
            out.append((ev.vcpu_id, ev.irq, ev.level))

    async def estat(self, vcpu_id: int) -> int:
        return await self.v[vcpu_id].get_one_reg(ESTAT)

    async def estats(self) -> dict[int, int]:
        return {vid: await vcpu.get_one_reg(ESTAT) for vid, vcpu in self.v.items()}

    @property
    def any(self) -> AsyncVcpu:
        """Some vCPU, for guest accesses to global registers."""
        return next(iter(self.v.values()))


async def make_guest(
    kvm: AsyncKvm,
    phyids: dict[int, int | None],
    devices: Iterable[str] = (),
    *,
    max_phyid: int | None = None,
) -> Guest:
    """vcpu_id -> phyid (None: left unset); devices created after the vCPUs; subscribed."""
    vm = await kvm.create_vm(max_phyid=max_phyid)
    vcpus: dict[int, AsyncVcpu] = {}
    for vcpu_id, phyid in phyids.items():
        vcpus[vcpu_id] = await vm.create_vcpu(vcpu_id)
        if phyid is not None:
            await vcpus[vcpu_id].set_one_reg(CPUID, phyid)
    devs = {t: await vm.create_device(t) for t in devices}
    if PCHPIC in devs:
        await devs[PCHPIC].set_attr(PCH_GRP_CTRL, 0, PCH_BASE)
    await vm.subscribe()
    return Guest(vm, vcpus, devs)


async def expect_errno(name: str, call: Awaitable[object]) -> None:
    with pytest.raises(KvmError) as info:
        await call
    assert info.value.name == name, info.value


def sext(value: int, size: int) -> int:
    """What a guest load of ``size`` bytes leaves in the 64-bit register (decision 7)."""
    bits = 8 * size
    value &= (1 << bits) - 1
    return value | (U64 ^ ((1 << bits) - 1)) if value >> (bits - 1) else value


def bits(*numbers: int) -> int:
    return sum(1 << n for n in set(numbers))


async def pv_ipi(vcpu: AsyncVcpu, a1: int, a2: int, a3: int) -> int:
    return await vcpu.hypercall(HCALL_SERVICE, FUNC_IPI, a1, a2, a3)


def send_data(cpu: int, low: int = 0, payload: int = 0, keep: int = 0) -> int:
    """A SEND register value: cpu field bits 16.., byte-keep mask bits 27..30, payload >> 32."""
    return (payload << 32) | (keep << 27) | (cpu << 16) | low


async def eio_enable(g: Guest, *irqs: int, on: bool = True) -> None:
    """Guest byte stores to ENABLE, read-modify-write (a byte load comes back sign-extended)."""
    for irq in irqs:
        addr = EIO_ENABLE + irq // 8
        old = await g.any.iocsr_read(addr, 1) & 0xFF
        new = old | (1 << irq % 8) if on else old & ~(1 << irq % 8)
        await g.any.iocsr_write(addr, 1, new)


async def coremap(g: Guest, irq: int, byte: int) -> None:
    await g.any.iocsr_write(EIO_COREMAP + irq, 1, byte)


async def guest_coreisr(vcpu: AsyncVcpu) -> int:
    """The 256-bit COREISR as ``vcpu`` reads it (its own)."""
    words = [await vcpu.iocsr_read(EIO_COREISR + 8 * k, 8) & U64 for k in range(4)]
    return sum(w << (64 * k) for k, w in enumerate(words))


async def eio_isr(g: Guest) -> int:
    """EIOINTC's global ISR (attr-only): eight 4-byte attrs."""
    dev = g.dev[EIOINTC]
    words = [await dev.get_attr(EIO_GRP_REGS, EIO_OFF_ISR + 4 * k) for k in range(8)]
    return sum(w << (32 * k) for k, w in enumerate(words))


async def w1c_coreisr(vcpu: AsyncVcpu, irq: int) -> None:
    await vcpu.iocsr_write(EIO_COREISR + 4 * (irq // 32), 4, 1 << irq % 32)


# === PV IPI (cases 14-20) ========================================================================


async def test_case_14_pv_ipi_single_target_raises_swi0(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {0: 10, 1: 20, 2: 30})
        assert await pv_ipi(g.v[0], 1, 0, 20) == 0
        assert await g.drain() == [(1, INT_SWI0, 1)]
        assert await g.estats() == {0: 0, 1: 1 << INT_SWI0, 2: 0}
        # The host never lowers SWI0; a second IPI while it is up changes nothing.
        assert await pv_ipi(g.v[2], 1, 0, 20) == 0
        assert await g.drain() == []
        # The guest acknowledges (clear_csr_estat), and the next IPI raises again.
        await g.v[1].csr_xchg(CSR_ESTAT, 0, 1 << INT_SWI0)
        assert await g.drain() == [(1, INT_SWI0, 0)]
        assert await pv_ipi(g.v[0], 1, 0, 20) == 0
        assert await g.drain() == [(1, INT_SWI0, 1)]


async def test_case_15_pv_ipi_bitmap_with_holes_across_a1_and_a2(daemon: Daemon) -> None:
    base = 100
    layout: dict[int, int | None] = {
        0: base,
        1: base + 5,
        2: base + 63,
        3: base + 64,
        4: base + 64 + 7,
        5: base + 127,
        6: base + 3,
        7: base + 128,
        8: base - 1,  # a hole, past the bitmap, below the base
    }
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, layout)
        a1, a2 = bits(0, 5, 63), bits(0, 7, 63)
        assert await pv_ipi(g.v[8], a1, a2, base) == 0
        # One SWI0 per target, in ascending CPUID order (the kernel walks bits upwards).
        assert await g.drain() == [(vid, INT_SWI0, 1) for vid in range(6)]
        hit = dict.fromkeys(range(6), 1 << INT_SWI0)
        assert await g.estats() == {**dict.fromkeys(layout, 0), **hit}


async def test_case_16_pv_ipi_skips_unmapped_and_out_of_range_targets(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {0: 250, 1: 10, 2: None})
        # 250..377: only 250 is mapped; 251..255 are free, 256.. are beyond the limit.
        assert await pv_ipi(g.v[1], U64, U64, 250) == 0
        assert await g.drain() == [(0, INT_SWI0, 1)]
        assert await pv_ipi(g.v[1], U64, U64, 256) == 0  # everything >= 256
        assert await pv_ipi(g.v[1], bits(0, 1), 0, 5) == 0  # 5, 6: nobody holds them
        assert await g.drain() == []
        assert await g.estats() == {0: 1 << INT_SWI0, 1: 0, 2: 0}


async def test_case_17_pv_ipi_self_included(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {0: 4, 1: 5})
        assert await pv_ipi(g.v[0], 0b11, 0, 4) == 0
        assert await g.drain() == [(0, INT_SWI0, 1), (1, INT_SWI0, 1)]
        assert await g.estats() == {0: 1, 1: 1}


async def test_case_18_pv_ipi_base_wraps_as_u32_and_negative_ids_find_nobody(
    daemon: Daemon,
) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {7: 0, 8: 63, 9: 5, 3: 1})
        ack = g.v[7].csr_xchg
        # 0xFFFFFFFF + 1 wraps to CPUID 0.
        assert await pv_ipi(g.v[3], 0b10, 0, 0xFFFFFFFF) == 0
        assert await g.drain() == [(7, INT_SWI0, 1)]
        await ack(CSR_ESTAT, 0, 1)
        assert await g.drain() == [(7, INT_SWI0, 0)]
        # Bit 0 alone is 0xFFFFFFFF (negative: nobody); a2's base is 0xFFFFFFFF + 64 = 63.
        assert await pv_ipi(g.v[3], 0b1, 0b1, 0xFFFFFFFF) == 0
        assert await g.drain() == [(8, INT_SWI0, 1)]
        # A base of 0x80000000 is negative as an int: the whole bitmap finds nobody.
        assert await pv_ipi(g.v[3], U64, U64, 0x80000000) == 0
        assert await g.drain() == []
        # a3 is truncated to 32 bits: 2**32 + 5 is 5.
        assert await pv_ipi(g.v[3], 0b1, 0, 2**32 + 5) == 0
        assert await g.drain() == [(9, INT_SWI0, 1)]
        # Bit 63 of a1 from 0xFFFFFFC1 wraps to 0; bit 62 is 0xFFFFFFFF (nobody).
        assert await pv_ipi(g.v[3], bits(62, 63), 0, 0xFFFFFFC1) == 0
        assert await g.drain() == [(7, INT_SWI0, 1)]
        assert await g.estats() == {7: 1, 8: 1, 9: 1, 3: 0}


async def test_case_19_pv_ipi_without_feature_is_invalid_code_and_sends_nothing(
    daemon: Daemon,
) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        on = await make_guest(kvm, {0: 0, 1: 1})
        off = await make_guest(kvm, {0: 0, 1: 1})
        assert await off.v[0].get_attr(VCPU_CPUCFG, CPUCFG_KVM_FEATURE) & FEATURE_IPI_BIT
        await off.v[0].set_attr(VCPU_CPUCFG, CPUCFG_KVM_FEATURE, 0)
        assert await off.v[1].get_attr(VCPU_CPUCFG, CPUCFG_KVM_FEATURE) == 0  # VM-wide
        assert await pv_ipi(off.v[0], 0b11, 0, 0) == -1
        assert await off.drain() == []
        assert await off.estats() == {0: 0, 1: 0}
        # The same call on a VM that kept the feature is delivered.
        assert await pv_ipi(on.v[0], 0b11, 0, 0) == 0
        assert await on.drain() == [(0, INT_SWI0, 1), (1, INT_SWI0, 1)]


async def test_case_20_pv_ipi_empty_bitmap_sends_nothing(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {0: 0, 1: 5})
        for a3 in (0, 5, 0xFFFFFFFF):
            assert await pv_ipi(g.v[0], 0, 0, a3) == 0
        assert await g.drain() == []
        assert await g.estats() == {0: 0, 1: 0}


# === IPI device (cases 21-26) ====================================================================


async def ipi_status(vcpu: AsyncVcpu) -> int:
    return await vcpu.iocsr_read(IPI_STATUS, 4) & U32


async def test_case_21_ipi_send_raises_once_and_clear_to_zero_lowers(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {0: 3, 1: 7}, [IPI])
        assert await g.v[1].iocsr_read(IPI_EN, 4) == 0  # EN is 0 and never consulted
        await g.v[0].iocsr_write(IPI_SEND, 4, send_data(7, 5))
        assert await g.drain() == [(1, INT_IPI, 1)]
        assert await g.estats() == {0: 0, 1: 1 << INT_IPI}
        assert (await ipi_status(g.v[1]), await ipi_status(g.v[0])) == (1 << 5, 0)
        # A second vector while STATUS != 0: merged, no re-raise.
        await g.v[0].iocsr_write(IPI_SEND, 4, send_data(7, 9))
        assert await g.drain() == []
        assert await ipi_status(g.v[1]) == bits(5, 9)
        # CLEAR of one of two bits keeps the line; clearing the last lowers it.
        await g.v[1].iocsr_write(IPI_CLEAR, 4, 1 << 5)
        assert await g.drain() == []
        assert await g.estat(1) == 1 << INT_IPI
        await g.v[1].iocsr_write(IPI_CLEAR, 4, 1 << 9)
        assert await g.drain() == [(1, INT_IPI, 0)]
        assert await g.estat(1) == 0
        # EN has no effect: set all, clear all, delivery is the same either way.
        await g.v[1].iocsr_write(IPI_EN, 4, U32)
        assert await g.v[1].iocsr_read(IPI_EN, 4) == sext(U32, 4)
        await g.v[1].iocsr_write(IPI_EN, 4, 0)
        await g.v[0].iocsr_write(IPI_SEND, 4, send_data(7, 0))
        assert await g.drain() == [(1, INT_IPI, 1)]
        await g.v[1].iocsr_write(IPI_EN, 4, 0)
        assert await g.drain() == []
        # IOCSR_IPI_SET (newest) is a self-IPI of the accessing vCPU.
        await g.v[0].iocsr_write(IPI_SET, 4, 1 << 3)
        assert await g.drain() == [(0, INT_IPI, 1)]
        assert await ipi_status(g.v[0]) == 1 << 3


async def test_case_22_ipi_send_to_unmapped_or_out_of_range_cpu_is_ignored(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {0: 3, 1: 255, 2: None}, [IPI])
        for cpu in (256, 300, 1023, 4, 0, 254):
            await g.v[0].iocsr_write(IPI_SEND, 4, send_data(cpu, 1))
        assert await g.drain() == []
        dev = g.dev[IPI]
        assert [await dev.get_attr(IPI_GRP_REGS, vid << 16) for vid in (0, 1, 2)] == [0, 0, 0]
        await g.v[0].iocsr_write(IPI_SEND, 4, send_data(255, 1))  # the control: 255 works
        assert await g.drain() == [(1, INT_IPI, 1)]


async def test_case_22_ipi_cpu_field_is_10_bits_and_follows_max_phyid(daemon: Daemon) -> None:
    """With max_phyid 4096 (decision 4), phyid 300 is reachable; 1027 aliases to 3 (10 bits)."""
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {0: 300, 1: 3, 2: 1027}, [IPI], max_phyid=4096)
        await g.v[1].iocsr_write(IPI_SEND, 4, send_data(300, 4))
        assert await g.drain() == [(0, INT_IPI, 1)]
        assert await ipi_status(g.v[0]) == 1 << 4
        await g.v[0].iocsr_write(IPI_SEND, 4, send_data(1027, 2))
        assert await g.drain() == [(1, INT_IPI, 1)]
        assert await ipi_status(g.v[1]) == 1 << 2
        assert await ipi_status(g.v[2]) == 0
        assert await g.estat(2) == 0


async def test_case_23_mail_send_writes_the_targets_mailbox_with_byte_mask(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {0: 3, 1: 7}, [IPI])
        src, dst = g.v[0], g.v[1]
        # A 32-bit store: the payload is the upper half of the 64-bit source register.
        await src.iocsr_write(MAIL_SEND, 4, send_data(7, 5 << 2, payload=0x11223344))
        assert await dst.iocsr_read(IPI_BUF + 4 * 5, 4) == 0x11223344
        assert await src.iocsr_read(IPI_BUF + 4 * 5, 4) == 0
        # Keep bytes 0 and 2 (mask bits 27, 29): only bytes 1 and 3 take the payload.
        await src.iocsr_write(MAIL_SEND, 4, send_data(7, 5 << 2, 0xAABBCCDD, keep=0b0101))
        assert await dst.iocsr_read(IPI_BUF + 4 * 5, 4) == sext(0xAA22CC44, 4)
        assert await g.dev[IPI].get_attr(IPI_GRP_REGS, (1 << 16) | 0x30) == 0xAA22CC44 << 32
        # Mailbox 0 and mailbox 7 (the last slot, 0x3c).
        await src.iocsr_write(MAIL_SEND, 8, send_data(7, 0 << 2, payload=0x01020304))
        await src.iocsr_write(MAIL_SEND, 4, send_data(7, 7 << 2, payload=0x0A0B0C0D))
        assert await dst.iocsr_read(IPI_BUF, 4) == 0x01020304
        assert await dst.iocsr_read(IPI_BUF + 0x18, 8) == 0x0A0B0C0D << 32
        # To nobody: ignored, no error, nothing changes anywhere.
        before = [
            await g.dev[IPI].get_attr(IPI_GRP_REGS, (v << 16) | off)
            for v in (0, 1)
            for off in (0x20, 0x28, 0x30, 0x38)
        ]
        await src.iocsr_write(MAIL_SEND, 4, send_data(8, 0, payload=U32))
        await src.iocsr_write(MAIL_SEND, 4, send_data(256 + 7, 0, payload=U32))
        after = [
            await g.dev[IPI].get_attr(IPI_GRP_REGS, (v << 16) | off)
            for v in (0, 1)
            for off in (0x20, 0x28, 0x30, 0x38)
        ]
        assert after == before
        assert await g.drain() == []  # mail alone raises no interrupt


async def test_case_24_any_send_to_ipi_set_is_an_ipi(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {0: 3, 1: 7, 2: 9}, [IPI])
        await g.v[0].iocsr_write(ANY_SEND, 4, send_data(7, IPI_SET, payload=1 << 4))
        await g.v[0].iocsr_write(IPI_SEND, 4, send_data(9, 4))
        assert await g.drain() == [(1, INT_IPI, 1), (2, INT_IPI, 1)]
        assert (await ipi_status(g.v[1]), await ipi_status(g.v[2])) == (1 << 4, 1 << 4)
        assert await ipi_status(g.v[0]) == 0  # dispatched as the target, not the sender
        # Any address, as the target: its mailbox 0, then with byte 3 kept.
        await g.v[0].iocsr_write(ANY_SEND, 4, send_data(7, IPI_BUF, payload=0xDEADBEEF))
        assert await g.v[1].iocsr_read(IPI_BUF, 4) == sext(0xDEADBEEF, 4)
        assert await g.v[0].iocsr_read(IPI_BUF, 4) == 0
        await g.v[0].iocsr_write(ANY_SEND, 4, send_data(7, IPI_BUF, 0x11223344, keep=0b1000))
        assert await g.v[1].iocsr_read(IPI_BUF, 4) == sext(0xDE223344, 4)
        # An address nobody claims, or a target nobody holds: ignored without error.
        await g.v[0].iocsr_write(ANY_SEND, 4, send_data(7, 0x0F00, payload=1))
        await g.v[0].iocsr_write(ANY_SEND, 4, send_data(8, IPI_SET, payload=1))
        assert await g.drain() == []
        assert await ipi_status(g.v[0]) == 0


async def test_case_25_ipi_attr_addresses_vcpu_id_not_phyid(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {0: 5, 5: 0}, [IPI])
        dev = g.dev[IPI]
        await g.v[5].iocsr_write(IPI_SEND, 4, send_data(5, 2))  # phyid 5 = vcpu_id 0
        assert await g.drain() == [(0, INT_IPI, 1)]
        assert await dev.get_attr(IPI_GRP_REGS, (0 << 16) | 0x0) == 1 << 2
        assert await dev.get_attr(IPI_GRP_REGS, (5 << 16) | 0x0) == 0
        # An 8-byte mailbox attr lands in vcpu_id 5's buffer.
        await dev.set_attr(IPI_GRP_REGS, (5 << 16) | 0x20, 0x1122334455667788)
        assert await g.v[5].iocsr_read(IPI_BUF, 8) == 0x1122334455667788
        assert await g.v[0].iocsr_read(IPI_BUF, 8) == 0
        # STATUS by attr is a raw copy: the guest sees it, the line does not move.
        await dev.set_attr(IPI_GRP_REGS, (5 << 16) | 0x0, 1)
        assert await ipi_status(g.v[5]) == 1
        assert await g.drain() == []
        assert await g.estat(5) == 0
        # vcpu_ids that do not exist (1 and 3), and offsets that name no register.
        for attr in ((3 << 16) | 0x0, (1 << 16) | 0x20):
            await expect_errno("EINVAL", dev.get_attr(IPI_GRP_REGS, attr))
            await expect_errno("EINVAL", dev.set_attr(IPI_GRP_REGS, attr, 0))
        for off in (0x10, 0x24, 0x40, 0x48, 0x58):
            await expect_errno("EINVAL", dev.get_attr(IPI_GRP_REGS, off))
        await expect_errno("EINVAL", dev.get_attr(0x40000002, 0))
        # Widths: STATUS is 4 bytes, a mailbox attr 8.
        await expect_errno("EINVAL", dev.set_attr(IPI_GRP_REGS, 0x0, 1 << 32))
        await dev.set_attr(IPI_GRP_REGS, 0x38, U64)
        assert await dev.get_attr(IPI_GRP_REGS, 0x38) == U64
        assert await dev.get_attr(IPI_GRP_REGS, 0x0) == 1 << 2  # the refused set changed nothing


async def test_case_26_unaligned_or_unknown_ipi_accesses_read_zero_and_ignore_writes(
    daemon: Daemon,
) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {0: 0}, [IPI])
        v = g.v[0]
        word = 0x8899AABBCCDDEEFF
        await g.dev[IPI].set_attr(IPI_GRP_REGS, 0x20, word)
        for addr, size in (
            (0x1021, 2),
            (0x1022, 4),
            (0x1024, 8),
            (0x1004, 8),
            (0x1010, 4),
            (0x1018, 8),
            (0x1100, 4),
            (0x1040, 4),
            (IPI_SET, 4),
            (IPI_CLEAR, 4),
        ):
            assert await v.iocsr_read(addr, size) == 0, hex(addr)
        # Aligned loads come back sign-extended from the access width (decision 7).
        assert await v.iocsr_read(0x1020, 1) == U64
        assert await v.iocsr_read(0x1020, 2) == sext(0xEEFF, 2)
        assert await v.iocsr_read(0x1024, 4) == sext(0x8899AABB, 4)
        assert await v.iocsr_read(0x1020, 8) == word
        # Writes that are unaligned, to undecoded offsets, or to read-only STATUS: ignored.
        await v.iocsr_write(0x1021, 2, 0)
        await v.iocsr_write(0x100A, 4, 1)  # an unaligned SET
        await v.iocsr_write(0x1010, 4, 1)
        await v.iocsr_write(IPI_STATUS, 4, 0xFF)
        assert await g.dev[IPI].get_attr(IPI_GRP_REGS, 0x20) == word
        assert await ipi_status(v) == 0
        assert await g.drain() == []
        # Status bit 31 reads back sign-extended as well.
        await v.iocsr_write(IPI_SET, 4, 1 << 31)
        assert await v.iocsr_read(IPI_STATUS, 4) == sext(1 << 31, 4)
        assert await g.drain() == [(0, INT_IPI, 1)]


# === EIOINTC (cases 27-35) =======================================================================

COREMAP_BITMAP = [  # coremap byte -> physical CPUID, bitmap mode (§13 case 27)
    (0x00, 0),
    (0x01, 0),
    (0x02, 1),
    (0x04, 2),
    (0x08, 3),
    (0x10, 0),
    (0x20, 0),
    (0x40, 0),
    (0x80, 0),
    (0x0C, 2),
    (0x03, 0),
    (0x06, 1),
    (0xF8, 3),
]


async def test_case_27_coremap_bitmap_decode_then_phyid_lookup(daemon: Daemon) -> None:
    phys = {10: 0, 11: 1, 12: 2, 13: 3}
    by_phyid = {p: v for v, p in phys.items()}
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, dict(phys), MSI_CHIPS)
        for irq, (byte, _) in enumerate(COREMAP_BITMAP):
            await coremap(g, irq, byte)
        await eio_enable(g, *range(len(COREMAP_BITMAP)))
        for irq in range(len(COREMAP_BITMAP)):
            await g.vm.signal_msi(0, irq)
        expected = dict.fromkeys(phys, 0)
        for irq, (_, phyid) in enumerate(COREMAP_BITMAP):
            expected[by_phyid[phyid]] |= 1 << irq
        assert {v: await guest_coreisr(g.v[v]) for v in phys} == expected
        # One HWI0 assert per vCPU (shared line), in delivery order.
        assert await g.drain() == [(v, INT_HWI0, 1) for v in (10, 11, 12, 13)]


async def test_case_28_cpu_encode_mode_and_unmapped_phyid_keeps_route(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {0: 200, 3: 150, 4: 17}, MSI_CHIPS)
        dev = g.dev[EIOINTC]
        await dev.set_attr(EIO_GRP_CTRL, INIT_FEATURE, HAS_VIRT_EXTENSION | HAS_CPU_ENCODE)
        await g.any.iocsr_write(EIO_CONFIG, 4, STATUS_CPU_ENCODE)
        assert await g.any.iocsr_read(EIO_CONFIG, 4) == STATUS_CPU_ENCODE
        assert await g.any.iocsr_read(EIO_FEATURES, 4) == HAS_VIRT_EXTENSION | HAS_CPU_ENCODE
        assert await dev.get_attr(EIO_GRP_SW_STATUS, SW_STATE) == STATUS_CPU_ENCODE
        await coremap(g, 5, 150)  # the byte is the CPUID (bitmap mode would say CPUID 1)
        await coremap(g, 6, 42)  # nobody: stays on vcpu_id 0, the initial route
        await coremap(g, 7, 17)
        await coremap(g, 7, 99)  # nobody: stays on vcpu_id 4
        await coremap(g, 8, 200)
        await coremap(g, 40, 255)  # nobody, top of the range
        await eio_enable(g, 5, 6, 7, 8, 40)
        for irq in (5, 6, 7, 8, 40):
            await g.vm.signal_msi(0, irq)
        assert {v: await guest_coreisr(g.v[v]) for v in (0, 3, 4)} == {
            0: bits(6, 8, 40),
            3: bits(5),
            4: bits(7),
        }
        assert await g.drain() == [(3, INT_HWI0, 1), (0, INT_HWI0, 1), (4, INT_HWI0, 1)]


async def test_case_28_bitmap_mode_unmapped_phyid_keeps_route(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {0: 3, 1: 0}, MSI_CHIPS)
        await coremap(g, 1, 0x04)  # CPUID 2: nobody, stays on vcpu_id 0
        await coremap(g, 2, 0x01)  # CPUID 0 = vcpu_id 1
        await coremap(g, 2, 0x04)  # CPUID 2: nobody, stays on vcpu_id 1
        await eio_enable(g, 1, 2)
        await g.vm.signal_msi(0, 1)
        await g.vm.signal_msi(0, 2)
        assert (await guest_coreisr(g.v[0]), await guest_coreisr(g.v[1])) == (bits(1), bits(2))
        assert await g.drain() == [(0, INT_HWI0, 1), (1, INT_HWI0, 1)]


async def test_case_29_moving_a_pending_irq_moves_the_line(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {4: 0, 9: 1}, MSI_CHIPS)
        await coremap(g, 20, 0x01)  # CPUID 0 = vcpu_id 4
        await eio_enable(g, 20)
        await g.vm.signal_msi(0, 20)
        assert await g.drain() == [(4, INT_HWI0, 1)]
        await coremap(g, 20, 0x02)  # CPUID 1 = vcpu_id 9
        assert await g.drain() == [(4, INT_HWI0, 0), (9, INT_HWI0, 1)]
        assert (await g.estat(4), await g.estat(9)) == (0, 1 << INT_HWI0)
        assert (await guest_coreisr(g.v[4]), await guest_coreisr(g.v[9])) == (0, bits(20))
        # Rewriting the same route is no move.
        await coremap(g, 20, 0x02)
        assert await g.drain() == []


IPMAP_BITMAP = [  # ipmap byte -> ip (HWI0 + ip), bitmap mode (§13 case 30)
    (0x00, 0),
    (0x01, 0),
    (0x02, 1),
    (0x04, 2),
    (0x08, 3),
    (0x10, 0),
    (0x80, 0),
    (0x06, 1),
]


@pytest.mark.parametrize(
    ("group", "byte", "ip"),
    [(k, b, ip) for k, (b, ip) in enumerate(IPMAP_BITMAP)],
    ids=[f"{b:#04x}" for b, _ in IPMAP_BITMAP],
)
async def test_case_30_ipmap_bitmap_decode(daemon: Daemon, group: int, byte: int, ip: int) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {0: 0}, MSI_CHIPS)
        irq = 32 * group + 1
        await g.any.iocsr_write(EIO_IPMAP + group, 1, byte)
        await eio_enable(g, irq)
        await g.vm.signal_msi(0, irq)
        assert await g.drain() == [(0, INT_HWI0 + ip, 1)]
        assert await g.estat(0) == 1 << (INT_HWI0 + ip)
        await w1c_coreisr(g.v[0], irq)
        assert await g.drain() == [(0, INT_HWI0 + ip, 0)]


async def test_case_31_shared_line_asserts_once_deasserts_after_both_cleared(
    daemon: Daemon,
) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {0: 0}, MSI_CHIPS)
        await g.any.iocsr_write(EIO_IPMAP + 1, 1, 0x02)  # irqs 32..63 on HWI1
        await eio_enable(g, 3, 4, 33)
        await g.vm.signal_msi(0, 3)
        assert await g.drain() == [(0, INT_HWI0, 1)]
        await g.vm.signal_msi(0, 4)
        assert await g.drain() == []
        await g.vm.signal_msi(0, 33)  # another ip: a line of its own
        assert await g.drain() == [(0, INT_HWI0 + 1, 1)]
        assert await guest_coreisr(g.v[0]) == bits(3, 4, 33)
        await w1c_coreisr(g.v[0], 3)
        assert await g.drain() == []
        assert await g.estat(0) == bits(INT_HWI0, INT_HWI0 + 1)
        await w1c_coreisr(g.v[0], 4)
        assert await g.drain() == [(0, INT_HWI0, 0)]
        assert await guest_coreisr(g.v[0]) == bits(33)
        # W1C of a bit that is already clear changes nothing.
        await w1c_coreisr(g.v[0], 4)
        assert await g.drain() == []


async def test_case_32_enable_delivers_and_undelivers_a_pending_irq(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {0: 0}, MSI_CHIPS)
        await g.vm.signal_msi(0, 50)  # disabled: ISR only
        assert await g.drain() == []
        assert await eio_isr(g) == bits(50)
        assert await guest_coreisr(g.v[0]) == 0
        await eio_enable(g, 50)
        assert await g.drain() == [(0, INT_HWI0, 1)]
        assert await guest_coreisr(g.v[0]) == bits(50)
        await eio_enable(g, 50, on=False)
        assert await g.drain() == [(0, INT_HWI0, 0)]
        assert await guest_coreisr(g.v[0]) == 0
        assert await eio_isr(g) == bits(50)  # MSI set ISR and nothing clears it
        await eio_enable(g, 50)
        assert await g.drain() == [(0, INT_HWI0, 1)]


async def test_case_33_config_is_locked_while_enabled_except_for_zero(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {0: 0}, MSI_CHIPS)
        dev = g.dev[EIOINTC]
        features = HAS_VIRT_EXTENSION | HAS_ENABLE_OPTION | HAS_INT_ENCODE | HAS_CPU_ENCODE
        await dev.set_attr(EIO_GRP_CTRL, INIT_FEATURE, features)
        assert await dev.get_attr(EIO_GRP_SW_STATUS, SW_STATE) == 0
        config = g.any

        async def status() -> int:
            value = await config.iocsr_read(EIO_CONFIG, 4)
            assert value == await dev.get_attr(EIO_GRP_SW_STATUS, SW_STATE)
            return value

        await config.iocsr_write(EIO_CONFIG, 4, STATUS_ENABLE | STATUS_CPU_ENCODE)
        assert await status() == STATUS_ENABLE | STATUS_CPU_ENCODE
        await config.iocsr_write(EIO_CONFIG, 4, 1 << 2)
        await config.iocsr_write(EIO_CONFIG, 4, 0xE)
        assert await status() == STATUS_ENABLE | STATUS_CPU_ENCODE  # locked
        await config.iocsr_write(EIO_CONFIG, 4, 0)
        assert await status() == 0  # 0 always gets through
        await config.iocsr_write(EIO_CONFIG, 4, 1 << 2)
        assert await status() == 1 << 2  # unlocked now

        # Without the virt extension, INIT_FEATURE turns ENABLE on: CONFIG is locked at once,
        # and a write is filtered by the features in any case.
        h = await make_guest(kvm, {0: 0}, MSI_CHIPS)
        hdev = h.dev[EIOINTC]
        await hdev.set_attr(EIO_GRP_CTRL, INIT_FEATURE, 0)
        assert await hdev.get_attr(EIO_GRP_SW_STATUS, SW_STATE) == STATUS_ENABLE
        await h.any.iocsr_write(EIO_CONFIG, 4, STATUS_CPU_ENCODE)
        assert await hdev.get_attr(EIO_GRP_SW_STATUS, SW_STATE) == STATUS_ENABLE


async def test_case_34_init_num_cpu_limit_and_coreisr_attr_range(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {3: 0, 0: 1}, MSI_CHIPS)
        dev = g.dev[EIOINTC]
        await expect_errno("EINVAL", dev.set_attr(EIO_GRP_CTRL, INIT_NUM_CPU, 257))
        assert await dev.get_attr(EIO_GRP_SW_STATUS, SW_NUM_CPU) == 0
        await dev.set_attr(EIO_GRP_CTRL, INIT_NUM_CPU, 256)
        assert await dev.get_attr(EIO_GRP_SW_STATUS, SW_NUM_CPU) == 256
        await dev.set_attr(EIO_GRP_CTRL, INIT_NUM_CPU, 4)
        assert await dev.get_attr(EIO_GRP_SW_STATUS, SW_NUM_CPU) == 4
        # COREISR attrs are per vcpu_id below num_cpu.
        await expect_errno("EINVAL", dev.get_attr(EIO_GRP_REGS, (4 << 16) | EIO_OFF_COREISR))
        await expect_errno("EINVAL", dev.set_attr(EIO_GRP_REGS, (4 << 16) | EIO_OFF_COREISR, 0))
        await coremap(g, 2, 0x01)  # CPUID 0 = vcpu_id 3
        await eio_enable(g, 2)
        await g.vm.signal_msi(0, 2)
        assert await dev.get_attr(EIO_GRP_REGS, (3 << 16) | EIO_OFF_COREISR) == bits(2)
        assert await dev.get_attr(EIO_GRP_REGS, (0 << 16) | EIO_OFF_COREISR) == 0


async def test_case_35_load_finished_decodes_the_coremap_byte(daemon: Daemon) -> None:
    """Decision 6: the sw_coreisr rebuild uses the decoded byte, not the raw byte as a CPUID.

    irq 9's byte 0x01 decodes to CPUID 0 (vcpu_id 7) but is CPUID 1 (vcpu_id 8) raw; irq 10's
    byte 0x00 is CPUID 0 either way. Both are restored pending on vcpu_id 7's HWI0. Decoded, the
    line is shared by both and stays up until both are cleared; with the raw-byte quirk it would
    fall as soon as irq 10 is.
    """
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {7: 0, 8: 1}, MSI_CHIPS)
        dev = g.dev[EIOINTC]
        await dev.set_attr(EIO_GRP_CTRL, INIT_NUM_CPU, 16)
        pending = bits(9, 10)
        await dev.set_attr(EIO_GRP_REGS, EIO_OFF_COREMAP + 8, 0x01 << 8)  # irqs 8..11
        await dev.set_attr(EIO_GRP_REGS, EIO_OFF_ENABLE, pending)
        await dev.set_attr(EIO_GRP_REGS, EIO_OFF_ISR, pending)
        await dev.set_attr(EIO_GRP_REGS, (7 << 16) | EIO_OFF_COREISR, pending)
        await g.v[7].set_one_reg(ESTAT, 1 << INT_HWI0)  # the vCPU's own state, restored apart
        assert await g.drain() == [(7, INT_HWI0, 1)]
        await dev.set_attr(EIO_GRP_CTRL, LOAD_FINISHED, 0)
        assert await g.drain() == []  # the rebuild moves no line
        assert await guest_coreisr(g.v[7]) == pending
        await w1c_coreisr(g.v[7], 10)
        assert await g.drain() == []
        assert await g.estat(7) == 1 << INT_HWI0
        await w1c_coreisr(g.v[7], 9)
        assert await g.drain() == [(7, INT_HWI0, 0)]
        assert await g.estat(8) == 0


# === PCH-PIC and MSI (cases 36-40) ===============================================================

ALL_CHIPS = (IPI, EIOINTC, PCHPIC)


async def pch_reg(g: Guest, off: int) -> int:
    return await g.dev[PCHPIC].get_attr(PCH_GRP_REGS, off)


async def unmask(g: Guest, *pins: int) -> None:
    mask = await g.any.mmio_read(PCH_BASE + PCH_MASK, 8) & U64
    await g.any.mmio_write(PCH_BASE + PCH_MASK, 8, mask & ~bits(*pins))


async def test_case_36_level_pin_masked_by_default_unmask_delivers(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {0: 0}, ALL_CHIPS)
        await eio_enable(g, 5, 77)
        assert await g.any.mmio_read(PCH_BASE + PCH_MASK, 8) == U64  # all masked
        await g.vm.irq_line(5, 1)
        assert await g.drain() == []
        assert (await pch_reg(g, PCH_IRR), await pch_reg(g, PCH_ISR)) == (bits(5), 0)
        assert await eio_isr(g) == 0
        await unmask(g, 5)
        assert await g.drain() == [(0, INT_HWI0, 1)]
        assert (await pch_reg(g, PCH_ISR), await eio_isr(g)) == (bits(5), bits(5))
        await g.vm.irq_line(5, 0)  # a level pin follows its level
        assert await g.drain() == [(0, INT_HWI0, 0)]
        assert (await pch_reg(g, PCH_IRR), await eio_isr(g)) == (0, 0)
        # Pin 6 reprogrammed to EIOINTC irq 77 by the guest.
        await g.any.mmio_write(PCH_BASE + PCH_HTMSI_VEC + 6, 1, 77)
        assert await pch_reg(g, PCH_HTMSI_VEC + 6) == 77
        await unmask(g, 6)
        await g.vm.irq_line(6, 1)
        assert await g.drain() == [(0, INT_HWI0, 1)]
        assert await eio_isr(g) == bits(77)
        assert await guest_coreisr(g.v[0]) == bits(77)


async def test_case_37_edge_pin_ignores_deassert_and_clear_lowers(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {0: 0}, ALL_CHIPS)
        await eio_enable(g, 9, 10)
        await g.any.mmio_write(PCH_BASE + PCH_EDGE, 8, bits(9))
        await unmask(g, 9)
        await g.vm.irq_line(9, 1)
        assert await g.drain() == [(0, INT_HWI0, 1)]
        await g.vm.irq_line(9, 0)  # no effect on an edge pin
        assert await g.drain() == []
        assert (await pch_reg(g, PCH_IRR), await eio_isr(g)) == (bits(9), bits(9))
        assert await g.estat(0) == 1 << INT_HWI0
        await g.any.mmio_write(PCH_BASE + PCH_CLEAR, 8, bits(9))
        assert await g.drain() == [(0, INT_HWI0, 0)]
        assert (await pch_reg(g, PCH_IRR), await pch_reg(g, PCH_ISR), await eio_isr(g)) == (0, 0, 0)
        # CLEAR does nothing to a level pin.
        await unmask(g, 10)
        await g.vm.irq_line(10, 1)
        assert await g.drain() == [(0, INT_HWI0, 1)]
        await g.any.mmio_write(PCH_BASE + PCH_CLEAR, 8, bits(10))
        assert await g.drain() == []
        assert await pch_reg(g, PCH_IRR) == bits(10)


async def test_case_38_pins_32_to_63_reach_eiointc_irq_0_by_default(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {0: 0}, ALL_CHIPS)
        vecs = {pin: await pch_reg(g, PCH_HTMSI_VEC + pin) for pin in (0, 5, 31, 32, 40, 63)}
        assert vecs == {0: 0, 5: 5, 31: 31, 32: 0, 40: 0, 63: 0}
        await eio_enable(g, 0)
        await unmask(g, 40, 63)
        await g.vm.irq_line(40, 1)
        assert await g.drain() == [(0, INT_HWI0, 1)]
        assert await eio_isr(g) == bits(0)
        await g.vm.irq_line(40, 0)
        assert await g.drain() == [(0, INT_HWI0, 0)]
        await g.vm.irq_line(63, 1)
        assert await g.drain() == [(0, INT_HWI0, 1)]
        assert await eio_isr(g) == bits(0)
        await g.vm.irq_line(63, 0)
        assert await g.drain() == [(0, INT_HWI0, 0)]
        # Programmed, pin 41 goes where HTMSI_VEC says.
        await g.any.mmio_write(PCH_BASE + PCH_HTMSI_VEC + 41, 1, 200)
        await eio_enable(g, 200)
        await unmask(g, 41)
        await g.vm.irq_line(41, 1)
        assert await g.drain() == [(0, INT_HWI0, 1)]
        assert await eio_isr(g) == bits(200)


@pytest.mark.parametrize(
    "chips",
    [(), (IPI,), (EIOINTC,), (PCHPIC,), (IPI, EIOINTC), (IPI, PCHPIC), (EIOINTC, PCHPIC)],
    ids=lambda c: "+".join(c) or "none",
)
async def test_case_39_irq_line_needs_all_three_irqchips(
    daemon: Daemon, chips: tuple[str, ...]
) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {0: 0}, chips)
        await expect_errno("ENXIO", g.vm.irq_line(0, 1))
        await expect_errno("ENXIO", g.vm.irq_line(64, 1))  # the chip check comes first
        # Adding the missing chips makes the same call legal.
        for chip in ALL_CHIPS:
            if chip not in chips:
                dev = await g.vm.create_device(chip)
                if chip == PCHPIC:
                    await dev.set_attr(PCH_GRP_CTRL, 0, PCH_BASE)
        await g.vm.irq_line(0, 1)
        await g.vm.irq_line(0, 0)


async def test_case_39_irq_line_pin_range(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {0: 0}, ALL_CHIPS)
        for pin in (64, 65, 1000, -1):
            await expect_errno("EINVAL", g.vm.irq_line(pin, 1))
        await g.vm.irq_line(63, 1)
        assert await pch_reg(g, PCH_IRR) == bits(63)


async def test_case_40_msi_data_is_the_eiointc_irq(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {0: 2, 1: 0}, MSI_CHIPS)
        await coremap(g, 33, 0x01)  # CPUID 0 = vcpu_id 1
        await eio_enable(g, 33, 255)
        await g.vm.signal_msi(0x2FF00000, 33)
        assert await g.drain() == [(1, INT_HWI0, 1)]
        assert await eio_isr(g) == bits(33)
        assert await guest_coreisr(g.v[1]) == bits(33)
        await g.vm.signal_msi(0, 255)  # the top irq; routed to vcpu_id 0 (initial route)
        assert await g.drain() == [(0, INT_HWI0, 1)]
        for data in (256, 257, 2**32, U64):
            await expect_errno("EINVAL", g.vm.signal_msi(0, data))
        assert await eio_isr(g) == bits(33, 255)
        assert await g.drain() == []


@pytest.mark.parametrize("chips", [(), (IPI, PCHPIC)], ids=["none", "ipi+pchpic"])
async def test_case_40_msi_without_eiointc_is_enxio(daemon: Daemon, chips: tuple[str, ...]) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        g = await make_guest(kvm, {0: 0}, chips)
        await expect_errno("ENXIO", g.vm.signal_msi(0, 1))
        assert await g.drain() == []
