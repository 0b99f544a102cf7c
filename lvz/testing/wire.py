"""The one raw wire client: msgpack-RPC spoken byte by byte, for tests and benchmarks.

For whoever must send what no client library would send (junk, half messages, a thousand
pipelined requests, a request and then silence) or must see exactly what the daemon sent back.
It frames with a bare msgpack Packer/Unpacker, not with lvz's own decoder, so a test of the
daemon's wire handling does not lean on the code under test, and the benchmark drives the
floor and lvz through the very same code.

``Wire`` is the trio client: typed answers for tests (``call`` returns a ``Response``, ``ok``
its result, ``err`` its errno name, notifications kept as ``Notification`` in
``notifications``; every message is checked against PROTOCOL.md §2 on the way in) and the
benchmark's drivers (``result``, ``sequential``, ``pipelined``, ``batch``), which work on raw
messages so that the figure measures the server and not this client. ``BlockingWire`` is the
same with plain sockets, for threads and scripts outside trio.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Self

import msgpack
import trio

from lvz.protocol.abi import U32_MAX
from lvz.protocol.errors import ERRNO, KvmError
from lvz.protocol.events import Notification, Response

__all__ = [
    "BlockingWire",
    "MakeRequest",
    "OnNotification",
    "Run",
    "Wire",
    "WireError",
    "wire_error_problem",
    "wire_message_problem",
]

RECEIVE_BYTES: Final = 65536
#: Seconds a test-side wait may take before it is a failure, never a hang.
WAIT: Final = 10.0

MakeRequest = Callable[[int], tuple[str, dict[str, Any]]]
#: Called with every notification ``[2, event, params]`` that arrives on a driven connection.
OnNotification = Callable[[str, dict[str, Any]], None]


class WireError(AssertionError):
    """The server sent something the caller did not expect (an error, a bad shape, EOF).

    An AssertionError: in a test it is a failed check; in a benchmark the figure is void.
    """


# --- what PROTOCOL.md §2 allows the daemon to send ----------------------------------------------


def wire_error_problem(error: object) -> str | None:
    """Why ``error`` is not a PROTOCOL.md §2 error map, or None if it is one."""
    if type(error) is not dict:
        return f"error {error!r:.80} is not a map"
    name, number, message = error.get("name"), error.get("errno"), error.get("message")
    if type(name) is not str or name not in ERRNO:
        return f"error name {name!r} is not in PROTOCOL.md's table"
    if number != ERRNO[name] or type(number) is not int:
        return f"errno {number!r} does not match {name} ({ERRNO[name]})"
    if type(message) is not str or not message:
        return f"error message {message!r} is not a sentence"
    return None


def wire_message_problem(msg: object) -> str | None:
    """Why ``msg`` is neither a well-formed response nor a notification, or None."""
    if type(msg) is not list or not msg:
        return f"{msg!r:.80} is not a non-empty array"
    if msg[0] == 1 and type(msg[0]) is int:
        if len(msg) != 4:
            return f"response {msg!r:.80} does not have 4 elements"
        _, msgid, error, result = msg
        if type(msgid) is not int or not 0 <= msgid <= U32_MAX:
            return f"response msgid {msgid!r} is not a u32"
        if (error is None) == (result is None):
            return f"response {msg!r:.80} must have exactly one of error and result"
        if error is not None:
            return wire_error_problem(error)
        if type(result) is not dict:
            return f"result {result!r:.80} is not a map"
        return None
    if msg[0] == 2 and type(msg[0]) is int:
        if len(msg) != 3 or type(msg[1]) is not str or type(msg[2]) is not dict:
            return f"notification {msg!r:.80} is not [2, str, map]"
        if msg[1] == "protocol_error":
            return wire_error_problem(msg[2])
        return None
    return f"{msg!r:.80} is neither a response nor a notification"


def typed(msg: object) -> Response | Notification:
    """A checked message as the protocol layer's event type."""
    problem = wire_message_problem(msg)
    if problem:
        raise WireError(f"the daemon sent a malformed message: {problem}")
    assert isinstance(msg, list)
    if msg[0] == 2:
        return Notification(event=msg[1], params=msg[2])
    error = None if msg[2] is None else KvmError(msg[2]["name"], msg[2]["message"])
    return Response(msgid=msg[1], error=error, result=msg[3])


