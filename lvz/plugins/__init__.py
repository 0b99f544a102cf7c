"""Irqchips as pluggy plugins, and the seam plugin authors write against.

``api`` is everything a chip may see; ``hookspecs`` the hooks. One module per chip: ``ipi``,
``eiointc``, ``pchpic``, ``pv_ipi``. Built-in chips are loaded through the ``lvz.irqchips``
entry-point group exactly like third-party ones.
"""

from .api import (
    Device,
    DeviceType,
    IoHandler,
    RouteTrace,
    Stat,
    TracingVm,
    VmApi,
    explaining_copy,
)
from .hookspecs import hookimpl

__all__ = [
    "Device",
    "DeviceType",
    "IoHandler",
    "RouteTrace",
    "Stat",
    "TracingVm",
    "VmApi",
    "explaining_copy",
    "hookimpl",
]
