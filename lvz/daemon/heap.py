"""Keeping the cyclic garbage collector out of big VMs.

A VM of 65,536 vCPUs is about a million long-lived objects (vCPUs, their registers, handles,
chip state). CPython's full collection runs each time the long-lived heap has grown by a
quarter and walks all of it, so building such a VM walked the heap four or five times over, and
any request that allocates a lot (``vm.phyid_map``: 65,536 entries) could pay a whole walk,
50-100 ms, in the middle of its answer. Nothing in that heap is garbage: the objects live as
long as their VM.

So the daemon freezes the survivors of every full collection (``gc.freeze``: moved to the
permanent generation, never walked again). Full collections keep their schedule but each walks
only what survived since the last one, so every object is walked about once in its life.
Frozen objects are still freed by reference counting; only reference cycles among them would
outlive their use, so when a VM is torn down (a VM and its chips' view of it form cycles) the
frozen objects are thawed back into the oldest generation, for the next full collection to
sort out.

Installed by ``lvz serve`` for the daemon's process only: a library embedding the daemon (the
tests' in-process daemons) keeps the interpreter's collector as it was.
"""

from __future__ import annotations

import gc
from typing import Any

__all__ = ["install", "installed", "thaw", "uninstall"]


def _after_collection(phase: str, info: dict[str, Any]) -> None:
    if phase == "stop" and info["generation"] == 2:
        gc.freeze()


def installed() -> bool:
    return _after_collection in gc.callbacks


def install() -> None:
    """Freeze the survivors of every full collection from now on (idempotent)."""
    if not installed():
        gc.callbacks.append(_after_collection)


def uninstall() -> None:
    if installed():
        gc.callbacks.remove(_after_collection)
        gc.unfreeze()


def thaw() -> None:
    """A VM went away: let the next full collection see the frozen heap once more."""
    if installed():
        gc.unfreeze()
