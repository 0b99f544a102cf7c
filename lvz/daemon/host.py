"""The plugin host: loads irqchips through pluggy and calls them so a failure names its plugin.

Built-in chips are not special: they are found through the ``lvz.irqchips`` entry-point group
exactly like a third-party package's (pyproject.toml registers them), ``LVZ_PLUGINS`` (a comma
list of entry-point names) restricts what is loaded, ``LVZ_TRACE_PLUGINS=1`` logs every hook
call, and ``check_pending`` rejects any hook implementation without a spec before the daemon
accepts a connection.

Hooks are called one implementation at a time (in pluggy's order) rather than through
``pm.hook``: pluggy would let an exception escape without saying whose it was, and PROTOCOL.md
§2 wants EIO *naming the plugin*. Hook wrappers are therefore not supported.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

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


@dataclass(frozen=True, slots=True)
class LoadedPlugin:
    name: str
    version: str
    dist: str


class PluginHost:
    """Owns the PluginManager; the VM model calls plugins only through this object."""

    def __init__(self, pm: pluggy.PluginManager, loaded: list[LoadedPlugin]) -> None:
        self.pm = pm
        self.loaded = loaded
        self.device_types: dict[str, tuple[DeviceType, str]] = {}
        for impl in pm.hook.lvz_device_types.get_hookimpls():
            try:
                result: Any = impl.function()
                types = list(result)
            except Exception as exc:
                raise PluginLoadError(
                    f"plugin {impl.plugin_name!r} failed in lvz_device_types: {exc!r}"
                ) from exc
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
            try:
                result = impl.function(*[kwargs[a] for a in impl.argnames])
            except KvmError:
                raise
            except Exception as exc:
                raise plugin_failure(impl.plugin_name, exc) from exc
            if self.trace:
                log.info("hook %s: %s%r -> %r", hook, impl.plugin_name,
                         tuple(kwargs[a] for a in impl.argnames if a != "vm"), result)
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
        try:
            plugin = ep.load()
        except Exception as exc:
            raise PluginLoadError(
                f"plugin {ep.name!r} ({ep.value}) failed to load: {exc!r}"
            ) from exc
        try:
            pm.register(plugin, name=ep.name)
        except Exception as exc:
            raise PluginLoadError(f"plugin {ep.name!r} was rejected: {exc}") from exc
        dist = ep.dist
        loaded.append(LoadedPlugin(ep.name, dist.version if dist else "?",
                                   dist.name if dist else "?"))
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
