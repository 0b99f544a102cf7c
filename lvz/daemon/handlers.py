"""The protocol's methods (PROTOCOL.md §4): one handler each, and the tables that route to them.

The tables at the bottom are the whole dispatch: a method's name maps to its handler in the
table of the handle kind it takes, so the server resolves the handle by kind *before* calling
(EBADF, then ENOTTY, PROTOCOL.md §2) and a vCPU handler receives a ``VcpuHandle`` — its ``vcpu``
and ``vm`` already typed. Each handler does only the method's own checks, in the order the
kernel makes them, and calls the model.

Handlers are synchronous: a request takes effect without yielding. A handler that may have
to wait returns a coroutine instead of a result, and the server awaits it before the
connection's next request: ``vm.destroy`` (a VM of 65,536 vCPUs is torn down in chunks) and a
big ``vm.phyid_map`` (built in chunks under the map lock, so it is one consistent picture).
A vCPU request listed in ``WRITES_MAP`` runs under the VM's map lock, which the server takes
without a scheduler pass when it is free (the usual case) and awaits otherwise.
"""

from __future__ import annotations

import gc
import operator
import os
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final

import trio
import trio.lowlevel

import lvz
from lvz.plugins.api import RouteTrace, Verdict
from lvz.protocol import abi as C
from lvz.protocol.errors import KvmError, Unclaimed
from lvz.protocol.profiles import DEFAULT as DEFAULT_PROFILE
from lvz.protocol.profiles import NEWEST, PROFILES
from lvz.protocol.profiles import resolve as resolve_profile
from lvz.protocol.schema import METHODS

from . import stats
from .exits import Detached, access_exit, hypercall_exit
from .host import plugin_failure
from .model import Vcpu
from .peer import Connection, DeviceHandle, Handle, VcpuHandle, VmHandle

if TYPE_CHECKING:
    from .model import Vm
    from .server import Daemon

Params = dict[str, Any]
Result = dict[str, Any]
#: What a handler that may wait returns: the result, or a coroutine producing it (awaited
#: before the connection's next request), or ``Detached`` (answered out of order: an exit).
MaybeLater = Result | Coroutine[Any, Any, Result] | Detached

#: Which build answers (hello's "server"): "compiled" (mypyc) or "pure Python".
_BUILD: Final = "compiled" if lvz.compiled else "pure Python"

#: Map entries built between two yields of a big ``vm.phyid_map``.
MAP_CHUNK = 4096

# ---------------------------------------------------------------- kvm (no handle) ------------


def hello(d: Daemon, conn: Connection, p: Params) -> Result:
    if p["protocol"] != C.PROTOCOL_VERSION:
        raise KvmError(
            "EPROTONOSUPPORT",
            f"this daemon speaks protocol {C.PROTOCOL_VERSION}, not {p['protocol']}",
        )
    profile = p.get("profile", DEFAULT_PROFILE)
    compat = resolve_profile(profile)
    # A kernel irqchip type the profile predates is not offered (KVM_CREATE_DEVICE: ENODEV).
    absent = set(NEWEST["kernel_device_types"]) - set(compat["kernel_device_types"])
    return {
        "protocol": C.PROTOCOL_VERSION,
        "server": f"lvz {lvz.__version__} ({_BUILD})",
        "api_version": C.KVM_API_VERSION,
        "methods": sorted(METHODS),
        "device_types": [t for t in d.device_type_names if t not in absent],
        "profile": profile,
        "profiles": list(PROFILES),
    }


def kvm_get_api_version(d: Daemon, conn: Connection, p: Params) -> Result:
    return {"version": C.KVM_API_VERSION}


_CAPS: Final[dict[str, int]] = {
    "one_reg": 1,
    "irqchip": 1,
    "max_vcpus": C.KVM_MAX_VCPUS,
    "max_vcpu_id": C.KVM_MAX_VCPUS,
    "enable_cap": 1,
    "readonly_mem": 1,
    "immediate_exit": 1,
    "ioeventfd": 1,
    "mp_state": 1,
    "set_guest_debug": 1,
    "nr_vcpus": os.cpu_count() or 1,
    "max_phyid": C.MAX_PHYID_LIMIT,
}


