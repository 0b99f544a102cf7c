"""Every client method, written once: what it sends and how its answer is read.

Each function returns a ``Call`` (one request and its result parser) or an ``Op`` (a generator
that yields calls, batches and event waits). The blocking and trio façades wrap each in a
one-line method that runs it their way, so a new protocol method costs one function here and
a one-line method per façade, and the two façades cannot drift apart.

They are public for pipelining: ``kvm.gather([ops.get_one_reg(v, abi.CPUID) for v in
vcpus])`` sends every request at once and waits once, in the blocking and the trio client
alike, with no thread or nursery per call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from lvz.protocol import abi, snapshot
from lvz.protocol.errors import KvmError

from .core import (
    Call,
    EventsLost,
    HelloInfo,
    HypercallExit,
    IoExit,
    IrqEvent,
    Op,
    PhyidMap,
    PluginInfo,
    RouteDelivery,
    RouteExplanation,
    RouteHop,
    RouteVerdict,
    RunResult,
    SystemEvent,
    VmInfo,
    VmSummary,
    WaitEvent,
    _no_result,
    describe_source,
    field,
    int_field,
    line_names,
    line_number,
)


class Handle(Protocol):
    """Anything naming a daemon handle: the façades' ``VmFd``, ``VcpuFd``, ``DeviceFd``."""

    @property
    def handle(self) -> int: ...


def _int(key: str) -> Callable[[dict[str, Any], str], int]:
    def parse(result: dict[str, Any], method: str) -> int:
        return int_field(result, key, method)

    return parse


_value, _handle_vm, _handle_vcpu, _handle_device = (
    _int("value"),
    _int("vm"),
    _int("vcpu"),
    _int("device"),
)


# --- parsers ------------------------------------------------------------------------------------


def parse_hello(result: dict[str, Any], method: str = "hello") -> HelloInfo:
    return HelloInfo(
        protocol=int_field(result, "protocol", method),
        server=str(result.get("server", "")),
        api_version=int_field(result, "api_version", method),
        methods=tuple(str(m) for m in result.get("methods", ())),
        device_types=tuple(str(t) for t in result.get("device_types", ())),
    )


def parse_phyid_map(result: dict[str, Any], method: str = "vm.phyid_map") -> PhyidMap:
    entries = field(result, "entries", method)
    try:
        pairs = tuple((int(phyid), int(vcpu_id)) for phyid, vcpu_id in entries)
    except (TypeError, ValueError):
        raise KvmError("EPROTO", f"{method}: entries are not [phyid, vcpu_id] pairs") from None
    return PhyidMap(limit=int_field(result, "limit", method), entries=pairs)


def parse_vm_info(result: dict[str, Any], method: str = "vm.info") -> VmInfo:
    name = result.get("name")
    return VmInfo(
        name=name if isinstance(name, str) else None,
        max_phyid=int_field(result, "max_phyid", method),
        vcpus=tuple(int(v) for v in field(result, "vcpus", method)),
        devices=tuple(str(d) for d in field(result, "devices", method)),
    )


def parse_vm_list(result: dict[str, Any], method: str = "kvm.list_vms") -> list[VmSummary]:
    rows = []
    for vm in field(result, "vms", method):
        name = vm.get("name")
        rows.append(
            VmSummary(
                name=name if isinstance(name, str) else None,
                vcpus=int(vm.get("vcpus", 0)),
                devices=int(vm.get("devices", 0)),
            )
        )
    return rows


def parse_plugins(result: dict[str, Any], method: str = "kvm.list_plugins") -> list[PluginInfo]:
    return [
        PluginInfo(
            name=str(p.get("name", "")),
            version=str(p.get("version", "")),
            dist=str(p.get("dist", "")),
            device_types=tuple(str(t) for t in p.get("device_types", ())),
        )
        for p in field(result, "plugins", method)
    ]


