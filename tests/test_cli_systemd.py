"""``lvz serve`` under systemd: socket activation, STATUS=, the watchdog, STOPPING=1.

The daemon is started the way systemd starts it: a listening socket bound by someone else is
fd 3, ``LISTEN_FDS=1`` and ``LISTEN_PID`` is the daemon's own pid (set by a tiny exec wrapper,
since only the exec'd process knows it), and notifications go to a datagram socket we read.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lvz.clients import Kvm

ROOT = Path(__file__).resolve().parent.parent

# Put the passed socket at fd 3, name ourselves in LISTEN_PID, become `lvz serve`.
WRAPPER = """\
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "lvz.clients.cli", *sys.argv[2:]])
"""


@pytest.fixture
def tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="lvz"))  # AF_UNIX paths must stay short
    yield path
    shutil.rmtree(path, ignore_errors=True)


def messages(notify: socket.socket, until: str, timeout: float = 10.0) -> list[str]:
    """Notification datagrams up to and including one that contains ``until``."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        notify.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            got.append(notify.recv(4096).decode())
        except TimeoutError:
            break
        if until in got[-1]:
            return got
    raise AssertionError(f"no {until!r} among {got}")


def start(
    tmp: Path, listen_fds: str = "1", watchdog: str = "", passed: socket.socket | None = None
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify"))
    env = dict(
        os.environ, NOTIFY_SOCKET=str(tmp / "notify"), LISTEN_FDS=listen_fds, PYTHONPATH=str(ROOT)
    )
    env.pop("LVZ_SOCKET", None)
    if watchdog:
        env["WATCHDOG_USEC"] = watchdog
    fd = passed.fileno() if passed is not None else os.open(os.devnull, os.O_RDONLY)
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRAPPER,
                str(fd),
                "serve",
                "--socket",
                str(tmp / "unused" / "lvz.sock"),
            ],
            pass_fds=(fd,),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    finally:
        if passed is None:
            os.close(fd)
    return proc, notify


def stop(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err.decode(errors="replace")


def test_socket_activation_status_watchdog_stopping(tmp: Path) -> None:
    path = tmp / "lvz.sock"
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(path))
    listening.listen(16)
    proc, notify = start(tmp, watchdog="200000", passed=listening)
    listening.close()  # the daemon holds it now, as it would hold systemd's
    try:
        first = messages(notify, "READY=1")
        assert any("READY=1" in m for m in first)
        with Kvm.connect(path) as kvm:  # served on the socket it was given, not --socket
            kvm.create_vm(name="activated").create_vcpu(0)
            seen = messages(notify, "STATUS=1 VMs, 1 vCPUs, 1 connections")
            assert any("WATCHDOG=1" in m for m in first + seen)
        assert not (tmp / "unused" / "lvz.sock").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        stopping = messages(notify, "STOPPING=1")
        _, raw = proc.communicate(timeout=10)
        code, err = proc.returncode, raw.decode(errors="replace")
        notify.close()
    assert "STOPPING=1" in stopping[-1]
    assert code == 0, err
    assert path.exists(), "the socket belongs to systemd: a stopping daemon must leave it"


def test_listen_pid_of_another_process_is_ignored(tmp: Path) -> None:
    """Inherited LISTEN_* variables (not meant for us) must not make us take fd 3."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify"))
    own = tmp / "own" / "lvz.sock"
    env = dict(
        os.environ,
        NOTIFY_SOCKET=str(tmp / "notify"),
        LISTEN_FDS="1",
        LISTEN_PID="1",
        PYTHONPATH=str(ROOT),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "lvz.clients.cli", "serve", "--socket", str(own)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        messages(notify, "READY=1")
        with Kvm.connect(own) as kvm:
            assert kvm.list_vms() == []
    finally:
        code, err = stop(proc)
        notify.close()
    assert code == 0, err


@pytest.mark.parametrize(
    ("listen_fds", "why"),
    [
        ("2", "systemd passed 2 sockets"),
        ("1", "fd 3 is not a socket"),
        ("x", "LISTEN_FDS='x' is not a number"),
    ],
)
def test_bad_activation_is_refused_with_a_reason(tmp: Path, listen_fds: str, why: str) -> None:
    proc, notify = start(tmp, listen_fds=listen_fds)
    _, raw = proc.communicate(timeout=20)
    notify.close()
    err = raw.decode(errors="replace")
    assert proc.returncode == 125, err
    assert why in err


def test_a_starter_that_stops_listening_is_warned_about_once(tmp: Path) -> None:
    """lvz's spawner (the pytest fixture, lvz demo) closes its NOTIFY_SOCKET after READY=1.

    The daemon then said "could not notify … Connection refused" at every STATUS= (every 5 s,
    or every watchdog ping): in every failing test's daemon log section, for ever. Now the
    first failure is logged, the repeats are not, and notifications resume when someone
    listens again.
    """
    path = tmp / "lvz.sock"
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(path))
    listening.listen(16)
    proc, notify = start(tmp, watchdog="40000", passed=listening)  # a ping every 20 ms
    listening.close()
    try:
        messages(notify, "READY=1")
        notify.close()
        os.unlink(tmp / "notify")
        time.sleep(0.5)  # not a measurement: lets some 25 pings fail
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(tmp / "notify"))
        messages(notify, "WATCHDOG=1")  # it kept trying, and gets through again
        with Kvm.connect(path) as kvm:
            assert kvm.list_vms() == []
    finally:
        code, err = stop(proc)
        notify.close()
    assert code == 0, err
    assert err.count("could not notify") == 1, err