def kvm_check_extension(d: Daemon, conn: Connection, p: Params) -> Result:
    """KVM_CHECK_EXTENSION as kernel ``profile`` answers (default: the newest).

    KVM_CAP_IRQCHIP and KVM_CAP_SIGNAL_MSI come with the in-kernel irqchips (6.13:
    HAVE_KVM_IRQCHIP, HAVE_KVM_MSI); ``pv_features`` (lvz's) is the PV feature mask the VMM
    may set, 0 where the kernel has no PV feature control (before 6.12).
    """
    compat = resolve_profile(p.get("profile", DEFAULT_PROFILE))
    cap = p["cap"]
    if cap in ("irqchip", "signal_msi"):
        return {"value": 1 if compat["irqchip_ioctls"] else 0}
    if cap == "pv_features":
        return {"value": compat["pv_feature_mask"] or 0}
    return {"value": _CAPS.get(cap, 0)}


def kvm_create_vm(d: Daemon, conn: Connection, p: Params) -> Result:
    name = p.get("name")
    max_phyid = p.get("max_phyid", C.KVM_MAX_PHYID)
    profile = p.get("profile", DEFAULT_PROFILE)
    resolve_profile(profile)  # EINVAL naming the profiles, before anything is created
    if name is not None:
        if not name:
            raise KvmError("EINVAL", "kvm.create_vm: a VM name cannot be empty")
        if name in d.named:
            raise KvmError("EEXIST", f"kvm.create_vm: a VM named {name!r} exists")
    if not 1 <= max_phyid <= C.MAX_PHYID_LIMIT:
        raise KvmError(
            "EINVAL", f"kvm.create_vm: max_phyid {max_phyid} is not in 1..{C.MAX_PHYID_LIMIT}"
        )
    d.check_handle_room(conn)
    if len(d.vms) >= d.config.max_vms:
        raise KvmError("ENOSPC", f"kvm.create_vm: the daemon already hosts {d.config.max_vms} VMs")
    vm = d.new_vm(name, max_phyid)
    vm.use_profile(profile)
    return {"vm": d.add_handle(conn, VmHandle(conn.next_handle, vm))}


def kvm_open_vm(d: Daemon, conn: Connection, p: Params) -> Result:
    vm = d.named.get(p["name"])
    if vm is None:
        raise KvmError("ENOENT", f"kvm.open_vm: no VM named {p['name']!r}")
    d.check_handle_room(conn)
    return {"vm": d.add_handle(conn, VmHandle(conn.next_handle, vm))}


def kvm_list_vms(d: Daemon, conn: Connection, p: Params) -> Result:
    return {
        "vms": [
            {
                "name": vm.name,
                "vcpus": len(vm.vcpus),
                "devices": len(vm.devices),
                "max_phyid": vm.max_phyid,
                "phyids": len(vm.phyids),
                "id": d.vm_ids[vm],
                "profile": vm.profile,
            }
            for vm in d.vms
        ]
    }


def kvm_open_vm_id(d: Daemon, conn: Connection, p: Params) -> Result:
    vm = d.vm_by_id.get(p["id"])
    if vm is None:
        raise KvmError("ENOENT", f"kvm.open_vm_id: no VM with id {p['id']}")
    d.check_handle_room(conn)
    return {"vm": d.add_handle(conn, VmHandle(conn.next_handle, vm))}


def kvm_list_plugins(d: Daemon, conn: Connection, p: Params) -> Result:
    types: dict[str, list[str]] = {}
    for name, (_dt, plugin) in d.host.device_types.items():
        types.setdefault(plugin, []).append(name)
    return {
        "plugins": [
            {
                "name": lp.name,
                "version": lp.version,
                "dist": lp.dist,
                "device_types": sorted(types.get(lp.name, [])),
            }
            for lp in d.host.loaded
        ]
    }


# ---------------------------------------------------------------- any handle -----------------


def close(d: Daemon, conn: Connection, p: Params, h: Handle) -> Result:
    d.release(conn, h)
    return {}


# ---------------------------------------------------------------- vm -------------------------


def vm_destroy(d: Daemon, conn: Connection, p: Params, h: VmHandle) -> MaybeLater:
    return _destroyed(d.destroy_vm(h.vm))


async def _destroyed(teardown: Coroutine[Any, Any, None]) -> Result:
    await teardown
    return {}


def vm_create_vcpu(d: Daemon, conn: Connection, p: Params, h: VmHandle) -> Result:
    d.check_handle_room(conn)
    vcpu = h.vm.create_vcpu(p["vcpu_id"])
    return {"vcpu": d.add_handle(conn, VcpuHandle(conn.next_handle, vcpu))}