def _parse_io(member: Any, method: str) -> IoExit | None:
    if member is None:
        return None
    try:
        return IoExit(
            phys_addr=int(member["phys_addr"]),
            len=int(member["len"]),
            is_write=bool(member["is_write"]),
            data=int(member["data"]),
        )
    except (KeyError, TypeError, ValueError):
        raise KvmError(
            "EPROTO",
            f"{method}: an mmio / iocsr_io exit that is not {{phys_addr, len, is_write, data}}",
        ) from None


def _parse_hypercall(member: Any, method: str) -> HypercallExit | None:
    if member is None:
        return None
    try:
        return HypercallExit(
            nr=int(member["nr"]),
            args=tuple(int(a) for a in member["args"]),
            ret=int(member["ret"]),
            flags=int(member["flags"]),
        )
    except (KeyError, TypeError, ValueError):
        raise KvmError(
            "EPROTO", f"{method}: a hypercall exit that is not {{nr, args, ret, flags}}"
        ) from None


def _parse_system_event(member: Any, method: str) -> SystemEvent | None:
    if member is None:
        return None
    try:
        return SystemEvent(
            type=int(member["type"]),
            ndata=int(member["ndata"]),
            data=tuple(int(d) for d in member["data"]),
        )
    except (KeyError, TypeError, ValueError):
        raise KvmError(
            "EPROTO", f"{method}: a system_event exit that is not {{type, ndata, data}}"
        ) from None


def parse_run(result: dict[str, Any], method: str = "vcpu.run") -> RunResult:
    """A run's answer; an exit carries its ``kvm_run`` member (protocol-additions.md)."""
    return RunResult(
        exit_reason=str(field(result, "exit_reason", method)),
        estat=int_field(result, "estat", method),
        mmio=_parse_io(result.get("mmio"), method),
        iocsr_io=_parse_io(result.get("iocsr_io"), method),
        hypercall=_parse_hypercall(result.get("hypercall"), method),
        system_event=_parse_system_event(result.get("system_event"), method),
    )


def _verdict(raw: Any) -> RouteVerdict | None:
    if raw is None:
        return None
    return RouteVerdict(
        chip=str(raw["chip"]),
        reason=str(raw["reason"]),
        message=str(raw["message"]),
        register=raw.get("register"),
        bit=raw.get("bit"),
        value=raw.get("value"),
    )


