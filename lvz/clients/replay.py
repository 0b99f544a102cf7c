"""``lvz replay``: run a recording against a daemon and find the first answer that differs.

A recording (``lvz.protocol.recording``) holds every byte each connection sent and got. Replay
opens one connection per recorded one, sends the recorded bytes in the recorded order, and,
wherever the daemon wrote in the recording, reads the same number of messages from the new
daemon and compares them decoded (so chunking may differ, content may not). Connections are
interleaved as they were, so an event one connection caused on another is checked too. Both
files are streamed: a recording of any length replays in constant memory.

``to_pytest`` turns the same recording into a pytest test on the lvz pytest plugin's ``kvm`` /
``lvz_socket`` fixtures, for a bug report that becomes a regression test — the way QEMU turns
fuzzer traces into reproducers.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from lvz.protocol.recording import Header, Record, RecordingError, RecordingReader

__all__ = ["ReplayReport", "read_header", "read_recording", "replay", "to_pytest"]

CHUNK = 1 << 16


def read_recording(path: Path) -> Iterator[tuple[Header, Record]]:
    """Every record of the file with its header, read a chunk at a time."""
    reader = RecordingReader()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                for record in reader.feed(chunk):
                    assert reader.header is not None
                    yield reader.header, record
    except RecordingError as exc:
        raise RecordingError(f"{path}: {exc}") from None
    try:
        reader.end()
    except RecordingError as exc:
        raise RecordingError(f"{path}: {exc}") from None


def read_header(path: Path) -> Header:
    """The recording's header alone (which plugins the recorded daemon had, say)."""
    reader = RecordingReader()
    try:
        with open(path, "rb") as f:
            while reader.header is None and (chunk := f.read(CHUNK)):
                for _ in reader.feed(chunk):
                    break
            if reader.header is None:
                reader.end()  # raises: the file ends before the header
    except RecordingError as exc:
        raise RecordingError(f"{path}: {exc}") from None
    assert reader.header is not None
    return reader.header


def _unpacker() -> msgpack.Unpacker:
    return msgpack.Unpacker(raw=False, strict_map_key=False)


def describe(message: Any, methods: dict[int, str] | None = None) -> str:
    """A message as a person reads it: ``response to vm.info (msgid 3): {...}``."""
    if isinstance(message, list) and len(message) == 4 and message[0] == 1:
        method = (methods or {}).get(message[1], "?")
        if message[2] is not None:
            err = message[2]
            what = f"{err.get('name')}: {err.get('message')}" if isinstance(err, dict) else err
            return f"response to {method} (msgid {message[1]}): error {what}"
        return f"response to {method} (msgid {message[1]}): {message[3]!r}"
    if isinstance(message, list) and len(message) == 3 and message[0] == 2:
        return f"notification {message[1]} {message[2]!r}"
    return repr(message)


@dataclass
class _Conn:
    sock: socket.socket | None
    got: msgpack.Unpacker = field(default_factory=_unpacker)
    expected: msgpack.Unpacker = field(default_factory=_unpacker)
    sent: msgpack.Unpacker | None = field(default_factory=_unpacker)
    methods: dict[int, str] = field(default_factory=dict)
    last_in_ns: int = 0
    eof: bool = False

    def next_message(self, deadline: float) -> Any:
        """The next message the daemon sent on this connection, or a sentinel on EOF/timeout."""
        while True:
            for message in self.got:
                return message
            if self.eof or self.sock is None:
                return _EOF
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _TIMEOUT
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(CHUNK)
            except TimeoutError:
                return _TIMEOUT
            except OSError:
                data = b""
            if not data:
                self.eof = True
            self.got.feed(data)


_EOF = object()
_TIMEOUT = object()


@dataclass
class ReplayReport:
    records: int = 0
    messages: int = 0
    connections: int = 0
    difference: str | None = None
    header: Header | None = None