def vm_open_vcpu(d: Daemon, conn: Connection, p: Params, h: VmHandle) -> Result:
    vcpu = h.vm.vcpus.get(p["vcpu_id"])
    if vcpu is None:
        raise KvmError("ENOENT", f"vm.open_vcpu: the VM has no vCPU {p['vcpu_id']}")
    d.check_handle_room(conn)
    return {"vcpu": d.add_handle(conn, VcpuHandle(conn.next_handle, vcpu))}


def vm_create_device(d: Daemon, conn: Connection, p: Params, h: VmHandle) -> Result:
    d.check_handle_room(conn)
    device = h.vm.create_device(p["type"])
    return {"device": d.add_handle(conn, DeviceHandle(conn.next_handle, h.vm, device))}


def vm_open_device(d: Daemon, conn: Connection, p: Params, h: VmHandle) -> Result:
    rec = h.vm.devices.get(p["type"])
    if rec is None:
        raise KvmError("ENOENT", f"vm.open_device: the VM has no {p['type']}")
    d.check_handle_room(conn)
    return {"device": d.add_handle(conn, DeviceHandle(conn.next_handle, h.vm, rec.device))}


def vm_info(d: Daemon, conn: Connection, p: Params, h: VmHandle) -> Result:
    vm = h.vm
    return {
        "name": vm.name,
        "max_phyid": vm.max_phyid,
        "vcpus": sorted(vm.vcpus),
        "devices": sorted(vm.devices),
        "seq": vm.seq,
        "profile": vm.profile,
    }


def vm_set_name(d: Daemon, conn: Connection, p: Params, h: VmHandle) -> Result:
    """Name an unnamed VM: from now on it outlives its handles, like one created named.

    A restore builds its VM unnamed and names it last, so a restore that stops early (an
    error, a killed client) leaves nothing behind: the VM dies with the connection.
    """
    vm, name = h.vm, p["name"]
    if not name:
        raise KvmError("EINVAL", "vm.set_name: a VM name cannot be empty")
    if vm.name is not None:
        raise KvmError(
            "EINVAL", f"vm.set_name: the VM is already named {vm.name!r}; a name cannot change"
        )
    if name in d.named:
        raise KvmError("EEXIST", f"vm.set_name: a VM named {name!r} exists")
    vm.name = name
    d.named[name] = vm
    return {}


def _irq_line_refusal(vm: Vm) -> str | None:
    """Why ``vm.irq_line`` answers ENXIO for this VM, or None (shared with ``explain_route``)."""
    missing = [t for t in (C.DEV_IPI, C.DEV_EIOINTC, C.DEV_PCHPIC) if t not in vm.devices]
    if missing:
        return f"the VM has no in-kernel irqchip ({', '.join(missing)} missing)"
    return None


def _check_pin(method: str, irq: int, level: int) -> None:
    """A gsi >= 64 stays EINVAL because PROTOCOL.md §4 fixes it (the kernel's ``kvm_set_irq``
    finds no route and returns 0: SEMANTICS decision 10); a level must fit the ``__u32``
    ``kvm_irq_level.level``, and any non-zero one raises (``pch_pic_set_irq``: ``if (level)``).
    """
    if not 0 <= irq < C.KVM_IRQCHIP_NUM_PINS:
        raise KvmError("EINVAL", f"{method}: irq {irq} is not a PCH-PIC pin (0..63)")
    if not -(1 << 31) <= level <= C.U32_MAX:
        raise KvmError(
            "EINVAL", f"{method}: level {level} does not fit the __u32 kvm_irq_level.level"
        )


def _check_msi_data(method: str, data: int) -> None:
    if data >= C.EIOINTC_IRQS:
        raise KvmError("EINVAL", f"{method}: data {data} is not an EIOINTC irq (0..255)")


def _no_irqchip_ioctls(vm: Vm, method: str, ioctl: str) -> None:
    if not vm.compat["irqchip_ioctls"]:
        raise KvmError(
            "ENOTTY",
            f"{method}: kernel {vm.profile} has no {ioctl} (the in-kernel "
            f"irqchip and HAVE_KVM_IRQCHIP / HAVE_KVM_MSI came in 6.13)",
        )


