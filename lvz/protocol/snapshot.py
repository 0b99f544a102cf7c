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

The snapshot knows no device: every chip, built-in or third-party, declares its own state
(``Device.save_state`` in lvz.plugins.api), which ``device.save_state`` returns as device attrs
in restore order, and restoring replays them with ``device.set_attr``. A device whose plugin
declares no state makes the save fail with EINVAL naming its type, never a partial snapshot.

The file is msgpack: ``{"format": "lvz-snapshot", "version": 1, "vm": …, "vcpus": […],
"devices": […]}``. ``decode`` checks every field before anything is created, so a corrupt or
truncated file creates nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, TypeVar

import msgpack

from . import abi
from .abi import (
    CPUCFG_KVM_FEATURE,
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

def _ok(results: Results) -> list[dict[str, Any]]:
    for r in results:
        if isinstance(r, KvmError):
            raise r
    return results  # type: ignore[return-value]


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
        states = _ok((yield [("device.save_state", {"device": d}) for d in devs]))
        devices = [{"type": kind, "attrs": state["attrs"]}
                   for kind, state in zip(info["devices"], states, strict=True)]
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
                  if not (i == abi.CPUID and value == unset) and i != abi.VCPU_RESET]
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
