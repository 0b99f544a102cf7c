"""``vm.explain_route`` (``lvz why``) against a real daemon over a real socket.

Every reason a route can stop or be redirected is set up the way a VMM and a guest would set it
up (device attrs, guest IOCSR/MMIO stores, ONE_REG), explained, and then the interrupt is really
injected: where the explanation says it is delivered, that vCPU's line is the one that moves;
where it says it stops, no line moves. An explanation itself changes nothing and sends no event.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from lvz.clients import AsyncVmFd, IrqEvent, Kvm, KvmError, VcpuFd, VmFd, abi, ops
from lvz.clients.cli import main

IPI, EIO, PCH = abi.DEV_IPI, abi.DEV_EIOINTC, abi.DEV_PCHPIC
PIN = 12  # its default HTMSI vector is EIOINTC irq 12
HWI1 = abi.INT_HWI0 + 1
CTRL = abi.KVM_DEV_LOONGARCH_EXTIOI_GRP_CTRL
FEATURE = abi.KVM_DEV_LOONGARCH_EXTIOI_CTRL_INIT_FEATURE
VIRT, CPU_ENCODE = abi.EIOINTC_HAS_VIRT_EXTENSION, abi.EIOINTC_HAS_CPU_ENCODE
FULL_STEPS = [
    "irq_line",
    "pin",
    "mask",
    "vector",
    "input",
    "coremap",
    "decode",
    "phyid",
    "route",
    "ipmap",
    "enable",
    "line",
]


class Guest:
    """A VM with vCPUs at chosen phyids and the three irqchips, programmed as a guest does."""

    def __init__(
        self,
        kvm: Kvm,
        layout: dict[int, int | None],
        chips: tuple[str, ...] = (IPI, EIO, PCH),
        features: int | None = None,
    ) -> None:
        self.vm: VmFd = kvm.create_vm()
        self.vcpus: dict[int, VcpuFd] = {}
        for vcpu_id, phyid in layout.items():
            self.vcpus[vcpu_id] = self.vm.create_vcpu(vcpu_id)
            if phyid is not None:
                self.vcpus[vcpu_id].set_one_reg(abi.CPUID, phyid)
        self.devs = {chip: self.vm.create_device(chip) for chip in chips}
        if features is not None:
            self.devs[EIO].set_attr(CTRL, FEATURE, features)
        if PCH in self.devs:
            self.devs[PCH].set_attr(
                abi.KVM_DEV_LOONGARCH_PCH_PIC_GRP_CTRL,
                abi.KVM_DEV_LOONGARCH_PCH_PIC_CTRL_INIT,
                abi.VIRT_PCH_PIC_BASE,
            )
        self.cpu = next(iter(self.vcpus.values()))  # the CPU that programs the chips
        if EIO in self.devs:
            self.eio(abi.EIOINTC_IPMAP, 0x02, size=1)  # irqs 0..31 on HWI1

    def eio(self, offset: int, value: int, size: int = 8) -> None:
        self.cpu.iocsr_write(abi.EIOINTC_BASE + offset, size, value)

    def config(self, value: int) -> None:
        self.cpu.iocsr_write(abi.EIOINTC_VIRT_BASE + abi.EIOINTC_VIRT_CONFIG, 4, value)

    def coremap(self, irq: int, byte: int) -> None:
        self.eio(abi.EIOINTC_COREMAP + irq, byte, size=1)

    def enable(self, *irqs: int) -> None:
        self.eio(abi.EIOINTC_ENABLE, sum(1 << i for i in irqs))

    def pch(self, offset: int, value: int) -> None:
        self.cpu.mmio_write(abi.VIRT_PCH_PIC_BASE + offset, 8, value)

    def unmask(self, pin: int = PIN) -> None:
        self.pch(abi.PCH_PIC_MASK, abi.U64_MAX & ~(1 << pin))

    def lines(self) -> dict[int, tuple[str, ...]]:
        return {vid: v.lines() for vid, v in self.vcpus.items() if v.lines()}


def moved(g: Guest, inject: Callable[[], object]) -> list[tuple[int, int, int]]:
    """Subscribe, run ``inject``, and return the (vcpu_id, irq, level) changes it made."""
    g.vm.subscribe()
    inject()
    g.vcpus[next(iter(g.vcpus))].lines()  # a round trip: every event of inject() is in
    return [(e.vcpu_id, e.irq, e.level) for e in g.vm.events() if isinstance(e, IrqEvent)]


# --- delivered, and the agreement with a real injection --------------------------------------


def test_a_delivered_route_names_the_vcpu_whose_line_then_rises(kvm: Kvm) -> None:
    g = Guest(kvm, {0: 3, 1: 2, 2: 1, 3: 5})
    g.unmask()
    g.enable(PIN)
    g.coremap(PIN, 0x04)  # bitmap: phyid 2, held by vCPU 1
    why = g.vm.explain_route(PIN)
    assert [h.step for h in why.hops] == FULL_STEPS
    assert why.stopped is None and why.redirected is None
    assert why.delivered is not None
    assert (
        why.delivered.vcpu_id,
        why.delivered.phyid,
        why.delivered.line_name,
        why.delivered.changed,
    ) == (1, 2, "HWI1", True)
    assert moved(g, lambda: g.vm.irq_line(PIN, 1)) == [(1, HWI1, 1)]
    again = g.vm.explain_route(PIN)  # the line is up now: delivered there, no change
    assert again.delivered is not None and again.delivered.changed is False
    assert again.hops[-2].step == "shared" and "already pending" in again.hops[-2].note
    down = g.vm.explain_route(PIN, level=0)
    assert down.delivered is not None and (
        down.delivered.vcpu_id,
        down.delivered.level,
        down.delivered.changed,
    ) == (1, 0, True)
    assert moved(g, lambda: g.vm.irq_line(PIN, 0)) == [(1, HWI1, 0)]


def test_cpu_encode_mode_routes_by_the_whole_byte(kvm: Kvm) -> None:
    g = Guest(kvm, {0: 3, 1: 2, 2: 1, 3: 200}, features=VIRT | CPU_ENCODE)
    g.config(abi.EIOINTC_STATUS_CPU_ENCODE)
    g.enable(40)
    g.eio(abi.EIOINTC_IPMAP, 0x0202, size=2)
    g.coremap(40, 200)
    why = g.vm.explain_route(msi=(abi.VIRT_PCH_MSI_ADDR, 40))
    decode = next(h for h in why.hops if h.step == "decode")
    assert (decode.register, decode.bit, decode.value) == ("CONFIG", 3, 1)
    assert why.delivered is not None and (why.delivered.vcpu_id, why.delivered.phyid) == (3, 200)
    assert why.redirected is None
    assert moved(g, lambda: g.vm.signal_msi(abi.VIRT_PCH_MSI_ADDR, 40)) == [(3, HWI1, 1)]


def test_a_line_shared_with_another_irq_does_not_change(kvm: Kvm) -> None:
    g = Guest(kvm, {0: 0})
    g.enable(3, 4)
    g.vm.signal_msi(abi.VIRT_PCH_MSI_ADDR, 3)
    why = g.vm.explain_route(eiointc_irq=4)
    assert why.delivered is not None and why.delivered.changed is False
    shared = why.hops[-2]
    assert shared.step == "shared" and "irqs 3 routed there keep it up" in shared.note
    low = g.vm.explain_route(eiointc_irq=3, level=0)  # 3 leaves, nothing else holds HWI1
    assert low.delivered is not None and low.delivered.changed is True
    assert moved(g, lambda: g.vm.signal_msi(abi.VIRT_PCH_MSI_ADDR, 4)) == []


# --- every stop ---------------------------------------------------------------------------------


def test_a_masked_pin_stops_at_pch_pic_mask(kvm: Kvm) -> None:
    g = Guest(kvm, {0: 0})
    g.enable(PIN)
    why = g.vm.explain_route(PIN)  # PCH-PIC starts with every pin masked
    assert why.delivered is None and why.stopped is not None
    assert (
        why.stopped.chip,
        why.stopped.reason,
        why.stopped.register,
        why.stopped.bit,
        why.stopped.value,
    ) == (PCH, "masked", "MASK", PIN, 1)
    assert moved(g, lambda: g.vm.irq_line(PIN, 1)) == []


def test_lowering_an_edge_pin_stops_at_pch_pic_edge(kvm: Kvm) -> None:
    g = Guest(kvm, {0: 0})
    g.unmask()
    g.enable(PIN)
    g.pch(abi.PCH_PIC_EDGE, 1 << PIN)
    g.vm.irq_line(PIN, 1)
    why = g.vm.explain_route(PIN, level=0)
    assert why.stopped is not None
    assert (why.stopped.reason, why.stopped.register, why.stopped.bit) == (
        "edge_latched",
        "EDGE",
        PIN,
    )
    assert "CLEAR" in why.stopped.message
    assert moved(g, lambda: g.vm.irq_line(PIN, 0)) == []
    assert g.lines() == {0: ("HWI1",)}


def test_lowering_a_pin_never_forwarded_stops_at_pch_pic_isr(kvm: Kvm) -> None:
    g = Guest(kvm, {0: 0})
    why = g.vm.explain_route(PIN, level=0)
    assert why.stopped is not None
    assert (why.stopped.reason, why.stopped.register, why.stopped.bit, why.stopped.value) == (
        "not_forwarded",
        "INT_ISR",
        PIN,
        0,
    )


def test_an_irq_not_enabled_stops_at_eiointc_enable(kvm: Kvm) -> None:
    g = Guest(kvm, {0: 0})
    g.unmask()
    why = g.vm.explain_route(PIN)
    assert [h.step for h in why.hops] == FULL_STEPS[:-2]
    assert why.stopped is not None
    assert (
        why.stopped.chip,
        why.stopped.reason,
        why.stopped.register,
        why.stopped.bit,
        why.stopped.value,
    ) == (EIO, "not_enabled", "ENABLE", PIN, 0)
    assert moved(g, lambda: g.vm.irq_line(PIN, 1)) == []


def test_a_route_to_a_missing_vcpu_stops_at_the_route(kvm: Kvm) -> None:
    g = Guest(kvm, {1: 1, 2: 2})  # no vcpu_id 0, where every route starts
    g.enable(7)
    why = g.vm.explain_route(eiointc_irq=7)
    assert why.stopped is not None
    assert (why.stopped.reason, why.stopped.register, why.stopped.value) == (
        "no_such_vcpu",
        "SW_STATUS_ROUTE",
        0,
    )
    assert moved(g, lambda: g.vm.signal_msi(0, 7)) == []


@pytest.mark.parametrize(
    ("chips", "source", "missing"),
    [
        ((EIO,), {"pin": 3}, "loongarch-ipi, loongarch-pchpic missing"),
        ((IPI,), {"msi": (0, 3)}, "no loongarch-eiointc"),
        ((IPI,), {"eiointc_irq": 3}, "no loongarch-eiointc"),
    ],
    ids=["pin", "msi", "eiointc_irq"],
)
def test_a_vm_without_the_irqchip_stops_before_any_chip(
    kvm: Kvm, chips: tuple[str, ...], source: dict[str, object], missing: str
) -> None:
    g = Guest(kvm, {0: 0}, chips=chips)
    why = g.vm.explain_route(**source)  # type: ignore[arg-type]
    assert why.stopped is not None and why.stopped.reason == "no_irqchip"
    assert missing in why.stopped.message and why.stopped.chip == "vm"


# --- every redirect -----------------------------------------------------------------------------


def test_config_ignored_without_has_virt_extension_names_init_feature(kvm: Kvm) -> None:
    """The issue's bug: CPU-encode asked for, INIT_FEATURE without HAS_VIRT_EXTENSION."""
    g = Guest(kvm, {0: 5, 1: 0}, features=CPU_ENCODE)
    g.config(abi.EIOINTC_STATUS_ENABLE | abi.EIOINTC_STATUS_CPU_ENCODE)  # silently ignored
    g.enable(PIN)
    g.coremap(PIN, 5)  # meant: phyid 5 (vCPU 0); read as a bitmap: phyid 0 (vCPU 1)
    g.unmask()
    why = g.vm.explain_route(PIN)
    assert why.delivered is not None and (why.delivered.vcpu_id, why.delivered.phyid) == (1, 0)
    assert why.redirected is not None
    assert (
        why.redirected.reason,
        why.redirected.register,
        why.redirected.bit,
        why.redirected.value,
    ) == ("config_ignored", "INIT_FEATURE", 0, 0)
    assert "HAS_VIRT_EXTENSION" in why.redirected.message
    assert "phyid 0, not 5" in why.redirected.message
    assert moved(g, lambda: g.vm.irq_line(PIN, 1)) == [(1, HWI1, 1)]


