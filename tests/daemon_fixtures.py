"""A real lvz daemon, started as a subprocess, for tests that talk over a real socket.

The socket lives under ``tempfile.mkdtemp(prefix="lvz")`` in /tmp rather than pytest's
``tmp_path``: AF_UNIX paths must stay under 108 bytes. Readiness is "the socket accepts a
connection" (PROTOCOL.md §1), polled, never a fixed sleep. One daemon serves the whole session;
tests stay independent by giving every named VM a unique name (``unique_name``).

Use from a test module with ``pytest_plugins = ["tests.daemon_fixtures"]`` (or from conftest),
and reach everything through fixtures: importing this module by name as well would defeat
pytest's assertion rewriting (and its warning is an error here).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

__all__ = [
    "DaemonProcess", "lvz_daemon", "lvz_socket", "own_daemon", "start_daemon", "unique_name",
    "vm_name",
]


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(os.fspath(path))
        except OSError:
            return False
    return True


class DaemonProcess:
    def __init__(self, proc: subprocess.Popen[bytes], socket_path: Path, log: Path) -> None:
        self.proc = proc
        self.socket = socket_path
        self.log = log

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, as PROTOCOL.md §1 shuts the daemon down; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextmanager
def start_daemon(*extra: str, timeout: float = 15.0) -> Iterator[DaemonProcess]:
    """``python -m lvz.clients.cli serve --socket <short tmp path> *extra``, ready when yielded."""
    tmp = Path(tempfile.mkdtemp(prefix="lvz", dir="/tmp"))
    sock = tmp / "lvz.sock"
    log = tmp / "daemon.log"
    cmd = [sys.executable, "-m", "lvz.clients.cli", "serve", "--socket", os.fspath(sock), *extra]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    daemon = DaemonProcess(proc, sock, log)
    try:
        deadline = time.monotonic() + timeout
        while not accepts(sock):
            if proc.poll() is not None:
                raise RuntimeError(f"lvz daemon exited ({proc.returncode}):\n{daemon.log_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"lvz daemon not ready in {timeout} s:\n{daemon.log_text()}")
            time.sleep(0.02)
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def lvz_daemon() -> Iterator[DaemonProcess]:
    """One daemon for the session; a test that needs to kill a daemon starts its own."""
    with start_daemon() as daemon:
        yield daemon
    # A daemon that crashed during the session must not pass silently.
    assert daemon.proc.returncode == 0, daemon.log_text()


@pytest.fixture
def lvz_socket(lvz_daemon: DaemonProcess) -> Path:
    assert lvz_daemon.proc.poll() is None, lvz_daemon.log_text()
    return lvz_daemon.socket


@pytest.fixture
def own_daemon() -> Iterator[DaemonProcess]:
    """A daemon for this test alone: for tests that kill it or need their own settings."""
    with start_daemon() as daemon:
        yield daemon


@pytest.fixture
def vm_name() -> str:
    """A VM name no other test uses (named VMs are shared by the whole daemon)."""
    return unique_name()
