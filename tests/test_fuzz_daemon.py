"""Hostile and broken input over a real socket to a real daemon (PROTOCOL.md §2).

Every example opens a fresh connection to a subprocess daemon (``lvz serve``, its own for this
module, with a small ``--max-vms`` and ``--max-message`` so fuzz-created VMs and huge messages
stay cheap), sends a payload and then a sentinel request, half-closes, and reads to the end.
``fuzzers.wire.exchange`` checks what came back: every message is a well-formed response or
notification, error maps carry an errno/name pair from PROTOCOL.md's table, and the daemon
closes only right after a ``protocol_error`` (EPROTO / E2BIG) -- otherwise it answers the
sentinel. Each test adds an oracle for what *its* payloads must get.

Meanwhile a ``Watcher`` connection holds a named VM (vCPUs with phyids, all chips, a pending
IPI, routed irqs); after every example its phyid map, registers, attrs and a routing probe must
be exactly as before, and the daemon must still answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzzers.watcher import Watcher
from fuzzers.wire import HANDLE_SETUP as SETUP
from fuzzers.wire import exchange
from lvz.protocol import abi
from lvz.protocol.abi import U32_MAX, U64_MAX
from lvz.protocol.schema import METHODS

from .daemon_fixtures import DaemonProcess, start_daemon, unique_name

GUEST_CALLS = frozenset(
    {"vcpu.iocsr_read", "vcpu.iocsr_write", "vcpu.mmio_read", "vcpu.mmio_write", "vcpu.hypercall"}
)
MAX_MESSAGE = 1 << 16
MAX_VMS = 8

FUZZ = settings(
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


class Target:
    def __init__(self, daemon: DaemonProcess, watcher: Watcher) -> None:
        self.daemon = daemon
        self.path = str(daemon.socket)
        self.watcher = watcher

    def after_example(self) -> None:
        """The watcher's VM is untouched and the daemon alive; other named VMs are removed."""
        assert self.daemon.proc.poll() is None, self.daemon.log_text()
        assert self.watcher.observe() == self.watcher.baseline
        self.watcher.cleanup_others()


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    with start_daemon("--max-vms", str(MAX_VMS), "--max-message", str(MAX_MESSAGE)) as daemon:
        watcher = Watcher(str(daemon.socket), unique_name("watch"))
        watcher.check_probe_meaning()
        try:
            yield Target(daemon, watcher)
            assert watcher.observe() == watcher.baseline
        finally:
            watcher.close()
    assert daemon.proc.returncode == 0, daemon.log_text()


# ---------------------------------------------------------------------- strategies --------------

INTS = st.one_of(
    st.integers(-4, 300),
    st.sampled_from(
        [
            U32_MAX,
            U32_MAX + 1,
            U64_MAX,
            -(1 << 63),
            1 << 63,
            abi.CPUID,
            abi.ESTAT,
            0x1000,
            0x1008,
            0x1040,
            0x1400,
            0x40000001,
            0x40000004,
            0x40000006,
        ]
    ),
    st.integers(-(1 << 63), U64_MAX),
)
SCALARS = st.one_of(
    st.none(), st.booleans(), INTS, st.floats(), st.text(max_size=12), st.binary(max_size=12)
)
KEYS = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["vm", "vcpu", "id", "value", "name"]),
    st.binary(max_size=4),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(KEYS, inner, max_size=5)),
    max_leaves=30,
)
MSGIDS = st.one_of(
    st.integers(0, 50),
    st.sampled_from([U32_MAX, U32_MAX + 1, -1]),
    st.integers(-(1 << 63), U64_MAX),
)
METHOD_NAMES = st.one_of(
    st.sampled_from(sorted(METHODS)),
    st.text(max_size=16),
    st.sampled_from(["vm.frobnicate", "kvm.", "", "VCPU.RUN"]),
)
SHAPED = st.one_of(
    st.tuples(
        st.sampled_from([0, 0, 0, 1, 2, -1, False]),
        MSGIDS,
        METHOD_NAMES | VALUES,
        st.dictionaries(KEYS, VALUES, max_size=4) | VALUES,
    ).map(list),
    st.lists(VALUES, max_size=6),
    VALUES,
)


