"""VM snapshots through the public protocol: the way a VMM migrates a guest.

Saving reads a VM with the same requests any client can send (``vm.info``, ``vm.open_vcpu``,
``vcpu.get_reg_list``, ``vcpu.get_one_reg``, ``vcpu.get_attr``, ``device.get_attr``); restoring
replays them as ``kvm.create_vm``, ``vm.create_vcpu``, ``vcpu.set_one_reg``, ``vm.create_device``
and ``device.set_attr``, so a restored VM goes through every check a live one does (CPUIDs are
set once through ``kvm_set_cpuid``, the phyid map is rebuilt by the daemon, not copied).

Sans-I/O like the rest of this package: ``save_vm`` and ``restore_vm`` are generators that yield
a *batch* of requests and receive the batch's results (a result map, or the ``KvmError`` the
daemon answered). A driver sends a batch however it likes — pipelined on the async client, one
by one on the blocking client, or straight into the daemon's dispatch for ``--state-dir`` — so
one procedure serves all three.

Like a VMM, the snapshot knows its devices: the three in-kernel irqchips' state is their device
attrs, listed here in the order KVM wants them restored (EIOINTC: CTRL init, registers, then
LOAD_FINISHED). A VM with a device type this module does not know cannot be saved; that is an
EINVAL naming the type, not a silent partial snapshot.

The file is msgpack: ``{"format": "lvz-snapshot", "version": 1, "vm": …, "vcpus": […],
"devices": […]}``. ``decode`` checks every field before anything is created, so a corrupt or
truncated file creates nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, TypeVar

import msgpack

from . import regs
from .constants import (
    CPUCFG_KVM_FEATURE,
    DEV_EIOINTC,
    DEV_IPI,
    DEV_PCHPIC,
    KVM_LOONGARCH_VCPU_CPUCFG,
    MAX_PHYID_LIMIT,
    PV_FEATURES_DEFAULT,
    U64_MAX,
)
from .errors import KvmError

__all__ = ["FORMAT", "VERSION", "Batch", "Results", "decode", "drive", "encode", "restore_vm",
           "save_vm"]

FORMAT = "lvz-snapshot"
VERSION = 1

Batch = list[tuple[str, dict[str, Any]]]
Results = list["dict[str, Any] | KvmError"]
T = TypeVar("T")

# In-kernel irqchip attribute layout (SEMANTICS.md §8-§10).
_IPI_REGS = 0x40000001
_IPI_OFFSETS = (0x00, 0x04, 0x08, 0x0C, 0x20, 0x28, 0x30, 0x38)
_EIO_REGS, _EIO_SW_STATUS, _EIO_CTRL = 0x40000002, 0x40000003, 0x40000004
_EIO_SHARED = [(0x0A0, 0x0C0), (0x0C0, 0x0C8), (0x200, 0x220), (0x280, 0x2A0), (0x300, 0x320),
               (0x800, 0x900)]  # NODETYPE, IPMAP, ENABLE, BOUNCE, ISR, COREMAP
_EIO_COREISR = (0x400, 0x420)
_EIO_ROUTE = 0x100  # lvz's SW_STATUS extension: sw_coremap[irq] (plugins/eiointc.py)
_PCH_REGS, _PCH_CTRL = 0x40000005, 0x40000006
_PCH_WIDE = (0x20, 0x40, 0x60, 0xC0, 0xE0, 0x380, 0x3A0, 0x3E0)
_PCH_BYTES = [0x100 + i for i in range(64)] + [0x200 + i for i in range(64)]


def _ok(results: Results) -> list[dict[str, Any]]:
    for r in results:
        if isinstance(r, KvmError):
            raise r
    return results  # type: ignore[return-value]


def _attr_reads(dev: int, attrs: list[tuple[int, int]]) -> Batch:
    return [("device.get_attr", {"device": dev, "group": g, "attr": a}) for g, a in attrs]


def _save_device(kind: str, dev: int, vcpu_ids: list[int]) -> Generator[Batch, Results,
                                                                         list[list[int]]]:
    """The attrs that make up one device's state, in restore order, as [group, attr, value]."""
    if kind == DEV_IPI:
        attrs = [(_IPI_REGS, (v << 16) | off) for v in vcpu_ids for off in _IPI_OFFSETS]
        values = _ok((yield _attr_reads(dev, attrs)))
        return [[g, a, r["value"]] for (g, a), r in zip(attrs, values, strict=True)]
    if kind == DEV_EIOINTC:
        num_cpu, features, state = (r["value"] for r in _ok((yield _attr_reads(
            dev, [(_EIO_SW_STATUS, 0), (_EIO_SW_STATUS, 1), (_EIO_SW_STATUS, 2)]))))
        attrs = [(_EIO_REGS, off) for lo, hi in _EIO_SHARED for off in range(lo, hi, 4)]
        attrs += [(_EIO_REGS, (cpu << 16) | off) for cpu in range(num_cpu)
                  for off in range(*_EIO_COREISR, 4)]
        routes = [(_EIO_SW_STATUS, (irq << 16) | _EIO_ROUTE) for irq in range(256)]
        values = _ok((yield _attr_reads(dev, attrs + routes)))
        saved = [[g, a, r["value"]] for (g, a), r in zip(attrs + routes, values, strict=True)]
        return [[_EIO_CTRL, 0, num_cpu], [_EIO_CTRL, 1, features], [_EIO_SW_STATUS, 2, state],
                *saved[:len(attrs)],
                [_EIO_CTRL, 3, 0],  # LOAD_FINISHED: rebuild routing from the registers,
                *saved[len(attrs):]]  # then put back the live routes it cannot know
    if kind == DEV_PCHPIC:
        attrs = [(_PCH_REGS, off) for off in (*_PCH_WIDE, *_PCH_BYTES)]
        results = yield _attr_reads(dev, [(_PCH_CTRL, 0), *attrs])
        base = results[0]
        out = [] if isinstance(base, KvmError) else [[_PCH_CTRL, 0, base["value"]]]
        values = _ok(results[1:])
        return out + [[g, a, r["value"]] for (g, a), r in zip(attrs, values, strict=True)]
    raise KvmError("EINVAL", f"a {kind} cannot be saved: lvz snapshots know the in-kernel "
                             f"irqchips only")