def test_cpu_encode_not_offered_names_init_feature_bit_3(kvm: Kvm) -> None:
    g = Guest(kvm, {0: 5, 1: 0}, features=VIRT)
    g.config(abi.EIOINTC_STATUS_CPU_ENCODE)  # CONFIG keeps only what INIT_FEATURE offers
    g.enable(PIN)
    g.coremap(PIN, 5)
    why = g.vm.explain_route(eiointc_irq=PIN)
    assert why.redirected is not None
    assert (why.redirected.reason, why.redirected.register, why.redirected.bit) == (
        "cpu_encode_unsupported",
        "INIT_FEATURE",
        3,
    )
    assert why.delivered is not None and why.delivered.vcpu_id == 1


def test_config_written_while_enabled_names_config_enable(kvm: Kvm) -> None:
    g = Guest(kvm, {0: 5, 1: 0}, features=VIRT | abi.EIOINTC_HAS_ENABLE_OPTION | CPU_ENCODE)
    g.config(abi.EIOINTC_STATUS_ENABLE)
    g.config(abi.EIOINTC_STATUS_ENABLE | abi.EIOINTC_STATUS_CPU_ENCODE)  # refused: enabled
    g.enable(PIN)
    g.coremap(PIN, 5)
    why = g.vm.explain_route(eiointc_irq=PIN)
    assert why.redirected is not None
    assert (
        why.redirected.reason,
        why.redirected.register,
        why.redirected.bit,
        why.redirected.value,
    ) == ("config_ignored", "CONFIG", 1, 1)


