"""Sans-I/O connection state for both ends of the lvz protocol.

Theory of operation: bytes go in through ``receive_data`` (``b""`` means EOF), typed events come
out of ``next_event`` (or ``NEED_DATA``), and ``send_*`` return the bytes to write. Nothing here
touches a socket, awaits or sleeps, so the trio daemon, the trio client and the blocking client
share this core, and the tests drive it with plain byte strings.

Framing is MessagePack-RPC with no length prefix. The decoder never holds more than
``max_message`` bytes of one unfinished message: pending input is fed to the Unpacker only as far
as that bound allows, so a peer that streams an endless message is cut off at the limit instead of
growing our buffer. msgpack allocates an array's list when it reads the header, so the bytes
of a message cut by a read (or holding an array16/32 header) are first walked header by header
(``_Walker``): a message announcing more elements than fit in ``max_message`` is refused (E2BIG)
before the Unpacker sees it. After any unpack error other than "need more data" the Unpacker is
unusable (msgpack's README), so the connection enters the ERROR state and only reports that
error again.
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


# ------------------------------------------------------------------ the header walker ---------

#: msgpack's parse stack: a container nested deeper than this is an unpack error (EPROTO).
MSGPACK_DEPTH: Final = 1024

#: What an unfinished message may cost beyond its bytes, for ``held`` (the daemon's budget):
#: each object msgpack built (an empty list is 56 bytes plus its slot) and each slot of an
#: array it allocated from a header.
OBJECT_COST: Final = 64
SLOT_COST: Final = 8


def _header_table() -> tuple[list[int], list[int], list[int]]:
    """Per first byte: header size, how many bytes of it give a length (0, 1, 2 or 4) and
    what that length counts: 0 a fixed-size scalar (size - header = payload), 1 payload
    bytes, 2 array elements, 3 map entries; -1 marks 0xc1, never used."""
    size = [1] * 256
    width = [0] * 256
    kind = [0] * 256
    for b in range(0x80, 0x90):
        kind[b] = 3
    for b in range(0x90, 0xA0):
        kind[b] = 2
    for b in range(0xA0, 0xC0):
        kind[b] = 1
    kind[0xC1] = -1
    for b, w, k, extra in (
        (0xC4, 1, 1, 0),
        (0xC5, 2, 1, 0),
        (0xC6, 4, 1, 0),  # bin
        (0xC7, 1, 1, 1),
        (0xC8, 2, 1, 1),
        (0xC9, 4, 1, 1),  # ext (+ type)
        (0xD9, 1, 1, 0),
        (0xDA, 2, 1, 0),
        (0xDB, 4, 1, 0),  # str
        (0xDC, 2, 2, 0),
        (0xDD, 4, 2, 0),  # array
        (0xDE, 2, 3, 0),
        (0xDF, 4, 3, 0),
    ):  # map
        size[b] = 1 + w + extra
        width[b] = w
        kind[b] = k
    for b, n in (
        (0xCA, 5),
        (0xCB, 9),
        (0xCC, 2),
        (0xCD, 3),
        (0xCE, 5),
        (0xCF, 9),
        (0xD0, 2),
        (0xD1, 3),
        (0xD2, 5),
        (0xD3, 9),
        (0xD4, 3),
        (0xD5, 4),
        (0xD6, 6),
        (0xD7, 10),
        (0xD8, 18),
    ):
        size[b] = n  # a fixed-size scalar: kind 0, the rest skipped as payload
    return size, width, kind


_SIZE, _WIDTH, _KIND = _header_table()


class _Walker:
    """The structure of buffered bytes, walked header by header without building anything.

    Why: msgpack's Unpacker allocates an array's whole list as soon as it reads the header,
    so a few KiB of nested headers announcing 65,535 elements each made the daemon allocate
    tens of MiB that no byte count (``--max-message``, ``--partial-budget``) saw. Every
    element takes at least one byte, so the elements a message has announced but not yet
    sent must fit in what is left of ``max_message``: the walker refuses one that cannot
    (E2BIG) before the Unpacker sees its headers. That bounds what an unfinished message can
    make msgpack allocate to O(max_message), and ``cost`` tells the daemon's budget about it.

    Incremental: it keeps the open containers' remaining element counts, the payload bytes
    still to skip and a header cut by a read, so a message trickled byte by byte is walked
    once. ``_Decoder`` runs it only where the Unpacker could allocate on a message's word:
    over bytes with an array16/32 header byte, or while a message is unfinished.
    """

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self.stack: list[int] = []  # remaining elements of each open container
        self.owed = 0  # sum of ``stack``: elements announced, not begun
        self.skip = 0  # payload bytes still to come
        self.partial = b""  # the start of a header a read cut in two
        self.length = 0  # bytes of the current message walked so far; 0 between messages
        self.objects = 0  # objects begun in the current message
        self.slots = 0  # array slots announced in the current message
        self.poisoned = False  # past bytes msgpack itself refuses: nothing more to walk
        self.error: RemoteProtocolError | None = None
        self.begin = 0  # offset in the last walked chunk where the current message began
        self.idle = True  # between messages: nothing announced is outstanding

    @property
    def cost(self) -> int:
        """What the unfinished message may have made msgpack allocate (an upper bound)."""
        if self.length == 0:
            return 0
        return OBJECT_COST * self.objects + SLOT_COST * self.slots

    def walk(self, data: bytes | memoryview) -> bool:
        """Walk ``data``, the next bytes of the stream; False (with ``error`` and ``begin``
        set) when a message in it cannot fit in ``max_message``."""
        if self.poisoned:
            return True
        carried = len(self.partial)  # a cut header's bytes, counted when it is whole
        if carried:
            data = self.partial + bytes(data)
            self.partial = b""
        n = len(data)
        i = 0
        stack = self.stack
        size_of = _SIZE
        width_of = _WIDTH
        kind_of = _KIND
        limit = self.max_message
        length = self.length
        skip = self.skip
        self.begin = 0
        while i < n:
            if skip:
                take: int = min(skip, n - i)
                skip -= take
                i += take
                length += take
                if skip:
                    break
            else:
                b: int = data[i]
                size: int = size_of[b]
                if i + size > n:
                    self.partial = bytes(data[i:])
                    break
                kind: int = kind_of[b]
                if kind < 0 or (kind >= 2 and len(stack) >= MSGPACK_DEPTH):
                    self.poisoned = True  # msgpack refuses it right there (EPROTO)
                    break
                if length == 0:
                    self.begin = max(0, i - carried)
                    self.objects = 0
                    self.slots = 0
                if stack:
                    stack[-1] -= 1
                    self.owed -= 1
                self.objects += 1
                length += size
                i += size
                if kind != 0:  # a fixed-size scalar's bytes are all header: nothing to skip
                    w: int = width_of[b]
                    if w == 0:
                        count: int = b & (0x1F if kind == 1 else 0x0F)
                    else:
                        at: int = i - size + 1
                        count = int.from_bytes(data[at : at + w], "big")
                    if kind == 1:
                        skip = count
                    elif count:
                        if kind == 3:
                            count *= 2  # a key and a value per entry
                        else:
                            self.slots += count
                        stack.append(count)
                        self.owed += count
                if length + self.owed + skip > limit:
                    self.error = RemoteProtocolError(
                        "E2BIG",
                        f"a message announces more than fits in the {limit}-byte "
                        f"limit (--max-message): {length + self.owed + skip} bytes at least",
                    )
                    self.length = length
                    self.skip = skip
                    self.idle = False  # and stays so: the decoder is done
                    return False
            if not skip:
                while stack and stack[-1] == 0:
                    stack.pop()
                if not stack:
                    length = 0  # a whole message: the next byte begins another
        self.length = length
        self.skip = skip
        self.idle = length == 0 and not self.partial and not self.poisoned
        return True


def _why(exc: Exception) -> str:
    """What msgpack found wrong. FormatError and StackError carry no message of their own, so
    a client was told "undecodable message: " and nothing else."""
    if isinstance(exc, msgpack.FormatError):
        return "a byte that starts no msgpack value (0xc1, the one msgpack never uses)"
    if isinstance(exc, msgpack.StackError):
        return "arrays or maps nested deeper than msgpack's limit"
    return str(exc) or type(exc).__name__


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

    def __init__(self, max_message: int, walk: bool = True) -> None:
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
        self._walks = walk
        self._walker: _Walker | None = None  # made by the first walk: most connections need none
        self._unwalked: list[bytes] = []  # fed without a walk, from stream offset:
        self._unwalked_at = 0
        self._refused: RemoteProtocolError | None = None  # raised once what precedes is out

    def _feed(self, data: bytes | memoryview) -> None:
        """Walk ``data`` if the Unpacker could allocate on its word, then feed it.

        The common case -- whole messages, no array16/32 header byte anywhere -- is not
        walked: msgpack builds at most what the bytes hold. If such bytes end inside a
        message, ``_catch_up`` walks that message before anything more is fed.
        """
        if self._walks:
            walker = self._walker
            if (
                (walker is None or walker.idle)
                and type(data) is bytes
                and 0xDC not in data
                and 0xDD not in data
            ):  # memchr, ~10 ns each
                if not self._unwalked:
                    self._unwalked_at = self._fed
                self._unwalked.append(data)
            else:
                walked = self._walk(data)
                if walked is None:
                    return
                data = walked
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

    def _walk(self, data: bytes | memoryview) -> bytes | memoryview | None:
        """What of ``data`` may be fed: all of it, the whole messages before a refused one,
        or None (nothing: a message was refused)."""
        if self._refused is not None:
            return None  # nothing of a refused message or after it reaches the Unpacker
        if self._unwalked and not self._catch_up():
            return None
        walker = self._walker
        if walker is None:
            walker = self._walker = _Walker(self.max_message)
        if walker.walk(data):
            return data
        self._refused = walker.error
        return data[: walker.begin] or None  # the whole messages before it still count

    def _catch_up(self) -> bool:
        """Walk what was fed unwalked, from the unfinished message on; False if refused."""
        walker = self._walker
        if walker is None:
            walker = self._walker = _Walker(self.max_message)
        start = self._start
        at = self._unwalked_at
        ok = True
        for chunk in self._unwalked:
            end = at + len(chunk)
            if end > start and not walker.walk(chunk[start - at :] if start > at else chunk):
                self._refused = walker.error
                ok = False
                break
            at = end
        self._unwalked.clear()
        return ok

    @property
    def unfinished(self) -> int:
        """Stream offset where an unfinished message begins, or -1 if none is buffered."""
        if self._fed > self._start or self._pending_bytes:
            return self._start
        return -1

    @property
    def held(self) -> int:
        """Bytes held for unfinished input (an upper bound), for the daemon's budget."""
        walker = self._walker
        cost = walker.cost if walker is not None else 0
        return self.capacity + self._pending_bytes + cost

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
                    self._error = RemoteProtocolError("EPROTO", f"undecodable message: {_why(exc)}")
                    raise self._error from None
                if obj is not NEED_DATA:
                    # tell() also moves inside a partial message: only trust it after a whole one.
                    self._start = self._base + unpacker.tell()
                    return obj
                if self._fed == self._start:
                    self._unpacker = None  # nothing unfinished (see the class docstring)
                    self.capacity = 0
                    self._unwalked.clear()
                elif self._unwalked:
                    self._catch_up()  # a message cut by a read: walk it before more comes
            if self._refused is not None:
                self._error = self._refused
                raise self._error
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
                    return BadRequest(
                        msgid=msgid,
                        error=KvmError("EBADMSG", "the method of a request must be a string"),
                    )
                if type(params) is not dict:
                    return BadRequest(
                        msgid=msgid,
                        error=KvmError("EBADMSG", "the params of a request must be a map"),
                    )
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
        # Responses may legitimately be larger than requests (a 65,536-entry phyid map). Not
        # walked (see _Walker): the daemon is one's own (SO_PEERCRED) and big maps are its
        # ordinary answers.
        self._decoder = _Decoder(max_message, walk=False)
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
                    return Response(
                        msgid=msgid, error=None, result=result if type(result) is dict else {}
                    )
                return Response(msgid=msgid, error=KvmError.from_wire(error), result=None)
            if len(obj) == 3 and obj[0] == 2 and type(obj[1]) is str and type(obj[2]) is dict:
                return Notification(event=obj[1], params=obj[2])
        raise RemoteProtocolError("EPROTO", f"the daemon sent something unexpected: {obj!r:.200}")
