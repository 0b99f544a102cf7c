"""Start ``lvz serve`` as a child process: the one spawner for the pytest plugin, ``lvz demo``
and the benchmarks.

Readiness is the daemon's own word, not a guess: the spawner binds a datagram socket, hands it
to the daemon as ``NOTIFY_SOCKET`` and waits for ``READY=1`` (sent once the socket is bound and
the plugins are loaded), while also watching the child through a pidfd, so a daemon that dies
during start-up is reported at once with what it wrote to stderr. Nothing is polled.

The daemon runs in a process group of its own (a Ctrl-C meant for the test runner does not reach
it half-way through a test) and is started with ``--exit-with-parent``, so it goes away even
when its parent is SIGKILLed and no ``finally`` runs. ``stop`` ends the whole group.

Paths live in a fresh ``mkdtemp`` directory (mode 0700) under /tmp: AF_UNIX paths must stay
under 108 bytes, which pytest's ``tmp_path`` does not promise. Each call gets its own directory,
so parallel test workers never share a socket.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from types import TracebackType
from typing import Final, Self

__all__ = ["DaemonProcess", "SpawnError", "own_plugins", "serve_command", "spawn"]

#: The entry-point group irqchips register under (``lvz.daemon.host.GROUP``; not imported so
#: that the spawner stays free of the daemon).
IRQCHIP_GROUP: Final = "lvz.irqchips"

_STDERR_TAIL: Final = 4000  # characters of the daemon's log quoted in a start-up failure


class SpawnError(RuntimeError):
    """The daemon did not become ready; the message ends with what it wrote to stderr."""


def own_plugins() -> list[str]:
    """The irqchip entry points shipped by lvz itself, without any third-party chip."""
    return sorted(
        {
            ep.name
            for ep in entry_points(group=IRQCHIP_GROUP)
            if ep.dist is not None and ep.dist.name == "lvz"
        }
    )


def serve_command(socket_path: Path, *args: str, exit_with_parent: bool = True) -> list[str]:
    """The ``lvz serve`` command line, run by this interpreter so it finds the same lvz."""
    cmd = [sys.executable, "-m", "lvz.clients.cli", "serve", "--socket", os.fspath(socket_path)]
    if exit_with_parent:
        cmd.append("--exit-with-parent")
    return cmd + list(args)


class DaemonProcess:
    """A started daemon: ``socket`` to connect to, ``log`` with its stderr, ``proc`` itself,
    ``command`` its command line."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        command: list[str],
        socket_path: Path,
        log: Path,
        directory: Path,
    ) -> None:
        self.proc = proc
        self.command = command
        self.socket = socket_path
        self.log = log
        self.directory = directory

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM the group (PROTOCOL.md §1's shutdown), SIGKILL it after ``timeout``; the status.

        The whole group, so that nothing the daemon may have started outlives it.
        """
        if self.proc.poll() is None:
            _killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        _killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the group, if any
        return self.proc.returncode

    def close(self) -> int:
        """Stop the daemon and remove its directory; its exit status."""
        try:
            return self.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<DaemonProcess pid={self.proc.pid} socket={self.socket}>"


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def spawn(
    *args: str,
    plugins: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    verbose: int = 0,
    timeout: float = 30.0,
    exit_with_parent: bool = True,
    command: Sequence[str] | None = None,
    prefix: str = "lvz",
) -> DaemonProcess:
    """Start ``lvz serve *args`` on a private socket and return once it said READY=1.

    The result is a context manager: ``with spawn() as daemon:`` stops it and removes its
    directory at the end of the block.

    ``plugins`` restricts the irqchips it loads (``$LVZ_PLUGINS``; None: every installed one).
    ``command`` replaces the command line (``{socket}`` in it is replaced by the socket path),
    for benchmarking another daemon build; it must send READY=1 to ``$NOTIFY_SOCKET`` too.
    Raises ``SpawnError`` (with the daemon's stderr) if it exits or stays silent for ``timeout``.
    """
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    sock = directory / "lvz.sock"
    log = directory / "daemon.log"
    if command is not None:
        cmd = [part.replace("{socket}", os.fspath(sock)) for part in command]
    else:
        cmd = serve_command(sock, *(["-v"] * verbose), *args, exit_with_parent=exit_with_parent)
    full_env = dict(os.environ if env is None else env)
    if plugins is not None:
        full_env["LVZ_PLUGINS"] = ",".join(plugins)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        notify.bind(os.fspath(directory / "notify"))
        full_env["NOTIFY_SOCKET"] = os.fspath(directory / "notify")
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=full_env,
                start_new_session=True,
            )
        daemon = DaemonProcess(proc, cmd, sock, log, directory)
        try:
            _wait_ready(daemon, notify, timeout)
        except BaseException:
            daemon.close()
            raise
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    finally:
        notify.close()
    return daemon


def _wait_ready(daemon: DaemonProcess, notify: socket.socket, timeout: float) -> None:
    """Block on READY=1 or the child's exit, whichever comes first."""
    proc = daemon.proc
    pidfd = -1
    with contextlib.suppress(AttributeError, OSError):
        pidfd = os.pidfd_open(proc.pid)
    try:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SpawnError(
                    f"lvz serve (pid {proc.pid}) sent no READY=1 within {timeout} s"
                    + _quote(daemon)
                )
            watched = [notify] + ([pidfd] if pidfd >= 0 else [])
            # Without a pidfd (not Linux >= 5.3) the child's exit is checked every 0.1 s.
            ready, _, _ = select.select(watched, [], [], left if pidfd >= 0 else min(left, 0.1))
            if notify in ready:
                message = notify.recv(4096)
                if b"READY=1" in message.split(b"\n"):
                    return
            if proc.poll() is not None:
                raise SpawnError(
                    f"lvz serve exited with status {proc.returncode} during "
                    f"start-up" + _quote(daemon)
                )
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def _quote(daemon: DaemonProcess) -> str:
    text = daemon.log_text().strip()
    if len(text) > _STDERR_TAIL:
        text = "…" + text[-_STDERR_TAIL:]
    return ":\n" + text if text else " (it wrote nothing to stderr)"