def test_a_coremap_byte_naming_an_unheld_phyid_leaves_the_old_route(kvm: Kvm) -> None:
    g = Guest(kvm, {0: 5, 1: 0, 2: 1})
    g.enable(PIN)
    g.coremap(PIN, 0x08)  # phyid 3: nobody; the route stays at vcpu_id 0
    why = g.vm.explain_route(eiointc_irq=PIN)
    phyid = next(h for h in why.hops if h.step == "phyid")
    assert phyid.value == 3 and "no vCPU" in phyid.note
    assert why.redirected is not None
    assert (why.redirected.reason, why.redirected.register, why.redirected.value) == (
        "phyid_unmapped",
        f"COREMAP[{PIN}]",
        0x08,
    )
    assert why.delivered is not None and why.delivered.vcpu_id == 0
    assert moved(g, lambda: g.vm.signal_msi(0, PIN)) == [(0, HWI1, 1)]


def test_a_route_resolved_before_its_phyid_was_set_is_stale(kvm: Kvm) -> None:
    g = Guest(kvm, {0: 5, 1: 0, 2: None})
    g.enable(PIN)
    g.coremap(PIN, 0x04)  # phyid 2: nobody yet
    g.vcpus[2].set_one_reg(abi.CPUID, 2)  # now vCPU 2 holds it; the route is not re-read
    why = g.vm.explain_route(eiointc_irq=PIN)
    assert why.redirected is not None
    assert (why.redirected.reason, why.redirected.register, why.redirected.value) == (
        "stale_route",
        "SW_STATUS_ROUTE",
        0,
    )
    assert "vCPU 2" in why.redirected.message
    assert why.delivered is not None and why.delivered.vcpu_id == 0
    assert moved(g, lambda: g.vm.signal_msi(0, PIN)) == [(0, HWI1, 1)]


