"""Sans-I/O connection state for both ends of the lvz protocol.

Theory of operation: bytes go in through ``receive_data`` (``b""`` means EOF), typed events come
out of ``next_event`` (or ``NEED_DATA``), and ``send_*`` return the bytes to write. Nothing here
touches a socket, awaits or sleeps, so the trio daemon, the trio client and the blocking client
share this core, and the tests drive it with plain byte strings.

Framing is MessagePack-RPC with no length prefix. The decoder never holds more than
``max_message`` bytes of one unfinished message: pending input is fed to the Unpacker only as far
as that bound allows, so a peer that streams an endless message is cut off at the limit instead of
growing our buffer. After any unpack error other than "need more data" the Unpacker is unusable
(msgpack's README), so the connection enters the ERROR state and only reports that error again.
"""

from __future__ import annotations

from collections import deque
from enum import Enum
from typing import Any, Final

import msgpack

from .abi import U32_MAX
from .errors import KvmError, LocalProtocolError, ProtocolError, RemoteProtocolError
from .events import BadRequest, Event, Malformed, Notification, Request, Response
from .schema import validate

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "NEED_DATA",
    "ClientConnection",
    "ServerConnection",
]

DEFAULT_MAX_MESSAGE: Final = 1 << 20

#: The decoder's first buffer; it grows only for a large message (see ``_Decoder``).
BASE_BUFFER: Final = 4096

#: One encoder for every server connection: encoding is synchronous and keeps no state
#: between messages, and a per-connection Packer would cost 256 KiB each, idle or not.
_SERVER_PACK = msgpack.Packer(use_bin_type=True).pack


class _Sentinel(Enum):
    NEED_DATA = "NEED_DATA"


#: Returned by ``next_event`` when no whole message is buffered.
NEED_DATA: Final = _Sentinel.NEED_DATA


def _reject_ext(code: int, data: bytes) -> object:
    raise ValueError(f"msgpack ext type {code} is not part of the lvz protocol")


class _Decoder:
    """Bounded streaming msgpack decoder shared by both roles.

    Memory: an Unpacker costs about 40 KiB even empty (msgpack's parse stack) and grows its
    buffer by doubling without ever giving it back, so a connection that once received a
    large message would keep that buffer for life. So an Unpacker exists only while bytes
    are buffered: it is made (with a ``BASE_BUFFER`` buffer) when data arrives and dropped
    whenever everything fed has been decoded. An idle connection holds no decoder memory,
    whatever it received before; ``capacity`` is an upper bound of the live buffer (msgpack's
    growth rule), which ``held`` reports for the daemon's budget.
    """

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._unpacker: msgpack.Unpacker | None = None
        self._base = 0  # stream offset where the current Unpacker began
        self._pending: deque[memoryview] = deque()
        self._pending_bytes = 0
        self._fed = 0  # bytes fed to Unpackers so far
        self._start = 0  # stream offset where the unfinished message begins
        self.capacity = 0  # >= the live Unpacker's buffer; 0 without one
        self._eof = False
        self._error: RemoteProtocolError | None = None

    def _feed(self, data: bytes | memoryview) -> None:
        unpacker = self._unpacker
        if unpacker is None:
            unpacker = self._unpacker = msgpack.Unpacker(
                raw=False,
                strict_map_key=True,
                read_size=min(BASE_BUFFER, self.max_message),
                max_buffer_size=self.max_message,
                ext_hook=_reject_ext,
            )
            self._base = self._fed  # == self._start: nothing was unfinished
            self.capacity = min(BASE_BUFFER, self.max_message)
        n = len(data)
        need = self._fed - self._start + n
        if need > self.capacity:  # msgpack reallocates to min(2 * need, max_buffer_size)
            self.capacity = max(self.capacity, min(2 * need, self.max_message))
        unpacker.feed(data)
        self._fed += n

    @property
    def unfinished(self) -> int:
        """Stream offset where an unfinished message begins, or -1 if none is buffered."""
        if self._fed > self._start or self._pending_bytes:
            return self._start
        return -1

    @property
    def held(self) -> int:
        """Bytes held for unfinished input (an upper bound), for the daemon's budget."""
        return self.capacity + self._pending_bytes

    def receive_data(self, data: bytes) -> None:
        if not data:
            self._eof = True
        elif not self._pending and len(data) <= self.max_message - (self._fed - self._start):
            self._feed(data)  # the common case: straight in, no copy, no queue
        else:
            self._pending.append(memoryview(data))
            self._pending_bytes += len(data)

    def next_object(self) -> object:
        """The next decoded object, or NEED_DATA; raises RemoteProtocolError for bad bytes."""
        if self._error is not None:
            raise self._error
        while True:
            unpacker = self._unpacker
            if unpacker is not None:
                try:
                    # With a default, "need more data" is a return value, not a StopIteration
                    # raised and caught once per batch (per request, when sequential).
                    obj = next(unpacker, NEED_DATA)
                except Exception as exc:  # msgpack raises several types; all mean "not msgpack"
                    self._error = RemoteProtocolError("EPROTO", f"undecodable message: {exc}")
                    raise self._error from None
                if obj is not NEED_DATA:
                    # tell() also moves inside a partial message: only trust it after a whole one.
                    self._start = self._base + unpacker.tell()
                    return obj
                if self._fed == self._start:
                    self._unpacker = None  # nothing unfinished (see the class docstring)
                    self.capacity = 0
            buffered = self._fed - self._start
            space = self.max_message - buffered
            if not self._pending:
                if self._eof and buffered:
                    self._error = RemoteProtocolError(
                        "EPROTO", f"connection closed inside a message ({buffered} bytes)"
                    )
                    raise self._error
                return NEED_DATA
            if space <= 0:
                self._error = RemoteProtocolError(
                    "E2BIG", f"message larger than the {self.max_message}-byte limit"
                )
                raise self._error
            chunk = self._pending[0]
            if len(chunk) <= space:
                self._pending.popleft()
            else:
                self._pending[0] = chunk[space:]
                chunk = chunk[:space]
            self._pending_bytes -= len(chunk)
            self._feed(chunk)


