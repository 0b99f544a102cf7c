"""EIOINTC as a pure state machine against FakeVm (SEMANTICS.md §9, §13 cases 27-35)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lvz.plugins.eiointc import Eiointc, lvz_device_types
from lvz.protocol import abi
from lvz.protocol.abi import (
    DEV_EIOINTC,
    EIOINTC_BASE,
    EIOINTC_VIRT_BASE,
    EIOINTC_VIRT_FEATURE_MASK,
    INT_HWI0,
    KVM_DEV_TYPE_LOONGARCH_EIOINTC,
    U64_MAX,
)
from lvz.protocol.errors import KvmError
from tests.chipfake import FakeVm, implied_lines

# kvm_eiointc.h's short names, as the chip module uses them.
NODETYPE, IPMAP, ENABLE = abi.EIOINTC_NODETYPE, abi.EIOINTC_IPMAP, abi.EIOINTC_ENABLE
ISR, COREISR, COREMAP = abi.EIOINTC_ISR, abi.EIOINTC_COREISR, abi.EIOINTC_COREMAP
VIRT_FEATURES, VIRT_CONFIG = abi.EIOINTC_VIRT_FEATURES, abi.EIOINTC_VIRT_CONFIG
HAS_VIRT_EXTENSION, HAS_CPU_ENCODE = abi.EIOINTC_HAS_VIRT_EXTENSION, abi.EIOINTC_HAS_CPU_ENCODE
STATUS_ENABLE = abi.EIOINTC_STATUS_ENABLE
STATUS_INT_ENCODE, STATUS_CPU_ENCODE = abi.EIOINTC_STATUS_INT_ENCODE, abi.EIOINTC_STATUS_CPU_ENCODE
GRP_REGS = abi.KVM_DEV_LOONGARCH_EXTIOI_GRP_REGS
GRP_SW_STATUS = abi.KVM_DEV_LOONGARCH_EXTIOI_GRP_SW_STATUS
GRP_CTRL = abi.KVM_DEV_LOONGARCH_EXTIOI_GRP_CTRL
SW_STATUS_NUM_CPU = abi.KVM_DEV_LOONGARCH_EXTIOI_SW_STATUS_NUM_CPU
SW_STATUS_FEATURE = abi.KVM_DEV_LOONGARCH_EXTIOI_SW_STATUS_FEATURE
SW_STATUS_STATE = abi.KVM_DEV_LOONGARCH_EXTIOI_SW_STATUS_STATE
CTRL_INIT_NUM_CPU = abi.KVM_DEV_LOONGARCH_EXTIOI_CTRL_INIT_NUM_CPU
CTRL_INIT_FEATURE = abi.KVM_DEV_LOONGARCH_EXTIOI_CTRL_INIT_FEATURE
CTRL_LOAD_FINISHED = abi.KVM_DEV_LOONGARCH_EXTIOI_CTRL_LOAD_FINISHED
ALL_FEATURES = EIOINTC_VIRT_FEATURE_MASK


def make(phyids: dict[int, int | None] | None = None) -> tuple[FakeVm, Eiointc]:
    """A VM with an EIOINTC and vCPUs ``{vcpu_id: phyid}`` (default: vcpu i holds phyid i)."""
    vm = FakeVm()
    eio = Eiointc(vm)
    vm.add_device(DEV_EIOINTC, eio)
    for vid, phy in (phyids if phyids is not None else {0: 0, 1: 1}).items():
        vm.add_vcpu(vid, phy)
    return vm, eio


def wr(vm: FakeVm, off: int, size: int, value: int, vcpu: int = 0) -> None:
    vm.guest_iocsr_write(vcpu, EIOINTC_BASE + off, size, value)


def rd(vm: FakeVm, off: int, size: int, vcpu: int = 0) -> int:
    return vm.guest_iocsr_read(vcpu, EIOINTC_BASE + off, size)


def enable(vm: FakeVm, *irqs: int) -> None:
    for irq in irqs:
        old = rd(vm, ENABLE + irq // 8, 1)
        wr(vm, ENABLE + irq // 8, 1, old | 1 << (irq % 8))


def disable(vm: FakeVm, irq: int) -> None:
    old = rd(vm, ENABLE + irq // 8, 1)
    wr(vm, ENABLE + irq // 8, 1, old & ~(1 << (irq % 8)))


def coremap(vm: FakeVm, irq: int, byte: int) -> None:
    wr(vm, COREMAP + irq, 1, byte)


def ipmap(vm: FakeVm, group: int, byte: int) -> None:
    wr(vm, IPMAP + group, 1, byte)


def virt_config(vm: FakeVm, value: int) -> None:
    vm.guest_iocsr_write(0, EIOINTC_VIRT_BASE + VIRT_CONFIG, 4, value)


def virt_mode(vm: FakeVm, eio: Eiointc, status: int) -> None:
    eio.set_attr(GRP_CTRL, CTRL_INIT_FEATURE, ALL_FEATURES)
    virt_config(vm, status)
    assert eio.status == status


# --- registration ---------------------------------------------------------------------------


def test_device_type_and_claimed_ranges() -> None:
    [dt] = lvz_device_types()
    assert (dt.name, dt.kvm_type) == (DEV_EIOINTC, KVM_DEV_TYPE_LOONGARCH_EIOINTC)
    vm = FakeVm()
    dev = dt.factory(vm)
    assert isinstance(dev, Eiointc)
    assert [(base, size) for base, size, _ in vm.iocsr] == [
        (abi.EIOINTC_BASE, abi.EIOINTC_SIZE),
        (abi.EIOINTC_VIRT_BASE, abi.EIOINTC_VIRT_SIZE),
    ]


# --- COREMAP decode and routing (cases 27-29) -------------------------------------------------

DECODE_TABLE = [
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
    (0x0A, 1),
]


@pytest.mark.parametrize(("byte", "cpuid"), DECODE_TABLE)
def test_coremap_bitmap_decode(byte: int, cpuid: int) -> None:
    # vcpu_ids 10..13 hold phyids 0..3, so the route shows which *phyid* the byte named.
    vm, eio = make({10 + p: p for p in range(4)})
    assert eio.decode_coremap_byte(byte) == cpuid
    coremap(vm, 5, byte)
    assert eio.sw_coremap[5] == 10 + cpuid
    assert rd(vm, COREMAP + 5, 1) == byte


def test_coremap_cpu_encode_mode_reaches_any_phyid() -> None:
    vm, eio = make({0: 0, 3: 200, 4: 8})
    virt_mode(vm, eio, STATUS_ENABLE | STATUS_CPU_ENCODE)
    coremap(vm, 7, 200)
    assert eio.sw_coremap[7] == 3
    coremap(vm, 8, 0x08)  # the byte itself, not a bitmap: phyid 8
    assert eio.sw_coremap[8] == 4


def test_coremap_unmapped_cpuid_keeps_old_route() -> None:
    vm, eio = make({0: None, 1: 1})
    coremap(vm, 9, 0x04)  # phyid 2: nobody holds it
    assert eio.sw_coremap[9] == 0  # the initial route
    coremap(vm, 9, 0x02)
    assert eio.sw_coremap[9] == 1
    coremap(vm, 9, 0x08)  # phyid 3: unmapped again
    assert eio.sw_coremap[9] == 1


def test_cpu_encode_unmapped_keeps_old_route() -> None:
    vm, eio = make({0: 0, 2: 77})
    virt_mode(vm, eio, STATUS_CPU_ENCODE)
    coremap(vm, 1, 77)
    assert eio.sw_coremap[1] == 2
    coremap(vm, 1, 78)
    assert eio.sw_coremap[1] == 2


def test_phyid_set_later_does_not_reresolve() -> None:
    vm, eio = make({0: 0})
    coremap(vm, 4, 0x02)  # phyid 1, not yet held
    vm.add_vcpu(1, 1)
    assert eio.sw_coremap[4] == 0
    coremap(vm, 4, 0x02)  # only a new COREMAP write resolves it
    assert eio.sw_coremap[4] == 1


def test_moving_pending_irq_lowers_old_and_raises_new() -> None:
    vm, eio = make({0: 0, 1: 1})
    ipmap(vm, 1, 0x02)  # irqs 32..63 -> ip 1
    enable(vm, 40)
    eio.set_input(40, 1)
    assert vm.events == [(0, INT_HWI0 + 1, 1)]
    coremap(vm, 40, 0x02)
    assert vm.events == [(0, INT_HWI0 + 1, 1), (0, INT_HWI0 + 1, 0), (1, INT_HWI0 + 1, 1)]
    assert rd(vm, COREISR + 5, 1, vcpu=0) == 0
    assert rd(vm, COREISR + 5, 1, vcpu=1) == 1 << (40 % 8)


def test_moving_idle_irq_raises_nothing() -> None:
    vm, eio = make({0: 0, 1: 1})
    enable(vm, 40)
    coremap(vm, 40, 0x02)
    assert eio.sw_coremap[40] == 1
    assert vm.events == []


def test_coremap_8_byte_write_routes_each_byte() -> None:
    vm, eio = make({0: 0, 1: 1, 2: 2, 3: 3})
    wr(vm, COREMAP + 16, 8, 0x0102040810000000 | 0x08)
    assert eio.sw_coremap[16:24] == [3, 0, 0, 0, 3, 2, 1, 0]
    # a 2-byte store in the middle of the word merges and leaves the other bytes alone
    wr(vm, COREMAP + 18, 2, 0x0402)
    assert rd(vm, COREMAP + 16, 8) == 0x0102040804020008
    assert eio.sw_coremap[16:24] == [3, 0, 1, 2, 3, 2, 1, 0]


# --- IPMAP decode (case 30) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("byte", "ip"),
    [(0x00, 0), (0x01, 0), (0x02, 1), (0x04, 2), (0x08, 3), (0x10, 0), (0x80, 0), (0x06, 1)],
)
def test_ipmap_bitmap_decode(byte: int, ip: int) -> None:
    vm, eio = make({0: 0})
    ipmap(vm, 2, byte)  # irqs 64..95
    enable(vm, 70)
    eio.set_input(70, 1)
    assert vm.events == [(0, INT_HWI0 + ip, 1)]


@pytest.mark.parametrize(("byte", "ip"), [(0, 0), (5, 5), (7, 7), (8, 7), (0xFF, 7)])
def test_ipmap_int_encode_is_raw_byte_clamped_to_7(byte: int, ip: int) -> None:
    vm, eio = make({0: 0})
    virt_mode(vm, eio, STATUS_INT_ENCODE)
    ipmap(vm, 7, byte)  # irqs 224..255
    enable(vm, 250)
    eio.set_input(250, 1)
    assert vm.events == [(0, INT_HWI0 + ip, 1)]


def test_ipmap_write_does_not_reroute_pending() -> None:
    vm, eio = make({0: 0})
    enable(vm, 3)
    eio.set_input(3, 1)
    ipmap(vm, 0, 0x04)
    assert vm.events == [(0, INT_HWI0, 1)]
    assert implied_lines(eio) == {0: 1 << INT_HWI0}


# --- line sharing, COREISR, ENABLE (cases 31-32) ----------------------------------------------


def test_shared_line_asserts_once_and_deasserts_after_last_w1c() -> None:
    vm, eio = make({0: 0})
    enable(vm, 1, 2)
    eio.set_input(1, 1)
    eio.set_input(2, 1)
    assert vm.events == [(0, INT_HWI0, 1)]
    assert rd(vm, COREISR, 1) == 0b110
    wr(vm, COREISR, 1, 0b010)  # W1C irq 1
    assert vm.events == [(0, INT_HWI0, 1)]
    assert rd(vm, COREISR, 1) == 0b100
    wr(vm, COREISR, 1, 0b100)
    assert vm.events == [(0, INT_HWI0, 1), (0, INT_HWI0, 0)]
    # the global ISR is not cleared by W1C
    assert eio.get_attr(GRP_REGS, ISR) == 0b110


def test_coreisr_w1c_only_clears_bits_that_were_set() -> None:
    vm, eio = make({0: 0})
    enable(vm, 1)
    eio.set_input(1, 1)
    wr(vm, COREISR, 8, U64_MAX & ~0b10)  # every bit but irq 1's
    assert rd(vm, COREISR, 1) == 0b10
    assert vm.events == [(0, INT_HWI0, 1)]


def test_coreisr_is_per_accessing_vcpu_and_w1c_acts_on_route() -> None:
    vm, eio = make({0: 0, 1: 1})
    coremap(vm, 3, 0x02)
    enable(vm, 3)
    eio.set_input(3, 1)
    assert vm.events == [(1, INT_HWI0, 1)]
    assert rd(vm, COREISR, 4, vcpu=0) == 0
    assert rd(vm, COREISR, 4, vcpu=1) == 0b1000
    wr(vm, COREISR, 4, 0b1000, vcpu=0)  # vCPU 0's COREISR has nothing to clear
    assert vm.line(1, INT_HWI0) == 1
    wr(vm, COREISR, 4, 0b1000, vcpu=1)
    assert vm.events[-1] == (1, INT_HWI0, 0)


def test_different_ips_are_separate_lines() -> None:
    vm, eio = make({0: 0})
    ipmap(vm, 0, 0x01)
    ipmap(vm, 1, 0x08)
    enable(vm, 0, 32)
    eio.set_input(0, 1)
    eio.set_input(32, 1)
    assert vm.events == [(0, INT_HWI0, 1), (0, INT_HWI0 + 3, 1)]
    eio.set_input(32, 0)
    assert vm.events[-1] == (0, INT_HWI0 + 3, 0)
    assert vm.line(0, INT_HWI0) == 1


def test_enable_0_to_1_delivers_and_1_to_0_undelivers() -> None:
    vm, eio = make({0: 0})
    eio.set_input(100, 1)
    assert vm.events == []
    assert eio.get_attr(GRP_REGS, ISR + 12) == 1 << (100 - 96)
    enable(vm, 100)
    assert vm.events == [(0, INT_HWI0, 1)]
    disable(vm, 100)
    assert vm.events == [(0, INT_HWI0, 1), (0, INT_HWI0, 0)]
    enable(vm, 100)
    assert vm.events[-1] == (0, INT_HWI0, 1)


def test_enable_without_isr_delivers_nothing() -> None:
    vm, _ = make({0: 0})
    wr(vm, ENABLE, 8, U64_MAX)
    assert vm.events == []


def test_msi_like_isr_stays_set_and_reasserts_on_enable_toggle() -> None:
    """SEMANTICS §10 quirk: nothing clears ISR after an MSI; re-enabling re-asserts."""
    vm, eio = make({0: 0})
    enable(vm, 60)
    eio.set_input(60, 1)
    wr(vm, COREISR + 7, 1, 1 << 4)
    assert vm.events == [(0, INT_HWI0, 1), (0, INT_HWI0, 0)]
    disable(vm, 60)
    enable(vm, 60)
    assert vm.events[-1] == (0, INT_HWI0, 1)


def test_delivery_to_missing_vcpu_is_dropped() -> None:
    vm, eio = make({1: 1})  # the initial route, vcpu_id 0, does not exist
    enable(vm, 2)
    eio.set_input(2, 1)
    assert vm.events == []
    assert implied_lines(eio) == {1: 0}
    assert rd(vm, COREISR, 1, vcpu=0) == 0


def test_set_input_rejects_irq_out_of_range() -> None:
    _, eio = make()
    with pytest.raises(KvmError) as e:
        eio.set_input(256, 1)
    assert e.value.name == "EINVAL"


def test_vcpu_destroyed_drops_its_pending_sets() -> None:
    vm, eio = make({0: 0, 1: 1})
    enable(vm, 0)
    eio.set_input(0, 1)
    assert implied_lines(eio) == {0: 1 << INT_HWI0, 1: 0}
    eio.vcpu_destroyed(0)
    assert 0 not in eio.sw_coreisr


# --- guest access rules -----------------------------------------------------------------------


def test_word_merge_and_shifted_reads() -> None:
    vm, _ = make()
    wr(vm, NODETYPE + 8, 8, 0x1122334455667788)
    assert rd(vm, NODETYPE + 8, 8) == 0x1122334455667788
    assert rd(vm, NODETYPE + 12, 4) == 0x11223344
    assert rd(vm, NODETYPE + 10, 2) == 0x5566
    assert rd(vm, NODETYPE + 15, 1) == 0x11
    wr(vm, NODETYPE + 11, 1, 0xAB)
    assert rd(vm, NODETYPE + 8, 8) == 0x11223344AB667788
    wr(vm, NODETYPE + 12, 4, 0xFFFFFFFF_00000000)  # only the low 4 bytes of the GPR
    assert rd(vm, NODETYPE + 8, 8) == 0x00000000AB667788


def test_unaligned_access_reads_zero_and_ignores_writes() -> None:
    vm, _ = make()
    wr(vm, NODETYPE, 8, 0x1122334455667788)
    assert rd(vm, NODETYPE + 2, 4) == 0
    assert rd(vm, NODETYPE + 1, 2) == 0
    wr(vm, NODETYPE + 4, 8, 0)
    wr(vm, NODETYPE + 1, 2, 0)
    assert rd(vm, NODETYPE, 8) == 0x1122334455667788


def test_isr_and_unknown_offsets_read_zero() -> None:
    vm, eio = make({0: 0})
    eio.set_input(0, 1)
    assert eio.get_attr(GRP_REGS, ISR) == 1
    assert rd(vm, ISR, 8) == 0
    wr(vm, ISR, 8, 0)  # guest cannot clear ISR either
    assert eio.get_attr(GRP_REGS, ISR) == 1
    assert rd(vm, 0x000, 8) == 0
    assert rd(vm, 0x100, 4) == 0
    wr(vm, 0x100, 4, 0xFFFFFFFF)
    assert rd(vm, 0x100, 4) == 0


def test_virt_block_features_read_only_and_config() -> None:
    vm, eio = make()
    eio.set_attr(GRP_CTRL, CTRL_INIT_FEATURE, ALL_FEATURES)
    base = EIOINTC_VIRT_BASE
    assert vm.guest_iocsr_read(0, base + VIRT_FEATURES, 4) == ALL_FEATURES
    vm.guest_iocsr_write(0, base + VIRT_FEATURES, 4, 0)
    assert vm.guest_iocsr_read(0, base + VIRT_FEATURES, 4) == ALL_FEATURES
    virt_config(vm, 0xFF)
    assert vm.guest_iocsr_read(0, base + VIRT_CONFIG, 4) == 0xFF & ALL_FEATURES
    assert vm.guest_iocsr_read(0, base + 8, 4) == 0
    eio.set_attr(GRP_SW_STATUS, SW_STATUS_STATE, 0x1234)
    assert vm.guest_iocsr_read(0, base + VIRT_CONFIG, 1) == 0x34
    assert vm.guest_iocsr_read(0, base + VIRT_CONFIG, 8) == 0x1234


def test_config_locked_while_enabled_unless_zero() -> None:
    vm, eio = make()
    eio.set_attr(GRP_CTRL, CTRL_INIT_FEATURE, ALL_FEATURES)
    virt_config(vm, STATUS_ENABLE)
    virt_config(vm, STATUS_ENABLE | STATUS_CPU_ENCODE)
    assert eio.status == STATUS_ENABLE
    virt_config(vm, 0)
    assert eio.status == 0
    virt_config(vm, STATUS_CPU_ENCODE)
    assert eio.status == STATUS_CPU_ENCODE


def test_config_keeps_only_advertised_features() -> None:
    vm, eio = make()
    eio.set_attr(GRP_CTRL, CTRL_INIT_FEATURE, HAS_VIRT_EXTENSION | HAS_CPU_ENCODE)
    assert eio.status == 0  # the extension starts disabled
    virt_config(vm, STATUS_ENABLE | STATUS_CPU_ENCODE)
    assert eio.status == STATUS_CPU_ENCODE


def test_init_feature_without_virt_extension_enables() -> None:
    _, eio = make()
    eio.set_attr(GRP_CTRL, CTRL_INIT_FEATURE, 0)
    assert eio.status == STATUS_ENABLE
    assert eio.get_attr(GRP_SW_STATUS, SW_STATUS_STATE) == STATUS_ENABLE


# --- device attrs (cases 34-35) ---------------------------------------------------------------


def test_init_num_cpu_limit() -> None:
    _, eio = make()
    with pytest.raises(KvmError) as e:
        eio.set_attr(GRP_CTRL, CTRL_INIT_NUM_CPU, 257)
    assert e.value.name == "EINVAL"
    assert eio.get_attr(GRP_SW_STATUS, SW_STATUS_NUM_CPU) == 0
    eio.set_attr(GRP_CTRL, CTRL_INIT_NUM_CPU, 256)
    assert eio.get_attr(GRP_SW_STATUS, SW_STATUS_NUM_CPU) == 256


def test_coreisr_attr_needs_cpu_below_num_cpu() -> None:
    _, eio = make()
    eio.set_attr(GRP_CTRL, CTRL_INIT_NUM_CPU, 2)
    eio.set_attr(GRP_REGS, abi.eiointc_attr(COREISR + 4, cpu=1), 0xDEADBEEF)
    assert eio.get_attr(GRP_REGS, abi.eiointc_attr(COREISR + 4, cpu=1)) == 0xDEADBEEF
    assert eio.coreisr[1] == 0xDEADBEEF << 32
    for attr in ((2 << 16) | COREISR, (0xFFFF << 16) | COREISR):
        with pytest.raises(KvmError) as e:
            eio.get_attr(GRP_REGS, attr)
        assert e.value.name == "EINVAL"
        with pytest.raises(KvmError) as e:
            eio.set_attr(GRP_REGS, attr, 0)
        assert e.value.name == "EINVAL"


def test_regs_attr_is_4_bytes_raw_and_isr_included() -> None:
    vm, eio = make({0: 0})
    enable(vm, 5)
    eio.set_attr(GRP_REGS, ISR, 1 << 5)  # raw copy: no delivery
    assert vm.events == []
    assert eio.get_attr(GRP_REGS, ISR) == 1 << 5
    eio.set_attr(GRP_REGS, COREMAP + 4, 0x08040201)
    assert rd(vm, COREMAP, 8) == 0x08040201_00000000
    assert eio.sw_coremap[4:8] == [0, 0, 0, 0]  # not re-resolved until LOAD_FINISHED
    assert eio.get_attr(GRP_REGS, IPMAP + 4) == 0
    eio.set_attr(GRP_REGS, IPMAP + 4, 0x08040201)
    assert rd(vm, IPMAP, 8) == 0x08040201_00000000


@pytest.mark.parametrize("off", [0x000, 0x09C, 0x0C8, 0x100, 0x220, 0x320, 0x420, 0x900])
def test_regs_attr_unknown_offset(off: int) -> None:
    _, eio = make()
    for call in (lambda: eio.get_attr(GRP_REGS, off), lambda: eio.set_attr(GRP_REGS, off, 0)):
        with pytest.raises(KvmError) as e:
            call()
        assert e.value.name == "EINVAL"


def test_regs_attr_value_wider_than_u32() -> None:
    _, eio = make()
    with pytest.raises(KvmError) as e:
        eio.set_attr(GRP_REGS, NODETYPE, 1 << 32)
    assert e.value.name == "EINVAL"
    assert eio.get_attr(GRP_REGS, NODETYPE) == 0


def test_sw_status_attrs() -> None:
    _, eio = make()
    eio.set_attr(GRP_CTRL, CTRL_INIT_NUM_CPU, 4)
    eio.set_attr(GRP_CTRL, CTRL_INIT_FEATURE, ALL_FEATURES)
    eio.set_attr(GRP_SW_STATUS, SW_STATUS_NUM_CPU, 9)  # accepted, ignored
    eio.set_attr(GRP_SW_STATUS, SW_STATUS_FEATURE, 0)
    assert eio.get_attr(GRP_SW_STATUS, SW_STATUS_NUM_CPU) == 4
    assert eio.get_attr(GRP_SW_STATUS, SW_STATUS_FEATURE) == ALL_FEATURES
    eio.set_attr(GRP_SW_STATUS, SW_STATUS_STATE, 0b1010)
    assert eio.get_attr(GRP_SW_STATUS, SW_STATUS_STATE) == 0b1010
    for call in (
        lambda: eio.get_attr(GRP_SW_STATUS, 3),
        lambda: eio.set_attr(GRP_SW_STATUS, 3, 0),
    ):
        with pytest.raises(KvmError) as e:
            call()
        assert e.value.name == "EINVAL"


def test_ctrl_is_set_only_and_unknown_groups_fail() -> None:
    _, eio = make()
    eio.set_attr(GRP_CTRL, 2, 123)  # unknown CTRL attrs are ignored
    eio.set_attr(GRP_CTRL, 0x99, 0)
    assert (eio.num_cpu, eio.features, eio.status) == (0, 0, 0)
    for call in (
        lambda: eio.get_attr(GRP_CTRL, CTRL_INIT_NUM_CPU),
        lambda: eio.get_attr(abi.KVM_DEV_LOONGARCH_IPI_GRP_REGS, 0),
        lambda: eio.set_attr(abi.KVM_DEV_LOONGARCH_PCH_PIC_GRP_REGS, 0, 0),
    ):
        with pytest.raises(KvmError) as e:
            call()
        assert e.value.name == "EINVAL"


def test_load_finished_uses_decoded_coremap_byte() -> None:
    """Decision 6: the kernel would look up raw byte 0x02 as phyid 2 (vcpu 6) here."""
    vm, eio = make({4: 0, 5: 1, 6: 2})
    eio.set_attr(GRP_CTRL, CTRL_INIT_NUM_CPU, 8)
    eio.set_attr(GRP_REGS, IPMAP, 0x04)  # irqs 0..31 -> ip 2
    eio.set_attr(GRP_REGS, ENABLE, 1 << 3)
    eio.set_attr(GRP_REGS, ISR, 1 << 3)
    eio.set_attr(GRP_REGS, COREMAP, 0x02 << 24)  # irq 3 -> bitmap 0b10 -> phyid 1
    eio.set_attr(GRP_REGS, abi.eiointc_attr(COREISR, cpu=5), 1 << 3)
    eio.set_attr(GRP_CTRL, CTRL_LOAD_FINISHED, 0)
    assert eio.sw_coremap[3] == 5
    assert eio.sw_coreisr[5][2] == 1 << 3
    assert 6 not in eio.sw_coreisr
    assert implied_lines(eio) == {4: 0, 5: 1 << (INT_HWI0 + 2), 6: 0}
    assert vm.events == []  # no notify: lines come back with the vCPUs' own state


def test_load_finished_resolves_all_words_and_skips_unmapped() -> None:
    _, eio = make({7: 3})
    eio.set_attr(GRP_REGS, COREMAP + 0xFC, 0x08 << 24)  # irq 255 -> phyid 3
    eio.set_attr(GRP_REGS, COREMAP + 0x10, 0x04)  # irq 16 -> phyid 2, unmapped
    eio.set_attr(GRP_CTRL, CTRL_LOAD_FINISHED, 0)
    assert eio.sw_coremap[255] == 7
    assert eio.sw_coremap[16] == 0
    # irq 0's byte is 0 -> phyid 0, unmapped; the route stays at vcpu 0
    assert eio.sw_coremap[0] == 0


# --- implied_lines agrees with the lines actually driven -------------------------------------

IRQS = st.sampled_from([0, 1, 31, 32, 33, 64, 100, 200, 255])
OPS = st.one_of(
    st.tuples(st.just("input"), IRQS, st.integers(0, 1)),
    st.tuples(st.just("enable"), IRQS, st.integers(0, 1)),
    st.tuples(st.just("coreisr"), st.integers(0, 4), st.integers(0, 3), st.integers(0, U64_MAX)),
    st.tuples(st.just("coremap"), IRQS, st.integers(0, 255)),
    st.tuples(st.just("ipmap"), st.integers(0, 7), st.integers(0, 255)),
    st.tuples(st.just("config"), st.integers(0, 15)),
    st.tuples(
        st.just("word"),
        st.sampled_from([ENABLE, COREMAP, COREMAP + 8, COREMAP + 0xF8]),
        st.integers(0, U64_MAX),
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(OPS, max_size=40))
def test_implied_lines_match_driven_lines(ops: list[tuple[object, ...]]) -> None:
    # vcpu_id != phyid, and vcpu 4 holds no phyid at all
    vm, eio = make({0: 3, 1: 2, 2: 1, 3: 0, 4: None})
    vm.add_vcpu(5, 200)
    eio.set_attr(GRP_CTRL, CTRL_INIT_FEATURE, ALL_FEATURES)
    for op in ops:
        match op:
            case ("input", int(irq), int(level)):
                eio.set_input(irq, level)
            case ("enable", int(irq), int(on)):
                (enable if on else disable)(vm, irq)
            case ("coreisr", int(vcpu), int(word), int(bits)):
                wr(vm, COREISR + 8 * word, 8, bits, vcpu=vcpu)
            case ("coremap", int(irq), int(byte)):
                coremap(vm, irq, byte)
            case ("ipmap", int(group), int(byte)):
                ipmap(vm, group, byte)
            case ("config", int(value)):
                virt_config(vm, value)
            case ("word", int(off), int(value)):
                wr(vm, off, 8, value)
            case _:
                raise AssertionError(op)
        assert implied_lines(eio) == vm.lines
        assert all(0 <= vid <= 5 for vid in eio.sw_coremap)


def test_route_attr_reads_and_restores_the_live_route_lvz_extension() -> None:
    """SW_STATUS (irq << 16) | 0x100 is sw_coremap[irq]; setting it moves a pending bit along."""
    from lvz.plugins.eiointc import Eiointc

    vm = FakeVm()
    for vid, phyid in ((0, 5), (2, 1)):
        vm.add_vcpu(vid, phyid)
    dev = vm.add_device("loongarch-eiointc", Eiointc(vm))
    assert isinstance(dev, Eiointc)
    assert dev.get_attr(GRP_SW_STATUS, abi.eiointc_route_attr(9)) == 0
    dev.set_attr(GRP_SW_STATUS, abi.eiointc_route_attr(9), 2)
    assert dev.get_attr(GRP_SW_STATUS, abi.eiointc_route_attr(9)) == 2
    assert dev.sw_coremap[9] == 2
    # lvz vcpu_ids go past the kernel's u8
    dev.set_attr(GRP_SW_STATUS, abi.eiointc_route_attr(9), 300)
    assert dev.get_attr(GRP_SW_STATUS, abi.eiointc_route_attr(9)) == 300
    for attr, value in ((abi.eiointc_route_attr(256), 0), (abi.eiointc_route_attr(9), 65536)):
        with pytest.raises(KvmError) as exc:
            dev.set_attr(GRP_SW_STATUS, attr, value)
        assert exc.value.name == "EINVAL"
    assert vm.events == []  # restoring a route never touches a line