def vm_irq_line(d: Daemon, conn: Connection, p: Params, h: VmHandle) -> Result:
    """KVM_IRQ_LINE (``kvm_vm_ioctl_irq_line`` -> ``kvm_set_irq`` -> ``pch_pic_set_irq``)."""
    vm = h.vm
    _no_irqchip_ioctls(vm, "vm.irq_line", "KVM_IRQ_LINE")
    refusal = _irq_line_refusal(vm)
    if refusal:
        raise KvmError("ENXIO", f"vm.irq_line: {refusal}")
    irq, level = p["irq"], p["level"]
    _check_pin("vm.irq_line", irq, level)
    level = 1 if level else 0
    vm.irq_lines += level
    vm.set_chip_input(C.DEV_PCHPIC, irq, level)
    return {}


def vm_signal_msi(d: Daemon, conn: Connection, p: Params, h: VmHandle) -> Result:
    """KVM_SIGNAL_MSI (``kvm_send_userspace_msi``): EINVAL unless ``kvm_arch_irqchip_in_kernel``
    (IPI, EIOINTC and PCH-PIC all created).

    Without an EIOINTC the answer stays ENXIO, as PROTOCOL.md §4 fixes it (the kernel says
    EINVAL there too); SEMANTICS "Decisions for lvz" 10.
    """
    vm = h.vm
    _no_irqchip_ioctls(vm, "vm.signal_msi", "KVM_SIGNAL_MSI")
    if C.DEV_EIOINTC not in vm.devices:
        raise KvmError("ENXIO", "vm.signal_msi: the VM has no loongarch-eiointc")
    missing = [t for t in (C.DEV_IPI, C.DEV_PCHPIC) if t not in vm.devices]
    if missing:
        raise KvmError(
            "EINVAL",
            f"vm.signal_msi: the in-kernel irqchip is incomplete "
            f"({', '.join(missing)} missing; kvm_send_userspace_msi needs "
            f"kvm_arch_irqchip_in_kernel)",
        )
    _check_msi_data("vm.signal_msi", p["data"])
    vm.msis += 1
    vm.set_chip_input(C.DEV_EIOINTC, p["data"], 1)
    return {}


#: Chips one explanation may pass through: more means plugins forward to each other in a loop.
EXPLAIN_CHIPS = 8


def vm_explain_route(d: Daemon, conn: Connection, p: Params, h: VmHandle) -> Result:
    """Where an interrupt from ``source`` would go now, hop by hop, and what decided it.

    Read-only: each chip on the way answers ``Device.explain_input`` by running its own
    routing code on a scratch copy (no register, line or event changes). Bad input is refused
    as the method that injects it would refuse it (EINVAL); a VM that lacks a chip is not an
    error here but the reason the route stops.
    """
    vm, level = h.vm, p.get("level", 1)
    ((kind, arg),) = p["source"].items()
    out = _Route(vm, p["source"], level)
    method = "vm.explain_route"
    if kind == "pin":
        _check_pin(method, arg, level)
        out.hop(
            "vm",
            "irq_line",
            f"KVM_IRQ_LINE {arg} level {level}: GSI {arg} is PCH-PIC pin "
            f"{arg} (the default GSI routing)",
        )
        refusal = _irq_line_refusal(vm)
        if refusal:
            return out.stop("no_irqchip", f"vm.irq_line answers ENXIO: {refusal}")
        return out.follow(C.DEV_PCHPIC, arg, 1 if level else 0)  # as vm.irq_line raises
    if level not in (0, 1):
        raise KvmError("EINVAL", f"{method}: level {level} is not 0 or 1")
    if kind == "msi":
        address, data = arg["address"], arg["data"]
        if level != 1:
            raise KvmError("EINVAL", f"{method}: an MSI only raises (KVM_SIGNAL_MSI has no level)")
        _check_msi_data(method, data)
        out.hop(
            "msi",
            "message",
            f"KVM_SIGNAL_MSI address {address:#x} data {data}: the data "
            f"is the EIOINTC irq (no DMSINTC, the address is not decoded)",
            "data",
            None,
            data,
        )
        if C.DEV_EIOINTC not in vm.devices:
            return out.stop(
                "no_irqchip", "vm.signal_msi answers ENXIO: the VM has no loongarch-eiointc"
            )
        return out.follow(C.DEV_EIOINTC, data, 1)
    if not 0 <= arg < C.EIOINTC_IRQS:
        raise KvmError("EINVAL", f"{method}: eiointc_irq {arg} is not an EIOINTC irq (0..255)")
    if C.DEV_EIOINTC not in vm.devices:
        return out.stop("no_irqchip", "the VM has no loongarch-eiointc")
    return out.follow(C.DEV_EIOINTC, arg, level)


