"""The VM model as a pure object: the phyid map against a reference of SEMANTICS.md §4.

Plain functions, no trio: the model is usable from any script (the map lock is the daemon's).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from lvz.daemon.host import PluginHost, load_plugins
from lvz.daemon.model import Vm
from lvz.protocol import KvmError, abi
from lvz.protocol.abi import CSR_CPUID

HOST: PluginHost = load_plugins()


def errno_of(fn: object, *args: object) -> str | None:
    try:
        fn(*args)  # type: ignore[operator]
    except KvmError as exc:
        return exc.name
    return None


def make_machine(limit: int) -> type[RuleBasedStateMachine]:
    ids = st.integers(min_value=0, max_value=15)
    values = st.one_of(
        st.integers(min_value=0, max_value=limit + 2),
        st.sampled_from([limit - 1, limit, 511, 2**31, 2**32, 2**64 - 1]),
    )

    class PhyidMachine(RuleBasedStateMachine):
        """Reference: vcpu_id -> phyid (None = unset) and phyid -> vcpu_id."""

        @initialize()
        def setup(self) -> None:
            self.vm = Vm(HOST, name=None, max_phyid=limit)
            self.ref: dict[int, int | None] = {}
            self.owner: dict[int, int] = {}

        @rule(vid=ids)
        def create(self, vid: int) -> None:
            expect = "EEXIST" if vid in self.ref else None
            got = errno_of(self.vm.create_vcpu, vid)
            assert got == expect
            if expect is None:
                self.ref[vid] = None
                assert self.vm.get_one_reg(self.vm.vcpus[vid], abi.CPUID) == limit
                assert self.vm.get_one_reg(self.vm.vcpus[vid], abi.TMID) == vid

        @rule(vid=ids, val=values)
        def set_cpuid(self, vid: int, val: int) -> None:
            if vid not in self.ref:
                return
            cur = self.ref[vid]
            if val >= limit:
                expect: str | None = "EINVAL"
            elif cur is not None:
                expect = None if cur == val else "EINVAL"
            elif val in self.owner:
                expect = "EINVAL"  # held by another vCPU (we hold none)
            else:
                expect = None
            got = errno_of(self.vm.set_one_reg, self.vm.vcpus[vid], abi.CPUID, val)
            assert got == expect, (vid, val, cur)
            if expect is None and cur is None:
                self.ref[vid] = val
                self.owner[val] = vid

        @rule(vid=ids)
        def destroy(self, vid: int) -> None:
            if vid not in self.ref:
                return
            vcpu = self.vm.vcpus[vid]
            self.vm.destroy_vcpu(vcpu)
            assert vcpu.csrs[CSR_CPUID] == limit  # dropped vCPU reads the unset marker
            cur = self.ref.pop(vid)
            if cur is not None:
                del self.owner[cur]

        @rule(phyid=st.integers(min_value=-(2**31), max_value=limit + 10))
        def lookup(self, phyid: int) -> None:
            assert self.vm.vcpu_by_phyid(phyid) == self.owner.get(phyid)

        @invariant()
        def map_is_a_bijection_matching_a_linear_scan(self) -> None:
            if not hasattr(self, "vm"):
                return
            scan = {
                v.csrs[CSR_CPUID]: v.vcpu_id
                for v in self.vm.vcpus.values()
                if v.csrs[CSR_CPUID] < limit
            }
            assert {p: v.vcpu_id for p, v in self.vm.phyids.items()} == scan == self.owner

    return PhyidMachine


@pytest.mark.parametrize("limit", [16, 256, 4096])
def test_phyid_map_matches_the_reference(limit: int) -> None:
    run_state_machine_as_test(
        make_machine(limit),
        settings=settings(max_examples=60, stateful_step_count=40, deadline=None),
    )


def test_the_model_needs_no_trio() -> None:
    """Import and drive the model with trio made unimportable: a fuzzer or a notebook can."""
    script = (
        "import sys; sys.modules['trio'] = None\n"
        "from lvz.daemon.host import load_plugins\n"
        "from lvz.daemon.model import Vm\n"
        "from lvz.protocol import abi\n"
        "vm = Vm(load_plugins(), name=None, max_phyid=256)\n"
        "for t in ('loongarch-ipi', 'loongarch-eiointc', 'loongarch-pchpic'):\n"
        "    vm.create_device(t)\n"
        "a, b = vm.create_vcpu(0), vm.create_vcpu(1)\n"
        "vm.set_one_reg(a, abi.CPUID, 7)\n"
        "vm.destroy_vcpu(b)\n"
        "print(vm.vcpu_by_phyid(7), vm.get_one_reg(a, abi.CPUID))\n"
        "vm.destroy()\n"
        "print(vm.alive, vm.vcpu_by_phyid(7))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "7", "False", "None"]


def test_destroy_in_steps_kills_at_once_and_tears_down_in_chunks() -> None:
    """What lets the daemon yield while a big VM goes: dead first, then chunk by chunk."""
    vm = Vm(HOST, name=None, max_phyid=256)
    vcpus = [vm.create_vcpu(i) for i in range(10)]
    for v in vcpus:
        vm.set_one_reg(v, abi.CPUID, v.vcpu_id + 100)
    steps = vm.begin_destroy(chunk=4)
    assert not vm.alive and not any(v.alive for v in vcpus)
    assert vm.vcpu_by_phyid(100) == 0  # torn down only as the steps run
    assert list(steps) == [4, 8]
    assert vm.phyids == {} and vm.vcpus == {} and vm.devices == {}
    assert list(vm.begin_destroy()) == []  # a second destroy is a no-op


def test_lines_follow_estat_writes_and_emit_one_event_per_change() -> None:
    vm = Vm(HOST, name=None, max_phyid=256)
    seen: list[tuple[int, int, int, int]] = []
    vm.listener = lambda _vm, vid, irq, level, seq: seen.append((vid, irq, level, seq))
    vcpu = vm.create_vcpu(1)
    vm.set_one_reg(vcpu, abi.ESTAT, (1 << 3) | (1 << 12) | (1 << 10))  # HWI1, IPI, PCOV bit
    assert vm.get_one_reg(vcpu, abi.ESTAT) == (1 << 3) | (1 << 12) | (1 << 10)
    assert seen == [(1, 3, 1, 1), (1, 12, 1, 2)]  # bit 10 is no line
    vm.set_one_reg(vcpu, abi.ESTAT, 0)  # OR: cannot lower
    assert vm.get_one_reg(vcpu, abi.ESTAT) & (1 << 12)
    vm.interrupt(vcpu, 12)  # already up: no event
    vm.interrupt(vcpu, -12)
    assert seen[-1] == (1, 12, 0, 3)
    vm.set_one_reg(vcpu, abi.VCPU_RESET, 0)
    assert seen[-1] == (1, 3, 0, 4)
    assert vm.get_one_reg(vcpu, abi.ESTAT) & 0x1BFF == 0


def test_csr_xchg_writes_only_what_a_guest_may() -> None:
    vm = Vm(HOST, name=None, max_phyid=256)
    vcpu = vm.create_vcpu(0)
    vm.interrupt(vcpu, 12)
    vm.hypercall(vcpu, 0x100, [1, 1, 0, 0])  # not mapped: nothing happens
    vm.set_one_reg(vcpu, abi.CPUID, 0)
    assert vm.hypercall(vcpu, 0x100, [1, 1, 0, 0]) == 0
    assert vm.get_one_reg(vcpu, abi.ESTAT) & 1
    old = vm.csr_xchg(vcpu, 0x5, 0, 0xFFFFFFFF)  # clears SWI0/1 only
    assert old & 1 and old & (1 << 12)
    assert vm.get_one_reg(vcpu, abi.ESTAT) == 1 << 12
    assert vm.csr_xchg(vcpu, CSR_CPUID, 7, 0xFF) == 0
    assert vm.get_one_reg(vcpu, abi.CPUID) == 0  # read-only to the guest
    assert vm.csr_xchg(vcpu, 0x30, 0xAB, 0xF0) == 0
    assert vm.get_one_reg(vcpu, abi.csr_id(0x30)) == 0xA0
    assert errno_of(vm.csr_xchg, vcpu, 0x800, 0, 0) == "EINVAL"


def test_interrupt_numbers_outside_1_to_14_are_einval() -> None:
    vm = Vm(HOST, name=None, max_phyid=256)
    vcpu = vm.create_vcpu(0)
    for irq in (0, 15, -15, 64, -(2**40)):
        assert errno_of(vm.interrupt, vcpu, irq) == "EINVAL"
    for irq in (10, 13, 14):  # consumed without a line
        vm.interrupt(vcpu, irq)
    assert vcpu.lines == 0


@pytest.mark.parametrize(
    ("value", "errno_name"),
    [
        ((1 << 14), None),  # LLFTP alone
        ((1 << 14) | 0b111 | (1 << 6) | (1 << 7), None),  # FP+SP+DP, LSX, LASX
        (0, "EINVAL"),  # no constant timer
        ((1 << 14) | 0b001, "EINVAL"),  # FP without SP/DP
        ((1 << 14) | (1 << 6), "EINVAL"),  # LSX without FP
        ((1 << 14) | 0b111 | (1 << 7), "EINVAL"),  # LASX without LSX
        (1 << 32, "EINVAL"),  # wider than 32 bits
    ],
)
def test_cpucfg2_architectural_rules(value: int, errno_name: str | None) -> None:
    vm = Vm(HOST, name=None, max_phyid=256)
    vcpu = vm.create_vcpu(0)
    assert errno_of(vm.set_one_reg, vcpu, abi.cpucfg_id(2), value) == errno_name
    assert vm.get_one_reg(vcpu, abi.cpucfg_id(2)) == (value if errno_name is None else 0)
    assert errno_of(vm.set_one_reg, vcpu, abi.cpucfg_id(3), 0xFFFFFFFF) is None  # others: any u32