def parse_route(result: dict[str, Any], method: str = "vm.explain_route") -> RouteExplanation:
    try:
        hops = tuple(
            RouteHop(
                chip=str(h["chip"]),
                step=str(h["step"]),
                note=str(h["note"]),
                register=h.get("register"),
                bit=h.get("bit"),
                value=h.get("value"),
            )
            for h in field(result, "hops", method)
        )
        d = result.get("delivered")
        delivered = (
            None
            if d is None
            else RouteDelivery(
                vcpu_id=int(d["vcpu_id"]),
                phyid=d.get("phyid"),
                line=int(d["line"]),
                line_name=str(d["line_name"]),
                level=int(d["level"]),
                changed=bool(d["changed"]),
            )
        )
        return RouteExplanation(
            source=describe_source(field(result, "source", method)),
            level=int_field(result, "level", method),
            hops=hops,
            delivered=delivered,
            stopped=_verdict(result.get("stopped")),
            redirected=_verdict(result.get("redirected")),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise KvmError(
            "EPROTO",
            f"{method}: the result is not a route explanation ({type(exc).__name__}: {exc})",
        ) from None


def _parse_lookup(result: dict[str, Any], method: str) -> int | None:
    value = result.get("vcpu_id")
    return value if type(value) is int else None


def _parse_lines(result: dict[str, Any], method: str) -> tuple[str, ...]:
    return line_names(int_field(result, "value", method))


# --- KVM system ioctls --------------------------------------------------------------------------


def hello() -> Call[HelloInfo]:
    return Call("hello", {"protocol": abi.PROTOCOL_VERSION}, parse_hello)


def get_api_version() -> Call[int]:
    return Call("kvm.get_api_version", {}, _int("version"))


def check_extension(cap: str, profile: str | None = None) -> Call[int]:
    """KVM_CHECK_EXTENSION, as kernel ``profile`` (default: the newest) answers."""
    params = {"cap": cap} if profile is None else {"cap": cap, "profile": profile}
    return Call("kvm.check_extension", params, _value)


def create_vm(
    name: str | None = None, max_phyid: int | None = None, profile: str | None = None
) -> Call[int]:
    """KVM_CREATE_VM; ``profile`` is the kernel the VM behaves as (``lvz profiles``)."""
    params: dict[str, Any] = {}
    if name is not None:
        params["name"] = name
    if max_phyid is not None:
        params["max_phyid"] = max_phyid
    if profile is not None:
        params["profile"] = profile
    return Call("kvm.create_vm", params, _handle_vm)


def open_vm(name: str) -> Call[int]:
    return Call("kvm.open_vm", {"name": name}, _handle_vm)


def list_vms() -> Call[list[VmSummary]]:
    return Call("kvm.list_vms", {}, parse_vm_list)


def list_plugins() -> Call[list[PluginInfo]]:
    return Call("kvm.list_plugins", {}, parse_plugins)


def close(handle: int) -> Call[None]:
    """``close(fd)``: drop one handle (the object lives on while other handles hold it)."""
    return Call("close", {"handle": handle}, _no_result)


def save_vm(vm: Handle) -> Op[dict[str, Any]]:
    """The VM's whole state, read through the protocol in pipelined batches (``lvz snapshot``)."""
    saved: dict[str, Any] = yield from snapshot.save_vm(vm.handle)
    return saved


def restore_vm(saved: dict[str, Any], name: str | None = None) -> Op[int]:
    """Create a VM from ``save_vm``'s result; on any failure no VM is left behind."""
    handle: int = yield from snapshot.restore_vm(saved, name)
    return handle


# --- VM ioctls ----------------------------------------------------------------------------------


def create_vcpu(vm: Handle, vcpu_id: int) -> Call[int]:
    return Call("vm.create_vcpu", {"vm": vm.handle, "vcpu_id": vcpu_id}, _handle_vcpu)


def open_vcpu(vm: Handle, vcpu_id: int) -> Call[int]:
    return Call("vm.open_vcpu", {"vm": vm.handle, "vcpu_id": vcpu_id}, _handle_vcpu)


def create_device(vm: Handle, type: str) -> Call[int]:
    return Call("vm.create_device", {"vm": vm.handle, "type": type}, _handle_device)


def open_device(vm: Handle, type: str) -> Call[int]:
    return Call("vm.open_device", {"vm": vm.handle, "type": type}, _handle_device)


def destroy_vm(vm: Handle) -> Call[None]:
    return Call("vm.destroy", {"vm": vm.handle}, _no_result)


def phyid_lookup(vm: Handle, phyid: int) -> Call[int | None]:
    """The vcpu_id owning ``phyid``, or None (``kvm_get_vcpu_by_cpuid``)."""
    return Call("vm.phyid_lookup", {"vm": vm.handle, "phyid": phyid}, _parse_lookup)


def phyid_map(vm: Handle) -> Call[PhyidMap]:
    return Call("vm.phyid_map", {"vm": vm.handle}, parse_phyid_map)


def vm_info(vm: Handle) -> Call[VmInfo]:
    return Call("vm.info", {"vm": vm.handle}, parse_vm_info)


def irq_line(vm: Handle, irq: int, level: int | bool) -> Call[None]:
    return Call("vm.irq_line", {"vm": vm.handle, "irq": irq, "level": int(level)}, _no_result)


def signal_msi(vm: Handle, address: int, data: int) -> Call[None]:
    return Call("vm.signal_msi", {"vm": vm.handle, "address": address, "data": data}, _no_result)


def explain_route(
    vm: Handle,
    pin: int | None = None,
    *,
    msi: tuple[int, int] | None = None,
    eiointc_irq: int | None = None,
    level: int | bool = 1,
) -> Call[RouteExplanation]:
    """Why an interrupt goes where it goes: PCH-PIC ``pin`` (as ``irq_line``), an ``msi``
    (address, data) as ``signal_msi``, or an EIOINTC irq, driven to ``level`` now. Read-only:
    nothing changes, no event is sent. Exactly one source; EINVAL otherwise."""
    sources: list[dict[str, Any]] = []
    if pin is not None:
        sources.append({"pin": pin})
    if msi is not None:
        sources.append({"msi": {"address": msi[0], "data": msi[1]}})
    if eiointc_irq is not None:
        sources.append({"eiointc_irq": eiointc_irq})
    if len(sources) != 1:
        raise KvmError("EINVAL", "explain_route: give exactly one of pin, msi and eiointc_irq")
    return Call(
        "vm.explain_route",
        {"vm": vm.handle, "source": sources[0], "level": int(level)},
        parse_route,
    )


def subscribe(vm: Handle) -> Call[None]:
    return Call("vm.subscribe", {"vm": vm.handle}, _no_result)


def wait_for_line(
    vm: Handle, vcpu_id: int, irq: int | str, level: int = 1, timeout: float | None = None
) -> Op[IrqEvent | None]:
    """Until vCPU ``vcpu_id``'s line ``irq`` is at ``level``: the event that put it there, or None
    if it already was; TimeoutError after ``timeout`` s. The VM must be subscribed first.

    The current level is read (ESTAT, through a handle opened for the purpose) after the
    subscription, so a change is either already visible or still to come as an event: none
    falls in between. Events of the VM read while waiting are consumed.
    """
    line = line_number(irq)
    deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
    vcpu: int = yield open_vcpu(vm, vcpu_id)
    try:
        estat: int = yield Call("vcpu.get_one_reg", {"vcpu": vcpu, "id": abi.ESTAT}, _value)
    except KvmError:
        yield close(vcpu)
        raise
    yield close(vcpu)
    if (estat >> line & 1) == level:
        return None
    while True:
        item = yield WaitEvent(vm.handle, deadline)
        if item is None:
            raise TimeoutError(
                f"vCPU {vcpu_id}'s line {irq} did not go to {level} within {timeout} s"
            )
        if isinstance(item, EventsLost):
            continue
        if item.vcpu_id == vcpu_id and item.irq == line and item.level == level:
            return item  # type: ignore[no-any-return]


# --- vCPU ioctls --------------------------------------------------------------------------------


def destroy_vcpu(vcpu: Handle) -> Call[None]:
    return Call("vcpu.destroy", {"vcpu": vcpu.handle}, _no_result)


def set_one_reg(vcpu: Handle, reg_id: int, value: int) -> Call[None]:
    return Call("vcpu.set_one_reg", {"vcpu": vcpu.handle, "id": reg_id, "value": value}, _no_result)


def get_one_reg(vcpu: Handle, reg_id: int) -> Call[int]:
    return Call("vcpu.get_one_reg", {"vcpu": vcpu.handle, "id": reg_id}, _value)


def lines(vcpu: Handle) -> Call[tuple[str, ...]]:
    """The vCPU's raised interrupt lines by name (``"IPI"``, ``"HWI0"``…), from its ESTAT."""
    return Call("vcpu.get_one_reg", {"vcpu": vcpu.handle, "id": abi.ESTAT}, _parse_lines)


def interrupt(vcpu: Handle, irq: int) -> Call[None]:
    return Call("vcpu.interrupt", {"vcpu": vcpu.handle, "irq": irq}, _no_result)


def csr_xchg(vcpu: Handle, csr: int, value: int, mask: int) -> Call[int]:
    return Call(
        "vcpu.csr_xchg",
        {"vcpu": vcpu.handle, "csr": csr, "value": value, "mask": mask},
        _int("old"),
    )


def vcpu_set_attr(vcpu: Handle, group: int, attr: int, value: int) -> Call[None]:
    return Call(
        "vcpu.set_attr",
        {"vcpu": vcpu.handle, "group": group, "attr": attr, "value": value},
        _no_result,
    )


def vcpu_get_attr(vcpu: Handle, group: int, attr: int) -> Call[int]:
    return Call("vcpu.get_attr", {"vcpu": vcpu.handle, "group": group, "attr": attr}, _value)


# A guest access no in-kernel device claims, a user hypercall (KVM_FEATURE_USER_HCALL) and a
# crash (KVM_FEATURE_CRASH) exit to the VMM: the call returns once a VMM has completed the exit
# through ``run``. ``timeout`` is how long to wait for one; without it, ENXIO at once unless a
# VMM runs the vCPU (docs/vmm-loop.md).


def _guest(vcpu: Handle, timeout: float | None, **params: Any) -> dict[str, Any]:
    params["vcpu"] = vcpu.handle
    if timeout is not None:
        params["timeout"] = timeout
    return params


def iocsr_read(vcpu: Handle, addr: int, size: int, timeout: float | None = None) -> Call[int]:
    return Call("vcpu.iocsr_read", _guest(vcpu, timeout, addr=addr, size=size), _value)


def iocsr_write(
    vcpu: Handle, addr: int, size: int, value: int, timeout: float | None = None
) -> Call[None]:
    return Call(
        "vcpu.iocsr_write", _guest(vcpu, timeout, addr=addr, size=size, value=value), _no_result
    )


def mmio_read(vcpu: Handle, addr: int, size: int, timeout: float | None = None) -> Call[int]:
    return Call("vcpu.mmio_read", _guest(vcpu, timeout, addr=addr, size=size), _value)


def mmio_write(
    vcpu: Handle, addr: int, size: int, value: int, timeout: float | None = None
) -> Call[None]:
    return Call(
        "vcpu.mmio_write", _guest(vcpu, timeout, addr=addr, size=size, value=value), _no_result
    )


def hypercall(vcpu: Handle, code: int, *args: int, timeout: float | None = None) -> Call[int]:
    """``hvcl code`` with a0..a5 = ``args``; returns the guest's a0 afterwards (signed)."""
    return Call("vcpu.hypercall", _guest(vcpu, timeout, code=code, args=list(args)), _int("a0"))


def run(
    vcpu: Handle, timeout: float, data: int | None = None, ret: int | None = None
) -> Call[RunResult]:
    """KVM_RUN: complete the exit the last ``run`` returned (``data`` answers an MMIO / IOCSR
    read, ``ret`` a hypercall), then return the next exit, else idle until an interrupt line
    is up or ``timeout`` s pass (the daemon's limit)."""
    params: dict[str, Any] = {"vcpu": vcpu.handle, "timeout": timeout}
    if data is not None:
        params["data"] = data
    if ret is not None:
        params["ret"] = ret
    return Call("vcpu.run", params, parse_run)


def kick(vcpu: Handle) -> Call[None]:
    """End a ``run`` waiting on this vCPU (from any connection) with EINTR."""
    return Call("vcpu.kick", {"vcpu": vcpu.handle}, _no_result)


# --- device ioctls ------------------------------------------------------------------------------


def device_set_attr(device: Handle, group: int, attr: int, value: int) -> Call[None]:
    return Call(
        "device.set_attr",
        {"device": device.handle, "group": group, "attr": attr, "value": value},
        _no_result,
    )


def device_get_attr(device: Handle, group: int, attr: int) -> Call[int]:
    return Call("device.get_attr", {"device": device.handle, "group": group, "attr": attr}, _value)
