"""The state dir's per-VM file: a compacted snapshot, then a journal of what changed since.

This is Redis's AOF with an RDB preamble, per named VM: the file starts with a whole snapshot
of the VM (the ``lvz snapshot`` bytes, SHA-256 and all) and goes on with one *entry* per request
that was applied to the VM since, in the order the daemon applied them. Loading restores the
snapshot and re-applies the entries through the same handlers a socket request takes, so
chips — built-in or third-party — are rebuilt by their own code, whatever state they keep.

It is the recording format (lvz.protocol.recording: a header map, then ``[t_ns, seq, kind,
data]`` arrays) with kinds of its own, so one reader skips what it does not know:

- the header carries ``"journal": 1``;
- ``snapshot``: ``data`` is a snapshot file (lvz.protocol.snapshot); always the first record;
- ``apply``: one *group* — the requests applied to the VM between two writes of its file, often
  many (a pipelined batch is one group, one ``write``). ``data`` is
  ``msgpack([handles, entries])`` followed by its CRC-32 (4 bytes, big-endian): ``entries`` are
  ``[method, params, outcome, conn]`` in the order applied, ``params`` the request's own (its
  handle number included), ``outcome`` None when the daemon answered with a result, else the
  errno name it answered; ``handles`` are ``[conn, handle, target]``, what each handle number of
  connection ``conn`` named: None for the VM, the ``vcpu_id`` for a vCPU, the type for a device.
  Replaying checks every outcome again: a daemon that would now answer differently (say,
  restarted with a smaller ``--max-vcpus``) refuses the file instead of loading another VM.

The daemon only appends tuples as requests take effect and encodes a group (with one reused
msgpack packer) when it writes, so a journaled request costs a few dictionary operations; a
``set_one_reg`` of the value its register is known to hold is not noted at all (``state.py``).

Pure: bytes in, bytes out; server-side I/O is in ``state.py``.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from lvz.protocol.recording import (
    FORMAT as RECORDING_FORMAT,
)
from lvz.protocol.recording import (
    Record,
    encode_header,
    encode_record,
)
from lvz.protocol.schema import HANDLE_PARAM

__all__ = [
    "JOURNALED",
    "Entry",
    "JournalError",
    "Noted",
    "Parsed",
    "encode_entry",
    "encode_file",
    "encode_group",
    "parse",
]

#: Requests that change a VM, by the kind of object their handle names. Everything else only
#: reads (or, like ``vcpu.run`` and ``vm.subscribe``, concerns the connection): not journaled.
#: Guest loads are journaled too: a chip may clear a register on read.
JOURNALED: Final[dict[str, str]] = {
    "vm.create_vcpu": "vm",
    "vm.create_device": "vm",
    "vm.irq_line": "vm",
    "vm.signal_msi": "vm",
    "vcpu.destroy": "vcpu",
    "vcpu.set_one_reg": "vcpu",
    "vcpu.interrupt": "vcpu",
    "vcpu.csr_xchg": "vcpu",
    "vcpu.set_attr": "vcpu",
    "vcpu.iocsr_write": "vcpu",
    "vcpu.mmio_write": "vcpu",
    "vcpu.iocsr_read": "vcpu",
    "vcpu.mmio_read": "vcpu",
    "vcpu.hypercall": "vcpu",
    "device.set_attr": "device",
}

_CRC: Final = 4
KIND_SNAPSHOT: Final = "snapshot"
KIND_APPLY: Final = "apply"


class JournalError(ValueError):
    """The file is not a journal this lvz can load; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Entry:
    method: str
    target: int | str | None
    params: dict[str, Any]
    outcome: str | None


#: One applied request as the daemon notes it: (method, params, outcome, conn).
Noted = tuple[str, dict[str, Any], "str | None", int]


#: One packer for every group: ``msgpack.packb`` builds (and frees) a Packer per call, which
#: was a third of the encoding's cost. The daemon encodes on its one thread only.
_PACK: Final = msgpack.Packer().pack


def encode_group(
    handles: list[tuple[int, int, int | str | None]], entries: list[Noted], seq: int = 0
) -> bytes:
    """One ``apply`` record: ``entries`` and the targets of the handles they name.

    Bytes for bytes what ``encode_record(Record(t_ns, seq, "apply", body + crc))`` gives.
    """
    body: bytes = _PACK([handles, entries])
    out: bytes = _PACK(
        [time.monotonic_ns(), seq, KIND_APPLY, body + zlib.crc32(body).to_bytes(_CRC, "big")]
    )
    return out


