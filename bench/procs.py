"""Starting and stopping the processes a benchmark talks to.

Both servers are started by the one spawner lvz has (``lvz.testing.spawn``, also behind the
pytest fixtures and ``lvz demo``): the daemon the way a user starts it (``lvz serve``) so its
figures include everything a user pays for, the floor with the same readiness handshake. Every
process is stopped with SIGTERM and then SIGKILL, also when the benchmark fails, and exits by
itself if the benchmark is killed, so a broken run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

from lvz.testing.spawn import DaemonProcess, spawn

#: The repository root: child processes find ``bench`` here (``python -m bench.floor``).
ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


@contextlib.contextmanager
def daemon(*args: str) -> Iterator[DaemonProcess]:
    """``lvz serve *args`` for the duration of the block; ``.socket``, ``.pid``, ``.proc.args``.

    ``$LVZ_BENCH_DAEMON`` (a command with ``{socket}`` in it, which must send READY=1 to
    ``$NOTIFY_SOCKET``) replaces ``lvz serve``, for A/B runs of a patched daemon against the
    same floor.
    """
    override = os.environ.get("LVZ_BENCH_DAEMON")
    command = [*shlex.split(override), *args] if override else None
    with spawn(*args, command=command, env=_env(), prefix="lvzb") as proc:
        yield proc


@contextlib.contextmanager
def profiled_daemon(profile: Path, *args: str) -> Iterator[DaemonProcess]:
    """``lvz serve`` under cProfile, writing ``profile`` when it shuts down."""
    command = [
        sys.executable,
        "-m",
        "cProfile",
        "-o",
        str(profile),
        "-m",
        "lvz.clients.cli",
        "serve",
        "--socket",
        "{socket}",
        "--exit-with-parent",
        *args,
    ]
    with spawn(command=command, env=_env(), prefix="lvzb") as proc:
        yield proc


@contextlib.contextmanager
def floor(*args: str) -> Iterator[DaemonProcess]:
    """The bare trio + msgpack echo server (bench/floor.py) for the duration of the block."""
    command = [sys.executable, "-m", "bench.floor", "{socket}", *args]
    with spawn(command=command, env=_env(), prefix="lvzb") as proc:
        yield proc


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
