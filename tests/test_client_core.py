"""The sans-I/O client core and the call specs, without a socket: pure protocol decisions."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from lvz.clients import LINE_NAMES, IrqEvent, KvmError, line_names, ops
from lvz.clients.core import (
    END,
    ConnectionLost,
    EventsLost,
    Pending,
    Session,
    Step,
    Stepper,
    WaitEvent,
)
from lvz.protocol.abi import INT_HWI0, INT_IPI, INT_PCOV, INT_TI


class _Vm:
    handle = 7


def _session() -> tuple[Session, list[Pending], list[int]]:
    done: list[Pending] = []
    wakes: list[int] = []
    s = Session(max_events=2, complete=done.append, wake_events=lambda: wakes.append(1))
    return s, done, wakes


def _irq(vm: int, seq: int, level: int = 1, **extra: Any) -> bytes:
    params = {"vm": vm, "vcpu_id": 0, "irq": INT_IPI, "level": level, "seq": seq, **extra}
    return msgpack.packb([2, "irq", params])


def current(st: Stepper[Any]) -> Step:
    """The step a Stepper waits on now (a call, so mypy does not keep an earlier narrowing)."""
    return st.step


def finished(st: Stepper[Any]) -> bool:
    return st.done


def test_line_names_follow_the_kernels_int_numbers() -> None:
    assert LINE_NAMES[INT_IPI] == "IPI" and LINE_NAMES[INT_TI] == "TI"
    assert LINE_NAMES[INT_HWI0 + 3] == "HWI3"
    assert line_names(1 << INT_IPI | 1 << INT_HWI0 | 1 << 0) == ("SWI0", "HWI0", "IPI")
    assert line_names(1 << INT_PCOV) == ()  # not an interrupt line


@pytest.mark.parametrize("bad", ["NMI", "nope", INT_PCOV, -1, 99])
def test_a_line_that_does_not_exist_is_einval(bad: int | str) -> None:
    with pytest.raises(KvmError) as exc:
        next(ops.wait_for_line(_Vm(), 0, bad))
    assert exc.value.name == "EINVAL"
    assert "IPI" in exc.value.message  # the error lists the lines that do exist


def test_responses_complete_their_own_call_only() -> None:
    s, done, _ = _session()
    p1, _ = s.request("a", {}, "w1")
    p2, _ = s.request("b", {}, "w2")
    s.receive(msgpack.packb([1, p2.msgid, None, {"x": 2}]))
    assert done == [p2] and s.outcome(p2) == {"x": 2}
    assert list(s.pending) == [p1.msgid]
    s.receive(msgpack.packb([1, 999, None, {}]))  # a response to nobody is dropped
    assert done == [p2]


def test_a_protocol_error_fails_every_waiter_with_its_reason() -> None:
    s, done, wakes = _session()
    p, _ = s.request("a", {}, "w")
    s.receive(
        msgpack.packb(
            [2, "protocol_error", {"errno": 71, "name": "EPROTO", "message": "bad bytes"}]
        )
    )
    assert done == [p] and wakes
    with pytest.raises(ConnectionLost, match="EPROTO: bad bytes"):
        s.outcome(p)
    with pytest.raises(ConnectionLost):
        s.request("b", {}, "w")


def test_unreadable_bytes_and_end_of_stream_fail_the_session() -> None:
    s, _, _ = _session()
    s.receive(b"\xc1")
    assert "cannot read" in str(s.failure)
    s2, _, _ = _session()
    s2.receive(b"")
    assert "closed the connection" in str(s2.failure)


def test_event_buffers_are_bounded_and_count_their_losses() -> None:
    s, _, wakes = _session()
    assert s.pop_event(7) is END  # not subscribed: the stream is closed
    assert not s.open_stream(7)
    for seq in (1, 2, 3, 4):
        s.receive(_irq(7, seq, phyid=42))
    s.receive(_irq(8, 1))  # a VM nobody subscribed to: dropped
    first = s.pop_event(7)
    assert isinstance(first, IrqEvent) and first.seq == 1 and first.phyid == 42
    assert first.line == "IPI"
    assert s.pop_event(None) == IrqEvent(vm=7, vcpu_id=0, irq=INT_IPI, level=1, seq=2, phyid=42)
    assert s.pop_event(7) == EventsLost(vm=7, count=2)
    assert s.pop_event(7) is None and not s.event_ready(7)
    s.forget(7)
    assert s.pop_event(7) is END and len(wakes) >= 5


def test_an_irq_without_phyid_is_an_event_with_none() -> None:
    s, _, _ = _session()
    s.open_stream(7)
    s.receive(_irq(7, 1))
    event = s.pop_event(7)
    assert isinstance(event, IrqEvent) and event.phyid is None


def test_wait_for_line_reads_estat_then_waits_for_the_matching_event() -> None:
    st = Stepper(ops.wait_for_line(_Vm(), 3, "ipi", timeout=None))
    assert st.step == ops.open_vcpu(_Vm(), 3)
    st.send(55)
    step = current(st)
    assert not isinstance(step, (WaitEvent, list))
    assert step.method == "vcpu.get_one_reg" and step.params["vcpu"] == 55
    st.send(1 << INT_TI)  # TI up, IPI down: wait
    assert st.step == ops.close(55)
    st.send(None)
    assert current(st) == WaitEvent(7, None)
    other = IrqEvent(vm=7, vcpu_id=2, irq=INT_IPI, level=1, seq=1)
    st.send(other)  # another vCPU's line: keep waiting
    st.send(EventsLost(vm=7, count=1))
    assert not finished(st)
    match = IrqEvent(vm=7, vcpu_id=3, irq=INT_IPI, level=1, seq=3, phyid=9)
    st.send(match)
    assert st.done and st.result() == match


def test_wait_for_line_returns_none_when_already_there_and_times_out_otherwise() -> None:
    st = Stepper(ops.wait_for_line(_Vm(), 0, INT_IPI, level=1, timeout=1.0))
    st.send(5)
    st.send(1 << INT_IPI)
    st.send(None)  # the close
    assert st.done and st.result() is None
    st = Stepper(ops.wait_for_line(_Vm(), 0, INT_IPI, level=1, timeout=0.0))
    st.send(5)
    st.send(0)
    st.send(None)
    with pytest.raises(TimeoutError, match="did not go to 1"):
        st.send(None)  # the driver's answer when the deadline passed


def test_wait_for_line_closes_its_handle_when_estat_cannot_be_read() -> None:
    st = Stepper(ops.wait_for_line(_Vm(), 0, INT_IPI))
    st.send(5)
    st.throw(KvmError("EBADF", "gone"))
    assert st.step == ops.close(5)
    with pytest.raises(KvmError, match="gone"):
        st.send(None)
