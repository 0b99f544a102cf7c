"""Shared fixtures: a real daemon on a real Unix socket, in-process (for async tests)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio

from lvz.daemon.config import ServeConfig
from lvz.daemon.host import load_plugins
from lvz.daemon.server import Daemon, serve
from lvz.testing.wire import Wire

# Subprocess daemons started the way a user starts them (`lvz serve`), for the sync client/CLI.
# pytester: the pytest plugin's own tests run user test files through it.
pytest_plugins = ["pytester", "tests.daemon_fixtures"]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory: AF_UNIX paths must stay under 108 bytes, pytest's tmp_path may not."""
    d = Path(tempfile.mkdtemp(prefix="lvz", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def serve_config(sock_dir: Path) -> ServeConfig:
    return ServeConfig(socket=sock_dir / "lvz.sock")


@pytest.fixture
async def daemon(nursery: trio.Nursery, serve_config: ServeConfig) -> Daemon:
    """A daemon served from this test's trio run; ``daemon.config.socket`` is its path."""
    d: Daemon = await nursery.start(serve, serve_config, load_plugins())
    return d


Connect = Callable[..., Awaitable[Wire]]


@pytest.fixture
async def connect(daemon: Daemon) -> AsyncIterator[Connect]:
    """Open raw protocol connections to ``daemon`` (or another path); all closed afterwards."""
    opened: list[Wire] = []

    async def _open(path: Path | None = None) -> Wire:
        raw = await Wire.open(path or daemon.config.socket)
        opened.append(raw)
        return raw

    yield _open
    for raw in opened:
        await raw.aclose()
