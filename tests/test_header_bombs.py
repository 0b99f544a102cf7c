"""Messages whose headers announce more than they hold (issue 8, memory bounds).

msgpack's Unpacker allocates an array's whole list when it reads the header; the decoder's
header walker refuses a message whose announced elements cannot fit in ``--max-message``
before the Unpacker sees it. Against a real daemon the measure is its memory (VmHWM, the
peak RSS, from /proc): a memory bound, not a timing one. Then hypothesis checks the walker
never refuses a valid message within the limit, however the bytes are cut.
"""

from __future__ import annotations

import itertools
import socket
import struct
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lvz.clients import Kvm
from lvz.protocol import Request, ServerConnection
from lvz.protocol.connection import NEED_DATA, _Decoder, _Walker
from lvz.protocol.errors import RemoteProtocolError

from .daemon_fixtures import start_daemon

MiB = 1 << 20

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads the daemon's memory from /proc"
)


def vm_hwm(pid: int) -> int:
    """The process's peak resident memory in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def bombs() -> list[bytes]:
    """~3-5 KB each, announcing tens of MiB of lists: array16/32 headers nested and
    repeated, maps, and a request whose params hide one."""
    req = msgpack.packb([0, 1, "kvm.get_api_version", {}])
    return [
        b"\xdc\xff\xff" * 1000,  # 1,000 nested arrays of 65,535 elements
        (b"\xdd" + struct.pack(">I", 1 << 20)) * 1000,  # ... of 1 Mi elements
        b"\x94\x00\x01\xa3abc\x81\xa1p" + b"\xdc\xff\xff" * 1000,  # inside a request
        b"\xde\xff\xff\xa1k" * 800 + b"\xdc\xff\xff" * 500,
        req + b"\xdd\xff\xff\xff\xff",  # after a whole request: that one is answered
    ]


def send_bomb(path: Path, bomb: bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    s.sendall(bomb)
    return s


def what_was_said(s: socket.socket) -> list[Any]:
    """What the daemon sent before hanging up (or within 5 s, if it waits for more)."""
    s.settimeout(5)
    unpacker = msgpack.Unpacker(raw=False)
    msgs: list[Any] = []
    try:
        while data := s.recv(65536):
            unpacker.feed(data)
            msgs.extend(unpacker)
    except TimeoutError:
        msgs.append("still waiting for the rest of the message")
    return msgs


def test_header_bombs_are_refused_with_e2big_and_cost_the_daemon_no_memory() -> None:
    with start_daemon() as d:
        with Kvm.connect(d.socket) as kvm:
            kvm.get_api_version()
        before = vm_hwm(d.pid)
        # Kept open on our side, as an attacker would, so nothing is freed by our leaving.
        held = [send_bomb(d.socket, bomb) for _ in range(4) for bomb in bombs()]
        said = [what_was_said(s) for s in held]
        grown = vm_hwm(d.pid) - before
        # Unwalked, each bomb made the daemon allocate 30-80 MiB (20 bombs: > 1 GiB).
        assert grown < 32 * MiB, f"the daemon's peak RSS grew by {grown / MiB:.1f} MiB"
        for msgs in said:
            *answers, last = msgs
            assert last[:2] == [2, "protocol_error"], msgs
            assert last[2]["name"] == "E2BIG"
            assert "--max-message" in last[2]["message"]
            assert all(m[0] == 1 and m[2] is None for m in answers)
        assert [len(msgs) for msgs in said[:5]] == [1, 1, 1, 1, 2]  # the request is answered
        with Kvm.connect(d.socket) as kvm:
            assert kvm.get_api_version() == 12
        for s in held:
            s.close()


def test_a_split_bomb_is_refused_as_its_headers_arrive() -> None:
    """Cut into 1-byte reads, after whole small requests (the unwalked common path)."""
    conn = ServerConnection()
    req = msgpack.packb([0, 7, "kvm.get_api_version", {}])
    stream = req + req + b"\x92\x00" + b"\xdc\xff\xff" * 100
    seen: list[int] = []
    refused: RemoteProtocolError | None = None
    for i in range(len(stream)):
        conn.receive_data(stream[i : i + 1])
        try:
            while (ev := conn.next_event()) is not NEED_DATA:
                assert isinstance(ev, Request)
                seen.append(ev.msgid)
        except RemoteProtocolError as exc:
            refused = exc
            break
    assert seen == [7, 7]
    assert refused is not None and refused.name == "E2BIG"
    assert i < len(req) * 2 + 2 + 3 * 20  # refused at the 17th header, not at the end


def test_an_unfinished_message_counts_what_msgpack_built_for_it() -> None:
    """The daemon's budget sees the lists an unfinished message made msgpack allocate."""
    conn = ServerConnection()
    conn.receive_data(b"\x94\x00\x01\xa3abc\x81\xa1p\xdc\xff\xff")  # 65,535 slots announced
    assert conn.next_event() is NEED_DATA
    assert conn.held >= 8 * 0xFFFF


# ---------------------------------------------------------------------- hypothesis ---------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=300)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=20) | st.dictionaries(st.text(max_size=8), inner, max_size=8)
    ),
    max_leaves=60,
)


@settings(max_examples=300, deadline=None)
@given(
    objs=st.lists(values, min_size=1, max_size=5),
    cuts=st.lists(st.integers(0, 4000)),
    big=st.integers(0, 3),
)
def test_the_walker_never_refuses_a_valid_message_within_the_limit(
    objs: list[object], cuts: list[int], big: int
) -> None:
    if big:  # a long array or map, so array16/32 and map16 headers are walked too
        objs.append(list(range(20 * big)) if big < 3 else {str(i): i for i in range(70)})
    packed = [msgpack.packb(o, use_bin_type=True) for o in objs]
    stream = b"".join(packed)
    decoder = _Decoder(max(map(len, packed)))  # the limit exactly: the largest one fits
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    got: list[object] = []
    for a, b in itertools.pairwise(points):
        decoder.receive_data(stream[a:b])
        while (obj := decoder.next_object()) is not NEED_DATA:
            got.append(obj)
    assert got == [msgpack.unpackb(p, raw=False, strict_map_key=False) for p in packed]
    assert decoder.held == 0


@settings(max_examples=300, deadline=None)
@given(obj=values, cut=st.integers(0, 10_000))
def test_the_walker_agrees_with_msgpack_where_a_message_ends(obj: object, cut: int) -> None:
    raw = msgpack.packb(obj, use_bin_type=True)
    walker = _Walker(len(raw))
    cut %= len(raw) + 1
    assert walker.walk(raw[:cut])
    assert walker.idle == (cut in (0, len(raw)))
    assert walker.walk(raw[cut:])
    assert walker.idle and walker.cost == 0
