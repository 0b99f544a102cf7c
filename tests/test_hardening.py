"""Service hardening (issue 8): socket path safety, memory bounds, signals, log injection.

Every scenario runs a real daemon on a real socket: a subprocess where the process itself is the
subject (exit codes, signals, its log, its fd limit), in-process otherwise.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import trio

from lvz.clients import Kvm, regs
from lvz.daemon.config import ServeConfig
from lvz.daemon.journal import parse
from lvz.daemon.state import file_name
from lvz.protocol import Notification, ServerConnection, snapshot
from lvz.protocol.connection import BASE_BUFFER, NEED_DATA

from .conftest import Connect
from .daemon_fixtures import DaemonProcess, start_daemon, unique_name

NOBODY = 65534


def serve_cmd(sock: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lvz.clients.cli", "serve", "--socket", os.fspath(sock), *extra]


def refused(sock: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(serve_cmd(sock), capture_output=True, text=True, timeout=30)


def wait_until_serving(sock: Path, proc: subprocess.Popen[bytes], what: str = "") -> None:
    """Until a request is answered: the socket file exists before listen(), and the signal
    handlers are installed only just before the first connection is accepted."""
    deadline = time.monotonic() + 15
    while True:
        assert proc.poll() is None, what
        try:
            with Kvm.connect(sock) as kvm:
                kvm.get_api_version()
            return
        except ConnectionError:
            assert time.monotonic() < deadline, what
            time.sleep(0.02)


# ------------------------------------------------------------------ socket path safety --------


def test_socket_directory_is_created_0700_and_the_socket_born_0600(sock_dir: Path) -> None:
    with start_daemon() as d:  # a fresh directory of our own already exists: fine
        assert stat.S_IMODE(d.socket.stat().st_mode) == 0o600
    sock = sock_dir / "made" / "lvz.sock"
    proc = subprocess.Popen(serve_cmd(sock), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until_serving(sock, proc)
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        if proc.stderr:
            proc.stderr.close()


def test_world_writable_socket_directory_is_refused(sock_dir: Path) -> None:
    hostile = sock_dir / "open"
    hostile.mkdir()
    hostile.chmod(0o777)
    r = refused(hostile / "lvz.sock")
    assert r.returncode == 125, r.stderr
    assert str(hostile) in r.stderr
    assert "group- or world-writable (mode 0777)" in r.stderr
    assert not (hostile / "lvz.sock").exists()


def test_symlinked_socket_directory_is_refused(sock_dir: Path) -> None:
    target = sock_dir / "real"
    target.mkdir(mode=0o700)
    link = sock_dir / "link"
    link.symlink_to(target)
    if os.getuid() == 0:
        os.chown(target, NOBODY, NOBODY)
        os.lchown(link, NOBODY, NOBODY)
    r = refused(link / "lvz.sock")
    assert r.returncode == 125, r.stderr
    assert f"{link} is a symbolic link" in r.stderr
    assert not (target / "lvz.sock").exists()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to create a directory as uid 65534")
def test_socket_directory_of_another_user_is_refused(sock_dir: Path) -> None:
    hostile = sock_dir / "theirs"
    hostile.mkdir(mode=0o700)
    os.chown(hostile, NOBODY, NOBODY)
    r = refused(hostile / "lvz.sock")
    assert r.returncode == 125, r.stderr
    assert f"{hostile} is owned by uid {NOBODY}, not by this daemon's uid 0" in r.stderr
    assert not (hostile / "lvz.sock").exists()


# ------------------------------------------------------------------ memory bounds -------------


def test_decoder_buffer_grows_for_a_large_message_and_shrinks_after() -> None:
    conn = ServerConnection()
    big = msgpack.packb([0, 1, "kvm.get_api_version", {"pad": b"x" * 600_000}])
    conn.receive_data(big[:300_000])
    assert conn.next_event() is NEED_DATA
    assert conn.unfinished == 0
    assert conn.held >= 300_000  # counted against the daemon's budget while unfinished
    conn.receive_data(big[300_000:])
    assert conn.next_event().msgid == 1  # type: ignore[union-attr]
    conn.next_event()  # NEED_DATA: nothing unfinished, the grown buffer is given back
    assert conn.held == 0
    assert conn.unfinished == -1
    # ... and the next messages, small or split, decode as before on a fresh small buffer.
    small = msgpack.packb([0, 2, "kvm.get_api_version", {}])
    conn.receive_data(small + small[:5])
    assert conn.next_event().msgid == 2  # type: ignore[union-attr]
    assert conn.next_event() is NEED_DATA
    assert 0 < conn.held <= BASE_BUFFER + 1024  # the buffer and the objects begun
    conn.receive_data(small[5:])
    assert conn.next_event().msgid == 2  # type: ignore[union-attr]


def unfinished(size: int) -> bytes:
    """The first ``size`` bytes of a request whose bin parameter is much longer."""
    return msgpack.packb([0, 1, "kvm.get_api_version", {"pad": b"x" * (size * 2)}])[:size]


async def closing_error(raw: object) -> tuple[str, str]:
    """The protocol_error a connection was closed with: (errno name, message)."""
    notes: list[Notification] = []
    while True:
        ev = await raw.next_event()  # type: ignore[attr-defined]
        if ev is None:
            break
        if isinstance(ev, Notification):
            notes.append(ev)
    [note] = [n for n in notes if n.event == "protocol_error"]
    return note.params["name"], note.params["message"]


@pytest.fixture
def serve_config(sock_dir: Path) -> ServeConfig:
    return ServeConfig(
        socket=sock_dir / "lvz.sock", partial_budget=400_000, message_timeout=0.5, max_connections=4
    )


async def test_partial_messages_over_the_daemon_budget_close_the_connection(
    connect: Connect,
) -> None:
    holder, greedy = await connect(), await connect()
    await holder.send(unfinished(150_000))
    await trio.sleep(0.05)
    await greedy.send(unfinished(300_000))
    name, message = await closing_error(greedy)
    assert name == "ENOMEM"
    assert "budget for partially received messages (400000 bytes" in message
    # The holder was within the budget; a fresh client is served as before.
    fresh = await connect()
    assert (await fresh.ok("kvm.get_api_version"))["version"] == 12


async def test_a_message_left_unfinished_is_closed_with_etimedout(connect: Connect) -> None:
    slow = await connect()
    for i in range(8):  # slowloris: a byte now and then keeps one message unfinished
        await slow.send(unfinished(20 + i)[-1:] if i else unfinished(20))
        await trio.sleep(0.1)
    name, message = await closing_error(slow)
    assert name == "ETIMEDOUT"
    assert "unfinished for more than 0.5 s (--message-timeout)" in message
    other = await connect()
    assert (await other.ok("kvm.get_api_version"))["version"] == 12


async def test_a_connection_over_max_connections_gets_emfile_at_once(connect: Connect) -> None:
    held = [await connect() for _ in range(4)]
    for raw in held:
        await raw.ok("kvm.get_api_version")
    extra = await connect()
    name, message = await closing_error(extra)
    assert name == "EMFILE"
    assert "already serves 4 connections (--max-connections)" in message
    await held[0].aclose()
    await trio.sleep(0.05)
    again = await connect()
    assert (await again.ok("kvm.get_api_version"))["version"] == 12


def _read_protocol_error(s: socket.socket) -> str | None:
    s.settimeout(5)
    unpacker = msgpack.Unpacker()
    while data := s.recv(65536):
        unpacker.feed(data)
        for msg in unpacker:
            if msg[0] == 2 and msg[1] == "protocol_error":
                return str(msg[2]["name"])
    return None


def test_at_the_fd_limit_clients_are_told_emfile_and_the_log_stays_short(sock_dir: Path) -> None:
    sock = sock_dir / "lvz.sock"
    log = sock_dir / "log"

    def small_fd_table() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    with open(log, "wb") as out:
        proc = subprocess.Popen(
            serve_cmd(sock, "--max-connections", "1000"),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            preexec_fn=small_fd_table,
        )
    held: list[socket.socket] = []
    try:
        wait_until_serving(sock, proc, log.read_text())
        answers = []
        for _ in range(60):
            s = socket.socket(socket.AF_UNIX)
            held.append(s)
            s.connect(os.fspath(sock))
            try:
                s.sendall(msgpack.packb([0, 1, "kvm.get_api_version", {}]))
            except BrokenPipeError:
                pass  # refused before it could ask: the refusal is waiting to be read
            s.settimeout(5)
            first = msgpack.unpackb(s.recv(65536))
            answers.append("served" if first[0] == 1 else first[2]["name"])
        assert answers.count("served") > 20
        assert answers[-1] == "EMFILE", answers
        assert proc.poll() is None
        for s in held:
            s.close()
        held.clear()
        deadline = time.monotonic() + 10
        while True:  # once the daemon has seen the closes, clients are served as usual
            try:
                with Kvm.connect(sock) as kvm:
                    assert kvm.get_api_version() == 12
                break
            except ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        for s in held:
            s.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, log.read_text()
    assert log.read_text().count("accept failed") <= 5, log.read_text()


# ------------------------------------------------------------------ signals -------------------


@pytest.fixture
def stateful(sock_dir: Path) -> Iterator[tuple[DaemonProcess, Path, str]]:
    state = sock_dir / "state"
    name = unique_name("keep")
    with start_daemon("--state-dir", os.fspath(state), "-v") as d:
        with Kvm.connect(d.socket) as kvm:
            vm = kvm.create_vm(name=name)
            for i in range(64):
                vm.create_vcpu(i).set_one_reg(regs.CPUID, i)
        yield d, state, name


def _saved(state: Path, name: str) -> bool:
    """The VM's file is there and holds all 64 vCPUs (its snapshot head plus journal)."""
    path = state / file_name(name)
    if not path.exists():
        return False
    parsed = parse(path.read_bytes())
    vcpus = len(snapshot.decode(parsed.snapshot)["vcpus"])
    return vcpus + sum(e.method == "vm.create_vcpu" for e in parsed.entries) == 64