# --- read-only, bad input, output ----------------------------------------------------------------


def state(kvm: Kvm, vm: VmFd) -> object:
    """Every device attr and vCPU register of the VM, less the free-running counter."""
    saved = kvm.save_vm(vm)
    regs = [[r for r in v["regs"] if r[0] != abi.COUNTER] for v in saved["vcpus"]]
    return saved["devices"], regs


def test_an_explanation_changes_nothing_and_sends_no_event(kvm: Kvm) -> None:
    g = Guest(kvm, {0: 3, 1: 2})
    g.unmask()
    g.enable(PIN, 13)
    g.pch(abi.PCH_PIC_EDGE, 1 << 13)
    g.vm.irq_line(13, 1)
    before, seq = state(kvm, g.vm), g.vm.info()
    g.vm.subscribe()
    stats = kvm.call("vm.stats", {"vm": g.vm.handle})  # after subscribing: that is counted
    g.vm.explain_route(PIN)
    g.vm.explain_route(13, level=0)
    g.vm.explain_route(msi=(0, 200))
    g.vm.explain_route(eiointc_irq=13, level=0)
    assert list(g.vm.events()) == []
    assert state(kvm, g.vm) == before and g.vm.info() == seq
    assert kvm.call("vm.stats", {"vm": g.vm.handle}) == stats  # no chip counted anything


