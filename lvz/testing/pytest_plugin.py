"""The ``lvz`` pytest plugin: a real lvz daemon and connected clients as fixtures.

Installed with lvz (the ``pytest11`` entry point ``lvz``), so any test in a venv where lvz is
installed can ask for:

- ``lvz_daemon`` (session): ``lvz serve`` in a child process on a private socket (``.socket``),
  ready when READY=1 arrives on its notify socket; its log is attached to every failing test
  that used it; it and its process group end with the session, and it ends by itself if pytest
  is SIGKILLed (``--exit-with-parent``). One per pytest-xdist worker.
- ``lvz_socket``: the socket of the daemon this test uses (the session's, or the one its
  ``lvz_serve`` marker asked for).
- ``kvm`` / ``vm``: a connected blocking ``Kvm`` / a fresh VM on it, destroyed at teardown
  whatever the test did; ``trio_kvm`` / ``trio_vm``: the same for pytest-trio tests.

Options: ``--lvz-socket PATH`` or the ``lvz_socket`` ini option use a daemon that is already
running instead of starting one; ``lvz_plugins`` (ini) restricts the irqchips every daemon of
the session loads (also in-process ones: it becomes ``$LVZ_PLUGINS``); ``lvz_serve_args``
(ini) adds ``lvz serve`` options such as ``--max-vcpus 64``; ``@pytest.mark.lvz_serve(*args,
plugins=[...])`` gives the marked tests a daemon started with those options instead (one per
distinct set of options, shared by the tests that ask for it).
"""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

import pytest

from .spawn import DaemonProcess, SpawnError, spawn

if TYPE_CHECKING:
    from lvz.clients import AsyncKvm, AsyncVm, Kvm, Vm

__all__ = ["ExistingDaemon", "LvzDaemons"]

#: Fixtures through which a test talks to a daemon (its log is attached when the test fails).
DAEMON_FIXTURES: Final = frozenset({"lvz_daemon", "lvz_socket", "kvm", "vm", "trio_kvm", "trio_vm"})


@dataclass(frozen=True, slots=True)
class ExistingDaemon:
    """A daemon the plugin did not start (``--lvz-socket``): a socket and no log to show."""

    socket: Path

    def alive(self) -> bool:
        return self.socket.exists()

    def log_text(self) -> str:
        return ""


Daemon = DaemonProcess | ExistingDaemon
Options = tuple[tuple[str, ...], tuple[str, ...] | None]  # (serve args, plugins or None)


@dataclass(slots=True)
class LvzDaemons:
    """Every daemon this session started, by the options it was started with."""

    config: pytest.Config
    started: dict[Options, DaemonProcess] = field(default_factory=dict)
    failed: dict[Options, str] = field(default_factory=dict)  # start-up failures, not retried

    def existing(self) -> Path | None:
        given = self.config.getoption("lvz_socket") or self.config.getini("lvz_socket")
        return Path(given) if given else None

    def default_options(self) -> Options:
        args = tuple(self.config.getini("lvz_serve_args"))
        plugins = self.config.getini("lvz_plugins")
        return args, tuple(plugins) if plugins else None

    def get(self, options: Options) -> DaemonProcess:
        """The daemon for ``options``, started on first use; a start-up failure fails the test."""
        if options in self.failed:
            pytest.fail(self.failed[options], pytrace=False)
        if options not in self.started:
            args, plugins = options
            worker = os.environ.get("PYTEST_XDIST_WORKER", "")
            try:
                self.started[options] = spawn(
                    "-v", *args, plugins=plugins, prefix=f"lvz-{worker}-" if worker else "lvz-"
                )
            except SpawnError as exc:
                self.failed[options] = f"the lvz daemon fixture could not start: {exc}"
        if options in self.failed:  # outside the except: the report shows the daemon's words
            pytest.fail(self.failed[options], pytrace=False)
        return self.started[options]

    def stop_all(self) -> list[str]:
        """Stop every daemon; a description of each that did not exit cleanly."""
        problems = []
        for daemon in self.started.values():
            status = daemon.close()
            if status != 0:
                problems.append(
                    f"lvz daemon {daemon.socket} exited with status {status}:\n{daemon.log_text()}"
                )
        self.started.clear()
        return problems


DAEMONS = pytest.StashKey[LvzDaemons]()
SAVED_ENV = pytest.StashKey[str | None]()  # $LVZ_PLUGINS before lvz_plugins replaced it
USED = pytest.StashKey[dict[int, tuple[Daemon, int]]]()  # id -> (daemon, log offset at start)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lvz", "lvz daemon fixtures")
    group.addoption(
        "--lvz-socket",
        dest="lvz_socket",
        metavar="PATH",
        default=None,
        help="use the lvz daemon already serving on PATH instead of starting one",
    )
    parser.addini("lvz_socket", "use the lvz daemon already serving on this socket", default="")
    parser.addini(
        "lvz_plugins",
        "irqchip plugins the lvz daemons load (default: all installed)",
        type="args",
        default=[],
    )
    parser.addini(
        "lvz_serve_args",
        "extra `lvz serve` options for the lvz daemon fixture",
        type="args",
        default=[],
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "lvz_serve(*args, plugins=None): run this test against a daemon started "
        "with these `lvz serve` options (and only these irqchip plugins)",
    )
    daemons = LvzDaemons(config)
    config.stash[DAEMONS] = daemons
    plugins = daemons.default_options()[1]
    if plugins is not None:  # in-process daemons (load_plugins) obey it too
        config.stash[SAVED_ENV] = os.environ.get("LVZ_PLUGINS")
        os.environ["LVZ_PLUGINS"] = ",".join(plugins)