def _usable(msgid: object) -> bool:
    return type(msgid) is int and 0 <= msgid <= U32_MAX


def _expected(obj: Any) -> tuple[str, Any]:
    """What PROTOCOL.md §2 says one decoded message gets: a response to a msgid or EBADMSG."""
    if type(obj) is list and len(obj) >= 2 and _usable(obj[1]):
        return "response", obj[1]
    return "protocol_error", "EBADMSG"


def _observed(msg: list[Any]) -> tuple[str, Any]:
    if msg[0] == 1:
        return "response", msg[1]
    return "protocol_error", msg[2]["name"]


# ---------------------------------------------------------------------- the tests ---------------


def _corrupt(raw: bytes, at: int, junk: bytes) -> bytes:
    """A message with bytes spliced in (or, past its end, appended)."""
    at %= len(raw) + 1
    return raw[:at] + junk + raw[at:]


@settings(FUZZ, max_examples=200)
@given(
    payload=st.one_of(
        st.binary(max_size=600),
        st.builds(
            lambda obj, at, junk: _corrupt(msgpack.packb(obj), at, junk),
            SHAPED,
            st.integers(0, 40),
            st.binary(min_size=1, max_size=3),
        ),
    )
)
def test_random_bytes(target: Target, payload: bytes) -> None:
    """Arbitrary bytes and corrupted messages: answered, or refused with EPROTO (not msgpack)
    or E2BIG (a header announcing more than --max-message) and closed."""
    ex = exchange(target.path, payload)
    if ex.closed_with:
        assert ex.closed_with in ("EPROTO", "E2BIG"), ex.messages[-1]
    target.after_example()


@settings(FUZZ, max_examples=200)
@given(objs=st.lists(SHAPED, min_size=1, max_size=6))
def test_random_msgpack_values(target: Target, objs: list[Any]) -> None:
    """Valid msgpack with string/bytes keys never closes the connection, and every message gets
    exactly what §2 says: a response to a usable msgid, else an EBADMSG protocol_error."""
    payload = b"".join(msgpack.packb(o) for o in objs)
    decoded = _decode_all(payload)
    ex = exchange(target.path, payload)
    assert ex.answered and not ex.closed_with, ex.messages[-1:]
    got = [_observed(m) for m in ex.replies()]
    assert got == [_expected(o) for o in decoded]
    for m, o in zip(ex.replies(), decoded, strict=True):
        if m[0] != 1:
            continue
        if not (len(o) == 4 and type(o[0]) is int and o[0] == 0):
            want: str | None = "EBADMSG"
        elif type(o[2]) is not str:
            want = "EBADMSG"
        else:
            want = _predicted_error(o[2], o[3])
        if want is not None:
            assert m[2] is not None and m[2]["name"] == want, (o, m)
    target.after_example()


def _decode_all(payload: bytes) -> list[Any]:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(payload)
    return list(unpacker)


@settings(FUZZ, max_examples=40)
@given(
    key=st.one_of(
        st.integers(-(1 << 63), U64_MAX),
        st.none(),
        st.booleans(),
        st.floats(allow_nan=False),
        st.tuples(st.integers(0, 9)),
    ),
    prefix=st.lists(st.just([0, 9, "kvm.get_api_version", {}]), max_size=2),
)
def test_non_string_map_keys_are_eproto(target: Target, key: Any, prefix: list[Any]) -> None:
    """protocol-additions.md: a non-string map key is EPROTO and closes the connection, after
    everything before it was answered."""
    bad = msgpack.packb([0, 1, "hello", {key: 1}], strict_types=False)
    payload = b"".join(msgpack.packb(p) for p in prefix) + bad
    ex = exchange(target.path, payload)
    assert ex.closed_with == "EPROTO" and not ex.answered
    assert [m[1] for m in ex.messages[:-1]] == [9] * len(prefix)
    target.after_example()


