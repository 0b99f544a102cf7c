"""``lvz serve --record FILE``: every byte of every connection, streamed to a recording.

The recorder sits where bytes cross the socket — a thin stream wrapper around each accepted
connection — so it sees exactly what a client sent and got, junk and protocol errors included,
and the server needs one line to enable it. Records go straight to the file (format in
``lvz.protocol.recording``): nothing accumulates in memory however long the daemon runs, and
each record is flushed, so a daemon that is killed leaves everything up to its last write.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import IO, cast

import trio

from lvz import __version__
from lvz.protocol.recording import Record, encode_header, encode_record

log = logging.getLogger("lvz.daemon")


class RecordingFailed(Exception):
    """The recording file cannot be opened; the message names it."""


class Recorder:
    """Appends records to one open file; ``received`` / ``sent`` are the whole interface."""

    def __init__(self, file: IO[bytes], plugins: list[tuple[str, str]], argv: list[str]) -> None:
        self._file = file
        self._t0 = time.monotonic_ns()
        self._failed = False
        self._write(encode_header(__version__, plugins, argv, time.time()))

    @classmethod
    def open(
        cls, path: Path, plugins: list[tuple[str, str]], argv: list[str] | None = None
    ) -> Recorder:
        # Every byte of every client is as private as the 0600 socket they came through: a new
        # recording is 0600, and one that another user owns (pre-created in /tmp, say, to
        # read what we record) is refused rather than written into.
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW  # truncated once ours
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise RecordingFailed(f"cannot record to {path}: {exc.strerror or exc}") from None
        owner = os.fstat(fd).st_uid
        if owner != os.geteuid():
            os.close(fd)
            raise RecordingFailed(
                f"cannot record to {path}: it belongs to uid {owner}, who "
                "could read every byte recorded; choose a path of your own"
            )
        os.ftruncate(fd, 0)
        file = os.fdopen(fd, "wb")
        return cls(file, plugins, list(sys.argv if argv is None else argv))

    def _write(self, data: bytes) -> None:
        if self._failed:
            return
        try:
            self._file.write(data)
            self._file.flush()
        except OSError as exc:  # a full disk ends the recording, never the daemon
            self._failed = True
            log.error("recording stopped: %s", exc)

    def _record(self, conn: int, kind: str, data: bytes = b"") -> None:
        self._write(encode_record(Record(time.monotonic_ns() - self._t0, conn, kind, bytes(data))))

    def opened(self, conn: int) -> None:
        self._record(conn, "open")

    def received(self, conn: int, data: bytes) -> None:
        self._record(conn, "in" if data else "close", data)

    def sent(self, conn: int, data: bytes) -> None:
        self._record(conn, "out", data)

    def closed(self, conn: int) -> None:
        self._record(conn, "close")

    def wrap(self, stream: trio.SocketStream, conn: int) -> trio.SocketStream:
        """The stream as the server uses it, with every byte recorded on the way."""
        self.opened(conn)
        return cast(trio.SocketStream, RecordingStream(stream, self, conn))

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass


class RecordingStream(trio.abc.HalfCloseableStream):
    """Delegates to a SocketStream (which trio does not let us subclass), recording bytes."""

    def __init__(self, inner: trio.SocketStream, recorder: Recorder, conn: int) -> None:
        self._inner = inner
        self._recorder = recorder
        self._conn = conn
        self._closed = False
        self.socket = inner.socket

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._recorder.sent(self._conn, bytes(data))
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self._inner.receive_some(max_bytes)
        if data or not self._closed:
            self._recorder.received(self._conn, data)  # b"" is recorded as the close
            self._closed = not data
        return data

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._recorder.closed(self._conn)
        await self._inner.aclose()
