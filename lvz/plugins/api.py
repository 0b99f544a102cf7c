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

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from lvz.protocol.errors import KvmError

__all__ = [
    "Device",
    "DeviceType",
    "Hop",
    "IoHandler",
    "RouteTrace",
    "Stat",
    "TracingVm",
    "Unhandled",
    "Verdict",
    "VmApi",
    "explaining_copy",
]

#: What a counter means over time, as KVM_GET_STATS_FD's KVM_STATS_TYPE_*: ``cumulative``
#: only grows (rates are its differences), ``instant`` is a level now, ``peak`` a high mark.
STAT_KINDS = ("cumulative", "instant", "peak")
#: What one value counts: events, a 0/1 state, a bit set, an identifier, or milliseconds.
STAT_UNITS = ("count", "boolean", "bitmask", "id", "milliseconds")


class Unhandled(Exception):
    """Raised by ``IoHandler.read``/``write`` for an access the chip does not decode.

    That is where the kernel's chip returns -EINVAL (unaligned, unknown offset, a write to a
    read-only register). What follows is the VM's kernel profile's business, not the chip's:
    from 7.0 the load reads 0 and the store is ignored (2faec60a4858), before it the access
    leaves the kernel as one nobody claims (ENXIO, an exit to the VMM). The message says why.
    """


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

    def compat(self, key: str) -> Any:
        """The VM's kernel-profile value for ``key`` (lvz.protocol.profiles), None if unknown.

        How a chip or hypercall handler behaves as an older kernel: it asks for a behaviour,
        never for a version number.
        """
        ...

    def set_steal_time(self, vcpu_id: int, gpa: int) -> None:
        """Store ``vcpu_id``'s steal-time address (FUNC_NOTIFY; the PVTIME vCPU attr reads it)."""
        ...

    def vcpu_by_phyid(self, phyid: int) -> int | None:
        """``kvm_get_vcpu_by_cpuid``: the vcpu_id holding ``phyid``, None if unset/out of range.

        On a profile before 7.0 a negative ``phyid`` raises KvmError EINVAL (the kernel read
        out of bounds there).
        """
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

    def explain_input(self, line: int, level: int) -> RouteTrace | None:
        """Where driving input ``line`` to ``level`` now would go, and why; changes nothing.

        ``vm.explain_route`` (``lvz why``) asks each chip on an interrupt's way in turn. A chip
        answers with a ``RouteTrace``: the hops it took, then either a stop (the register and
        bit that ended delivery), a forward to another chip's input, or a delivery to a vCPU
        line. It must be computed by the code that routes, not by a second description of it:
        the built-in chips run their own ``set_input`` on a scratch copy of their state, with a
        ``TracingVm`` that records line and chip-input changes instead of making them. The
        default (None) tells the daemon this chip cannot explain itself; the route then ends
        there with the reason ``unexplained``.
        """
        return None

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
        raise KvmError(
            "EINVAL",
            f"a {self.type_name} cannot be saved: its plugin declares no state (Device.save_state)",
        )


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


# --- route explanations (vm.explain_route) -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hop:
    """One step of a route: what a chip looked at and what that told it, in a sentence.

    ``value`` is what was found: the bit's value (0 or 1) when ``bit`` is given, else the
    register's (or, with no register, the number the step is about: a phyid, a vcpu_id).
    """

    chip: str
    step: str
    note: str
    register: str | None = None
    bit: int | None = None
    value: int | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """Why a route stopped, or why it went elsewhere than the registers seem to say.

    ``reason`` is a stable word a test can assert on (``masked``, ``not_enabled``…);
    ``register`` and ``bit`` name what decided it, ``value`` what was found there (as in
    ``Hop``).
    """

    chip: str
    reason: str
    message: str
    register: str | None = None
    bit: int | None = None
    value: int | None = None


