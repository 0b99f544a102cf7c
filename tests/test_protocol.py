"""The sans-I/O protocol core, driven with plain byte strings (no sockets, no trio)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lvz.protocol import (
    NEED_DATA,
    BadRequest,
    ClientConnection,
    KvmError,
    Malformed,
    Notification,
    RemoteProtocolError,
    Request,
    Response,
    ServerConnection,
    abi,
)
from lvz.protocol.errors import ERRNO
from lvz.protocol.schema import METHODS, validate


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


REQ = pack([0, 7, "vcpu.get_one_reg", {"vcpu": 3, "id": abi.CPUID}])


def drain(conn: ServerConnection | ClientConnection) -> list[object]:
    out: list[object] = []
    while (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


def test_whole_message_is_one_validated_request() -> None:
    s = ServerConnection()
    s.receive_data(REQ)
    assert drain(s) == [
        Request(msgid=7, method="vcpu.get_one_reg", params={"vcpu": 3, "id": abi.CPUID})
    ]


def test_one_byte_at_a_time_needs_data_until_the_last_byte() -> None:
    s = ServerConnection()
    for i in range(len(REQ) - 1):
        s.receive_data(REQ[i : i + 1])
        assert s.next_event() is NEED_DATA
    s.receive_data(REQ[-1:])
    ev = s.next_event()
    assert isinstance(ev, Request) and ev.msgid == 7
    assert s.next_event() is NEED_DATA


def test_trailing_data_stays_buffered_for_the_next_event() -> None:
    s = ServerConnection()
    second = pack([0, 8, "kvm.get_api_version", {}])
    s.receive_data(REQ + second[:3])
    assert isinstance(s.next_event(), Request)
    assert s.next_event() is NEED_DATA
    s.receive_data(second[3:])
    ev = s.next_event()
    assert isinstance(ev, Request) and ev.msgid == 8


def test_many_pipelined_requests_in_one_chunk() -> None:
    s = ServerConnection()
    s.receive_data(b"".join(pack([0, i, "kvm.list_vms", {}]) for i in range(500)))
    assert [e.msgid for e in drain(s)] == list(range(500))  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("message", "errno_name"),
    [
        ([0, 1, 5, {}], "EBADMSG"),  # method not a string
        ([0, 1, "hello", []], "EBADMSG"),  # params not a map
        ([0, 1, "hello"], "EBADMSG"),  # three elements
        ([1, 1, None, {}], "EBADMSG"),  # a response sent to the daemon
        ([0, 1, "no.such", {}], "ENOTTY"),
        ([0, 1, "vcpu.get_one_reg", {"vcpu": 1}], "EINVAL"),  # missing id
        ([0, 1, "vcpu.get_one_reg", {"vcpu": 1, "id": 1, "x": 2}], "EINVAL"),  # unknown
        ([0, 1, "vcpu.get_one_reg", {"vcpu": 1, "id": -1}], "EINVAL"),  # negative u64
        ([0, 1, "vcpu.get_one_reg", {"vcpu": True, "id": 1}], "EINVAL"),  # bool is no int
        ([0, 1, "vcpu.run", {"vcpu": 1, "timeout": float("inf")}], "EINVAL"),
        ([0, 1, "vcpu.run", {"vcpu": 1, "timeout": -0.5}], "EINVAL"),
        ([0, 1, "vcpu.hypercall", {"vcpu": 1, "code": 1, "args": [1] * 7}], "EINVAL"),
    ],
)
def test_bad_requests_with_a_usable_msgid_get_an_error_response(
    message: list[object], errno_name: str
) -> None:
    s = ServerConnection()
    s.receive_data(pack(message))
    ev = s.next_event()
    assert isinstance(ev, BadRequest)
    assert ev.msgid == 1 and ev.error.name == errno_name and ev.error.errno == ERRNO[errno_name]


def test_error_names_the_parameter() -> None:
    with pytest.raises(KvmError, match="'value'"):
        validate("vcpu.set_one_reg", {"vcpu": 1, "id": 2, "value": "x"})
    with pytest.raises(KvmError, match="missing parameter 'id'"):
        validate("vcpu.get_one_reg", {"vcpu": 1})


def test_optional_nil_counts_as_absent_but_required_nil_does_not() -> None:
    assert validate("kvm.create_vm", {"name": None, "max_phyid": 4096}) == {"max_phyid": 4096}
    with pytest.raises(KvmError) as exc:
        validate("kvm.open_vm", {"name": None})
    assert exc.value.name == "EINVAL"


@pytest.mark.parametrize("message", [[0, -1, "hello", {}], [0, 2**32, "x", {}], "hi", 5, {}])
def test_no_usable_msgid_is_a_malformed_event(message: object) -> None:
    s = ServerConnection()
    s.receive_data(pack(message))
    ev = s.next_event()
    assert isinstance(ev, Malformed) and ev.error.name == "EBADMSG"
    s.receive_data(REQ)  # the connection goes on
    assert isinstance(s.next_event(), Request)


def test_non_msgpack_bytes_break_the_connection_for_good() -> None:
    s = ServerConnection()
    s.receive_data(b"\xc1" + REQ)  # 0xc1 is never valid msgpack
    with pytest.raises(RemoteProtocolError) as exc:
        s.next_event()
    assert exc.value.name == "EPROTO"
    with pytest.raises(RemoteProtocolError):
        s.next_event()


def test_ext_types_and_integer_map_keys_are_refused() -> None:
    for raw in (pack(msgpack.ExtType(1, b"x")), pack([0, 1, "hello", {1: 2}])):
        s = ServerConnection()
        s.receive_data(raw)
        with pytest.raises(RemoteProtocolError):
            s.next_event()


@pytest.mark.parametrize("limit", [64, 1024, 1 << 20])
def test_message_size_limit_exceeded_by_one(limit: int) -> None:
    header = pack([0, 1, "hello", {"client": ""}])
    overhead = len(header)
    # pick a string length that makes the whole message exactly limit bytes, then one more
    for extra, ok in ((0, True), (1, False)):
        n = limit - overhead + extra
        body = pack([0, 1, "hello", {"client": "x" * n}])
        n -= len(body) - (limit + extra)
        body = pack([0, 1, "hello", {"client": "x" * n}])
        assert len(body) == limit + extra
        s = ServerConnection(max_message=limit)
        s.receive_data(body)
        if ok:
            assert isinstance(s.next_event(), BadRequest | Request)
        else:
            with pytest.raises(RemoteProtocolError) as exc:
                s.next_event()
            assert exc.value.name == "E2BIG"


def test_a_message_announced_within_the_limit_is_read_to_its_end() -> None:
    s = ServerConnection(max_message=1024)
    s.receive_data(b"\xa1x")  # a whole message (not a request) first: still answered
    s.receive_data(b"\xdb\x00\x00\x03\xfb")  # str32 of 1019 bytes: 1024 in all, fits
    assert isinstance(s.next_event(), Malformed)
    assert s.next_event() is NEED_DATA
    s.receive_data(b"y" * 1000)
    assert s.next_event() is NEED_DATA
    s.receive_data(b"y" * 19)
    assert isinstance(s.next_event(), Malformed)


def test_a_message_announcing_more_than_the_limit_is_refused_at_its_header() -> None:
    s = ServerConnection(max_message=1024)
    s.receive_data(b"\xdb\xff\xff\xff\xff")  # str32 announcing 4 GiB
    with pytest.raises(RemoteProtocolError) as exc:
        s.next_event()
    assert exc.value.name == "E2BIG" and "1024-byte limit" in exc.value.message


def test_eof_inside_a_message_is_reported() -> None:
    s = ServerConnection()
    s.receive_data(REQ[:5])
    s.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        s.next_event()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=64))
def test_fuzz_raw_bytes_only_protocol_errors_escape(data: bytes, chunk: int) -> None:
    s = ServerConnection(max_message=256)
    try:
        for i in range(0, len(data), chunk):
            s.receive_data(data[i : i + chunk])
            drain(s)
        s.receive_data(b"")
        drain(s)
    except RemoteProtocolError:
        pass


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_values, max_size=4), st.sampled_from(sorted(METHODS)))
def test_fuzz_msgpack_values_always_yield_an_event(items: list[object], method: str) -> None:
    s = ServerConnection()
    for msg in ([0, 1, method, {"vcpu": items}], items, [0, *items]):
        s.receive_data(pack(msg))
        ev = s.next_event()
        assert isinstance(ev, Request | BadRequest | Malformed)


def test_client_pairs_responses_and_notifications() -> None:
    c = ClientConnection()
    s = ServerConnection()
    msgid, data = c.send_request("kvm.get_api_version", {})
    s.receive_data(data)
    req = s.next_event()
    assert isinstance(req, Request) and req.msgid == msgid
    c.receive_data(
        s.send_notification("irq", {"seq": 1})
        + s.send_result(msgid, {"version": 12})
        + s.send_error(msgid + 1, KvmError("EBADF", "gone"))
    )
    events = drain(c)
    assert events[0] == Notification(event="irq", params={"seq": 1})
    assert events[1] == Response(msgid=msgid, error=None, result={"version": 12})
    err = events[2]
    assert isinstance(err, Response) and isinstance(err.error, KvmError)
    assert err.error.errno == 9 and err.error.name == "EBADF" and str(err.error) == "EBADF: gone"


def test_client_msgids_wrap_at_u32() -> None:
    c = ClientConnection()
    c._next_id = 2**32 - 1
    assert c.send_request("hello", {})[0] == 2**32 - 1
    assert c.send_request("hello", {})[0] == 0


def test_register_ids_match_the_kernel_encoding() -> None:
    assert abi.CPUID == 0x9030000000010100
    assert abi.TMID == 0x9030000000010200
    assert abi.ESTAT == 0x9030000000010028
    assert abi.COUNTER == 0x9030000000020001
    assert abi.decode(abi.CPUID) == (abi.RegClass.CSR, 0x20)
    assert abi.decode(abi.cpucfg_id(20)) == (abi.RegClass.CPUCFG, 20)


@pytest.mark.parametrize(
    "reg_id",
    [
        abi.CPUID & ~abi.KVM_REG_SIZE_MASK | 0x0020000000000000,  # U32
        abi.csr_id(0x800),
        abi.cpucfg_id(21),
        abi.KVM_REG_LOONGARCH | abi.KVM_REG_SIZE_U64 | 0x30000,  # FPSIMD
        abi.KVM_REG_SIZE_U64 | 0x10000 | (0x20 << 3),  # no LoongArch arch bits
    ],
)
def test_register_decode_errors_are_einval(reg_id: int) -> None:
    with pytest.raises(KvmError) as exc:
        abi.decode(reg_id)
    assert exc.value.name == "EINVAL"
