r"""The plugin host: loads irqchips through pluggy and calls them so a failure names its plugin.

Built-in chips are not special: they are found through the ``lvz.irqchips`` entry-point group
exactly like a third-party package's (pyproject.toml registers them), ``LVZ_PLUGINS`` (a comma
list of entry-point names) restricts what is loaded, ``LVZ_TRACE_PLUGINS=1`` logs every hook
call, and ``check_pending`` rejects any hook implementation without a spec before the daemon
accepts a connection.

Hooks are called one implementation at a time (in pluggy's order) rather than through
``pm.hook``: pluggy would let an exception escape without saying whose it was, and PROTOCOL.md
§2 wants EIO *naming the plugin*. Hook wrappers are therefore not supported.

Every call into plugin code goes through a ``PluginGuard``: whatever the plugin raises,
``BaseException``\ s included (a stray ``sys.exit`` must not end the daemon), becomes EIO naming
it; only trio's own ``Cancelled`` passes. ``WATCHDOG`` bounds how long plugin code may run: a
lazily armed ``ITIMER_REAL`` whose SIGALRM handler raises ``PluginTimeout`` inside the plugin
(pytest-timeout's signal method), which the guard turns into ETIMEDOUT and, for a device, marks
it broken. The timer is armed when plugin code is entered and it is not already running, and
never disarmed on the way out: a tick that finds no plugin running does nothing, so the common
case (a chip call of a microsecond) costs two attribute writes, not two system calls.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import FrameType
from typing import Any, Protocol

import pluggy

from lvz.plugins import hookspecs
from lvz.plugins.api import DeviceType
from lvz.protocol.errors import KvmError

log = logging.getLogger("lvz.plugins")

GROUP = "lvz.irqchips"


class PluginLoadError(Exception):
    """A plugin could not be loaded; the daemon refuses to start rather than run without it."""


def plugin_failure(plugin: str, exc: BaseException) -> KvmError:
    """The EIO a request gets when ``plugin`` raised something other than a KvmError."""
    log.error("irqchip plugin %r failed: %r", plugin, exc, exc_info=exc)
    return KvmError("EIO", f"irqchip plugin {plugin!r} failed: {type(exc).__name__}: {exc}")


class PluginTimeout(BaseException):
    """Raised inside plugin code by the watchdog's SIGALRM handler.

    A BaseException so that a plugin's own ``except Exception`` cannot swallow it.
    """


class Breakable(Protocol):
    """What a guard marks when its plugin misbehaves: the device record (model.py)."""

    broken: str


class Watchdog:
    """The one process-wide timer that interrupts plugin code running past ``timeout``."""

    def __init__(self) -> None:
        self.timeout = 1.0
        self.enabled = False
        self.depth = 0  # nesting of plugin calls (a chip calling another chip's input)
        self.plugin = ""  # the innermost plugin running now
        self.started = 0.0  # when the outermost plugin call began
        self.armed = False
        self.users = 0
        self._previous: Any = None

    def install(self, timeout: float) -> bool:
        """Take over SIGALRM (``serve`` does, for its lifetime); 0 means no time limit.

        False, and no limit, where signals cannot be handled (not the main thread). Counted,
        so daemons started in one process (tests) share the handler.
        """
        if timeout <= 0:
            return False
        if self.users == 0:
            try:
                self._previous = signal.signal(signal.SIGALRM, self._tick)
            except (ValueError, OSError, AttributeError):  # not the main thread / no SIGALRM
                log.warning("plugin watchdog unavailable: plugin calls have no time limit")
                return False
        self.users += 1
        self.timeout = timeout
        self.enabled = True
        return True

    def uninstall(self) -> None:
        if self.users == 0:
            return
        self.users -= 1
        if self.users:
            return
        self.enabled = False
        self.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        try:
            signal.signal(signal.SIGALRM, self._previous or signal.SIG_DFL)
        except (ValueError, OSError):
            pass

    def enter(self, plugin: str) -> None:
        if self.depth == 0:
            self.started = time.monotonic()
            if self.enabled and not self.armed:
                self.armed = True
                signal.setitimer(signal.ITIMER_REAL, self.timeout)
        self.plugin = plugin
        self.depth += 1  # last: a tick can raise only once the guard's __exit__ will run

    def reset(self) -> None:
        """Forget every plugin call in progress (after a timeout escaped a guard)."""
        self.depth = 0
        self.plugin = ""

    def _tick(self, signum: int, frame: FrameType | None) -> None:
        self.armed = False
        if not self.enabled or self.depth == 0:
            return  # no plugin running: stay unarmed until the next plugin call
        left = self.started + self.timeout - time.monotonic()
        if left > 0:
            self.armed = True  # this call began after the timer was armed: wait the rest
            signal.setitimer(signal.ITIMER_REAL, left)
            return
        self.started = time.monotonic()  # the outer call's remaining plugins get a fresh span
        raise PluginTimeout(f"ran longer than {self.timeout:g} s (--plugin-timeout)")


#: Process-wide: SIGALRM is a process-wide resource. ``serve`` installs it.
WATCHDOG = Watchdog()


def _passes_through(exc: BaseException) -> bool:
    """trio's cancellation belongs to trio (the model does not import trio to ask)."""
    trio = sys.modules.get("trio")
    return trio is not None and isinstance(exc, trio.Cancelled)


