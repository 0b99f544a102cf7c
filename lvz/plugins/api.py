"""The narrow API between a VM and its irqchips: all a chip may see of the daemon.

A chip is a plain state machine. It is built by a ``DeviceType.factory`` with a ``VmApi`` (a
small facade the daemon makes per VM, never the VM model itself), keeps
its registers itself, and reaches vCPUs only through the VM's phyid map (``vcpu_by_phyid``, the
seed's ``kvm_get_vcpu_by_cpuid``) or by vcpu_id where the kernel does (device attrs, COREISR).
It never awaits and never does I/O; the daemon calls it with the VM's map lock held where the
kernel holds a spinlock, and turns any exception that is not a ``KvmError`` into EIO naming the
plugin, so a buggy chip fails one request and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from lvz.protocol.errors import KvmError

__all__ = ["Device", "DeviceType", "IoHandler", "Stat", "VmApi"]

#: What a counter means over time, as KVM_GET_STATS_FD's KVM_STATS_TYPE_*: ``cumulative``
#: only grows (rates are its differences), ``instant`` is a level now, ``peak`` a high mark.
STAT_KINDS = ("cumulative", "instant", "peak")
#: What one value counts: events, a 0/1 state, a bit set, an identifier, or milliseconds.
STAT_UNITS = ("count", "boolean", "bitmask", "id", "milliseconds")


class IoHandler(Protocol):
    """A claimed IOCSR or MMIO range. ``offset`` is relative to the claimed base."""

    def read(self, vcpu_id: int, offset: int, size: int) -> int:
        """Return the loaded value, zero-extended to ``size`` bytes (the daemon sign-extends)."""
        ...

    def write(self, vcpu_id: int, offset: int, size: int, value: int) -> None:
        """A store of ``size`` bytes; ``value`` is the whole 64-bit source register."""
        ...


class VmApi(Protocol):
    """What the VM offers a chip (and a hypercall handler)."""

    @property
    def max_phyid(self) -> int:
        """The VM's phyid limit; also the unset marker."""
        ...

    @property
    def pv_features(self) -> int:
        """The VM-wide PV feature word (KVM_FEATURE_* bits)."""
        ...

    def vcpu_by_phyid(self, phyid: int) -> int | None:
        """``kvm_get_vcpu_by_cpuid``: the vcpu_id holding ``phyid``, None if unset/out of range."""
        ...

    def vcpu_exists(self, vcpu_id: int) -> bool:
        """``kvm_get_vcpu_by_id`` is not None."""
        ...

    def vcpu_ids(self) -> list[int]:
        """The VM's vcpu_ids, ascending."""
        ...

    def queue_irq(self, vcpu_id: int, irq: int) -> None:
        """``kvm_queue_irq`` + kick: raise line ``irq`` (INT_*) of a vCPU; idempotent."""
        ...

    def dequeue_irq(self, vcpu_id: int, irq: int) -> None:
        """``kvm_dequeue_irq`` + kick: lower line ``irq``; idempotent."""
        ...

    def claim_iocsr(self, base: int, size: int, handler: IoHandler) -> None:
        """Route guest IOCSR accesses in [base, base+size) to ``handler`` (EEXIST on overlap)."""
        ...

    def claim_mmio(self, base: int, size: int, handler: IoHandler) -> None:
        """As ``claim_iocsr`` for MMIO; claiming again with the same handler moves the range."""
        ...

    def set_chip_input(self, device_type: str, line: int, level: int) -> None:
        """Drive input ``line`` of this VM's device ``device_type`` (PCH-PIC -> EIOINTC).

        Raises KvmError ENXIO when the VM has no such device.
        """
        ...

    def iocsr_read(self, vcpu_id: int, addr: int, size: int) -> int:
        """An IOCSR load made as ``vcpu_id`` (IPI ANY_SEND), zero-extended to ``size`` bytes.

        It is the very path a guest's ``vcpu.iocsr_read`` takes, less the sign extension:
        KvmError ENXIO when nothing claims ``addr``, EINVAL for a size that is not 1/2/4/8.
        """
        ...

    def iocsr_write(self, vcpu_id: int, addr: int, size: int, value: int) -> None:
        """An IOCSR store made as ``vcpu_id``: the path of ``vcpu.iocsr_write``, same errors."""
        ...