def replay(path: Path, socket_path: Path, timeout: float = 5.0) -> ReplayReport:
    """Replay ``path`` against the daemon at ``socket_path``; stop at the first difference."""
    report = ReplayReport()
    conns: dict[int, _Conn] = {}
    try:
        for header, record in read_recording(path):
            report.header = header
            report.records += 1
            difference = _step(conns, record, socket_path, timeout, report)
            if difference is not None:
                report.difference = (
                    f"connection {record.conn}, at {record.t_ns / 1e9:.6f} s "
                    f"(record {report.records}): {difference}"
                )
                return report
    finally:
        for conn in conns.values():
            if conn.sock is not None:
                conn.sock.close()
    return report


def _step(
    conns: dict[int, _Conn], record: Record, socket_path: Path, timeout: float, report: ReplayReport
) -> str | None:
    if record.kind == "open":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(os.fspath(socket_path))
        conns[record.conn] = _Conn(sock)
        report.connections += 1
        return None
    conn = conns.get(record.conn)
    if conn is None:  # recording started mid-connection: nothing to replay it on
        return None
    if record.kind == "in":
        if conn.sent is not None:  # method names, for the report only
            conn.sent.feed(record.data)
            try:
                for message in conn.sent:
                    if isinstance(message, list) and len(message) == 4 and message[0] == 0:
                        conn.methods[message[1]] = str(message[2])
            except (msgpack.UnpackException, ValueError):
                conn.sent = None  # junk: the bytes are still sent as recorded
        conn.last_in_ns = record.t_ns
        if conn.sock is not None and not conn.eof:
            try:
                conn.sock.sendall(record.data)
            except OSError as exc:
                return f"the daemon closed the connection before it got these bytes ({exc})"
        return None
    if record.kind == "out":
        conn.expected.feed(record.data)
        # A slow answer (vcpu.run) gets as long as it took when recorded, plus the timeout.
        waited = max(0, record.t_ns - conn.last_in_ns) / 1e9
        deadline = time.monotonic() + timeout + waited
        for expected in conn.expected:
            got = conn.next_message(deadline)
            report.messages += 1
            want = describe(expected, conn.methods)
            if got is _EOF:
                return f"the daemon closed the connection; expected {want}"
            if got is _TIMEOUT:
                return f"nothing within {timeout + waited:.1f} s; expected {want}"
            if got != expected:
                return (
                    f"expected {describe(expected, conn.methods)}\n"
                    f"                 got {describe(got, conn.methods)}"
                )
        return None
    # close
    if conn.sock is not None:
        conn.sock.close()
        conn.sock = None
    return None


# --- pytest generation --------------------------------------------------------------------------