class RouteTrace:
    """A chip's answer to ``explain_input``, and the recorder its routing code writes to.

    The outcome is at most one of ``stopped``, ``forward`` (device type, input line, level)
    and ``delivered`` (vcpu_id, INT_* line, level, whether the line changes). ``redirected``
    may accompany a delivery that reaches another vCPU than the registers literally name.
    """

    __slots__ = ("chip", "delivered", "forward", "hops", "redirected", "stopped")

    def __init__(self, chip: str) -> None:
        self.chip = chip
        self.hops: list[Hop] = []
        self.stopped: Verdict | None = None
        self.redirected: Verdict | None = None
        self.forward: tuple[str, int, int] | None = None
        self.delivered: tuple[int, int, int, bool] | None = None

    def hop(
        self,
        step: str,
        note: str,
        register: str | None = None,
        bit: int | None = None,
        value: int | None = None,
    ) -> None:
        self.hops.append(Hop(self.chip, step, note, register, bit, value))

    def stop(
        self,
        reason: str,
        message: str,
        register: str | None = None,
        bit: int | None = None,
        value: int | None = None,
    ) -> None:
        if self.stopped is None:
            self.stopped = Verdict(self.chip, reason, message, register, bit, value)

    def redirect(
        self,
        reason: str,
        message: str,
        register: str | None = None,
        bit: int | None = None,
        value: int | None = None,
    ) -> None:
        """Keep the first: it is the earliest cause on the way."""
        if self.redirected is None:
            self.redirected = Verdict(self.chip, reason, message, register, bit, value)

    def deliver(self, vcpu_id: int, irq: int, level: int, changed: bool) -> None:
        if self.delivered is None:
            self.delivered = (vcpu_id, irq, level, changed)


class TracingVm:
    """The ``VmApi`` of a chip's scratch copy while it explains: it reads the real VM (map,
    vCPUs) and records, instead of making, every line and chip-input change, so running the
    chip's own routing code on it changes nothing and emits no event."""

    __slots__ = ("_trace", "_vm")

    def __init__(self, vm: VmApi, trace: RouteTrace) -> None:
        self._vm = vm
        self._trace = trace

    @property
    def max_phyid(self) -> int:
        return self._vm.max_phyid

    @property
    def pv_features(self) -> int:
        return self._vm.pv_features

    def vcpu_by_phyid(self, phyid: int) -> int | None:
        return self._vm.vcpu_by_phyid(phyid)

    def vcpu_exists(self, vcpu_id: int) -> bool:
        return self._vm.vcpu_exists(vcpu_id)

    def vcpu_ids(self) -> list[int]:
        return self._vm.vcpu_ids()

    def queue_irq(self, vcpu_id: int, irq: int) -> None:
        self._trace.deliver(vcpu_id, irq, 1, True)

    def dequeue_irq(self, vcpu_id: int, irq: int) -> None:
        self._trace.deliver(vcpu_id, irq, 0, True)

    def set_chip_input(self, device_type: str, line: int, level: int) -> None:
        if self._trace.forward is None:
            self._trace.forward = (device_type, line, level)

    def _refuse(self, what: str) -> KvmError:
        return KvmError("EINVAL", f"an explanation is read-only: it cannot {what}")

    def claim_iocsr(self, base: int, size: int, handler: IoHandler) -> None:
        raise self._refuse("claim IOCSR ranges")

    def claim_mmio(self, base: int, size: int, handler: IoHandler) -> None:
        raise self._refuse("claim MMIO ranges")

    def iocsr_read(self, vcpu_id: int, addr: int, size: int) -> int:
        raise self._refuse("make IOCSR accesses")

    def iocsr_write(self, vcpu_id: int, addr: int, size: int, value: int) -> None:
        raise self._refuse("make IOCSR accesses")


_D = TypeVar("_D", bound=Device)


def explaining_copy(device: _D, trace: RouteTrace) -> _D:
    """A deep copy of ``device`` whose ``vm`` is a ``TracingVm`` recording into ``trace``.

    Run the chip's own routing code on it to explain a route without changing anything: its
    registers, caches and counters are copies (a deep copy, so state a chip adds later is
    covered too), and the VM it sees reads the real map but only records line changes.
    """
    return copy.deepcopy(device, {id(device.vm): TracingVm(device.vm, trace)})