def encode_entry(entry: Entry, seq: int = 0) -> bytes:
    """A group of one entry (tests, tools): its handle is number 1 of connection 0."""
    param = HANDLE_PARAM[entry.method][0]
    return encode_group(
        [(0, 1, entry.target)],
        [(entry.method, dict(entry.params, **{param: 1}), entry.outcome, 0)],
        seq,
    )


def encode_file(snapshot_bytes: bytes, lvz: str, plugins: list[tuple[str, str]]) -> bytes:
    """A new file: the header and the snapshot head; entries are appended after it."""
    header: dict[str, Any] = msgpack.unpackb(encode_header(lvz, plugins, [], time.time()))
    header["journal"] = 1
    return msgpack.packb(header) + encode_record(
        Record(time.monotonic_ns(), 0, KIND_SNAPSHOT, snapshot_bytes)
    )


@dataclass(slots=True)
class Parsed:
    snapshot: bytes
    entries: list[Entry]
    #: Bytes of whole records; past it is a torn tail (a write the crash cut short).
    good_length: int
    torn: bool


def _group(data: bytes, index: int) -> list[Entry]:
    body, crc = data[:-_CRC], data[-_CRC:]
    if len(data) <= _CRC or zlib.crc32(body).to_bytes(_CRC, "big") != crc:
        raise JournalError(f"group {index}: its checksum does not match")
    try:
        handles, entries = msgpack.unpackb(body, strict_map_key=True)
        targets = {(c, n): t for c, n, t in handles}
        out = []
        for method, params, outcome, conn in entries:
            if (
                not isinstance(method, str)
                or method not in JOURNALED
                or not isinstance(params, dict)
                or not (outcome is None or isinstance(outcome, str))
            ):
                raise ValueError("an entry is malformed")
            target = targets[conn, params[HANDLE_PARAM[method][0]]]
            if not (target is None or type(target) in (int, str)):
                raise ValueError("a handle target is malformed")
            out.append(Entry(method, target, params, outcome))
    except JournalError:
        raise
    except Exception as exc:
        raise JournalError(
            f"group {index} is not [handles, entries]: {type(exc).__name__}: {exc}"
        ) from None
    return out


def parse(data: bytes) -> Parsed:
    """Split a file into its snapshot head and its entries; raises JournalError.

    A record cut short at the end, or a last record whose checksum fails, is a torn tail: a
    write that a crash (or power loss, without ``--fsync always``) interrupted, so never
    acknowledged. It is reported (``torn``), not loaded. Damage anywhere else is an error.
    """
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(data) + 1)
    unpacker.feed(data)
    try:
        header = unpacker.unpack()
    except msgpack.OutOfData:
        raise JournalError("the file ends before its header") from None
    except Exception as exc:
        raise JournalError(f"the header is not msgpack: {type(exc).__name__}") from None
    if (
        not isinstance(header, dict)
        or header.get("format") != RECORDING_FORMAT
        or header.get("journal") != 1
    ):
        raise JournalError("it does not start with an lvz journal header")
    snapshot: bytes | None = None
    entries: list[Entry] = []
    good = unpacker.tell()
    index = 0
    while True:
        end = -1
        try:
            try:
                obj = unpacker.unpack()
            except msgpack.OutOfData:
                break
            except Exception:
                raise JournalError(f"record {index} is not msgpack") from None
            end = unpacker.tell()
            if not (
                isinstance(obj, list)
                and len(obj) == 4
                and isinstance(obj[2], str)
                and isinstance(obj[3], bytes)
            ):
                raise JournalError(f"record {index} is not [t_ns, seq, kind, data]")
            kind, payload = obj[2], obj[3]
            if index == 0:
                if kind != KIND_SNAPSHOT:
                    raise JournalError("the first record is not the snapshot")
                snapshot = payload
            elif kind == KIND_APPLY:
                entries += _group(payload, index - 1)
            # other kinds: a later version's, skipped as every recording reader does
        except JournalError:
            # A damaged last record, or zeros where the file system lost a tail: torn.
            if index > 0 and (end == len(data) or not data[good:].strip(b"\0")):
                break
            raise
        good = end
        index += 1
    if snapshot is None:
        raise JournalError("the file ends before its snapshot")
    return Parsed(snapshot, entries, good, good != len(data))
