"""Client side of lvz: blocking and trio clients over one sans-I/O core; the ``lvz`` command.

``Kvm.connect`` (blocking) and ``open_kvm`` (trio) give the same object model, named as rust-vmm's
kvm-ioctls: ``Kvm`` → ``VmFd`` → ``VcpuFd`` / ``DeviceFd``, and for trio ``AsyncKvm`` →
``AsyncVmFd`` → ``AsyncVcpuFd`` / ``AsyncDeviceFd``. Errors are ``KvmError`` (an ``OSError``
carrying the errno the emulated ioctl returned); connection failures are ``ConnectionError``.

The trio names are imported on first use, so ``from lvz.clients import Kvm`` (every ``lvz``
command) does not pay for importing trio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lvz.protocol import abi
from lvz.protocol.errors import KvmError

from . import ops
from .core import (
    LINES_BY_NAME,
    Call,
    HypercallExit,
    IoExit,
    RouteDelivery,
    RouteExplanation,
    RouteHop,
    RouteVerdict,
    SystemEvent,
    UntrustedDaemon,
    line_names,
)
from .sync import (
    ConnectionLost,
    DaemonUnreachable,
    Device,
    DeviceFd,
    EventsLost,
    HelloInfo,
    IrqEvent,
    Kvm,
    PhyidMap,
    PluginInfo,
    RunResult,
    Vcpu,
    VcpuFd,
    Vm,
    VmFd,
    VmInfo,
    VmSummary,
)

#: The old name of ``abi`` (it held only the register ids), kept for one release.
regs = abi

if TYPE_CHECKING:
    from .trio_client import (
        AsyncDevice,
        AsyncDeviceFd,
        AsyncKvm,
        AsyncVcpu,
        AsyncVcpuFd,
        AsyncVm,
        AsyncVmFd,
        open_kvm,
    )

_TRIO_NAMES = frozenset(
    {
        "open_kvm",
        "AsyncKvm",
        "AsyncVmFd",
        "AsyncVcpuFd",
        "AsyncDeviceFd",
        "AsyncVm",
        "AsyncVcpu",
        "AsyncDevice",
    }
)


def __getattr__(name: str) -> Any:
    if name in _TRIO_NAMES:
        from . import trio_client

        return getattr(trio_client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    # trio client
    "open_kvm",
    "AsyncKvm",
    "AsyncVmFd",
    "AsyncVcpuFd",
    "AsyncDeviceFd",
    "AsyncVm",
    "AsyncVcpu",
    "AsyncDevice",
    # blocking client
    "Kvm",
    "VmFd",
    "VcpuFd",
    "DeviceFd",
    "Vm",
    "Vcpu",
    "Device",
    # call specs, for pipelining with gather
    "ops",
    "Call",
    # values and errors
    "IrqEvent",
    "EventsLost",
    "RunResult",
    "PhyidMap",
    "VmInfo",
    "VmSummary",
    "PluginInfo",
    "RouteExplanation",
    "RouteHop",
    "RouteVerdict",
    "RouteDelivery",
    "HelloInfo",
    "KvmError",
    "ConnectionLost",
    "DaemonUnreachable",
    "UntrustedDaemon",
    # exits to the VMM, as ``RunResult`` carries them (docs/vmm-loop.md)
    "IoExit",
    "HypercallExit",
    "SystemEvent",
    # the KVM ABI: register ids, attrs, offsets, lines, hypercalls (``regs``: its old name)
    "abi",
    "regs",
    # interrupt lines (ESTAT bits, as in ``abi``) by name
    "INT_SWI0",
    "INT_SWI1",
    "INT_HWI0",
    "INT_HWI7",
    "INT_TI",
    "INT_IPI",
    "LINE_MASK",
    "LINE_NAMES",
    "LINES_BY_NAME",
    "line_names",
]
#: The line numbers, straight from ``abi``, so ``from lvz.clients import INT_IPI`` works.
INT_SWI0, INT_SWI1, INT_HWI0, INT_HWI7 = abi.INT_SWI0, abi.INT_SWI1, abi.INT_HWI0, abi.INT_HWI7
INT_TI, INT_IPI, LINE_MASK, LINE_NAMES = abi.INT_TI, abi.INT_IPI, abi.LINE_MASK, abi.LINE_NAMES