class PluginGuard:
    """``with PluginGuard(plugin, record):`` around any call into plugin code.

    A class rather than a ``@contextmanager`` generator: it runs on every chip access.
    """

    __slots__ = ("outer", "plugin", "record")

    def __init__(self, plugin: str, record: Breakable | None = None) -> None:
        self.plugin = plugin
        self.record = record

    def __enter__(self) -> None:
        record = self.record
        if record is not None and record.broken:
            raise KvmError(
                "EIO",
                f"irqchip plugin {self.plugin!r}: the device is broken "
                f"({record.broken}); destroy the VM",
            )
        self.outer = WATCHDOG.plugin
        WATCHDOG.enter(self.plugin)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        WATCHDOG.depth -= 1
        WATCHDOG.plugin = self.outer
        if exc is None or isinstance(exc, KvmError) or _passes_through(exc):
            return
        if isinstance(exc, PluginTimeout):
            log.error("irqchip plugin %r timed out: %s", self.plugin, exc)
            if self.record is not None:
                self.record.broken = f"timed out: {exc}"
            raise KvmError("ETIMEDOUT", f"irqchip plugin {self.plugin!r} {exc}") from exc
        raise plugin_failure(self.plugin, exc) from exc


@dataclass(frozen=True, slots=True)
class LoadedPlugin:
    name: str
    version: str
    dist: str


#: What a plugin may raise while it loads and still be named in a refusal to start. SystemExit
#: (a module that calls sys.exit, a hook that raises it) used to end ``lvz serve`` with exit 0
#: and not a word; KeyboardInterrupt stays out: at start-up it is the user's Ctrl-C.
LOAD_FAILURES = (Exception, SystemExit, GeneratorExit)


@contextlib.contextmanager
def _loading(failure: str, plugin: str) -> Iterator[None]:
    """Plugin code run while the daemon starts: a failure, or a run past ``--plugin-timeout``
    (when ``lvz serve`` armed the watchdog for loading), refuses the start naming the plugin.
    A plugin that slept in its import or ``lvz_device_types`` kept the daemon from ever being
    ready, with nothing said."""
    outer = WATCHDOG.plugin
    WATCHDOG.enter(plugin)
    try:
        yield
    except PluginTimeout as exc:
        raise PluginLoadError(f"{failure}: {exc}") from None
    except LOAD_FAILURES as exc:
        raise PluginLoadError(f"{failure}: {exc!r}") from exc
    finally:
        WATCHDOG.depth -= 1
        WATCHDOG.plugin = outer


