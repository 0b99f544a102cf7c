"""The narrow API between a VM and its irqchips: all a chip may see of the daemon.

A chip is a plain state machine. It is built by a ``DeviceType.factory`` with a ``VmApi``, keeps
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

__all__ = ["Device", "DeviceType", "IoHandler", "VmApi"]


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

    def iocsr_read(self, vcpu_id: int, addr: int, size: int) -> int | None:
        """An IOCSR load dispatched as ``vcpu_id`` (IPI ANY_SEND); None if nothing claims it."""
        ...

    def iocsr_write(self, vcpu_id: int, addr: int, size: int, value: int) -> bool:
        """An IOCSR store dispatched as ``vcpu_id``; False if nothing claims ``addr``."""
        ...


class Device:
    """Base of an irqchip instance: one per VM and type. Override what the chip supports.

    The lifecycle methods are called with the map lock held, after the VM changed: a chip that
    caches routing (EIOINTC's coremap) refreshes it here instead of keeping its own phyid table.
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

    def implied_lines(self) -> dict[int, int]:
        """vcpu_id -> bitmask of INT_* lines this chip's state says are up (for invariant checks).

        A chip that drives no lines returns {}; a vCPU missing from the dict implies none.
        """
        return {}


@dataclass(frozen=True, slots=True)
class DeviceType:
    """What ``lvz_device_types`` returns: a name for ``vm.create_device`` and how to build it."""

    name: str
    kvm_type: int
    factory: Callable[[VmApi], Device]
