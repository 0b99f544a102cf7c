"""Route explanations at the chip seam: third-party chips, and agreement on random chip states.

A third-party PCH-PIC stands in for the built-in one in a real daemon, so every way a chip can
answer ``Device.explain_input`` (not at all, a forward to nowhere or to itself, nothing, a
wrong type, a line of a vCPU that does not exist) ends the route with its own reason. Then
hypothesis builds random PCH-PIC + EIOINTC states on the pure chips and checks that what the
explanation says (delivered where, stopped or not) is what ``set_input`` then does, and that
explaining changed nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lvz.daemon.config import ServeConfig
from lvz.daemon.host import load_plugins
from lvz.daemon.server import serve
from lvz.plugins import Device, DeviceType, hookimpl
from lvz.plugins.api import RouteTrace
from lvz.plugins.eiointc import Eiointc
from lvz.plugins.pchpic import PchPic
from lvz.protocol import abi
from lvz.testing.wire import Wire

from .chipfake import FakeVm

PLUGIN = "fake-pch"


class FakePch(Device):
    """Answers ``explain_input`` as its input line says; routes nothing for real."""

    def set_input(self, line: int, level: int) -> None:
        pass

    def explain_input(self, line: int, level: int) -> RouteTrace | None:
        trace = RouteTrace(self.type_name)
        trace.hop("fake", f"pin {line}")
        if line == 0:
            return super().explain_input(line, level)
        if line == 1:
            trace.forward = ("nowhere", 1, level)
        elif line == 3:
            trace.forward = (abi.DEV_PCHPIC, 3, level)
        elif line == 4:
            return 42  # type: ignore[return-value]
        elif line == 5:
            trace.forward = (abi.DEV_EIOINTC, 5, level)
        elif line == 6:
            trace.deliver(99, abi.INT_HWI0, level, True)
        return trace  # line 2: no outcome at all


class FakePchPlugin:
    @hookimpl
    def lvz_device_types(self) -> list[DeviceType]:
        return [DeviceType(abi.DEV_PCHPIC, abi.KVM_DEV_TYPE_LOONGARCH_PCHPIC, FakePch)]


async def test_each_way_a_chip_answers_ends_the_route_with_its_reason(
    nursery: trio.Nursery, sock_dir: Path
) -> None:
    cfg = ServeConfig(socket=sock_dir / "x.sock")
    host = load_plugins(
        allow=["loongarch-ipi", "loongarch-eiointc"], extra=[(PLUGIN, FakePchPlugin())]
    )
    await nursery.start(serve, cfg, host)
    raw = await Wire.open(cfg.socket)
    vm = (await raw.ok("kvm.create_vm"))["vm"]
    v = (await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=0))["vcpu"]
    await raw.ok("vcpu.set_one_reg", vcpu=v, id=abi.CPUID, value=0)
    for chip in (abi.DEV_IPI, abi.DEV_EIOINTC, abi.DEV_PCHPIC):
        await raw.ok("vm.create_device", vm=vm, type=chip)

    async def why(pin: int) -> dict[str, Any]:
        return await raw.ok("vm.explain_route", vm=vm, source={"pin": pin})

    expected = {0: "unexplained", 1: "no_device", 2: "no_effect", 3: "loop", 6: "no_such_vcpu"}
    for pin, reason in expected.items():
        result = await why(pin)
        stopped = result["stopped"]
        assert isinstance(stopped, dict) and stopped["reason"] == reason, (pin, result)
        assert result["delivered"] is None
    assert PLUGIN in (await why(0))["stopped"]["message"]
    r = await raw.call("vm.explain_route", vm=vm, source={"pin": 4})
    assert r.error is not None and r.error.name == "EIO" and PLUGIN in r.error.message
    # A chip's hops and forward are followed into the built-in EIOINTC.
    through = await why(5)
    steps = [(h["chip"], h["step"]) for h in through["hops"]]
    assert steps[:3] == [("vm", "irq_line"), (abi.DEV_PCHPIC, "fake"), (abi.DEV_EIOINTC, "input")]
    assert through["stopped"]["reason"] == "not_enabled"
    await raw.aclose()


# --- agreement on random chip states (pure chips, no daemon) ------------------------------------

PHYIDS = st.dictionaries(
    st.integers(0, 3), st.one_of(st.none(), st.integers(0, 5)), min_size=2, max_size=4
)
BYTE = st.integers(0, 255)
#: Mostly set / mostly clear bytes, so that most routes get past MASK, EDGE and ENABLE.
DENSE = st.builds(lambda a, b: a | b, BYTE, BYTE)
SPARSE = st.builds(lambda a, b: a & b, BYTE, BYTE)


@st.composite
def chip_states(draw: st.DrawFn) -> tuple[FakeVm, PchPic, Eiointc, int, int]:
    """A VM whose vCPUs hold random phyids (some none, some later), random EIOINTC features,
    CONFIG, ENABLE, IPMAP and COREMAP, random PCH-PIC MASK, EDGE and vectors, a few pins
    already driven; and a pin and level to explain."""
    vm = FakeVm()
    eio = vm.add_device(abi.DEV_EIOINTC, Eiointc(vm))
    pch = vm.add_device(abi.DEV_PCHPIC, PchPic(vm))
    assert isinstance(eio, Eiointc) and isinstance(pch, PchPic)
    layout = draw(PHYIDS)
    late = {}
    for vcpu_id, phyid in layout.items():
        taken = phyid in vm.phyids
        if draw(st.booleans()) and phyid is not None and not taken:
            vm.add_vcpu(vcpu_id, phyid)
        else:
            vm.add_vcpu(vcpu_id)
            if phyid is not None and not taken:
                late[vcpu_id] = phyid
    eio.set_attr(
        abi.KVM_DEV_LOONGARCH_EXTIOI_GRP_CTRL,
        abi.KVM_DEV_LOONGARCH_EXTIOI_CTRL_INIT_FEATURE,
        draw(st.integers(0, abi.EIOINTC_VIRT_FEATURE_MASK)),
    )
    cpu = next(iter(layout))
    for value in draw(st.lists(st.integers(0, 15), max_size=2)):
        vm.guest_iocsr_write(cpu, abi.EIOINTC_VIRT_BASE + abi.EIOINTC_VIRT_CONFIG, 4, value)
    pins = st.integers(0, 7)
    vectors = st.integers(0, 7)
    for pin in range(8):
        pch.htmsi_vector[pin] = draw(vectors)
    eio_base = abi.EIOINTC_BASE
    vm.guest_iocsr_write(cpu, eio_base + abi.EIOINTC_ENABLE, 1, draw(DENSE))
    vm.guest_iocsr_write(cpu, eio_base + abi.EIOINTC_IPMAP, 1, draw(st.integers(0, 255)))
    for irq in range(8):
        vm.guest_iocsr_write(
            cpu, eio_base + abi.EIOINTC_COREMAP + irq, 1, draw(st.integers(0, 255))
        )
    for vcpu_id, phyid in late.items():  # set after the coremap was resolved: stale routes
        vm.phyids[phyid] = vcpu_id
    pch.regs[abi.PCH_PIC_MASK] = draw(SPARSE) | ~0xFF & abi.U64_MAX
    pch.regs[abi.PCH_PIC_EDGE] = draw(SPARSE)
    for pin, level in draw(st.lists(st.tuples(pins, st.integers(0, 1)), max_size=4)):
        pch.set_input(pin, level)
    return vm, pch, eio, draw(pins), draw(st.sampled_from((1, 1, 0)))


def explain(pch: PchPic, eio: Eiointc, pin: int, level: int) -> RouteTrace:
    """The daemon's chain, in small: PCH-PIC's answer, then EIOINTC's for what it forwards."""
    trace = pch.explain_input(pin, level)
    if trace.forward is None:
        return trace
    device_type, line, lvl = trace.forward
    assert device_type == abi.DEV_EIOINTC
    return eio.explain_input(line, lvl)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chip_states())
