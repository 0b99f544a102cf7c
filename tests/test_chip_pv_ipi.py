"""The PV IPI hypercall as a pure function of the phyid map (SEMANTICS.md §7, §13 cases 14-20).

Most vCPUs here hold a phyid different from their vcpu_id, so a test that confuses the two fails.
"""

from __future__ import annotations

import pluggy
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lvz.plugins import hookspecs, pv_ipi
from lvz.plugins.pv_ipi import lvz_hypercall
from lvz.protocol.abi import (
    INT_SWI0,
    KVM_FEATURE_IPI,
    KVM_FEATURE_STEAL_TIME,
    KVM_HCALL_FUNC_IPI,
    KVM_HCALL_FUNC_NOTIFY,
    KVM_HCALL_SERVICE,
    KVM_HCALL_SWDBG,
    KVM_HCALL_USER_SERVICE,
    U32_MAX,
    U64_MAX,
)
from tests.chipfake import FakeVm

RAISED = 1


class LookupSpyVm(FakeVm):
    """Records every phyid the hypercall asks about, to see what it never asks."""

    def __init__(self, max_phyid: int = 256) -> None:
        super().__init__(max_phyid)
        self.lookups: list[int] = []

    def vcpu_by_phyid(self, phyid: int) -> int | None:
        self.lookups.append(phyid)
        return super().vcpu_by_phyid(phyid)


def make_vm(mapping: dict[int, int], max_phyid: int = 256) -> LookupSpyVm:
    """A VM whose vcpu_id -> phyid map is ``mapping``."""
    vm = LookupSpyVm(max_phyid)
    for vcpu_id, phyid in mapping.items():
        vm.add_vcpu(vcpu_id, phyid)
    return vm


def pv_ipi_call(vm: FakeVm, a1: int, a2: int, a3: int, caller: int = 0) -> int | None:
    return lvz_hypercall(
        vm=vm, vcpu_id=caller, code=KVM_HCALL_SERVICE, args=[KVM_HCALL_FUNC_IPI, a1, a2, a3, 0, 0]
    )


def swi0_targets(vm: FakeVm) -> list[int]:
    """vcpu_ids that got SWI0, in delivery order."""
    assert all(irq == INT_SWI0 and level == RAISED for _, irq, level in vm.events)
    return [vcpu_id for vcpu_id, _, _ in vm.events]


# --- §13 case 14: a single target ---------------------------------------------------------------


def test_single_target_gets_swi0_and_call_succeeds() -> None:
    vm = make_vm({0: 7, 1: 5, 2: 6})
    assert pv_ipi_call(vm, a1=1, a2=0, a3=5) == 0
    assert vm.events == [(1, INT_SWI0, RAISED)]
    assert vm.line(1, INT_SWI0) == 1
    assert vm.line(0, INT_SWI0) == 0
    assert vm.line(2, INT_SWI0) == 0


def test_target_is_found_by_phyid_not_vcpu_id() -> None:
    vm = make_vm({0: 2, 2: 0})
    assert pv_ipi_call(vm, a1=1, a2=0, a3=2) == 0
    assert swi0_targets(vm) == [0]


# --- §13 case 15: holes across a1 and a2 ---------------------------------------------------------


def test_bitmap_with_holes_across_both_words() -> None:
    # base 10: a1 bits 0, 3 -> 10, 13; a2 bits 0, 6 -> 74, 80 (bit k of a2 is base + 64 + k).
    vm = make_vm({0: 10, 1: 13, 2: 74, 3: 80, 4: 11, 5: 12, 6: 75, 7: 79}, max_phyid=256)
    assert pv_ipi_call(vm, a1=(1 << 0) | (1 << 3), a2=(1 << 0) | (1 << 6), a3=10) == 0
    assert swi0_targets(vm) == [0, 1, 2, 3]


def test_bit_63_of_a2_is_base_plus_127() -> None:
    vm = make_vm({0: 127, 1: 63, 2: 128})
    assert pv_ipi_call(vm, a1=0, a2=1 << 63, a3=0) == 0
    assert swi0_targets(vm) == [0]


def test_delivery_is_in_ascending_cpuid_order() -> None:
    vm = make_vm({0: 100, 1: 3, 2: 64, 3: 0})
    assert pv_ipi_call(vm, a1=(1 << 0) | (1 << 3), a2=(1 << 0) | (1 << 36), a3=0) == 0
    assert swi0_targets(vm) == [3, 1, 2, 0]