class PluginHost:
    """Owns the PluginManager; the VM model calls plugins only through this object."""

    def __init__(self, pm: pluggy.PluginManager, loaded: list[LoadedPlugin]) -> None:
        self.pm = pm
        self.loaded = loaded
        self.device_types: dict[str, tuple[DeviceType, str]] = {}
        for impl in pm.hook.lvz_device_types.get_hookimpls():
            with _loading(
                f"plugin {impl.plugin_name!r} failed in lvz_device_types", impl.plugin_name
            ):
                result: Any = impl.function()
                types = list(result)
            for dt in types:
                if not isinstance(dt, DeviceType):
                    raise PluginLoadError(
                        f"plugin {impl.plugin_name!r} returned {dt!r}, not a DeviceType"
                    )
                if dt.name in self.device_types:
                    other = self.device_types[dt.name][1]
                    raise PluginLoadError(
                        f"device type {dt.name!r} is offered by both {other!r} "
                        f"and {impl.plugin_name!r}"
                    )
                self.device_types[dt.name] = (dt, impl.plugin_name)
        #: $LVZ_TRACE_PLUGINS: log every hook call with its arguments and answer.
        self.trace = bool(os.environ.get("LVZ_TRACE_PLUGINS"))
        self._impls = {
            name: list(reversed(getattr(pm.hook, name).get_hookimpls()))
            for name in ("lvz_hypercall",)
        }

    def call_first(self, hook: str, **kwargs: Any) -> tuple[Any, str]:
        """Call a firstresult hook; returns (result, plugin name) or (None, "")."""
        # In pluggy's order (last registered first), each with the arguments it asked for.
        for impl in self._impls[hook]:
            with PluginGuard(impl.plugin_name):
                result = impl.function(*[kwargs[a] for a in impl.argnames])
            if self.trace:
                log.info(
                    "hook %s: %s%r -> %r",
                    hook,
                    impl.plugin_name,
                    tuple(kwargs[a] for a in impl.argnames if a != "vm"),
                    result,
                )
            if result is not None:
                return result, impl.plugin_name
        return None, ""


def load_plugins(
    allow: Iterable[str] | None = None, extra: Iterable[tuple[str, object]] = ()
) -> PluginHost:
    """Load the entry-point plugins (restricted to ``allow`` or ``$LVZ_PLUGINS``) plus ``extra``.

    ``extra`` is (name, plugin object) pairs registered directly, for tests and embedding.
    """
    if allow is None:
        env = os.environ.get("LVZ_PLUGINS")
        allow = [n.strip() for n in env.split(",") if n.strip()] if env is not None else None
    allowed = set(allow) if allow is not None else None
    pm = pluggy.PluginManager("lvz")
    pm.add_hookspecs(hookspecs)
    loaded: list[LoadedPlugin] = []
    seen: set[str] = set()
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        if ep.name in seen or (allowed is not None and ep.name not in allowed):
            continue
        seen.add(ep.name)
        with _loading(f"plugin {ep.name!r} ({ep.value}) failed to load", ep.name):
            plugin = ep.load()
        try:
            pm.register(plugin, name=ep.name)
        except Exception as exc:
            raise PluginLoadError(f"plugin {ep.name!r} was rejected: {exc}") from exc
        dist = ep.dist
        loaded.append(
            LoadedPlugin(ep.name, dist.version if dist else "?", dist.name if dist else "?")
        )
    if allowed is not None:
        missing = allowed - seen
        if missing:
            raise PluginLoadError(f"LVZ_PLUGINS names unknown plugins: {sorted(missing)}")
    for name, plugin in extra:
        pm.register(plugin, name=name)
        loaded.append(LoadedPlugin(name, "-", "(registered directly)"))
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginLoadError(f"plugin {exc.plugin!r}: {exc}") from exc
    log.info("plugins loaded: %s", ", ".join(p.name for p in loaded) or "none")
    return PluginHost(pm, loaded)
