"""``kvm.stats`` and ``vm.stats``: self-describing counters, as KVM_GET_STATS_FD.

KVM hands a stats fd whose header describes every counter (name, type, unit, size) once and
whose data block is read again and again. The wire form here is the same idea without the fd:
the answer carries ``schema`` (a number that changes whenever the descriptors would), and the
descriptors only when the caller's ``schema`` is not the current one. Descriptors never change
while a daemon runs: the daemon, VM and vCPU counters are fixed below, and each chip's come with
its ``DeviceType`` (``Stat`` in lvz.plugins.api), which is loaded once.

Nothing here runs on the hot path. The counters are plain ints bumped where the event already
happens (``Vm._set_lines``, ``Vm.hypercall``, the irq_line / signal_msi handlers, the event
fan-out, the chips); levels (lines up, the map's fill, a chip's pending and masked bits) are
read from the state itself when someone asks, and VM totals are sums over its vCPUs made here.
"""

from __future__ import annotations

import time
import zlib
from typing import TYPE_CHECKING, Any, Final

from lvz.plugins.api import Stat
from lvz.protocol.abi import (
    CSR_CPUID,
    EXCCODE_INT_NUM,
    INT_HWI0,
    INT_HWI7,
    INT_IPI,
    INT_SWI0,
    INT_SWI1,
    INT_TI,
)
from lvz.protocol.errors import KvmError

from .host import PluginHost, plugin_failure
from .model import Vcpu, Vm

if TYPE_CHECKING:
    from .server import Daemon

__all__ = ["DAEMON_STATS", "VCPU_STATS", "VM_STATS", "StatsSchema"]

DAEMON_STATS: Final = (
    Stat("vms", "instant", help="VMs the daemon hosts"),
    Stat("vcpus", "instant", help="vCPUs in all VMs"),
    Stat("connections", "instant", help="client connections open"),
    Stat("connections_total", "cumulative", help="connections accepted since start"),
    Stat("connections_peak", "peak", help="most connections open at once"),
    Stat("uptime", "instant", "milliseconds", help="time since the daemon started"),
)

VM_STATS: Final = (
    Stat("vcpus", "instant", help="vCPUs in the VM"),
    Stat("phyids", "instant", help="entries in the phyid map (vCPUs whose CPUID is set)"),
    Stat("max_phyid", "instant", help="the phyid map's size (and the unset marker)"),
    Stat("deliveries", "cumulative", help="interrupt lines raised on its vCPUs, any line"),
    Stat("ipis", "cumulative", help="INT_IPI raises (the IPI device)"),
    Stat("swis", "cumulative", help="INT_SWI0/1 raises (PV IPIs land on SWI0)"),
    Stat("hwis", "cumulative", help="INT_HWI0-7 raises (EIOINTC)"),
    Stat("timers", "cumulative", help="INT_TI raises"),
    Stat("irq_lines", "cumulative", help="vm.irq_line calls with level 1 (KVM_IRQ_LINE)"),
    Stat("msis", "cumulative", help="vm.signal_msi calls (KVM_SIGNAL_MSI)"),
    Stat("hypercalls", "cumulative", help="hvcl calls made by its vCPUs"),
    Stat("events", "cumulative", help="line changes, up or down (the irq events' seq)"),
    Stat("events_lost", "cumulative", help="irq events dropped for subscribers too slow"),
    Stat("pending", "instant", help="interrupt lines up now, over all its vCPUs"),
    Stat("running", "instant", help="vCPUs waiting in vcpu.run"),
    Stat("subscribers", "instant", help="connections subscribed to its events"),
)

VCPU_STATS: Final = (
    Stat("phyid", "instant", "id", help="CPUID (max_phyid while unset)"),
    Stat("lines", "instant", "bitmask", help="interrupt lines up now (ESTAT bit numbers)"),
    Stat("deliveries", "cumulative", help="interrupt lines raised, any line"),
    Stat("raises", "cumulative", size=EXCCODE_INT_NUM, help="raises of each line (INT_*)"),
    Stat("ipis", "cumulative", help="INT_IPI raises"),
    Stat("hypercalls", "cumulative", help="hvcl calls it made"),
    Stat("running", "instant", "boolean", help="a vcpu.run is waiting on it"),
)

_HWI_SLICE = slice(INT_HWI0, INT_HWI7 + 1)


def _describe(scope: str, device: str | None, stats: tuple[Stat, ...]) -> list[dict[str, Any]]:
    return [
        {
            "name": s.name,
            "scope": scope,
            "device": device,
            "kind": s.kind,
            "unit": s.unit,
            "size": s.size,
            "help": s.help,
        }
        for s in stats
    ]