@dataclass(slots=True)
class Run:
    """One timed run: ``count`` answered requests in ``seconds`` (first send to last answer)."""

    count: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


class _Codec:
    """Request numbering and framing shared by both clients."""

    def __init__(self) -> None:
        self._pack = msgpack.Packer(use_bin_type=True).pack
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=64 << 20)
        self._next_id = 0
        self.notifications: list[Notification] = []
        self.early: dict[int, Response] = {}  # answers that came while waiting for another
        self.closed = False  # the server closed its end

    def send_request(self, method: str, params: dict[str, Any]) -> tuple[int, bytes]:
        """Encode a request without sending it: its msgid and its bytes."""
        msgid = self._next_id
        self._next_id = (msgid + 1) & U32_MAX
        return msgid, self._pack([0, msgid, method, params])

    def _encode(self, method: str, params: dict[str, Any]) -> bytes:
        return self.send_request(method, params)[1]

    def _sort(self, msg: object, msgid: int) -> Response | None:
        """Keep a notification or another request's answer for later; return ``msgid``'s."""
        event = typed(msg)
        if isinstance(event, Notification):
            self.notifications.append(event)
            return None
        if event.msgid == msgid:
            return event
        self.early[event.msgid] = event
        return None

    @staticmethod
    def _ok(method: str, r: Response) -> dict[str, Any]:
        if r.error is not None:
            raise WireError(f"{method} failed: {r.error}")
        assert r.result is not None
        return r.result

    @staticmethod
    def _err(method: str, r: Response) -> str:
        if r.error is None:
            raise WireError(f"{method} unexpectedly succeeded: {r.result}")
        return r.error.name


