"""Client side of lvz: async and blocking clients over one sans-I/O core; the ``lvz`` command.

``open_kvm`` (trio) and ``Kvm.connect`` (blocking) give the same object model, shaped like
rust-vmm's kvm-ioctls: ``Kvm`` → ``Vm`` → ``Vcpu`` / ``Device``, errors as ``KvmError`` (an
``OSError`` carrying the errno the emulated ioctl returned), connection failures as
``ConnectionError``.
"""

from __future__ import annotations

from lvz.protocol import abi
from lvz.protocol.errors import KvmError

from .aio import AsyncDevice, AsyncKvm, AsyncVcpu, AsyncVm, open_kvm
from .sync import (
    ConnectionLost,
    DaemonUnreachable,
    Device,
    EventsLost,
    HelloInfo,
    IrqEvent,
    Kvm,
    PhyidMap,
    PluginInfo,
    RunResult,
    Vcpu,
    Vm,
    VmInfo,
    VmSummary,
)

#: The old name of ``abi`` (it held only the register ids), kept for one release.
regs = abi

__all__ = [
    # trio client
    "open_kvm", "AsyncKvm", "AsyncVm", "AsyncVcpu", "AsyncDevice",
    # blocking client
    "Kvm", "Vm", "Vcpu", "Device",
    # values and errors
    "IrqEvent", "EventsLost", "RunResult", "PhyidMap", "VmInfo", "VmSummary", "PluginInfo",
    "HelloInfo", "KvmError", "ConnectionLost", "DaemonUnreachable",
    # the KVM ABI: register ids, attrs, offsets, lines, hypercalls (``regs``: its old name)
    "abi", "regs",
]
