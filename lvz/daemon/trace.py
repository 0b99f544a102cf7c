"""``lvz serve -vv``: a debug line for every request, every answer and each batch of events.

The trace sits where bytes cross the socket, as the recorder does: a stream wrapper chosen
once per connection, and only when the daemon started at DEBUG level. The dispatch path is
the same code with or without it, so an untraced daemon pays one ``is None`` test per
connection and nothing per request. The wrapper decodes a copy of each direction with its own
msgpack Unpacker: a second decode is the price of tracing, paid only by a traced daemon.

Lines go to the ``lvz.daemon`` logger, whose filter (listener.py) escapes control characters
in the formatted line, so a newline in a VM name cannot forge a line; params are also shown
through ``repr`` and cut at ``PARAMS_SHOWN`` characters, so a 65,536-entry map is one line.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, cast

import msgpack
import trio

log = logging.getLogger("lvz.daemon")

#: Characters of a request's params shown; the rest is elided with its length.
PARAMS_SHOWN = 200


def _shown(params: object) -> str:
    text = repr(params)
    if len(text) > PARAMS_SHOWN:
        return f"{text[:PARAMS_SHOWN]}… ({len(text)} chars)"
    return text


class _Direction:
    """One direction of one connection: bytes in, a log line per decoded message out."""

    def __init__(self, conn: int, max_buffer: int) -> None:
        self.conn = conn
        self.unpacker: msgpack.Unpacker | None = msgpack.Unpacker(
            raw=False, strict_map_key=False, max_buffer_size=max_buffer
        )

    def messages(self, data: bytes) -> list[Any]:
        unpacker = self.unpacker
        if unpacker is None:
            return []
        try:
            unpacker.feed(data)
            return list(unpacker)
        except Exception as exc:  # the daemon's own decoder answers junk; we just stop
            self.unpacker = None
            log.debug(
                "connection %d: trace stops, the bytes do not decode (%s)",
                self.conn,
                type(exc).__name__,
            )
            return []


def trace_requests(conn: int, direction: _Direction, data: bytes) -> None:
    for msg in direction.messages(data):
        if type(msg) is list and len(msg) == 4 and msg[0] == 0:
            log.debug("connection %d: request %s %s %s", conn, msg[1], msg[2], _shown(msg[3]))
        else:
            log.debug("connection %d: not a request: %s", conn, _shown(msg))


def trace_answers(conn: int, direction: _Direction, data: bytes) -> None:
    events: Counter[str] = Counter()
    for msg in direction.messages(data):
        if type(msg) is list and len(msg) == 4 and msg[0] == 1:
            error = msg[2]
            if error is None:
                log.debug("connection %d: answer %s ok", conn, msg[1])
            else:
                name = error.get("name") if isinstance(error, dict) else error
                log.debug("connection %d: answer %s %s", conn, msg[1], name)
        elif type(msg) is list and len(msg) == 3 and msg[0] == 2:
            if msg[1] == "protocol_error":
                log.debug("connection %d: sent protocol_error %s", conn, _shown(msg[2]))
            else:
                events[str(msg[1])] += 1
    if events:  # summarized: an event storm is a line per write, not a line per event
        log.debug(
            "connection %d: sent %s",
            conn,
            ", ".join(f"{n} {name}" for name, n in sorted(events.items())),
        )


class TracingStream(trio.abc.HalfCloseableStream):
    """Delegates to the connection's stream (a SocketStream or a RecordingStream)."""

    def __init__(self, inner: trio.SocketStream, conn: int, max_message: int) -> None:
        self._inner = inner
        self._conn = conn
        self._in = _Direction(conn, 2 * max_message)
        # Answers may be much larger than requests (a 65,536-entry phyid map).
        self._out = _Direction(conn, 64 * max_message)
        self.socket = inner.socket

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        trace_answers(self._conn, self._out, bytes(data))
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self._inner.receive_some(max_bytes)
        if data:
            trace_requests(self._conn, self._in, data)
        return data

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def aclose(self) -> None:
        await self._inner.aclose()


def traced(stream: trio.SocketStream, conn: int, max_message: int) -> trio.SocketStream:
    """``stream`` with its requests, answers and events logged at DEBUG."""
    return cast(trio.SocketStream, TracingStream(stream, conn, max_message))
