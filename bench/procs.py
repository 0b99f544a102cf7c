"""Starting and stopping the processes a benchmark talks to.

The daemon is started the way a user starts it (``lvz serve --socket PATH``) so its figures
include everything a user pays for. Every process started here is stopped with SIGTERM and then
SIGKILL, also when the benchmark fails, so a broken run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

#: The repository root: child processes run there so ``python -m bench.*`` imports this package.
ROOT = Path(__file__).resolve().parent.parent

#: Until ``lvz.clients.cli`` exists the daemon is started through its library entry point.
_FALLBACK_SERVE = (
    "import sys; from pathlib import Path; from lvz.daemon.server import run; "
    "from lvz.daemon.config import ServeConfig; "
    "sys.exit(run(ServeConfig(socket=Path(sys.argv[1]))))"
)


def daemon_command(path: Path) -> list[str]:
    """The command line a user types to start the daemon (the one-line switch lives here).

    ``$LVZ_BENCH_DAEMON`` (a command with ``{socket}`` in it) replaces it, for A/B runs of a
    patched daemon against the same floor.
    """
    override = os.environ.get("LVZ_BENCH_DAEMON")
    if override:
        return [part.replace("{socket}", str(path)) for part in shlex.split(override)]
    if importlib.util.find_spec("lvz.clients.cli") is not None:
        return [sys.executable, "-m", "lvz.clients.cli", "serve", "--socket", str(path)]
    return [sys.executable, "-c", _FALLBACK_SERVE, str(path)]


def floor_command(path: Path) -> list[str]:
    return [sys.executable, "-m", "bench.floor", str(path)]


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Ready means the socket accepts a connection (PROTOCOL.md §1), polled for ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before serving")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
                return
            except OSError:
                pass
        time.sleep(0.01)
    raise RuntimeError(f"{path} did not accept connections within {timeout} s")


def stop(proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    """SIGTERM, wait ``grace`` seconds, then SIGKILL: never leave a server behind."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)


@contextlib.contextmanager
def server(cmd: list[str], path: Path, env: dict[str, str] | None = None,
           ) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` (which serves on ``path``) for the duration of the block."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), full_env.get("PYTHONPATH", "")) if p)
    if env:
        full_env.update(env)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdin=subprocess.DEVNULL)
    try:
        wait_for_socket(path, proc)
        yield proc
    finally:
        stop(proc)


def rss_bytes(pid: int) -> int:
    """VmRSS of a process from /proc (Linux), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """CPU time of a process's main thread, from /proc/PID/schedstat (nanosecond resolution).

    The daemon and the floor do all their work on the main thread (one trio loop), so this is
    what serving the requests cost them.
    """
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