def _wire(v: Verdict | None) -> dict[str, Any] | None:
    if v is None:
        return None
    return {
        "chip": v.chip,
        "reason": v.reason,
        "message": v.message,
        "register": v.register,
        "bit": v.bit,
        "value": v.value,
    }


class _Route:
    """One explanation being assembled, chip after chip, into the wire result."""

    def __init__(self, vm: Vm, source: dict[str, Any], level: int) -> None:
        self.vm = vm
        self.head = {"source": source, "level": level}
        self.hops: list[dict[str, Any]] = []
        self.redirected: Verdict | None = None

    def hop(
        self,
        chip: str,
        step: str,
        note: str,
        register: str | None = None,
        bit: int | None = None,
        value: int | None = None,
    ) -> None:
        self.hops.append(
            {
                "chip": chip,
                "step": step,
                "note": note,
                "register": register,
                "bit": bit,
                "value": value,
            }
        )

    def result(self, stopped: Verdict | None, delivered: dict[str, Any] | None) -> Result:
        return {
            **self.head,
            "hops": self.hops,
            "delivered": delivered,
            "stopped": _wire(stopped),
            "redirected": _wire(self.redirected),
        }

    def stop(self, reason: str, message: str, chip: str = "vm") -> Result:
        return self.result(Verdict(chip, reason, message), None)

    def follow(self, device_type: str, line: int, level: int) -> Result:
        """Ask each chip in turn until one stops the interrupt or delivers it to a line."""
        vm = self.vm
        for _ in range(EXPLAIN_CHIPS):
            rec = vm.devices.get(device_type)
            if rec is None:
                return self.stop(
                    "no_device",
                    f"input {line} of {device_type} is driven, but "
                    f"the VM has no {device_type} (ENXIO)",
                )
            trace = vm.device_call(rec.device, "explain_input", line, level)
            if trace is None:
                return self.stop(
                    "unexplained",
                    f"{device_type} (plugin {rec.plugin!r}) does "
                    f"not explain its routing "
                    f"(Device.explain_input)",
                    device_type,
                )
            if not isinstance(trace, RouteTrace):
                raise plugin_failure(
                    rec.plugin, TypeError(f"explain_input returned {trace!r:.80}, not a RouteTrace")
                )
            self.hops += [
                {
                    "chip": x.chip,
                    "step": x.step,
                    "note": x.note,
                    "register": x.register,
                    "bit": x.bit,
                    "value": x.value,
                }
                for x in trace.hops
            ]
            self.redirected = self.redirected or trace.redirected
            if trace.stopped is not None:
                return self.result(trace.stopped, None)
            if trace.delivered is not None:
                return self.deliver(device_type, *trace.delivered)
            if trace.forward is None:
                return self.stop(
                    "no_effect",
                    f"{device_type} neither delivers, forwards nor stops input {line}",
                    device_type,
                )
            device_type, line, level = trace.forward
        return self.stop("loop", f"the route passes more than {EXPLAIN_CHIPS} chips")

    def deliver(self, chip: str, vcpu_id: int, irq: int, level: int, changed: bool) -> Result:
        vcpu = self.vm.vcpus.get(vcpu_id)
        name = C.LINE_NAMES.get(irq, str(irq))
        if vcpu is None or irq not in C.LINE_NAMES:
            return self.stop(
                "no_such_vcpu",
                f"{chip} drives line {name} of vcpu_id {vcpu_id}, which the VM does not have",
                chip,
            )
        cpuid = vcpu.csrs[C.CSR_CPUID]
        phyid = cpuid if self.vm.phyids.get(cpuid) is vcpu else None
        now = vcpu.lines >> irq & 1
        changed = changed and now != level
        held = f"phyid {phyid}" if phyid is not None else "no phyid"
        if changed:
            note = (
                f"line {name} of vCPU {vcpu_id} ({held}) goes {now} → {level}: an irq "
                f"event{', and vcpu.run returns' if level else ''}"
            )
        else:
            note = f"line {name} of vCPU {vcpu_id} ({held}) stays {now}: no change, no event"
        self.hop("vcpu", "line", note, "ESTAT", irq, now)
        return self.result(
            None,
            {
                "vcpu_id": vcpu_id,
                "phyid": phyid,
                "line": irq,
                "line_name": name,
                "level": level,
                "changed": changed,
            },
        )