class Wire(_Codec):
    """One trio connection to a daemon (or the bench floor)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        super().__init__()
        self.stream = stream
        self.on_notification: OnNotification | None = None

    @classmethod
    async def connect(cls, path: str | Path) -> Wire:
        return cls(await trio.open_unix_socket(str(path)))

    open = connect  # the tests' spelling

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def next_message(self) -> Any:
        """The next decoded message as sent, or None at EOF (then ``closed`` is set)."""
        while True:
            for msg in self._unpacker:
                return msg
            data = await self.stream.receive_some(RECEIVE_BYTES)
            if not data:
                self.closed = True
                return None
            self._unpacker.feed(data)

    # --- typed, for tests -----------------------------------------------------------------------

    async def next_event(self) -> Response | Notification | None:
        """The next message, checked and typed; None at EOF. Fails after ``WAIT`` seconds."""
        with trio.fail_after(WAIT):
            msg = await self.next_message()
        return None if msg is None else typed(msg)

    async def response(self, msgid: int) -> Response:
        """The answer to ``msgid``, keeping notifications and other answers that come first."""
        if msgid in self.early:
            return self.early.pop(msgid)
        with trio.fail_after(WAIT):
            while True:
                msg = await self.next_message()
                if msg is None:
                    raise WireError("the connection closed before the response")
                answer = self._sort(msg, msgid)
                if answer is not None:
                    return answer

    async def call(self, method: str, **params: Any) -> Response:
        msgid, data = self.send_request(method, params)
        await self.send(data)
        return await self.response(msgid)

    async def ok(self, method: str, **params: Any) -> dict[str, Any]:
        return self._ok(method, await self.call(method, **params))

    async def err(self, method: str, **params: Any) -> str:
        return self._err(method, await self.call(method, **params))

    # --- raw, for benchmarks --------------------------------------------------------------------

    def _notification(self, msg: Any) -> None:
        if msg[1] == "protocol_error":
            raise WireError(f"protocol error from the server: {msg[2]}")
        if self.on_notification is not None:
            self.on_notification(msg[1], msg[2])

    def _check(self, msg: Any, expect_id: int, method: str) -> dict[str, Any]:
        if msg[1] != expect_id:
            raise WireError(f"{method}: answer to msgid {msg[1]}, expected {expect_id}")
        if msg[2] is not None:
            raise WireError(f"{method}: error {msg[2]}")
        result = msg[3]
        assert isinstance(result, dict)
        return result

    async def result(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """One request, its result (set-up calls and the sequential mode); errors raise."""
        expect = self._next_id
        await self.stream.send_all(self._encode(method, params))
        while True:
            msg = await self.next_message()
            if msg is None:
                raise WireError("the server closed the connection")
            if msg[0] == 2:
                self._notification(msg)
                continue
            return self._check(msg, expect, method)

    async def sequential(self, make: MakeRequest, seconds: float, max_count: int) -> Run:
        """One request in flight, for ``seconds`` or ``max_count`` requests, whichever first."""
        t0 = time.perf_counter()
        deadline = t0 + seconds
        count = 0
        while count < max_count:
            method, params = make(count)
            await self.result(method, params)
            count += 1
            if time.perf_counter() >= deadline:
                break
        return Run(count, time.perf_counter() - t0)

    async def pipelined(
        self, make: MakeRequest, window: int, seconds: float, max_count: int, unit: int = 1
    ) -> Run:
        """``window`` requests in flight; every receive is answered by one send topping it up.

        The number of requests sent is a multiple of ``unit`` (a raise and its acknowledgement
        must both be sent, or a line is left up). Results are checked for errors and order but
        not kept; a scenario that needs results uses ``result`` or ``batch``.
        """
        encode = self._encode
        unpacker = self._unpacker
        stream = self.stream
        first_id = self._next_id
        sent = done = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        out = []
        max_count -= max_count % unit
        while sent < window and sent < max_count:
            out.append(encode(*make(sent)))
            sent += 1
        await stream.send_all(b"".join(out))
        topping = True
        while done < sent:
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:
                raise WireError("the server closed the connection")
            unpacker.feed(data)
            answered = 0
            for msg in unpacker:
                if msg[0] == 2:
                    self._notification(msg)
                    continue
                if msg[2] is not None or msg[1] != (first_id + done) & U32_MAX:
                    raise WireError(f"request {done}: unexpected answer {msg!r:.200}")
                done += 1
                answered += 1
            if topping and time.perf_counter() >= deadline:
                topping = False
                if sent % unit:
                    rest = [encode(*make(i)) for i in range(sent, sent + unit - sent % unit)]
                    sent += len(rest)
                    await stream.send_all(b"".join(rest))
            if topping and answered:
                out = []
                while answered and sent < max_count:
                    out.append(encode(*make(sent)))
                    sent += 1
                    answered -= 1
                if out:
                    await stream.send_all(b"".join(out))
        return Run(done, time.perf_counter() - t0)

    async def batch(
        self, requests: list[tuple[str, dict[str, Any]]], window: int = 64
    ) -> list[dict[str, Any]]:
        """Pipeline ``requests`` (``window`` in flight) and return every result, in order."""
        results: list[dict[str, Any]] = []
        first_id = self._next_id
        encode = self._encode
        total = len(requests)
        sent = 0
        while len(results) < total:
            top = min(total, len(results) + window)
            if top > sent:
                await self.stream.send_all(b"".join(encode(*r) for r in requests[sent:top]))
                sent = top
            msg = await self.next_message()
            if msg is None:
                raise WireError("the server closed the connection")
            while True:
                if msg[0] == 2:
                    self._notification(msg)
                else:
                    i = len(results)
                    results.append(self._check(msg, (first_id + i) & U32_MAX, requests[i][0]))
                try:  # drain what is already decoded before topping the window up again
                    msg = next(self._unpacker)
                except StopIteration:
                    break
        return results


class BlockingWire(_Codec):
    """``Wire`` with a plain blocking socket, for threads and synchronous checks."""

    def __init__(self, path: str | Path, timeout: float = WAIT) -> None:
        """Connect; a full listen backlog (EAGAIN on AF_UNIX) is retried for ``timeout`` s."""
        super().__init__()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(str(path))
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise
                time.sleep(0.001)
            except BaseException:
                self.sock.close()
                raise

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def shutdown_write(self) -> None:
        """Half-close: the daemon sees EOF after what was sent (a partial message is EPROTO)."""
        self.sock.shutdown(socket.SHUT_WR)

    def read_to_end(self) -> list[bytes]:
        """Every byte the daemon sends until it closes, as received (a reset ends it too)."""
        chunks = []
        while True:
            try:
                data = self.sock.recv(RECEIVE_BYTES)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
        self.closed = True
        return chunks

    def next_message(self) -> Any:
        """The next decoded message as sent, or None at EOF (then ``closed`` is set)."""
        while True:
            for msg in self._unpacker:
                return msg
            data = self.sock.recv(RECEIVE_BYTES)
            if not data:
                self.closed = True
                return None
            self._unpacker.feed(data)

    def response(self, msgid: int) -> Response:
        if msgid in self.early:
            return self.early.pop(msgid)
        while True:
            msg = self.next_message()
            if msg is None:
                raise WireError("the connection closed before the response")
            answer = self._sort(msg, msgid)
            if answer is not None:
                return answer

    def call(self, method: str, **params: Any) -> Response:
        msgid, data = self.send_request(method, params)
        self.send(data)
        return self.response(msgid)

    def ok(self, method: str, **params: Any) -> dict[str, Any]:
        return self._ok(method, self.call(method, **params))

    def err(self, method: str, **params: Any) -> str:
        return self._err(method, self.call(method, **params))

    # --- raw, for benchmarks (the blocking floor's client: no event loop in the way) -------------

    def result(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """One request, its result; notifications are skipped (nothing here subscribes)."""
        expect = self._next_id
        self.sock.sendall(self._encode(method, params))
        while True:
            msg = self.next_message()
            if msg is None:
                raise WireError("the server closed the connection")
            if msg[0] == 2:
                if msg[1] == "protocol_error":
                    raise WireError(f"protocol error from the server: {msg[2]}")
                continue
            if msg[1] != expect or msg[2] is not None:
                raise WireError(f"{method}: unexpected answer {msg!r:.200}")
            result = msg[3]
            assert isinstance(result, dict)
            return result

    def sequential(self, make: MakeRequest, seconds: float, max_count: int) -> Run:
        """``Wire.sequential`` on a blocking socket."""
        t0 = time.perf_counter()
        deadline = t0 + seconds
        count = 0
        while count < max_count:
            method, params = make(count)
            self.result(method, params)
            count += 1
            if time.perf_counter() >= deadline:
                break
        return Run(count, time.perf_counter() - t0)

    def pipelined(self, make: MakeRequest, window: int, seconds: float, max_count: int) -> Run:
        """``Wire.pipelined`` (without ``unit``) on a blocking socket."""
        encode, unpacker, sock = self._encode, self._unpacker, self.sock
        first_id = self._next_id
        sent = done = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        out = []
        while sent < window and sent < max_count:
            out.append(encode(*make(sent)))
            sent += 1
        sock.sendall(b"".join(out))
        topping = True
        while done < sent:
            data = sock.recv(RECEIVE_BYTES)
            if not data:
                raise WireError("the server closed the connection")
            unpacker.feed(data)
            answered = 0
            for msg in unpacker:
                if msg[0] == 2:
                    continue
                if msg[2] is not None or msg[1] != (first_id + done) & U32_MAX:
                    raise WireError(f"request {done}: unexpected answer {msg!r:.200}")
                done += 1
                answered += 1
            if topping and time.perf_counter() >= deadline:
                topping = False
            if topping and answered:
                out = []
                while answered and sent < max_count:
                    out.append(encode(*make(sent)))
                    sent += 1
                    answered -= 1
                if out:
                    sock.sendall(b"".join(out))
        return Run(done, time.perf_counter() - t0)