def _sized(n: int) -> bytes:
    """A well-formed request (it gets EINVAL: unknown parameter) of exactly ``n`` bytes."""
    head = msgpack.packb([0, 7, "kvm.get_api_version", {"pad": b""}])
    body = max(0, n - len(head))
    for _ in range(3):  # the bin header grows with the length: settle it
        raw = msgpack.packb([0, 7, "kvm.get_api_version", {"pad": b"x" * body}])
        body += n - len(raw)
    raw = msgpack.packb([0, 7, "kvm.get_api_version", {"pad": b"x" * body}])
    assert len(raw) == n
    return raw


@settings(FUZZ, max_examples=30)
@given(
    n=st.one_of(
        st.integers(MAX_MESSAGE - 8, MAX_MESSAGE + 8),
        st.integers(MAX_MESSAGE // 2, 2 * MAX_MESSAGE),
    ),
    kind=st.sampled_from(["bin", "map", "list"]),
)
def test_size_limit(target: Target, n: int, kind: str) -> None:
    """Up to --max-message bytes a message is read and answered; one byte more is E2BIG + close."""
    if kind == "bin":
        raw = _sized(n)
    else:
        count = n // 10
        item: Any = (
            {f"k{i:07d}": i for i in range(count)}
            if kind == "map"
            else list(range(1000, 1000 + count))
        )
        raw = msgpack.packb([0, 7, "vm.info", {"vm": item}])
    ex = exchange(target.path, raw)
    if len(raw) <= MAX_MESSAGE:
        assert ex.answered, ex.messages[-1:]
        assert ex.replies()[0][1] == 7 and ex.replies()[0][2]["name"] == "EINVAL"
    else:
        assert ex.closed_with == "E2BIG" and not ex.answered
    target.after_example()


@settings(FUZZ, max_examples=30)
@given(
    depth=st.integers(1, 3000),
    container=st.sampled_from([b"\x91", b"\x81\xa1k"]),
    inside=st.booleans(),
)
def test_deep_nesting(target: Target, depth: int, container: bytes, inside: bool) -> None:
    """Deeply nested values: answered while the decoder can hold them (msgpack's limit is 1024
    levels); deeper is refused with EPROTO and a close, never a crash."""
    nested = container * depth + b"\xc0"
    # Inside: the value of a real parameter (EINVAL); else a whole message (EBADMSG).
    payload = b"\x94\x00\x05\xa5hello\x81\xa8protocol" + nested if inside else nested
    ex = exchange(target.path, payload)
    if depth + inside < 1000:
        assert ex.answered
        reply = ex.replies()[0]
        if inside:
            assert reply[1] == 5 and reply[2]["name"] == "EINVAL"
        else:
            assert reply[1] == "protocol_error" and reply[2]["name"] == "EBADMSG"
    elif not ex.answered:
        assert ex.closed_with == "EPROTO"
    target.after_example()


# ---- well-formed requests with random parameters, deep enough to reach the chips --------------


GOOD = {
    "handle": st.integers(0, 8),
    "vm": st.integers(0, 8),
    "vcpu": st.integers(0, 8),
    "device": st.integers(0, 8),
    "u32": INTS,
    "u64": INTS,
    "int": INTS,
    "str": st.one_of(
        st.sampled_from(
            ["loongarch-ipi", "loongarch-eiointc", "loongarch-pchpic", "one_reg", "max_vcpus", ""]
        ),
        st.text(max_size=10),
    ),
    "timeout": st.one_of(st.floats(0, 0.02), st.integers(0, 0), st.floats()),
    "args": st.lists(INTS, max_size=7),
    "source": st.one_of(
        st.builds(lambda k, n: {k: n}, st.sampled_from(["pin", "eiointc_irq"]), INTS),
        st.builds(lambda a, d: {"msi": {"address": a, "data": d}}, INTS, INTS),
    ),
}
WRONG = st.one_of(SCALARS, st.lists(INTS, max_size=3), st.dictionaries(KEYS, INTS, max_size=2))


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, Any]:
    method = draw(st.one_of(st.sampled_from(sorted(METHODS)), METHOD_NAMES))
    if draw(st.integers(0, 30)) == 0:
        return method, draw(VALUES)  # params that may not be a map
    params: dict[str, Any] = {}
    for name, kind, required in METHODS.get(method, ()):
        if draw(st.floats(0, 1)) < (0.92 if required else 0.5):
            params[name] = draw(GOOD[kind] if draw(st.floats(0, 1)) < 0.8 else WRONG)
    if draw(st.integers(0, 8)) == 0:
        params[draw(st.text(max_size=6))] = draw(SCALARS)
    return method, params


