"""What lvz's own suite adds to the ``lvz`` pytest plugin (lvz/testing/pytest_plugin.py).

The session daemon (``lvz_daemon``) and ``lvz_socket`` come from the plugin, started by the one
spawner (``lvz.testing.spawn``) and restricted to lvz's own chips by ``lvz_plugins`` in
pyproject.toml. Here: a daemon for one test (for tests that kill it or need their own
settings) and unique VM names, since named VMs are shared by the whole daemon.

Use from a test module with ``pytest_plugins = ["tests.daemon_fixtures"]`` (conftest does it),
and reach everything through fixtures: importing this module by name as well would defeat
pytest's assertion rewriting (and its warning is an error here).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from lvz.testing.spawn import DaemonProcess, spawn

__all__ = ["DaemonProcess", "own_daemon", "start_daemon", "unique_name", "vm_name"]


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


@contextmanager
def start_daemon(*extra: str) -> Iterator[DaemonProcess]:
    """``lvz serve *extra`` on a short private socket, ready (READY=1) when yielded."""
    with spawn(*extra) as daemon:
        yield daemon


@pytest.fixture
def own_daemon() -> Iterator[DaemonProcess]:
    """A daemon for this test alone: for tests that kill it or need their own settings."""
    with start_daemon() as daemon:
        yield daemon


@pytest.fixture
def vm_name() -> str:
    """A VM name no other test uses (named VMs are shared by the whole daemon)."""
    return unique_name()