def test_all_128_bits_reach_128_vcpus() -> None:
    vm = make_vm({v: 127 - v for v in range(128)})
    assert pv_ipi_call(vm, a1=U64_MAX, a2=U64_MAX, a3=0) == 0
    assert sorted(swi0_targets(vm)) == list(range(128))


# --- §13 case 16: unmapped and out-of-range targets ---------------------------------------------


def test_unmapped_and_out_of_range_targets_are_skipped_and_call_succeeds() -> None:
    # base 250 covers phyids 250..377; only 252 is held, everything >= 256 is out of range.
    vm = make_vm({0: 252, 1: 0})
    assert pv_ipi_call(vm, a1=U64_MAX, a2=U64_MAX, a3=250) == 0
    assert swi0_targets(vm) == [0]


def test_only_unmapped_targets_still_succeed() -> None:
    vm = make_vm({0: 0})
    assert pv_ipi_call(vm, a1=1 << 5, a2=1, a3=300) == 0
    assert vm.events == []


# --- §13 case 17: self-IPI ----------------------------------------------------------------------


def test_caller_may_target_itself() -> None:
    vm = make_vm({0: 4, 1: 5})
    assert pv_ipi_call(vm, a1=0b11, a2=0, a3=4, caller=0) == 0
    assert swi0_targets(vm) == [0, 1]


# --- §13 case 18: 32-bit wraparound -------------------------------------------------------------


def test_base_ffffffff_plus_bit_1_wraps_to_phyid_0() -> None:
    vm = make_vm({3: 0})
    assert pv_ipi_call(vm, a1=1 << 1, a2=0, a3=0xFFFFFFFF) == 0
    assert swi0_targets(vm) == [3]


def test_second_word_wraps_too() -> None:
    # base + 64 = 2^32 -> 0, so bit 0 of a2 is phyid 0 and bit 2 of a2 is phyid 2.
    vm = make_vm({1: 0, 2: 2})
    assert pv_ipi_call(vm, a1=0, a2=0b101, a3=0xFFFFFFC0) == 0
    assert swi0_targets(vm) == [1, 2]


def test_cpuid_at_or_above_2_pow_31_is_negative_and_never_looked_up() -> None:
    vm = make_vm({0: 0})
    assert pv_ipi_call(vm, a1=U64_MAX, a2=U64_MAX, a3=0x80000000) == 0
    assert vm.events == []
    assert vm.lookups == []


def test_crossing_2_pow_31_skips_only_the_negative_half() -> None:
    # base 0x7FFFFFC0: a1 covers 0x7FFFFFC0..0x7FFFFFFF (looked up), a2 covers 0x80000000.. (not).
    vm = make_vm({0: 0})
    assert pv_ipi_call(vm, a1=U64_MAX, a2=U64_MAX, a3=0x7FFFFFC0) == 0
    assert vm.lookups == list(range(0x7FFFFFC0, 0x80000000))
    assert vm.events == []


def test_a3_is_truncated_to_32_bits() -> None:
    vm = make_vm({0: 5, 1: 6})
    assert pv_ipi_call(vm, a1=1, a2=0, a3=(1 << 32) + 5) == 0
    assert swi0_targets(vm) == [0]


def test_a3_upper_bits_all_set_still_truncate() -> None:
    vm = make_vm({2: 1})
    assert pv_ipi_call(vm, a1=1, a2=0, a3=0xFFFFFFFF_00000001) == 0
    assert swi0_targets(vm) == [2]


# --- §13 case 19: feature gate ------------------------------------------------------------------


@pytest.mark.parametrize("features", [0, KVM_FEATURE_STEAL_TIME, 1])
def test_without_kvm_feature_ipi_the_call_is_invalid_and_sends_nothing(features: int) -> None:
    vm = make_vm({0: 0, 1: 1})
    vm.pv_features = features
    assert pv_ipi_call(vm, a1=0b11, a2=0, a3=0) == -1
    assert vm.events == []
    assert vm.lines == {0: 0, 1: 0}


def test_feature_gate_is_read_at_call_time() -> None:
    vm = make_vm({0: 0})
    vm.pv_features = 0
    assert pv_ipi_call(vm, a1=1, a2=0, a3=0) == -1
    vm.pv_features = KVM_FEATURE_IPI
    assert pv_ipi_call(vm, a1=1, a2=0, a3=0) == 0
    assert swi0_targets(vm) == [0]