def _predicted_error(method: str, params: Any) -> str | None:
    """The error §2's check order fixes without knowing any state (None: not fixed)."""
    if type(params) is not dict:
        return "EBADMSG"
    specs = METHODS.get(method)
    if specs is None:
        return "ENOTTY"
    names = {n for n, _, _ in specs}
    if any(k not in names for k in params):
        return "EINVAL"
    if any(required and n not in params for n, _, required in specs):
        return "EINVAL"
    return None


@settings(FUZZ, max_examples=250)
@given(reqs=st.lists(requests(), min_size=1, max_size=25))
def test_random_requests(target: Target, reqs: list[tuple[str, Any]]) -> None:
    """Real and unknown methods with right, wrong, missing and extra parameters, pipelined after
    a set-up that gives the connection a VM with chips: one response per request, in order."""
    msgs = [[0, i + 1, m, p] for i, (m, p) in enumerate(SETUP)]
    msgs += [[0, 1000 + i, m, p] for i, (m, p) in enumerate(reqs)]
    ex = exchange(target.path, b"".join(msgpack.packb(m) for m in msgs))
    assert ex.answered and not ex.closed_with, ex.messages[-1:]
    replies = ex.replies()
    assert all(r[0] == 1 for r in replies), replies
    setup = [r for r in replies if r[1] <= len(SETUP)]
    assert [r[1] for r in setup] == list(range(1, len(SETUP) + 1))
    assert all(r[2] is None for r in setup), setup
    # vcpu.run, and a guest access given a timeout (it may wait for a VMM to complete its
    # exit), are answered by a task of their own: not in order, and not after the half-close.
    waits = {
        1000 + i
        for i, (m, p) in enumerate(reqs)
        if m == "vcpu.run" or (m in GUEST_CALLS and isinstance(p, dict) and "timeout" in p)
    }
    got = [r for r in replies if r[1] >= 1000 and r[1] not in waits]
    assert [r[1] for r in got] == [1000 + i for i in range(len(reqs)) if 1000 + i not in waits]
    for r in got:
        method, params = reqs[r[1] - 1000]
        want = _predicted_error(method, params)
        if want is not None:
            assert r[2] is not None and r[2]["name"] == want, (method, params, r)
    target.after_example()


def test_timestamp_is_a_value_no_parameter_accepts(target: Target) -> None:
    """msgpack decodes the timestamp ext (-1) itself, so it is a valid value, not a framing
    error: as a parameter it is mistyped (EINVAL), as a msgid unusable (protocol_error
    EBADMSG), and the connection stays open (protocol-additions.md)."""
    stamp = msgpack.Timestamp(1, 0)
    ex = exchange(target.path, msgpack.packb([0, 1, "hello", {"protocol": stamp}]))
    assert ex.answered
    [reply] = ex.replies()
    assert reply[:2] == [1, 1]
    assert reply[2]["name"] == "EINVAL"
    assert "protocol" in reply[2]["message"]
    ex = exchange(target.path, msgpack.packb([0, stamp, "hello", {}]))
    assert ex.answered
    [note] = ex.replies()
    assert note[:2] == [2, "protocol_error"]
    assert note[2]["name"] == "EBADMSG"
    target.after_example()


def test_other_ext_types_are_eproto(target: Target) -> None:
    head = msgpack.packb([0, 1, "hello", {"protocol": None}])[:-1]  # drop the nil
    for code in (0, 5, 127, -2, -128):
        payload = head + b"\xd5" + (code & 0xFF).to_bytes(1, "little") + b"ab"  # fixext 2
        ex = exchange(target.path, payload)
        assert ex.closed_with == "EPROTO" and not ex.answered, code
    target.after_example()
