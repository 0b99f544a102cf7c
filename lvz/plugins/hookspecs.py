"""Hook specifications: the contract between lvz and irqchip plugins (pluggy project ``lvz``).

Every hook is synchronous and does no I/O; pluggy never awaits and a chip is a state machine.
Call hooks with keyword arguments only; an implementation may take any subset of a hook's
parameters, so new parameters can be added without breaking plugins. ``docs/plugins.md``
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


# --- lifecycle (every implementation is called; return values are ignored) ---------------------


@hookspec
def lvz_vcpu_created(vm: VmApi, vcpu_id: int) -> None:
    """A vCPU was created in ``vm``."""


@hookspec
def lvz_vcpu_destroyed(vm: VmApi, vcpu_id: int) -> None:
    """A vCPU was destroyed (its phyid, if any, was dropped first)."""


@hookspec
def lvz_phyid_set(vm: VmApi, vcpu_id: int, phyid: int) -> None:
    """``vcpu_id`` took physical CPUID ``phyid`` (a first, successful ``kvm_set_cpuid``)."""


@hookspec
def lvz_phyid_dropped(vm: VmApi, vcpu_id: int, phyid: int) -> None:
    """``phyid`` was released by ``vcpu_id`` (``kvm_drop_cpuid``, on vCPU destroy)."""