class StatsSchema:
    """The descriptor table of one daemon and its number, built once from the loaded plugins."""

    def __init__(self, host: PluginHost) -> None:
        self.devices: dict[str, tuple[Stat, ...]] = {
            name: dt.stats for name, (dt, _plugin) in sorted(host.device_types.items())
        }
        descriptors = (
            _describe("daemon", None, DAEMON_STATS)
            + _describe("vm", None, VM_STATS)
            + _describe("vcpu", None, VCPU_STATS)
        )
        for name, stats in self.devices.items():
            descriptors += _describe("device", name, stats)
        for i, desc in enumerate(descriptors):
            desc["id"] = i
        self.descriptors = descriptors
        # A stable fingerprint of the table: equal tables give equal numbers across restarts.
        self.number = zlib.crc32(repr(descriptors).encode())

    def header(self, schema: int | None) -> dict[str, Any]:
        """The ``schema`` field, and the descriptors unless the caller holds this table."""
        if schema == self.number:
            return {"schema": self.number}
        return {"schema": self.number, "descriptors": self.descriptors}


def daemon_values(d: Daemon) -> list[int | list[int]]:
    return [
        len(d.vms),
        sum(len(vm.vcpus) for vm in d.vms),
        len(d.connections),
        d.conn_counter,
        d.peak_connections,
        int((time.monotonic() - d.started) * 1000),
    ]


def vm_values(d: Daemon, vm: Vm) -> list[int | list[int]]:
    total = [0] * EXCCODE_INT_NUM
    hypercalls = pending = running = 0
    for vcpu in vm.vcpus.values():
        raises = vcpu.raises
        if raises is not None:
            total = [a + b for a, b in zip(total, raises, strict=True)]
        hypercalls += vcpu.hypercalls
        pending += vcpu.lines.bit_count()
        running += vcpu in d.running
    return [
        len(vm.vcpus),
        len(vm.phyids),
        vm.max_phyid,
        sum(total),
        total[INT_IPI],
        total[INT_SWI0] + total[INT_SWI1],
        sum(total[_HWI_SLICE]),
        total[INT_TI],
        vm.irq_lines,
        vm.msis,
        hypercalls,
        vm.seq,
        vm.events_lost,
        pending,
        running,
        len(d.subscribers.get(vm, ())),
    ]


def vcpu_values(d: Daemon, vcpu: Vcpu) -> list[int | list[int]]:
    raises = vcpu.raises or [0] * EXCCODE_INT_NUM
    return [
        vcpu.csrs[CSR_CPUID],
        vcpu.lines,
        sum(raises),
        list(raises),
        raises[INT_IPI],
        vcpu.hypercalls,
        int(vcpu in d.running),
    ]


def device_values(vm: Vm, type_name: str, stats: tuple[Stat, ...]) -> list[int | list[int]] | None:
    """A chip's ``Device.stats()`` under its plugin's guard, checked against what its type
    declared; None for a device already broken (its other calls answer EIO too).

    A chip that raises or answers the wrong shape fails this request with EIO naming its
    plugin, as any other chip call does; the daemon goes on.
    """
    rec = vm.devices[type_name]
    if rec.broken:
        return None
    values: Any = vm.device_call(rec.device, "stats")
    problem = ""
    if type(values) is not list or len(values) != len(stats):
        problem = (
            f"stats() returned {values!r:.60}, not a list of the {len(stats)} values "
            f"its DeviceType declares"
        )
    else:
        for stat, value in zip(stats, values, strict=True):
            if stat.size == 1:
                ok = type(value) is int
            else:
                ok = (
                    type(value) is list
                    and len(value) == stat.size
                    and all(type(x) is int for x in value)
                )
            if not ok:
                problem = (
                    f"stats() value for {stat.name!r} is not "
                    f"{'an int' if stat.size == 1 else f'a list of {stat.size} ints'}"
                )
                break
    if problem:
        raise plugin_failure(rec.plugin, TypeError(problem))
    checked: list[int | list[int]] = values
    return checked


def kvm_stats(d: Daemon, schema: StatsSchema, p: dict[str, Any]) -> dict[str, Any]:
    """Daemon- and VM-scope values of every VM (``lvz top``'s first screen), and with ``id`` one
    VM in depth as ``vm`` (its drill-down), found by id so that watching a VM never holds a
    handle that would keep it alive."""
    result = {
        **schema.header(p.get("schema")),
        "daemon": daemon_values(d),
        "vms": [{"id": d.vm_ids[vm], "name": vm.name, "values": vm_values(d, vm)} for vm in d.vms],
    }
    if "id" in p:
        vm = d.vm_by_id.get(p["id"])
        if vm is None:
            raise KvmError("ENOENT", f"kvm.stats: no VM with id {p['id']}")
        result["vm"] = _detail(d, schema, vm)
    return result


def vm_stats(d: Daemon, schema: StatsSchema, vm: Vm, p: dict[str, Any]) -> dict[str, Any]:
    """One VM in depth, for a client that holds its handle."""
    return {**schema.header(p.get("schema")), **_detail(d, schema, vm)}


def _detail(d: Daemon, schema: StatsSchema, vm: Vm) -> dict[str, Any]:
    return {
        "id": d.vm_ids[vm],
        "name": vm.name,
        "values": vm_values(d, vm),
        "vcpus": [
            {"vcpu_id": vcpu_id, "values": vcpu_values(d, vm.vcpus[vcpu_id])}
            for vcpu_id in sorted(vm.vcpus)
        ],
        "devices": {
            name: device_values(vm, name, schema.devices[name])
            for name in sorted(vm.devices)
            if name in schema.devices
        },
    }