def vm_phyid_lookup(d: Daemon, conn: Connection, p: Params, h: VmHandle) -> Result:
    return {"vcpu_id": h.vm.vcpu_by_phyid(p["phyid"])}


def vm_phyid_map(d: Daemon, conn: Connection, p: Params, h: VmHandle) -> MaybeLater:
    """The map the model keeps (``Vm.map_entries``), rebuilt first if it was not kept.

    The kept list changes with the map, in place; the server encodes an answer before
    anything else runs, so no reader sees it change.
    """
    vm = h.vm
    entries = vm.map_entries
    if entries is None:
        if len(vm.phyids) > MAP_CHUNK:
            return _big_phyid_map(d, h)
        entries = vm.map_entries = _map_entries(vm.phyids, sorted(vm.phyids))
    return {"limit": vm.max_phyid, "entries": entries}


async def _big_phyid_map(d: Daemon, h: VmHandle) -> Result:
    """A map of up to 65,536 entries, rebuilt in chunks with other clients served in between.

    Under the VM's map lock, so no set or drop lands between two chunks.
    """
    vm = h.vm
    lock = d.map_locks.get(vm)
    if lock is None:
        raise KvmError("EBADF", f"vm.phyid_map: handle {h.number} is not open")
    async with lock:
        if not vm.alive:
            raise KvmError("EBADF", f"vm.phyid_map: handle {h.number} is not open")
        generation = vm.map_generation
        phyids = sorted(vm.phyids)
        entries: list[tuple[int, int]] = []
        collecting = gc.isenabled()
        gc.disable()  # 65,536 new pairs, none of them garbage: nothing for the collector
        try:
            for start in range(0, len(phyids), MAP_CHUNK):
                entries += _map_entries(vm.phyids, phyids[start : start + MAP_CHUNK])
                await trio.lowlevel.checkpoint()
        finally:
            if collecting:
                gc.enable()
        if vm.map_generation == generation:  # (a writer that does not wait for the lock)
            vm.map_entries = entries
        return {"limit": vm.max_phyid, "entries": entries}


_VCPU_ID: Final = operator.attrgetter("vcpu_id")


def _map_entries(phyids: dict[int, Vcpu], keys: list[int]) -> list[tuple[int, int]]:
    """The map's ``[phyid, vcpu_id]`` pairs for ``keys``, built by C loops (map, zip).

    Pairs are tuples: msgpack writes a tuple as an array, so the wire is PROTOCOL.md's
    ``[[phyid, vcpu_id], ...]``, and a tuple is one allocation where a list is two (65,536
    of them for the largest VM). A comprehension would also cost twice as much compiled,
    where each int is unboxed and boxed again on its way in.
    """
    return list(zip(keys, map(_VCPU_ID, map(phyids.__getitem__, keys)), strict=True))


def vm_subscribe(d: Daemon, conn: Connection, p: Params, h: VmHandle) -> Result:
    d.subscribe(conn, h)
    return {}


# ---------------------------------------------------------------- vcpu -----------------------


def vcpu_destroy(d: Daemon, conn: Connection, p: Params, h: VcpuHandle) -> Result:
    d.destroy_vcpu(h.vcpu)
    return {}


def vcpu_set_one_reg(d: Daemon, conn: Connection, p: Params, h: VcpuHandle) -> Result:
    h.vm.set_one_reg(h.vcpu, p["id"], p["value"])
    return {}


def vcpu_get_one_reg(d: Daemon, conn: Connection, p: Params, h: VcpuHandle) -> Result:
    return {"value": h.vm.get_one_reg(h.vcpu, p["id"])}


def vcpu_get_reg_list(d: Daemon, conn: Connection, p: Params, h: VcpuHandle) -> Result:
    return {"ids": h.vm.reg_list(h.vcpu)}


def vcpu_interrupt(d: Daemon, conn: Connection, p: Params, h: VcpuHandle) -> Result:
    h.vm.interrupt(h.vcpu, p["irq"])
    return {}


def vcpu_csr_xchg(d: Daemon, conn: Connection, p: Params, h: VcpuHandle) -> Result:
    return {"old": h.vm.csr_xchg(h.vcpu, p["csr"], p["value"], p["mask"])}


def vcpu_set_attr(d: Daemon, conn: Connection, p: Params, h: VcpuHandle) -> Result:
    h.vm.set_vcpu_attr(h.vcpu, p["group"], p["attr"], p["value"])
    return {}


