"""Hook specifications: the contract between lvz and irqchip plugins (pluggy project ``lvz``).

Every hook is synchronous and does no I/O; pluggy never awaits and a chip is a state machine.
Call hooks with keyword arguments only; an implementation may take any subset of a hook's
parameters, so new parameters can be added without breaking plugins. VM lifecycle events
(vCPU created/destroyed, phyid set/dropped) reach a chip as ``Device`` methods, not as hooks:
one mechanism, called on the one device each VM has of the plugin's type. ``docs/plugins.md``
documents each hook, and a test fails when a hook or its signature is missing from it.
"""

from __future__ import annotations

from collections.abc import Iterable

import pluggy

from .api import DeviceType, VmApi

hookspec = pluggy.HookspecMarker("lvz")
hookimpl = pluggy.HookimplMarker("lvz")

__all__ = ["hookimpl", "hookspec"]


# --- registration ------------------------------------------------------------------------------


@hookspec
def lvz_device_types() -> Iterable[DeviceType]:
    """Return the device types this plugin adds (names must be unique across plugins)."""
    raise NotImplementedError


# --- decisions (firstresult: the first non-None answer wins) -----------------------------------


@hookspec(firstresult=True)
def lvz_hypercall(vm: VmApi, vcpu_id: int, code: int, args: list[int]) -> int | None:
    """Handle ``hvcl code`` from ``vcpu_id`` with a0..a5 in ``args`` (u64 each, always 6).

    Return the new a0 as a signed int, or None if this plugin does not handle the call
    (the daemon answers KVM_HCALL_INVALID_CODE, -1, when nobody does).
    """
    raise NotImplementedError