def test_the_explanation_is_what_set_input_then_does(
    state: tuple[FakeVm, PchPic, Eiointc, int, int],
) -> None:
    vm, pch, eio, pin, level = state
    saved = (
        pch.save_state(),
        eio.save_state(),
        pch.stats(),
        eio.stats(),
        dict(vm.lines),
        len(vm.events),
    )
    trace = explain(pch, eio, pin, level)
    assert (
        pch.save_state(),
        eio.save_state(),
        pch.stats(),
        eio.stats(),
        dict(vm.lines),
        len(vm.events),
    ) == saved
    assert (trace.stopped is None) == (trace.delivered is not None)
    lines_before = dict(vm.lines)
    pch.set_input(pin, level)
    made = vm.events[saved[-1] :]
    if trace.delivered is None:
        assert made == []
        return
    vcpu_id, irq, lvl, changed = trace.delivered
    if changed and vm.line(vcpu_id, irq) != (lines_before[vcpu_id] >> irq & 1):
        assert made == [(vcpu_id, irq, lvl)]
    else:
        assert made == []
    if trace.redirected is None and trace.stopped is None:
        decoded = eio.decode_coremap_byte(eio.coremap_byte(pch.htmsi_vector[pin]))
        assert vm.vcpu_by_phyid(decoded) == vcpu_id  # no redirect: the byte's phyid's vCPU