def vcpu_get_attr(d: Daemon, conn: Connection, p: Params, h: VcpuHandle) -> Result:
    return {"value": h.vm.get_vcpu_attr(h.vcpu, p["group"], p["attr"])}


def _guest_load(
    d: Daemon, conn: Connection, p: Params, h: VcpuHandle, space: str, method: str
) -> MaybeLater:
    try:
        return {"value": h.vm.guest_read(space, h.vcpu, p["addr"], p["size"])}
    except Unclaimed as miss:  # KVM_EXIT_MMIO / KVM_EXIT_LOONGARCH_IOCSR
        return d.exits.guest_call(conn, h, method, access_exit(miss, None), p.get("timeout"))


def _guest_store(
    d: Daemon, conn: Connection, p: Params, h: VcpuHandle, space: str, method: str
) -> MaybeLater:
    try:
        h.vm.guest_write(space, h.vcpu, p["addr"], p["size"], p["value"])
    except Unclaimed as miss:
        return d.exits.guest_call(conn, h, method, access_exit(miss, p["value"]), p.get("timeout"))
    return {}


def vcpu_iocsr_read(d: Daemon, conn: Connection, p: Params, h: VcpuHandle) -> MaybeLater:
    return _guest_load(d, conn, p, h, "iocsr", "vcpu.iocsr_read")


def vcpu_iocsr_write(d: Daemon, conn: Connection, p: Params, h: VcpuHandle) -> MaybeLater:
    return _guest_store(d, conn, p, h, "iocsr", "vcpu.iocsr_write")


def vcpu_mmio_read(d: Daemon, conn: Connection, p: Params, h: VcpuHandle) -> MaybeLater:
    return _guest_load(d, conn, p, h, "mmio", "vcpu.mmio_read")


def vcpu_mmio_write(d: Daemon, conn: Connection, p: Params, h: VcpuHandle) -> MaybeLater:
    return _guest_store(d, conn, p, h, "mmio", "vcpu.mmio_write")


def vcpu_kick(d: Daemon, conn: Connection, p: Params, h: VcpuHandle) -> Result:
    """End a waiting ``vcpu.run`` on this vCPU (from any connection) with EINTR.

    KVM_RUN returns -EINTR when a signal reaches the vCPU thread; this is that signal, so a
    client that gives up on a run (a timeout of its own) frees the vCPU at once instead of
    leaving it EBUSY until the daemon-side timeout. With no run waiting it does nothing.
    """
    d.end_wait(h.vcpu, "vcpu.run: kicked (vcpu.kick)", "EINTR")
    return {}


def vcpu_hypercall(d: Daemon, conn: Connection, p: Params, h: VcpuHandle) -> MaybeLater:
    """``hvcl code``: a user hypercall or a crash exits to the VMM when its PV feature is on
    (exits.py); everything else is the plugins' (PV IPI) or INVALID_CODE."""
    args = p.get("args", [])
    exit = hypercall_exit(h.vm, p["code"], args)
    if exit is not None:
        call = d.exits.guest_call(conn, h, "vcpu.hypercall", exit, p.get("timeout"))
        h.vcpu.hypercalls += 1  # an hvcl all the same (the ``hypercalls`` stat)
        return call
    return {"a0": h.vm.hypercall(h.vcpu, p["code"], args)}


# ---------------------------------------------------------------- device ---------------------


def device_set_attr(d: Daemon, conn: Connection, p: Params, h: DeviceHandle) -> Result:
    h.vm.device_call(h.device, "set_attr", p["group"], p["attr"], p["value"])
    return {}


def device_get_attr(d: Daemon, conn: Connection, p: Params, h: DeviceHandle) -> Result:
    value = h.vm.device_call(h.device, "get_attr", p["group"], p["attr"])
    if type(value) is not int or not 0 <= value <= C.U64_MAX:
        rec = h.vm.devices.get(h.device.type_name)
        raise plugin_failure(
            rec.plugin if rec else "?", TypeError(f"get_attr returned {value!r}, not a u64")
        )
    return {"value": value}


def device_save_state(d: Daemon, conn: Connection, p: Params, h: DeviceHandle) -> Result:
    """The chip's declared state (``Device.save_state``), checked before it leaves."""
    state = h.vm.device_call(h.device, "save_state")
    try:
        attrs = [[g, a, v] for g, a, v in state]
        if not all(type(x) is int and 0 <= x <= C.U64_MAX for e in attrs for x in e):
            raise TypeError("an entry is not three u64")
    except (TypeError, ValueError) as exc:
        rec = h.vm.devices.get(h.device.type_name)
        raise plugin_failure(
            rec.plugin if rec else "?", TypeError(f"save_state returned {state!r:.80}: {exc}")
        ) from exc
    return {"attrs": attrs}