# --- §13 case 20: an empty bitmap ---------------------------------------------------------------


def test_empty_bitmap_sends_nothing_and_succeeds() -> None:
    vm = make_vm({0: 0, 1: 1})
    assert pv_ipi_call(vm, a1=0, a2=0, a3=0) == 0
    assert vm.events == []
    assert vm.lookups == []


# --- other functions and codes ------------------------------------------------------------------


@pytest.mark.parametrize("func", [0, KVM_HCALL_FUNC_NOTIFY, 3, 0xFF, U64_MAX])
def test_other_service_functions_are_invalid_and_send_nothing(func: int) -> None:
    vm = make_vm({0: 0})
    result = lvz_hypercall(vm=vm, vcpu_id=0, code=KVM_HCALL_SERVICE, args=[func, 1, 1, 0, 0, 0])
    assert result == -1
    assert vm.events == []


@pytest.mark.parametrize("code", [0, KVM_HCALL_SWDBG, KVM_HCALL_USER_SERVICE, 0x103, 0x7FFF])
def test_other_hypercall_codes_are_left_to_the_daemon(code: int) -> None:
    vm = make_vm({0: 0})
    assert (
        lvz_hypercall(vm=vm, vcpu_id=0, code=code, args=[KVM_HCALL_FUNC_IPI, 1, 0, 0, 0, 0]) is None
    )
    assert vm.events == []


def test_registered_through_pluggy_as_firstresult_hook() -> None:
    pm = pluggy.PluginManager("lvz")
    pm.add_hookspecs(hookspecs)
    pm.register(pv_ipi)
    vm = make_vm({0: 9})
    args = [KVM_HCALL_FUNC_IPI, 1, 0, 9, 0, 0]
    assert pm.hook.lvz_hypercall(vm=vm, vcpu_id=0, code=KVM_HCALL_SERVICE, args=args) == 0
    assert pm.hook.lvz_hypercall(vm=vm, vcpu_id=0, code=KVM_HCALL_SWDBG, args=args) is None
    assert swi0_targets(vm) == [0]


def test_repeated_send_leaves_swi0_up_and_never_lowers_it() -> None:
    vm = make_vm({0: 0})
    for _ in range(3):
        assert pv_ipi_call(vm, a1=1, a2=0, a3=0) == 0
    assert vm.events == [(0, INT_SWI0, RAISED)]
    assert vm.line(0, INT_SWI0) == 1


# --- against a reference walk -------------------------------------------------------------------


def reference_targets(
    phyid_of: dict[int, int], max_phyid: int, a1: int, a2: int, a3: int
) -> list[int]:
    """A literal 128-step reading of kvm_send_pv_ipi: the vcpu_ids hit, in order."""
    holder = {p: v for v, p in phyid_of.items()}
    hit: list[int] = []
    for k in range(128):
        if ((a2 << 64 | a1) >> k) & 1:
            cpuid = ((a3 & U32_MAX) + k) & U32_MAX
            signed = cpuid - (1 << 32) if cpuid >= 1 << 31 else cpuid
            if 0 <= signed < max_phyid and signed in holder:
                hit.append(holder[signed])
    return hit


@st.composite
def vm_maps(draw: st.DrawFn) -> tuple[dict[int, int], int]:
    max_phyid = draw(st.sampled_from([1, 4, 256, 4096]))
    phyids = draw(st.lists(st.integers(0, max_phyid - 1), unique=True, max_size=40))
    return dict(enumerate(phyids)), max_phyid


bases = st.one_of(
    st.integers(0, 300),
    st.integers(0, U64_MAX),
    st.sampled_from([0xFFFFFFFF, 0xFFFFFFC0, 0xFFFFFF81, 0x7FFFFFC0, 0x80000000, (1 << 32) + 5]),
)
words = st.one_of(st.integers(0, U64_MAX), st.sampled_from([0, 1, 1 << 63, U64_MAX]))


@given(vm_map=vm_maps(), a1=words, a2=words, a3=bases)
def test_matches_reference_bitmap_walk(
    vm_map: tuple[dict[int, int], int], a1: int, a2: int, a3: int
) -> None:
    mapping, max_phyid = vm_map
    vm = make_vm(mapping, max_phyid)
    assert pv_ipi_call(vm, a1, a2, a3) == 0
    assert swi0_targets(vm) == reference_targets(mapping, max_phyid, a1, a2, a3)
    assert all(0 <= p < 1 << 31 for p in vm.lookups)
