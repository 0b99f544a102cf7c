"""Short chip-fuzz runs for ``make test`` (the million-access runs are ``make fuzz``).

The engine is ``fuzzers.chips``: random guest IOCSR / MMIO accesses, device attrs, IRQ_LINE,
MSI, PV IPI, CPUID sets, csrxchg and vCPU hot-plug against one VM with every chip, with the
line/chip agreement and the phyid bijection checked after every step. Seeded runs cover the VM
shapes (max_phyid 16 / 256 / 4096 / 65536); a hypothesis-driven run lets failures shrink. The
mutant tests plant a bug of the kind the fuzzer exists to catch and demand that it is caught, so
a checker that silently stopped checking would fail here.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzzers.chips import CHIPS, ChipFuzzer, E, FuzzFailure, FuzzStats, fuzz_seed, run_fuzzer
from lvz.daemon.host import PluginHost, load_plugins
from lvz.plugins import pv_ipi
from lvz.plugins.eiointc import Eiointc
from lvz.plugins.ipi import IpiDevice
from lvz.protocol.abi import CSR_CPUID, U32_MAX

HOST: PluginHost = load_plugins()


@pytest.mark.parametrize(("seed", "limit"), [(1, 256), (2, 4096), (3, 16), (4, 65536), (5, 256)])
def test_seeded_run_keeps_every_invariant(seed: int, limit: int) -> None:
    stats = fuzz_seed(seed, 3000, host=HOST, max_phyid=limit)
    assert stats.steps == 3000
    # Not vacuous: every chip was reached, lines really went up, and errors really happened.
    for chip in CHIPS:
        assert stats.accesses[chip] > 100, (chip, stats.accesses)
    assert stats.lines_up["hwi"] > 0 and stats.lines_up["ipi"] > 0, stats.lines_up
    assert stats.errors["EINVAL"] > 0 and stats.errors["ENXIO"] > 0, stats.errors
    assert stats.ops["set_phyid"] > 0 and stats.ops["csr_xchg"] > 0, stats.ops


def test_seeded_runs_reach_pv_ipi_delivery() -> None:
    """SWI0 only rises through PV IPI, whose targets the fuzzer computes itself: it must rise."""
    total = FuzzStats()
    for seed in (10, 11, 12):
        total.merge(fuzz_seed(seed, 800, host=HOST, max_phyid=256))
    assert total.lines_up["swi0"] > 0, total.lines_up


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.large_base_example,
        HealthCheck.data_too_large,
    ],
)
@given(
    rng=st.randoms(use_true_random=False),
    limit=st.sampled_from([256, 4096]),
    n_vcpus=st.integers(2, 7),
)
def test_hypothesis_driven_run(rng: random.Random, limit: int, n_vcpus: int) -> None:
    """Hypothesis owns every random choice, so a failing sequence shrinks to a short one."""
    fuzzer = run_fuzzer(lambda: ChipFuzzer(rng, host=HOST, max_phyid=limit, n_vcpus=n_vcpus), 60)
    assert fuzzer.stats.steps == 60


def test_same_seed_same_run() -> None:
    """A seed reproduces a run exactly, which is what makes a reported failure actionable."""
    a = fuzz_seed(77, 300, host=HOST)
    b = fuzz_seed(77, 300, host=HOST)
    assert (a.accesses, a.ops, a.errors, a.lines_up) == (b.accesses, b.ops, b.errors, b.lines_up)


# ---------------------------------------------------------------------- planted bugs ------------


def _caught(seeds: range = range(20, 26), steps: int = 3000) -> str:
    for seed in seeds:
        try:
            fuzz_seed(seed, steps, host=HOST, max_phyid=256)
        except FuzzFailure as exc:
            return str(exc)
    pytest.fail("the fuzzer did not notice the planted bug")


def test_catches_ipi_line_left_up(monkeypatch: pytest.MonkeyPatch) -> None:
    def clear_without_lowering(self: IpiDevice, vcpu_id: int, bits: int) -> None:
        st = self._state(vcpu_id)
        st.status &= ~bits & U32_MAX

    monkeypatch.setattr(IpiDevice, "_ipi_clear", clear_without_lowering)
    assert "lines" in _caught()


def test_catches_eiointc_line_left_up(monkeypatch: pytest.MonkeyPatch) -> None:
    real = Eiointc.update_irq

    def never_lower(self: Eiointc, irq: int, level: int) -> None:
        if level:
            real(self, irq, level)
            return
        # Forget the deassert but keep the bookkeeping, as a missed dequeue_irq would.
        pending = self.sw_coreisr.get(self.sw_coremap[irq])
        if pending is not None:
            pending[self.ipnum(irq)] &= ~(1 << irq)

    monkeypatch.setattr(Eiointc, "update_irq", never_lower)
    assert "lines" in _caught()


def test_catches_a_lost_pv_ipi(monkeypatch: pytest.MonkeyPatch) -> None:
    real = pv_ipi.send_pv_ipi

    def drop_second_word(vm: object, a1: int, a2: int, a3: int) -> None:
        real(vm, a1, 0, a3)  # type: ignore[arg-type]

    monkeypatch.setattr(pv_ipi, "send_pv_ipi", drop_second_word)
    assert "SWI" in _caught(steps=6000)


class _LeakyMapFuzzer(ChipFuzzer):
    """After each CPUID set, leaves a stale second map entry for a vCPU that has one.

    The bug is planted in the state the model keeps, not by patching ``Vm.set_cpuid``: the
    model may be mypyc-compiled, and compiled callers never see a patched method.
    """

    def op_set_phyid(self) -> None:
        super().op_set_phyid()
        vm = self.vm
        for vcpu in self.vcpu_list:
            cur, spare = vcpu.csrs[CSR_CPUID], vcpu.csrs[CSR_CPUID] ^ 1
            if cur < vm.max_phyid and spare < vm.max_phyid and spare not in vm.phyids:
                vm.phyids[spare] = vcpu
                return


def test_catches_a_phyid_map_that_is_not_a_bijection() -> None:
    with pytest.raises(FuzzFailure, match="phyid map"):
        run_fuzzer(
            lambda: _LeakyMapFuzzer(random.Random(20), host=HOST, max_phyid=256, n_vcpus=5), 3000
        )


def test_catches_an_exception_escaping_a_chip(monkeypatch: pytest.MonkeyPatch) -> None:
    real = Eiointc._virt_write

    def crash_on_config(self: Eiointc, vcpu_id: int, offset: int, size: int, value: int) -> None:
        if offset == E.VIRT_CONFIG and value & 0x4:
            raise IndexError("planted")
        real(self, vcpu_id, offset, size, value)

    monkeypatch.setattr(Eiointc, "_virt_write", crash_on_config)
    assert "EIO" in _caught()