class Device:
    """Base of an irqchip instance: one per VM and type. Override what the chip supports.

    The lifecycle methods (``vcpu_created``, ``vcpu_destroyed``, ``phyid_set``,
    ``phyid_dropped``) are lvz's one mechanism for VM events: there are no lifecycle hooks. They
    are called after the VM changed: a chip that caches routing (EIOINTC's coremap) refreshes it
    here instead of keeping its own phyid table. ``vcpu_created`` may refuse the vCPU by raising
    KvmError (the creation is undone); the others cannot stop what already happened.
    """

    #: Set by the daemon from the DeviceType that built the device.
    type_name: str = ""

    def __init__(self, vm: VmApi) -> None:
        self.vm = vm

    def set_attr(self, group: int, attr: int, value: int) -> None:
        """KVM_SET_DEVICE_ATTR."""
        raise KvmError("ENXIO", f"{self.type_name}: no attribute group {group:#x}")

    def get_attr(self, group: int, attr: int) -> int:
        """KVM_GET_DEVICE_ATTR."""
        raise KvmError("ENXIO", f"{self.type_name}: no attribute group {group:#x}")

    def set_input(self, line: int, level: int) -> None:
        """An input pin driven from outside the chip (IRQ_LINE, MSI, another chip)."""
        raise KvmError("ENXIO", f"{self.type_name} has no input lines")

    def vcpu_created(self, vcpu_id: int) -> None:
        """A vCPU was added to the VM."""

    def vcpu_destroyed(self, vcpu_id: int) -> None:
        """A vCPU left the VM (after its phyid was dropped)."""

    def phyid_set(self, vcpu_id: int, phyid: int) -> None:
        """``vcpu_id`` now holds ``phyid``."""

    def phyid_dropped(self, vcpu_id: int, phyid: int) -> None:
        """``phyid`` is free again."""

    def stats(self) -> list[int | list[int]]:
        """The current values of ``DeviceType.stats``, in its order (a list for ``size`` > 1).

        Counters are plain ints the chip bumps where the event already happens; levels (pending,
        masked) are read from its registers here, so asking costs nothing until someone asks.
        """
        return []

    def save_state(self) -> list[tuple[int, int, int]]:
        """The device's whole state as ``(group, attr, value)`` device attrs, in restore order.

        Snapshots (``lvz snapshot``, ``--state-dir``) save a device by asking for this list
        (``device.save_state``) and restore it by replaying each entry with ``set_attr`` on a
        fresh device of the same type, in a VM whose vCPUs and registers were restored first.
        So the list may contain write-only attrs (a CTRL "init" or "load finished" step) and
        must contain every attr ``set_attr`` needs to rebuild what the guest can observe.

        A chip that keeps no state returns ``[]``. The default declares nothing, so a VM with
        this device cannot be saved: EINVAL naming the device type, never a partial snapshot.
        """
        raise KvmError("EINVAL", f"a {self.type_name} cannot be saved: its plugin declares no "
                                 f"state (Device.save_state)")


@dataclass(frozen=True, slots=True)
class Stat:
    """One counter a chip keeps, described once so ``lvz top`` needs no table of its own.

    ``size`` > 1 makes it an array (one value per input line, say); ``help`` is the sentence a
    viewer shows. ``Device.stats()`` returns the values in the order ``DeviceType.stats`` lists
    these, so the descriptors cross the wire once and the values each time.
    """

    name: str
    kind: str
    unit: str = "count"
    size: int = 1
    help: str = ""

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "a").isalnum() or not self.name.islower():
            raise ValueError(f"stat name {self.name!r} is not lower_case_with_underscores")
        if self.kind not in STAT_KINDS:
            raise ValueError(f"stat {self.name!r}: kind {self.kind!r} is not one of {STAT_KINDS}")
        if self.unit not in STAT_UNITS:
            raise ValueError(f"stat {self.name!r}: unit {self.unit!r} is not one of {STAT_UNITS}")
        if not 1 <= self.size <= 4096:
            raise ValueError(f"stat {self.name!r}: size {self.size} is not 1..4096")


@dataclass(frozen=True, slots=True)
class DeviceType:
    """What ``lvz_device_types`` returns: a name for ``vm.create_device`` and how to build it."""

    name: str
    kvm_type: int
    factory: Callable[[VmApi], Device]
    #: The counters ``Device.stats()`` reports (``kvm.stats`` / ``vm.stats``, ``lvz top``).
    stats: tuple[Stat, ...] = ()