def save_vm(vm: int) -> Generator[Batch, Results, dict[str, Any]]:
    """Read the whole state of the VM behind handle ``vm``."""
    info = _ok((yield [("vm.info", {"vm": vm})]))[0]
    vcpu_ids: list[int] = info["vcpus"]
    opened = _ok((yield [("vm.open_vcpu", {"vm": vm, "vcpu_id": v}) for v in vcpu_ids]))
    vcpus = [r["vcpu"] for r in opened]
    devs = [r["device"] for r in _ok((yield [("vm.open_device", {"vm": vm, "type": t})
                                             for t in info["devices"]]))]
    try:
        lists = _ok((yield [("vcpu.get_reg_list", {"vcpu": h}) for h in vcpus]))
        reads = [("vcpu.get_one_reg", {"vcpu": h, "id": i})
                 for h, lst in zip(vcpus, lists, strict=True) for i in lst["ids"]]
        values = iter(_ok((yield reads)))
        saved_vcpus = []
        for vid, lst in zip(vcpu_ids, lists, strict=True):
            saved_vcpus.append({"vcpu_id": vid,
                                "regs": [[i, next(values)["value"]] for i in lst["ids"]]})
        pv = None
        if vcpus:
            pv = _ok((yield [("vcpu.get_attr", {"vcpu": vcpus[0],
                                                "group": KVM_LOONGARCH_VCPU_CPUCFG,
                                                "attr": CPUCFG_KVM_FEATURE})]))[0]["value"]
        devices = []
        for kind, dev in zip(info["devices"], devs, strict=True):
            devices.append({"type": kind, "attrs": (yield from _save_device(kind, dev,
                                                                            vcpu_ids))})
    finally:
        yield [("close", {"handle": h}) for h in (*vcpus, *devs)]
    return {"format": FORMAT, "version": VERSION,
            "vm": {"name": info["name"], "max_phyid": info["max_phyid"], "pv_features": pv},
            "vcpus": saved_vcpus, "devices": devices}


