"""The recording format: what ``lvz serve --record`` writes and ``lvz replay`` reads.

Sans-I/O, like the rest of ``protocol/``: ``encode_header`` / ``encode_record`` return bytes to
append, and ``RecordingReader`` turns bytes fed to it into a header and then records, holding at
most one unfinished record. The daemon streams records to disk as they happen and the reader
consumes them as they are read, so a recording of any length costs no memory at either end.

A recording is a msgpack stream: one header map, then one array per record::

    {"format": "lvz-recording", "version": 1, "lvz": "0.2.0",
     "plugins": [{"name": ..., "version": ...}, ...], "argv": [...], "started": unix_time}
    [t_ns, conn, kind, data]

``t_ns`` is monotonic nanoseconds since the header; ``conn`` the daemon's connection number;
``kind`` one of ``open`` (a client connected), ``in`` (bytes the daemon read), ``out`` (bytes
it wrote), ``close`` (the connection ended); ``data`` the bytes exactly as they crossed the
socket (empty for open/close), so junk and partial messages replay as they happened. Bytes are
recorded per read and write, not per message: a message may span two ``in`` records.

The format is deliberately generic (a clock, a channel, a kind, opaque bytes) so that the
durable journal of the state directory can reuse it with kinds of its own; readers skip kinds
they do not know.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

__all__ = [
    "FORMAT",
    "KINDS",
    "VERSION",
    "Header",
    "Record",
    "RecordingError",
    "RecordingReader",
    "encode_header",
    "encode_record",
]

FORMAT: Final = "lvz-recording"
VERSION: Final = 1
KINDS: Final = ("open", "in", "out", "close")
#: No record is larger than this: the daemon reads at most 64 KiB at a time and writes at most
#: one flush (bounded by its flush threshold plus one message), so a bigger one is corruption.
MAX_RECORD: Final = 64 << 20


class RecordingError(ValueError):
    """The bytes are not a recording this version can read; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Header:
    lvz: str
    plugins: tuple[tuple[str, str], ...]
    argv: tuple[str, ...]
    started: float
    version: int = VERSION
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Record:
    t_ns: int
    conn: int
    kind: str
    data: bytes = b""


def encode_header(
    lvz: str, plugins: Sequence[tuple[str, str]], argv: Sequence[str], started: float
) -> bytes:
    return msgpack.packb(
        {
            "format": FORMAT,
            "version": VERSION,
            "lvz": lvz,
            "plugins": [{"name": n, "version": v} for n, v in plugins],
            "argv": list(argv),
            "started": started,
        }
    )


def encode_record(record: Record) -> bytes:
    return msgpack.packb([record.t_ns, record.conn, record.kind, record.data])


def _parse_header(obj: object) -> Header:
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise RecordingError("not an lvz recording (no lvz-recording header)")
    version = obj.get("version")
    if version != VERSION:
        raise RecordingError(f"recording format version {version!r}; this lvz reads {VERSION}")
    try:
        plugins = tuple((str(p["name"]), str(p["version"])) for p in obj.get("plugins", []))
        argv = tuple(str(a) for a in obj.get("argv", []))
        started = float(obj.get("started", 0.0))
        lvz = str(obj.get("lvz", ""))
    except (TypeError, KeyError, ValueError) as exc:
        raise RecordingError(f"the header is malformed: {exc}") from None
    known = {"format", "version", "lvz", "plugins", "argv", "started"}
    return Header(
        lvz=lvz,
        plugins=plugins,
        argv=argv,
        started=started,
        extra={k: v for k, v in obj.items() if k not in known},
    )


def _parse_record(obj: object, index: int) -> Record | None:
    if (
        not isinstance(obj, list)
        or len(obj) != 4
        or type(obj[0]) is not int
        or type(obj[1]) is not int
        or not isinstance(obj[2], str)
        or not isinstance(obj[3], bytes)
    ):
        raise RecordingError(f"record {index} is not [t_ns, conn, kind, data]")
    if obj[2] not in KINDS:
        return None  # a kind of a later version or of the journal: not ours to interpret
    return Record(obj[0], obj[1], obj[2], obj[3])


class RecordingReader:
    """Feed bytes in, take the header and records out; ``end()`` says whether it stopped whole."""

    def __init__(self) -> None:
        self._unpacker = msgpack.Unpacker(
            raw=False, max_buffer_size=MAX_RECORD, strict_map_key=False
        )
        self.header: Header | None = None
        self.count = 0
        self._fed = 0

    def feed(self, data: bytes) -> list[Record]:
        self._fed += len(data)
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull:
            raise RecordingError(f"record {self.count} is larger than {MAX_RECORD} bytes") from None
        out: list[Record] = []
        try:
            for obj in self._unpacker:
                if self.header is None:
                    self.header = _parse_header(obj)
                    continue
                record = _parse_record(obj, self.count)
                self.count += 1
                if record is not None:
                    out.append(record)
        except (msgpack.UnpackException, ValueError) as exc:
            if isinstance(exc, RecordingError):
                raise
            raise RecordingError(f"record {self.count} is not msgpack: {exc}") from None
        return out

    def end(self) -> None:
        """Raise if the input stopped inside a record (or before the header)."""
        if self.header is None:
            raise RecordingError("the file ends before the recording header")
        if self._unpacker.tell() != self._fed:
            raise RecordingError(
                f"the file ends inside record {self.count} (the daemon was killed mid-write?)"
            )
