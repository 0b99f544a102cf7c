"""Record and replay: the format on its own, then ``lvz serve --record`` / ``lvz demo --record``
and ``lvz replay`` (plain and ``--pytest``) against real daemons."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from lvz.clients import Kvm, KvmError, regs
from lvz.clients.cli import main, private_daemon
from lvz.protocol.recording import (
    Record,
    RecordingError,
    RecordingReader,
    encode_header,
    encode_record,
)
from lvz.testing.spawn import spawn

ROOT = Path(__file__).resolve().parent.parent


def lvz(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LVZ_SOCKET"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "lvz.clients.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=cwd,
        check=False,
    )


@pytest.fixture
def tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="lvz"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --- the format ---------------------------------------------------------------------------------


def test_format_round_trip_fed_one_byte_at_a_time() -> None:
    records = [
        Record(0, 1, "open"),
        Record(5, 1, "in", b"\x94\x00\x01"),
        Record(9, 1, "out", b"x" * 70000),
        Record(12, 1, "close"),
    ]
    data = encode_header("9.9", [("ipi", "1.0")], ["lvz", "serve"], 1.5)
    data += msgpack.packb([7, 1, "journal-kind", b""])  # a kind of another version: skipped
    data += b"".join(encode_record(r) for r in records)
    reader = RecordingReader()
    got = [r for i in range(len(data)) for r in reader.feed(data[i : i + 1])]
    reader.end()
    assert got == records
    assert reader.header is not None
    assert (reader.header.lvz, reader.header.plugins, reader.header.argv) == (
        "9.9",
        (("ipi", "1.0"),),
        ("lvz", "serve"),
    )


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "ends before the recording header"),
        (msgpack.packb({"format": "something-else"}), "not an lvz recording"),
        (msgpack.packb({"format": "lvz-recording", "version": 2}), "format version 2"),
        (
            encode_header("1", [], [], 0) + encode_record(Record(0, 1, "in", b"abc"))[:-1],
            "ends inside record 0",
        ),
        (encode_header("1", [], [], 0) + msgpack.packb([0, "one", "in", b""]), "record 0 is not"),
        (encode_header("1", [], [], 0) + b"\xc1", "record 0 is not msgpack"),
    ],
)
def test_bad_recordings_are_refused_with_a_reason(data: bytes, why: str) -> None:
    def read() -> None:
        reader = RecordingReader()
        reader.feed(data)
        reader.end()

    with pytest.raises(RecordingError, match=why):
        read()


# --- record, replay -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_recording() -> Iterator[Path]:
    """`lvz demo --record`: the recording the README tells a user to attach to a bug report."""
    tmp = Path(tempfile.mkdtemp(prefix="lvz"))
    path = tmp / "demo.lvzrec"
    result = lvz("demo", "--record", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    yield path
    shutil.rmtree(tmp, ignore_errors=True)


def test_a_demo_recording_replays_with_exit_0(demo_recording: Path) -> None:
    result = lvz("replay", str(demo_recording))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all as recorded" in result.stdout


def _edit_first_response(source: Path, target: Path, method: str, new_result: object) -> None:
    """Rewrite the recorded answer to the first ``method`` request, as a person editing it."""
    reader = RecordingReader()
    records = reader.feed(source.read_bytes())
    assert reader.header is not None
    msgids: set[int] = set()
    out = [encode_header(reader.header.lvz, reader.header.plugins, reader.header.argv, 0.0)]
    done = False
    for rec in records:
        if rec.kind == "in":
            msgids |= {m[1] for m in _messages(rec.data) if m[0] == 0 and m[2] == method}
        if rec.kind == "out" and not done:
            messages = _messages(rec.data)
            for m in messages:
                if m[0] == 1 and m[1] in msgids and not done:
                    m[3] = new_result
                    done = True
            rec = Record(rec.t_ns, rec.conn, rec.kind, b"".join(msgpack.packb(m) for m in messages))
        out.append(encode_record(rec))
    assert done
    target.write_bytes(b"".join(out))


def _messages(data: bytes) -> list[list[Any]]:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(data)
    return list(unpacker)


def test_an_edited_recording_replays_with_exit_1_naming_the_answer(
    demo_recording: Path, tmp: Path
) -> None:
    edited = tmp / "edited.lvzrec"
    _edit_first_response(demo_recording, edited, "vm.phyid_lookup", {"vcpu_id": 5})
    result = lvz("replay", str(edited))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "response to vm.phyid_lookup" in result.stdout
    assert "{'vcpu_id': 5}" in result.stdout and "{'vcpu_id': None}" in result.stdout


def test_replay_as_pytest_passes_on_a_fresh_daemon(demo_recording: Path, tmp: Path) -> None:
    result = lvz("replay", str(demo_recording), "--pytest")
    assert result.returncode == 0, result.stderr
    (tmp / "test_generated.py").write_text(result.stdout)
    # The lvz pytest plugin provides these; a conftest stands in where it is not installed.
    (tmp / "conftest.py").write_text(
        "import pytest\nfrom lvz.clients import Kvm\n"
        "pytest_plugins = ['tests.daemon_fixtures']\n"
        "@pytest.fixture\ndef kvm(lvz_socket):\n"
        "    with Kvm.connect(lvz_socket) as client:\n        yield client\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp),
            "-c",
            os.devnull,
            str(tmp),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout
    assert "pytest.raises(KvmError)" in result.stdout and "IrqEvent" in result.stdout


def test_serve_record_keeps_junk_and_several_connections(tmp: Path) -> None:
    path = tmp / "session.lvzrec"
    with private_daemon(extra=["--record", str(path)]) as sock:
        with Kvm.connect(sock) as a, Kvm.connect(sock) as b:
            vm = a.create_vm(name="shared")
            vm.create_vcpu(0).set_one_reg(regs.CPUID, 3)
            seen = b.open_vm("shared")
            seen.subscribe()
            vm.open_vcpu(0).interrupt(2)  # an event on b, caused by a
            assert seen.next_event(5.0) is not None
            with pytest.raises(KvmError):
                b.open_vm("nonesuch")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as junk:
            junk.connect(os.fspath(sock))
            junk.sendall(b"\xc1 not msgpack")
            junk.settimeout(5)
            while junk.recv(4096):  # the protocol_error, then the daemon closes
                pass
    kinds = [r.kind for r in RecordingReader().feed(path.read_bytes())]
    # a, b and the junk one (the spawner waits for READY=1: no readiness probe connects)
    assert kinds.count("open") >= 3 and kinds.count("close") >= 3
    result = lvz("replay", str(path), "-v")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "recorded by lvz" in result.stderr


def test_replay_refuses_a_bad_file_with_exit_2(
    tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replay", str(tmp / "missing")]) == 2
    assert f"cannot read {tmp / 'missing'}" in capsys.readouterr().err
    (tmp / "junk").write_bytes(b"\x00\x01")
    assert main(["replay", str(tmp / "junk"), "--pytest"]) == 2
    assert "not an lvz recording" in capsys.readouterr().err


def test_serve_record_to_an_unwritable_place_exits_125(tmp: Path) -> None:
    result = lvz("serve", "--socket", str(tmp / "s.sock"), "--record", str(tmp / "no" / "f"))
    assert result.returncode == 125
    assert f"cannot record to {tmp / 'no' / 'f'}" in result.stderr


def test_a_recording_is_private_and_never_another_users_file(tmp: Path) -> None:
    """A recording holds every byte every client sent: it was created 0644 (umask), and a
    file another user had pre-created at the path was written into, for them to read."""
    path = tmp / "session.lvzrec"
    with private_daemon(extra=["--record", str(path)]) as sock, Kvm.connect(sock) as kvm:
        kvm.create_vm(name="private")
    assert path.stat().st_mode & 0o777 == 0o600
    if os.getuid() != 0:
        pytest.skip("needs root to plant a file owned by another uid")
    planted = tmp / "planted.lvzrec"
    planted.write_bytes(b"the other user's bytes")
    os.chown(planted, 65534, 65534)
    result = lvz("serve", "--socket", str(tmp / "s.sock"), "--record", str(planted))
    assert result.returncode == 125
    assert f"cannot record to {planted}: it belongs to uid 65534" in result.stderr
    assert planted.read_bytes() == b"the other user's bytes"  # refused, not truncated
    link = tmp / "link.lvzrec"
    link.symlink_to(planted)
    result = lvz("serve", "--socket", str(tmp / "s.sock"), "--record", str(link))
    assert result.returncode == 125 and f"cannot record to {link}" in result.stderr


def test_replay_runs_with_the_recorded_plugins_not_the_installed_ones(tmp: Path) -> None:
    """A bug report recorded where only some chips were loaded (a pytest session's lvz_plugins,
    LVZ_PLUGINS) replayed against every installed chip, so it 'differed' at hello's
    device_types before the first real request."""
    path = tmp / "ipi-only.lvzrec"
    with (
        spawn("--record", str(path), plugins=["loongarch-ipi"]) as daemon,
        Kvm.connect(daemon.socket) as kvm,
    ):
        vm = kvm.create_vm(name="ipi-only")
        vm.create_vcpu(0).set_one_reg(regs.CPUID, 5)
        vm.create_device("loongarch-ipi")
    assert "loongarch-eiointc" in os.environ["LVZ_PLUGINS"]  # the replayer would load more
    result = lvz("replay", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    generated = lvz("replay", str(path), "--pytest").stdout
    assert "@pytest.mark.lvz_serve(plugins=['loongarch-ipi'])" in generated