def restore_vm(snap: dict[str, Any], name: str | None = None) -> Generator[Batch, Results, int]:
    """Create a VM from a decoded snapshot; returns its handle. On failure nothing is left."""
    spec = snap["vm"]
    params: dict[str, Any] = {"max_phyid": spec["max_phyid"]}
    if name is not None or spec["name"] is not None:
        params["name"] = name if name is not None else spec["name"]
    vm: int = _ok((yield [("kvm.create_vm", params)]))[0]["vm"]
    try:
        created = _ok((yield [("vm.create_vcpu", {"vm": vm, "vcpu_id": v["vcpu_id"]})
                              for v in snap["vcpus"]]))
        vcpus = [r["vcpu"] for r in created]
        pv = spec["pv_features"]
        if vcpus and pv is not None and pv != PV_FEATURES_DEFAULT:
            _ok((yield [("vcpu.set_attr", {"vcpu": vcpus[0], "group": KVM_LOONGARCH_VCPU_CPUCFG,
                                           "attr": CPUCFG_KVM_FEATURE, "value": pv})]))
        # An unset CPUID reads as the limit (the marker); a fresh vCPU already holds it and
        # setting it would be EINVAL, so it is the one register not written back.
        unset = spec["max_phyid"]
        writes = [("vcpu.set_one_reg", {"vcpu": h, "id": i, "value": value})
                  for h, v in zip(vcpus, snap["vcpus"], strict=True) for i, value in v["regs"]
                  if not (i == regs.CPUID and value == unset) and i != regs.VCPU_RESET]
        _ok((yield writes))
        made = _ok((yield [("vm.create_device", {"vm": vm, "type": d["type"]})
                           for d in snap["devices"]]))
        devs = [r["device"] for r in made]
        for dev, d in zip(devs, snap["devices"], strict=True):
            _ok((yield [("device.set_attr", {"device": dev, "group": g, "attr": a, "value": v})
                        for g, a, v in d["attrs"]]))
        _ok((yield [("close", {"handle": h}) for h in (*vcpus, *devs)]))
    except BaseException:
        yield [("vm.destroy", {"vm": vm})]
        raise
    return vm


def drive(gen: Generator[Batch, Results, T], send: Callable[[Batch], Results]) -> T:
    """Run a snapshot generator with a blocking batch sender (sync client, daemon)."""
    try:
        batch = next(gen)
        while True:
            batch = gen.send(send(batch))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


def encode(snap: dict[str, Any]) -> bytes:
    return msgpack.packb(snap, use_bin_type=True)


def _bad(why: str) -> KvmError:
    return KvmError("EINVAL", f"not a usable lvz snapshot: {why}")


def _is_u64(v: object) -> bool:
    return type(v) is int and 0 <= v <= U64_MAX


def decode(data: bytes) -> dict[str, Any]:
    """Parse and check a snapshot file completely; raises EINVAL saying what is wrong."""
    try:
        snap = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:
        raise _bad(f"the file is not whole msgpack ({type(exc).__name__})") from None
    if not isinstance(snap, dict) or snap.get("format") != FORMAT:
        raise _bad("it does not start with the lvz-snapshot format marker")
    if snap.get("version") != VERSION:
        raise _bad(f"version {snap.get('version')!r} is not {VERSION}")
    vm = snap.get("vm")
    if (not isinstance(vm, dict) or type(vm.get("max_phyid")) is not int
            or not 1 <= vm["max_phyid"] <= MAX_PHYID_LIMIT
            or not (vm.get("name") is None or isinstance(vm.get("name"), str))
            or not (vm.get("pv_features") is None or _is_u64(vm.get("pv_features")))):
        raise _bad("the vm section is malformed")
    vcpus = snap.get("vcpus")
    if not isinstance(vcpus, list):
        raise _bad("the vcpus section is malformed")
    for v in vcpus:
        if (not isinstance(v, dict) or type(v.get("vcpu_id")) is not int
                or not isinstance(v.get("regs"), list)
                or not all(isinstance(r, list) and len(r) == 2 and _is_u64(r[0]) and _is_u64(r[1])
                           for r in v["regs"])):
            raise _bad("a vcpu entry is malformed")
    devices = snap.get("devices")
    if not isinstance(devices, list):
        raise _bad("the devices section is malformed")
    for d in devices:
        if (not isinstance(d, dict) or not isinstance(d.get("type"), str)
                or not isinstance(d.get("attrs"), list)
                or not all(isinstance(a, list) and len(a) == 3 and all(_is_u64(x) for x in a)
                           for a in d["attrs"])):
            raise _bad("a device entry is malformed")
    return snap