def to_pytest(path: Path) -> str:
    """A pytest module that makes the recorded requests and asserts the recorded answers."""
    lines: list[str] = []
    names: dict[int, str] = {}
    sent: dict[int, msgpack.Unpacker] = {}
    got: dict[int, msgpack.Unpacker] = {}
    pending: dict[int, dict[int, str]] = {}  # conn -> msgid -> the call's expression
    body: list[str] = []
    deferred: list[str] = []  # event checks wait until the calls that cause them are made
    header: Header | None = None
    skipped = 0

    def conn_name(number: int) -> str:
        if number not in names:
            names[number] = "kvm" if not names else f"c{number}"
            if names[number] != "kvm":
                body.append(f"    {names[number]} = stack.enter_context(Kvm.connect(lvz_socket))")
        return names[number]

    for hdr, record in read_recording(path):
        header = hdr
        if record.kind == "open":  # named at its first request: probes get no variable
            sent[record.conn], got[record.conn] = _unpacker(), _unpacker()
            pending[record.conn] = {}
        elif record.conn not in sent:
            continue
        elif record.kind == "in":
            sent[record.conn].feed(record.data)
            try:
                for message in sent[record.conn]:
                    if not (
                        isinstance(message, list)
                        and len(message) == 4
                        and message[0] == 0
                        and isinstance(message[2], str)
                        and isinstance(message[3], dict)
                    ):
                        skipped += 1
                        continue
                    if message[2] == "hello":
                        continue  # Kvm.connect has said hello already
                    conn = conn_name(record.conn)
                    if message[2] == "vm.subscribe" and set(message[3]) == {"vm"}:
                        # through the Vm object: the client buffers events of subscribed VMs
                        call = f"Vm({conn}, {message[3]['vm']!r}).subscribe()"
                    else:
                        call = f"{conn}.call({message[2]!r}, {message[3]!r})"
                    pending[record.conn][message[1]] = call
            except (msgpack.UnpackException, ValueError):
                skipped += 1
                sent[record.conn] = _unpacker()
        elif record.kind == "out":
            got[record.conn].feed(record.data)
            for message in got[record.conn]:
                lines_ = _assertion(conn_name(record.conn), message, pending[record.conn])
                if message[0] == 2:
                    deferred.extend(lines_)
                else:
                    body.extend(lines_)
                if deferred and not any(pending.values()):
                    body.extend(deferred)
                    deferred.clear()
    body.extend(deferred)
    argv = " ".join(header.argv) if header is not None else "?"
    name = "".join(c if c.isalnum() else "_" for c in path.stem).strip("_") or "recording"
    extra = len(names) > 1  # other connections close with an ExitStack
    lines += [
        f'"""Generated by `lvz replay {path.name} --pytest` from a recording of lvz '
        f"{header.lvz if header else '?'}",
        "",
        f"recorded by: {argv}",
        f"plugins: {', '.join(f'{n} {v}' for n, v in header.plugins) if header else '?'}",
        '"""',
        "",
        *(["from contextlib import ExitStack", "from pathlib import Path", ""] if extra else []),
        "import pytest",
        "",
        "from lvz.clients import IrqEvent, Kvm, KvmError, Vm",
        "",
        "",
        # The recorded daemon's plugins, not whatever this venv has: hello lists device types.
        *(
            [f"@pytest.mark.lvz_serve(plugins={[n for n, _ in header.plugins]!r})"]
            if header is not None
            else []
        ),
        f"def test_replay_{name}(kvm: Kvm{', lvz_socket: Path' if extra else ''}) -> None:",
    ]
    if skipped:
        lines.append(
            f"    # {skipped} recorded messages were not requests (junk, protocol "
            "errors): `lvz replay` sends those, this test does not"
        )
    if extra:
        lines.append("    with ExitStack() as stack:")
        body = ["    " + line for line in body]
    lines += body or ["    pass"]
    return "\n".join(lines) + "\n"


def _assertion(conn: str, message: Any, pending: dict[int, str]) -> list[str]:
    if isinstance(message, list) and len(message) == 4 and message[0] == 1:
        call = pending.pop(message[1], None)
        if call is None:
            return []  # the answer to hello (or to a request this test does not make)
        if message[2] is None:
            if call.endswith(".subscribe()"):
                return [f"    {call}"]
            return [f"    assert {call} == {message[3]!r}"]
        err = message[2] if isinstance(message[2], dict) else {}
        return [
            "    with pytest.raises(KvmError) as err:",
            f"        {call}",
            f"    assert err.value.name == {err.get('name')!r}",
        ]
    if (
        isinstance(message, list)
        and len(message) == 3
        and message[0] == 2
        and message[1] == "irq"
        and isinstance(message[2], dict)
    ):
        p = message[2]
        return [
            f"    event = {conn}.next_event(5.0)",
            "    assert isinstance(event, IrqEvent)",
            f"    assert (event.vcpu_id, event.irq, event.level, event.seq) == "
            f"({p.get('vcpu_id')!r}, {p.get('irq')!r}, {p.get('level')!r}, "
            f"{p.get('seq')!r})",
        ]
    return [f"    # not checked: {describe(message)}"]