def pytest_unconfigure(config: pytest.Config) -> None:
    daemons = config.stash.get(DAEMONS, None)
    if daemons is not None:
        daemons.stop_all()  # normally done by lvz_daemon's teardown; this is the safety net
    if SAVED_ENV in config.stash:
        saved = config.stash[SAVED_ENV]
        if saved is None:
            os.environ.pop("LVZ_PLUGINS", None)
        else:
            os.environ["LVZ_PLUGINS"] = saved


def _used(item: pytest.Item) -> dict[int, tuple[Daemon, int]]:
    return item.stash.setdefault(USED, {})


def _log_size(daemon: Daemon) -> int:
    if isinstance(daemon, DaemonProcess):
        try:
            return daemon.log.stat().st_size
        except OSError:
            return 0
    return 0


def _note_use(request: pytest.FixtureRequest, daemon: Daemon) -> None:
    _used(request.node).setdefault(id(daemon), (daemon, _log_size(daemon)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach what each daemon the test used logged during the test, when the test failed."""
    report = yield
    if report.failed:
        for daemon, offset in item.stash.get(USED, {}).values():
            if not isinstance(daemon, DaemonProcess):
                continue
            try:
                with open(daemon.log, "rb") as f:
                    f.seek(offset)
                    text = f.read().decode(errors="replace")
            except OSError as exc:
                text = f"(cannot read {daemon.log}: {exc})"
            if not text.strip():
                text = f"(nothing logged during this test; whole log: {daemon.log})\n"
            status = "" if daemon.alive() else f", exited with status {daemon.proc.returncode}"
            report.sections.append((f"lvz daemon log ({daemon.socket}{status})", text))
    return report


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def lvz_daemon(pytestconfig: pytest.Config) -> Iterator[Daemon]:
    """The session's daemon; ``--lvz-socket``/``lvz_socket`` names one already running instead."""
    daemons = pytestconfig.stash[DAEMONS]
    existing = daemons.existing()
    if existing is not None:
        if not existing.exists():
            pytest.fail(f"--lvz-socket {existing}: no such socket", pytrace=False)
        yield ExistingDaemon(existing)
        return
    yield daemons.get(daemons.default_options())
    problems = daemons.stop_all()
    if problems:  # a daemon that crashed during the session must not pass silently
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def lvz_socket(request: pytest.FixtureRequest) -> Path:
    """The socket of the daemon this test uses: its ``lvz_serve`` marker's, else the session's."""
    marker = request.node.get_closest_marker("lvz_serve")
    daemons = request.config.stash[DAEMONS]
    daemon: Daemon
    if marker is None or daemons.existing() is not None:
        daemon = request.getfixturevalue("lvz_daemon")
    else:
        plugins: Sequence[str] | None = marker.kwargs.get("plugins")
        args = tuple(str(a) for a in marker.args)
        if len(marker.args) == 1 and isinstance(marker.args[0], str):
            args = tuple(shlex.split(marker.args[0]))
        daemon = daemons.get((args, tuple(plugins) if plugins is not None else None))
    _note_use(request, daemon)
    if not daemon.alive():
        pytest.fail(
            f"the lvz daemon at {daemon.socket} is gone:\n{daemon.log_text()}", pytrace=False
        )
    return daemon.socket


@pytest.fixture
def kvm(lvz_socket: Path) -> Iterator[Kvm]:
    """A blocking client connected for this test alone (unnamed VMs die with it)."""
    from lvz.clients import Kvm

    with Kvm.connect(lvz_socket) as client:
        yield client


@pytest.fixture
def vm(kvm: Kvm) -> Iterator[Vm]:
    """A fresh unnamed VM, destroyed at teardown even when the test failed."""
    from lvz.clients import KvmError

    fresh = kvm.create_vm()
    try:
        yield fresh
    finally:
        # Already destroyed by the test, or its connection gone (which ends an unnamed VM).
        with contextlib.suppress(KvmError, ConnectionError):
            fresh.destroy()


@pytest.fixture
async def trio_kvm(lvz_socket: Path) -> AsyncIterator[AsyncKvm]:
    """``kvm`` for pytest-trio tests: a connected trio client."""
    from lvz.clients import open_kvm

    async with open_kvm(lvz_socket) as client:
        yield client


@pytest.fixture
async def trio_vm(trio_kvm: AsyncKvm) -> AsyncIterator[AsyncVm]:
    """``vm`` for pytest-trio tests: a fresh VM, destroyed at teardown whatever happened."""
    from lvz.clients import KvmError

    fresh = await trio_kvm.create_vm()
    try:
        yield fresh
    finally:
        with contextlib.suppress(KvmError, ConnectionError):
            await fresh.destroy()