def test_sighup_shuts_down_cleanly_and_saves(stateful: tuple[DaemonProcess, Path, str]) -> None:
    d, state, name = stateful
    d.proc.send_signal(signal.SIGHUP)
    assert d.proc.wait(10) == 0, d.log_text()
    assert _saved(state, name)
    assert not d.socket.exists()
    assert "signal SIGHUP: shutting down" in d.log_text()


def test_a_second_signal_during_shutdown_does_not_abort_the_save(
    stateful: tuple[DaemonProcess, Path, str],
) -> None:
    d, state, name = stateful
    d.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while "signal SIGTERM: shutting down" not in d.log_text():
        assert time.monotonic() < deadline, d.log_text()
        time.sleep(0.001)
    d.proc.send_signal(signal.SIGTERM)
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(10) == 0, d.log_text()
    assert _saved(state, name), d.log_text()
    assert not d.socket.exists()


# ------------------------------------------------------------------ logs ----------------------


def test_a_newline_in_a_vm_name_cannot_forge_a_log_line() -> None:
    forged = "lvz[1] ERROR lvz.daemon: forged"
    with start_daemon("-v") as d:
        with Kvm.connect(d.socket) as kvm:
            kvm.create_vm(name=f"evil\n{forged}\x1b[2J").destroy()
        assert d.stop() == 0
        text = d.log_text()
    lines = text.splitlines()
    assert not any(line.startswith(forged) for line in lines), text
    assert any(f"evil\\n{forged}\\x1b[2J" in line for line in lines), text