@pytest.mark.parametrize(
    ("source", "level", "words"),
    [
        ({"pin": 64}, 1, "not a PCH-PIC pin"),
        # vm.irq_line raises on any non-zero __u32 level (pch_pic_set_irq: ``if (level)``).
        ({"pin": 3}, 1 << 32, "does not fit the __u32"),
        ({"msi": {"address": 0, "data": 256}}, 1, "not an EIOINTC irq"),
        ({"msi": {"address": 0, "data": 3}}, 0, "an MSI only raises"),
        ({"eiointc_irq": 256}, 1, "not an EIOINTC irq"),
        ({"eiointc_irq": 3}, -1, "level -1 is not 0 or 1"),
        ({"pin": 1, "eiointc_irq": 1}, 1, "parameter 'source' must be one of"),
        ({"msi": {"address": 0}}, 1, "parameter 'source' must be one of"),
        ({"irq": 3}, 1, "parameter 'source' must be one of"),
    ],
    ids=[
        "pin",
        "pin-level",
        "msi-data",
        "msi-level",
        "irq",
        "irq-level",
        "two",
        "msi-shape",
        "kind",
    ],
)
def test_bad_input_is_einval_naming_it(
    kvm: Kvm, source: dict[str, object], level: int, words: str
) -> None:
    g = Guest(kvm, {0: 0})
    with pytest.raises(KvmError) as err:
        kvm.call("vm.explain_route", {"vm": g.vm.handle, "source": source, "level": level})
    assert err.value.name == "EINVAL" and words in err.value.message


def test_the_client_wants_exactly_one_source(kvm: Kvm) -> None:
    g = Guest(kvm, {0: 0})
    for kwargs in ({}, {"pin": 1, "eiointc_irq": 2}):
        with pytest.raises(KvmError, match="exactly one of pin, msi and eiointc_irq"):
            g.vm.explain_route(**kwargs)  # type: ignore[arg-type]
    [why] = kvm.gather([ops.explain_route(g.vm, eiointc_irq=2)])
    assert why.stopped is not None and why.stopped.reason == "not_enabled"


def test_str_reads_as_a_numbered_chain(kvm: Kvm) -> None:
    g = Guest(kvm, {0: 3, 1: 2})
    g.unmask()
    g.enable(PIN)
    g.coremap(PIN, 0x04)
    text = str(g.vm.explain_route(PIN))
    lines = text.splitlines()
    assert lines[0] == f"PCH-PIC pin {PIN}:"
    assert lines[1].startswith("   1. vm irq_line")
    assert "pchpic mask" in text and "[MASK bit 12 = 0]" in text
    assert lines[-1] == "  => delivered: raises HWI1 of vCPU 1 (phyid 2)"


def test_lvz_why_prints_the_chain_and_json(
    kvm: Kvm, lvz_socket: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.daemon_fixtures import unique_name

    name = unique_name("why")
    vm = kvm.create_vm(name=name)
    vm.create_vcpu(0).set_one_reg(abi.CPUID, 0)
    for chip in (IPI, EIO, PCH):
        vm.create_device(chip)
    sock = ["--socket", str(lvz_socket)]
    try:
        assert main(["why", name, "pin", "5", *sock]) == 0
        out = capsys.readouterr().out
        assert (
            out.startswith("PCH-PIC pin 5:\n") and "=> stopped: masked (pchpic, MASK bit 5" in out
        )
        assert main(["why", name, "msi", "0x2ff00000", "9", "--format", "json", *sock]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["source"] == "MSI address 0x2ff00000 data 9"
        assert data["stopped"]["reason"] == "not_enabled" and data["delivered"] is None
        assert [h["step"] for h in data["hops"]][:2] == ["message", "input"]
        assert main(["why", name, "irq", "9", "--level", "0", *sock]) == 0
        assert "EIOINTC irq 9 (lowered):" in capsys.readouterr().out
        assert main(["why", name, "msi", "1", *sock]) == 2
        assert "takes ADDR DATA" in capsys.readouterr().err
        assert main(["why", name, "pin", "64", *sock]) == 1
        assert "EINVAL" in capsys.readouterr().err
    finally:
        vm.destroy()


async def test_the_trio_client_explains_the_same(trio_vm: AsyncVmFd) -> None:
    v = await trio_vm.create_vcpu(0)
    await v.set_one_reg(abi.CPUID, 0)
    await trio_vm.create_device(EIO)
    why = await trio_vm.explain_route(eiointc_irq=3)
    assert why.stopped is not None and why.stopped.reason == "not_enabled"
    assert why.vcpu_id is None and str(why).startswith("EIOINTC irq 3:\n")