def kvm_stats_(d: Daemon, conn: Connection, p: Params) -> Result:
    return stats.kvm_stats(d, d.stats_schema, p)


def vm_stats_(d: Daemon, conn: Connection, p: Params, h: VmHandle) -> Result:
    return stats.vm_stats(d, d.stats_schema, h.vm, p)


# ---------------------------------------------------------------- the tables -----------------

#: Methods that take no handle.
KVM: Final[dict[str, Callable[[Daemon, Connection, Params], Result]]] = {
    "hello": hello,
    "kvm.get_api_version": kvm_get_api_version,
    "kvm.check_extension": kvm_check_extension,
    "kvm.create_vm": kvm_create_vm,
    "kvm.open_vm": kvm_open_vm,
    "kvm.list_vms": kvm_list_vms,
    "kvm.open_vm_id": kvm_open_vm_id,
    "kvm.list_plugins": kvm_list_plugins,
    "kvm.stats": kvm_stats_,
}

#: Methods whose handle may be of any kind (``handle`` parameter).
ANY: Final[dict[str, Callable[[Daemon, Connection, Params, Handle], Result]]] = {
    "close": close,
}

#: VM methods; ``vm.destroy`` and ``vm.phyid_map`` may answer later (see the module doc).
VM: Final[dict[str, Callable[[Daemon, Connection, Params, VmHandle], MaybeLater]]] = {
    "vm.destroy": vm_destroy,
    "vm.create_vcpu": vm_create_vcpu,
    "vm.open_vcpu": vm_open_vcpu,
    "vm.create_device": vm_create_device,
    "vm.open_device": vm_open_device,
    "vm.info": vm_info,
    "vm.set_name": vm_set_name,
    "vm.irq_line": vm_irq_line,
    "vm.signal_msi": vm_signal_msi,
    "vm.phyid_lookup": vm_phyid_lookup,
    "vm.phyid_map": vm_phyid_map,
    "vm.subscribe": vm_subscribe,
    "vm.stats": vm_stats_,
    "vm.explain_route": vm_explain_route,
}

#: vCPU methods; the guest accesses and ``vcpu.hypercall`` may exit to the VMM (``Detached``).
VCPU: Final[dict[str, Callable[[Daemon, Connection, Params, VcpuHandle], MaybeLater]]] = {
    "vcpu.destroy": vcpu_destroy,
    "vcpu.set_one_reg": vcpu_set_one_reg,
    "vcpu.get_one_reg": vcpu_get_one_reg,
    "vcpu.get_reg_list": vcpu_get_reg_list,
    "vcpu.interrupt": vcpu_interrupt,
    "vcpu.csr_xchg": vcpu_csr_xchg,
    "vcpu.set_attr": vcpu_set_attr,
    "vcpu.get_attr": vcpu_get_attr,
    "vcpu.iocsr_read": vcpu_iocsr_read,
    "vcpu.iocsr_write": vcpu_iocsr_write,
    "vcpu.mmio_read": vcpu_mmio_read,
    "vcpu.mmio_write": vcpu_mmio_write,
    "vcpu.kick": vcpu_kick,
    "vcpu.hypercall": vcpu_hypercall,
    # vcpu.run is not here: it waits, in a task of its own (server.py ``_start_run``).
}

DEVICE: Final[dict[str, Callable[[Daemon, Connection, Params, DeviceHandle], Result]]] = {
    "device.set_attr": device_set_attr,
    "device.get_attr": device_get_attr,
    "device.save_state": device_save_state,
}


def _sets_cpuid(p: Params, h: VcpuHandle) -> bool:
    return p["id"] == C.CPUID and not h.vm.cpuid_unchanged(h.vcpu, p["value"])


def _always(p: Params, h: VcpuHandle) -> bool:
    return True


#: vCPU requests that set or drop a phyid (when the predicate says so): they run under the
#: VM's map lock, the kernel's ``phyid_map_lock``. ``vm.destroy`` takes it itself.
WRITES_MAP: Final[dict[str, Callable[[Params, VcpuHandle], bool]]] = {
    "vcpu.set_one_reg": _sets_cpuid,
    "vcpu.destroy": _always,
}