def _usable_msgid(obj: object) -> int | None:
    if type(obj) is list and len(obj) >= 2:
        msgid = obj[1]
        if type(msgid) is int and 0 <= msgid <= U32_MAX:
            return msgid
    return None


class ServerConnection:
    """The daemon's side: turns bytes into validated requests, responses into bytes."""

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self._decoder = _Decoder(max_message)
        self._pack = _SERVER_PACK

    def receive_data(self, data: bytes) -> None:
        self._decoder.receive_data(data)

    @property
    def unfinished(self) -> int:
        """Stream offset where an unfinished message begins, or -1: the slowloris clock."""
        return self._decoder.unfinished

    @property
    def held(self) -> int:
        """Bytes held for unfinished input beyond the idle size (the daemon-wide budget)."""
        return self._decoder.held

    def discard_input(self) -> None:
        """Forget buffered input at once: the connection is being closed, its memory must
        not wait for the goodbye."""
        self._decoder = _Decoder(self._decoder.max_message)

    def next_event(self) -> Event | _Sentinel:
        """The next request (validated), BadRequest, Malformed, or NEED_DATA.

        Raises RemoteProtocolError when the bytes cannot be framed: report it and close.
        """
        obj = self._decoder.next_object()
        if obj is NEED_DATA:
            return NEED_DATA
        if type(obj) is list and len(obj) == 4 and type(obj[0]) is int and obj[0] == 0:
            _, msgid, method, params = obj
            if type(msgid) is int and 0 <= msgid <= U32_MAX:
                if type(method) is not str:
                    return BadRequest(msgid=msgid, error=KvmError(
                        "EBADMSG", "the method of a request must be a string"))
                if type(params) is not dict:
                    return BadRequest(msgid=msgid, error=KvmError(
                        "EBADMSG", "the params of a request must be a map"))
                try:
                    params = validate(method, params)
                except KvmError as err:
                    return BadRequest(msgid=msgid, error=err)
                return Request(msgid, method, params)  # positional: the hot path
        msgid = _usable_msgid(obj)
        reason = "not a request: expected [0, msgid, method, params] with a u32 msgid"
        if msgid is not None:
            return BadRequest(msgid=msgid, error=KvmError("EBADMSG", reason))
        return Malformed(error=ProtocolError("EBADMSG", reason))

    def send_result(self, msgid: int, result: dict[str, Any]) -> bytes:
        return self._pack([1, msgid, None, result])

    def send_error(self, msgid: int, error: KvmError) -> bytes:
        return self._pack([1, msgid, error.to_wire(), None])

    def send_notification(self, event: str, params: dict[str, Any]) -> bytes:
        return self._pack([2, event, params])

    def send_protocol_error(self, error: ProtocolError) -> bytes:
        return self._pack([2, "protocol_error", error.to_wire()])


class ClientConnection:
    """The client's side: numbers requests, turns responses and notifications into events."""

    def __init__(self, max_message: int = 64 * DEFAULT_MAX_MESSAGE) -> None:
        # Responses may legitimately be larger than requests (a 65,536-entry phyid map).
        self._decoder = _Decoder(max_message)
        self._pack = msgpack.Packer(use_bin_type=True).pack
        self._next_id = 0

    def send_request(self, method: str, params: dict[str, Any]) -> tuple[int, bytes]:
        """Encode a request; returns its msgid (u32, wrapping) and the bytes to write."""
        msgid = self._next_id
        self._next_id = (msgid + 1) & U32_MAX
        try:
            return msgid, self._pack([0, msgid, method, params])
        except (TypeError, ValueError, OverflowError) as exc:
            raise LocalProtocolError("EINVAL", f"{method}: cannot encode params: {exc}") from None

    def receive_data(self, data: bytes) -> None:
        self._decoder.receive_data(data)

    def next_event(self) -> Event | _Sentinel:
        """The next Response / Notification, or NEED_DATA; raises RemoteProtocolError."""
        obj = self._decoder.next_object()
        if obj is NEED_DATA:
            return NEED_DATA
        if type(obj) is list:
            if len(obj) == 4 and obj[0] == 1 and type(obj[1]) is int:
                _, msgid, error, result = obj
                if error is None:
                    return Response(msgid=msgid, error=None,
                                    result=result if type(result) is dict else {})
                return Response(msgid=msgid, error=KvmError.from_wire(error), result=None)
            if len(obj) == 3 and obj[0] == 2 and type(obj[1]) is str and type(obj[2]) is dict:
                return Notification(event=obj[1], params=obj[2])
        raise RemoteProtocolError("EPROTO", f"the daemon sent something unexpected: {obj!r:.200}")

