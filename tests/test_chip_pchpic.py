"""PCH-PIC as a pure state machine against FakeVm (SEMANTICS.md §10, §13 cases 36-38)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lvz.plugins.api import Device, IoHandler
from lvz.plugins.eiointc import Eiointc
from lvz.plugins.pchpic import ID_WORD, PchPic, lvz_device_types
from lvz.protocol import abi
from lvz.protocol.abi import (
    DEV_EIOINTC,
    DEV_PCHPIC,
    EIOINTC_BASE,
    INT_HWI0,
    KVM_DEV_TYPE_LOONGARCH_PCHPIC,
    U64_MAX,
)
from lvz.protocol.errors import KvmError
from tests.chipfake import FakeVm, implied_lines

# kvm_pch_pic.h's short names, as the chip module uses them.
INT_ID, MASK, HTMSI_EN, EDGE = (
    abi.PCH_PIC_INT_ID,
    abi.PCH_PIC_MASK,
    abi.PCH_PIC_HTMSI_EN,
    abi.PCH_PIC_EDGE,
)
CLEAR, AUTO_CTRL0, AUTO_CTRL1 = abi.PCH_PIC_CLEAR, abi.PCH_PIC_AUTO_CTRL0, abi.PCH_PIC_AUTO_CTRL1
ROUTE_ENTRY, HTMSI_VEC = abi.PCH_PIC_ROUTE_ENTRY, abi.PCH_PIC_HTMSI_VEC
INT_IRR, INT_ISR, POLARITY = abi.PCH_PIC_INT_IRR, abi.PCH_PIC_INT_ISR, abi.PCH_PIC_POLARITY
GRP_REGS, GRP_CTRL = abi.KVM_DEV_LOONGARCH_PCH_PIC_GRP_REGS, abi.KVM_DEV_LOONGARCH_PCH_PIC_GRP_CTRL
CTRL_INIT = abi.KVM_DEV_LOONGARCH_PCH_PIC_CTRL_INIT
COREMAP, ENABLE, IPMAP = abi.EIOINTC_COREMAP, abi.EIOINTC_ENABLE, abi.EIOINTC_IPMAP

BASE = abi.VIRT_PCH_PIC_BASE


class Recorder(Device):
    """Stands in for EIOINTC: records every input PCH-PIC drives."""

    def __init__(self, vm: FakeVm) -> None:
        super().__init__(vm)
        self.inputs: list[tuple[int, int]] = []

    def set_input(self, line: int, level: int) -> None:
        self.inputs.append((line, level))


def make(base: int | None = BASE) -> tuple[FakeVm, PchPic, Recorder]:
    vm = FakeVm()
    rec = Recorder(vm)
    vm.add_device(DEV_EIOINTC, rec)
    pic = PchPic(vm)
    vm.add_device(DEV_PCHPIC, pic)
    if base is not None:
        pic.set_attr(GRP_CTRL, CTRL_INIT, base)
    return vm, pic, rec


def wr(vm: FakeVm, off: int, size: int, value: int) -> None:
    vm.guest_mmio_write(0, BASE + off, size, value)


def rd(vm: FakeVm, off: int, size: int) -> int:
    return vm.guest_mmio_read(0, BASE + off, size)


def unmask(vm: FakeVm, *pins: int) -> None:
    mask = rd(vm, MASK, 8)
    for pin in pins:
        mask &= ~(1 << pin)
    wr(vm, MASK, 8, mask)


def einval(call: object) -> None:
    assert callable(call)
    with pytest.raises(KvmError) as e:
        call()
    assert e.value.name == "EINVAL"


# --- registration and MMIO window -------------------------------------------------------------


def test_device_type() -> None:
    [dt] = lvz_device_types()
    assert (dt.name, dt.kvm_type) == (DEV_PCHPIC, KVM_DEV_TYPE_LOONGARCH_PCHPIC)
    assert isinstance(dt.factory(FakeVm()), PchPic)


def test_mmio_claimed_only_by_ctrl_init_and_a_second_init_adds_a_window() -> None:
    # kvm_pch_pic_init registers the new range with kvm_io_bus_register_dev and never
    # unregisters the old one (pch_pic.c), so both stay claimed.
    vm, pic, _ = make(base=None)
    assert vm.mmio == []
    assert vm.iocsr == []
    pic.set_attr(GRP_CTRL, CTRL_INIT, BASE)
    assert [(b, s) for b, s, _ in vm.mmio] == [(BASE, 0x3E8)]
    pic.set_attr(GRP_CTRL, CTRL_INIT, 0x20000000)
    assert [(b, s) for b, s, _ in vm.mmio] == [(BASE, 0x3E8), (0x20000000, 0x3E8)]
    assert vm.guest_mmio_read(0, 0x20000000 + MASK, 8) == U64_MAX


def test_ctrl_init_registration_failure_is_efault() -> None:
    class Crowded(FakeVm):
        def claim_mmio(self, base: int, size: int, handler: IoHandler) -> None:
            raise KvmError("EEXIST", "taken")

    vm = Crowded()
    pic = PchPic(vm)
    with pytest.raises(KvmError) as e:
        pic.set_attr(GRP_CTRL, CTRL_INIT, BASE)
    assert e.value.name == "EFAULT"
    assert pic.base is None


def test_ctrl_init_reads_back_only_once_set() -> None:
    vm = FakeVm()
    pic = PchPic(vm)
    with pytest.raises(KvmError) as e:
        pic.get_attr(GRP_CTRL, CTRL_INIT)
    assert e.value.name == "ENXIO"


def test_ctrl_attrs() -> None:
    _, pic, _ = make()
    einval(lambda: pic.set_attr(GRP_CTRL, 1, BASE))
    assert pic.get_attr(GRP_CTRL, CTRL_INIT) == BASE  # lvz extension: the base reads back
    einval(lambda: pic.get_attr(GRP_CTRL, 1))
    einval(lambda: pic.set_attr(GRP_CTRL, CTRL_INIT, -1))
    einval(lambda: pic.get_attr(abi.KVM_DEV_LOONGARCH_EXTIOI_GRP_CTRL, 0))
    einval(lambda: pic.set_attr(abi.KVM_DEV_LOONGARCH_EXTIOI_GRP_REGS, 0, 0))


# --- registers as the guest sees them ---------------------------------------------------------


def test_id_register() -> None:
    vm, _, _ = make()
    assert rd(vm, INT_ID, 8) == ID_WORD
    assert rd(vm, INT_ID + 3, 1) == 7
    assert rd(vm, INT_ID + 4, 1) == 1
    assert rd(vm, INT_ID + 6, 1) == 31
    assert rd(vm, INT_ID + 4, 4) == 0x001F0001
    wr(vm, INT_ID, 8, 0)  # read-only
    assert rd(vm, INT_ID, 8) == ID_WORD


def test_defaults() -> None:
    vm, pic, _ = make()
    assert rd(vm, MASK, 8) == U64_MAX
    for off in (HTMSI_EN, EDGE, INT_IRR, INT_ISR, POLARITY, AUTO_CTRL0, AUTO_CTRL1, CLEAR):
        assert rd(vm, off, 8) == 0
    assert rd(vm, ROUTE_ENTRY, 8) == 0x0101010101010101
    assert rd(vm, ROUTE_ENTRY + 0x18, 8) == 0x0101010101010101
    assert rd(vm, ROUTE_ENTRY + 0x20, 8) == 0
    assert rd(vm, HTMSI_VEC, 8) == 0x0706050403020100
    assert rd(vm, HTMSI_VEC + 0x1F, 1) == 31
    assert rd(vm, HTMSI_VEC + 0x20, 8) == 0
    assert [pic.get_attr(GRP_REGS, HTMSI_VEC + p) for p in (0, 5, 31, 32, 63)] == [0, 5, 31, 0, 0]


def test_sub_word_access_merges_and_shifts() -> None:
    vm, _, _ = make()
    wr(vm, MASK + 4, 4, 0)
    assert rd(vm, MASK, 8) == 0x00000000FFFFFFFF
    wr(vm, POLARITY + 2, 2, 0xABCD)
    assert rd(vm, POLARITY, 8) == 0xABCD0000
    assert rd(vm, POLARITY + 3, 1) == 0xAB
    wr(vm, HTMSI_VEC + 0x22, 2, 0x2A29)
    assert rd(vm, HTMSI_VEC + 0x20, 8) == 0x2A290000
    wr(vm, EDGE, 1, 0x1FF)  # a byte store takes only the low byte of the GPR
    assert rd(vm, EDGE, 8) == 0xFF


def test_unaligned_access_reads_zero_and_ignores_writes() -> None:
    vm, _, _ = make()
    assert rd(vm, MASK + 1, 2) == 0
    assert rd(vm, MASK + 4, 8) == 0
    wr(vm, MASK + 2, 4, 0)
    wr(vm, MASK + 1, 2, 0)
    wr(vm, MASK + 4, 8, 0)
    assert rd(vm, MASK, 8) == U64_MAX


def test_alignment_is_checked_on_the_absolute_address() -> None:
    vm, _, _ = make(base=BASE + 4)
    # offset 4 is 8-aligned in the address space, and lands in the ID word shifted by 4
    assert vm.guest_mmio_read(0, BASE + 8, 8) == ID_WORD >> 32
    assert vm.guest_mmio_read(0, BASE + 4, 8) == 0  # offset 0 is unaligned here


def test_route_entry_and_auto_ctrl_ignore_guest_writes() -> None:
    vm, pic, _ = make()
    wr(vm, ROUTE_ENTRY, 8, 0)
    wr(vm, AUTO_CTRL0, 8, 3)
    wr(vm, INT_IRR, 8, 1)
    wr(vm, INT_ISR, 8, 1)
    assert rd(vm, ROUTE_ENTRY, 8) == 0x0101010101010101
    assert (pic.regs[AUTO_CTRL0], pic.regs[INT_IRR], pic.regs[INT_ISR]) == (0, 0, 0)
    pic.set_attr(GRP_REGS, AUTO_CTRL1, 0b11)
    assert pic.get_attr(GRP_REGS, AUTO_CTRL1) == 0b11
    assert rd(vm, AUTO_CTRL1, 8) == 0  # the guest always sees the default mode


# --- pins (cases 36-38) -----------------------------------------------------------------------


def test_level_irq_masked_by_default_then_unmask_delivers() -> None:
    vm, pic, rec = make()
    wr(vm, HTMSI_VEC + 5, 1, 77)
    pic.set_input(5, 1)
    assert rec.inputs == []
    assert rd(vm, INT_IRR, 8) == 1 << 5
    assert rd(vm, INT_ISR, 8) == 0
    unmask(vm, 5)
    assert rec.inputs == [(77, 1)]
    assert rd(vm, INT_ISR, 8) == 1 << 5
    pic.set_input(5, 0)
    assert rec.inputs == [(77, 1), (77, 0)]
    assert rd(vm, INT_IRR, 8) == 0
    assert rd(vm, INT_ISR, 8) == 0


def test_unmasked_level_irq_follows_pin() -> None:
    vm, pic, rec = make()
    unmask(vm, 9)
    pic.set_input(9, 1)
    pic.set_input(9, 1)  # still high: ISR already set, forwarded again like the kernel
    pic.set_input(9, 0)
    pic.set_input(9, 0)  # already low: nothing to lower
    assert rec.inputs == [(9, 1), (9, 1), (9, 0)]


def test_masking_a_high_level_irq_does_not_lower_it() -> None:
    vm, pic, rec = make()
    unmask(vm, 3)
    pic.set_input(3, 1)
    wr(vm, MASK, 8, U64_MAX)
    assert rec.inputs == [(3, 1)]
    assert rd(vm, INT_ISR, 8) == 1 << 3
    pic.set_input(3, 0)  # the request goes away: lowered even though masked
    assert rec.inputs == [(3, 1), (3, 0)]


def test_edge_irq_ignores_deassert_and_clear_lowers() -> None:
    vm, pic, rec = make()
    wr(vm, EDGE, 8, 1 << 12)
    unmask(vm, 12)
    pic.set_input(12, 1)
    pic.set_input(12, 0)
    assert rec.inputs == [(12, 1)]
    assert rd(vm, INT_IRR, 8) == 1 << 12
    wr(vm, CLEAR, 8, 1 << 11)  # not this pin
    assert rec.inputs == [(12, 1)]
    wr(vm, CLEAR, 8, 1 << 12)
    assert rec.inputs == [(12, 1), (12, 0)]
    assert rd(vm, INT_IRR, 8) == 0
    assert rd(vm, INT_ISR, 8) == 0


def test_clear_ignores_level_pins() -> None:
    vm, pic, rec = make()
    unmask(vm, 2)
    pic.set_input(2, 1)
    wr(vm, CLEAR, 8, U64_MAX)
    assert rec.inputs == [(2, 1)]
    assert rd(vm, INT_IRR, 8) == 1 << 2


def test_clear_sub_word_store_reaches_upper_pins() -> None:
    vm, pic, rec = make()
    wr(vm, EDGE + 4, 4, 1 << (40 - 32))
    unmask(vm, 40)
    pic.set_input(40, 1)
    wr(vm, CLEAR + 4, 4, 1 << (40 - 32))
    assert rec.inputs == [(0, 1), (0, 0)]


def test_pins_32_to_63_go_to_eiointc_irq_0_until_programmed() -> None:
    vm, pic, rec = make()
    wr(vm, MASK, 8, 0)
    pic.set_input(32, 1)
    pic.set_input(63, 1)
    assert rec.inputs == [(0, 1), (0, 1)]
    wr(vm, HTMSI_VEC + 50, 1, 90)
    pic.set_input(50, 1)
    assert rec.inputs[-1] == (90, 1)


def test_unmasking_several_pending_pins_forwards_each_in_pin_order() -> None:
    vm, pic, rec = make()
    for pin in (20, 4, 35):
        pic.set_input(pin, 1)
    wr(vm, MASK, 8, 0)
    assert rec.inputs == [(4, 1), (20, 1), (0, 1)]


def test_set_input_pin_out_of_range() -> None:
    _, pic, _ = make()
    einval(lambda: pic.set_input(64, 1))
    einval(lambda: pic.set_input(-1, 1))


def test_missing_eiointc_error_propagates() -> None:
    vm = FakeVm()
    pic = PchPic(vm)
    vm.add_device(DEV_PCHPIC, pic)
    pic.set_attr(GRP_REGS, MASK, 0)
    with pytest.raises(KvmError) as e:
        pic.set_input(1, 1)
    assert e.value.name == "ENXIO"


# --- device attrs -----------------------------------------------------------------------------


def test_regs_attrs_are_raw_and_exact() -> None:
    _, pic, rec = make()
    assert pic.get_attr(GRP_REGS, MASK) == U64_MAX
    for off in (MASK, HTMSI_EN, EDGE, AUTO_CTRL0, AUTO_CTRL1, INT_IRR, INT_ISR, POLARITY):
        pic.set_attr(GRP_REGS, off, 0x8000_0000_0000_0001 + off)
        assert pic.get_attr(GRP_REGS, off) == 0x8000_0000_0000_0001 + off
    assert rec.inputs == []  # an unmasked IRR bit restored by attr is not forwarded
    pic.set_attr(GRP_REGS, ROUTE_ENTRY + 63, 0xFF)
    pic.set_attr(GRP_REGS, HTMSI_VEC + 40, 0x99)
    assert pic.get_attr(GRP_REGS, ROUTE_ENTRY + 63) == 0xFF
    assert pic.get_attr(GRP_REGS, HTMSI_VEC + 40) == 0x99
    assert pic.get_attr(GRP_REGS, HTMSI_VEC + 41) == 0


@pytest.mark.parametrize(
    "off", [INT_ID, INT_ID + 3, CLEAR, MASK + 1, MASK + 8, 0x384, INT_ISR + 8, 0x140, 0x240, 0x3E8]
)
def test_regs_attr_unknown_offsets(off: int) -> None:
    _, pic, _ = make()
    einval(lambda: pic.get_attr(GRP_REGS, off))
    einval(lambda: pic.set_attr(GRP_REGS, off, 0))


def test_regs_attr_value_wider_than_register() -> None:
    _, pic, _ = make()
    einval(lambda: pic.set_attr(GRP_REGS, HTMSI_VEC + 1, 0x100))
    einval(lambda: pic.set_attr(GRP_REGS, ROUTE_ENTRY, 0x100))
    einval(lambda: pic.set_attr(GRP_REGS, MASK, 1 << 64))
    einval(lambda: pic.set_attr(GRP_REGS, EDGE, -1))
    assert pic.get_attr(GRP_REGS, HTMSI_VEC + 1) == 1
    assert pic.get_attr(GRP_REGS, MASK) == U64_MAX


def test_implied_lines_is_empty() -> None:
    vm, pic, _ = make()
    vm.add_vcpu(0, 0)
    unmask(vm, 0)
    pic.set_input(0, 1)
    assert implied_lines(pic) == {}


# --- the chain: PCH-PIC pin -> EIOINTC -> the vCPU the coremap's phyid names ------------------


def make_chain() -> tuple[FakeVm, PchPic, Eiointc]:
    vm = FakeVm()
    eio = Eiointc(vm)
    vm.add_device(DEV_EIOINTC, eio)
    pic = PchPic(vm)
    vm.add_device(DEV_PCHPIC, pic)
    pic.set_attr(GRP_CTRL, CTRL_INIT, BASE)
    # vcpu_id and phyid deliberately disagree
    vm.add_vcpu(0, 5)
    vm.add_vcpu(1, 2)
    vm.add_vcpu(2, 0)
    return vm, pic, eio


def eio_wr(vm: FakeVm, off: int, size: int, value: int) -> None:
    vm.guest_iocsr_write(0, EIOINTC_BASE + off, size, value)


def test_chain_pin_reaches_vcpu_named_by_phyid() -> None:
    vm, pic, eio = make_chain()
    wr(vm, HTMSI_VEC + 3, 1, 40)  # pin 3 -> EIOINTC irq 40
    eio_wr(vm, ENABLE + 5, 1, 1 << 0)  # enable irq 40
    eio_wr(vm, IPMAP + 1, 1, 0x04)  # irqs 32..63 -> HWI2
    eio_wr(vm, COREMAP + 40, 1, 0x04)  # bitmap bit 2 -> phyid 2 -> vcpu_id 1
    unmask(vm, 3)
    pic.set_input(3, 1)
    assert vm.events == [(1, INT_HWI0 + 2, 1)]
    # the route moves to phyid 0 (vcpu_id 2) while pending
    eio_wr(vm, COREMAP + 40, 1, 0x01)
    pic.set_input(3, 0)
    assert vm.events == [
        (1, INT_HWI0 + 2, 1),
        (1, INT_HWI0 + 2, 0),
        (2, INT_HWI0 + 2, 1),
        (2, INT_HWI0 + 2, 0),
    ]
    assert implied_lines(eio) == {0: 0, 1: 0, 2: 0}


def test_chain_default_route_is_vcpu_id_0_not_phyid_0() -> None:
    vm, pic, _ = make_chain()
    eio_wr(vm, ENABLE, 1, 1 << 7)
    unmask(vm, 7)
    pic.set_input(7, 1)
    assert vm.events == [(0, INT_HWI0, 1)]  # vcpu_id 0 holds phyid 5


def test_chain_edge_pin_cleared_by_guest() -> None:
    vm, pic, eio = make_chain()
    eio_wr(vm, ENABLE, 4, U64_MAX)
    eio_wr(vm, COREMAP + 1, 1, 0x01)  # irq 1 -> phyid 0 -> vcpu_id 2
    wr(vm, EDGE, 8, 1 << 1)
    unmask(vm, 1)
    pic.set_input(1, 1)
    pic.set_input(1, 0)
    assert vm.events == [(2, INT_HWI0, 1)]
    wr(vm, CLEAR, 8, 1 << 1)
    assert vm.events == [(2, INT_HWI0, 1), (2, INT_HWI0, 0)]
    # EIOINTC ISR follows the PCH-PIC output
    assert eio.get_attr(abi.KVM_DEV_LOONGARCH_EXTIOI_GRP_REGS, abi.EIOINTC_ISR) == 0


PIN_OPS = st.one_of(
    st.tuples(st.just("input"), st.integers(0, 63), st.integers(0, 1)),
    st.tuples(st.just("mask"), st.integers(0, U64_MAX)),
    st.tuples(st.just("edge"), st.integers(0, U64_MAX)),
    st.tuples(st.just("clear"), st.integers(0, U64_MAX)),
    st.tuples(st.just("vec"), st.integers(0, 63), st.integers(0, 255)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(PIN_OPS, max_size=40))
def test_chain_invariants(ops: list[tuple[object, ...]]) -> None:
    vm, pic, eio = make_chain()
    eio_wr(vm, ENABLE, 8, U64_MAX)
    eio_wr(vm, ENABLE + 8, 8, U64_MAX)
    eio_wr(vm, COREMAP + 32, 8, 0x0102040801020408)
    eio_wr(vm, IPMAP, 8, 0x0804020108040201)
    for op in ops:
        match op:
            case ("input", int(pin), int(level)):
                pic.set_input(pin, level)
            case ("mask", int(value)):
                wr(vm, MASK, 8, value)
            case ("edge", int(value)):
                wr(vm, EDGE, 8, value)
            case ("clear", int(value)):
                wr(vm, CLEAR, 8, value)
            case ("vec", int(pin), int(irq)):
                wr(vm, HTMSI_VEC + pin, 1, irq)
            case _:
                raise AssertionError(op)
        irr, isr, mask = pic.regs[INT_IRR], pic.regs[INT_ISR], pic.regs[MASK]
        assert isr & ~irr == 0  # a serviced pin is still requested
        assert irr & ~mask & ~isr == 0  # every unmasked request is serviced
        assert implied_lines(eio) == vm.lines
