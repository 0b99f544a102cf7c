"""VM snapshots through the public protocol: the way a VMM migrates a guest.

Saving reads a VM with the same requests any client can send (``vm.info``, ``vm.open_vcpu``,
``vcpu.get_reg_list``, ``vcpu.get_one_reg``, ``vcpu.get_attr``, ``device.save_state``);
restoring replays them as ``kvm.create_vm``, ``vm.create_vcpu``, ``vcpu.set_one_reg``,
``vm.create_device`` and ``device.set_attr``, so a restored VM goes through every check a live
one does (CPUIDs are set once through ``kvm_set_cpuid``, the phyid map is rebuilt by the
daemon, not copied).

Sans-I/O like the rest of this package: ``save_vm`` and ``restore_vm`` are generators that yield
a *batch* of requests and receive the batch's results (a result map, or the ``KvmError`` the
daemon answered), at most ``CHUNK`` requests at a time. A driver sends a batch however it likes
— pipelined on either client, or straight into the daemon's dispatch for ``--state-dir`` — so
one procedure serves all three. ``drive`` / ``adrive`` are those drivers' loop.

Failure, the one rule: the generators clean up with requests only after a request was refused
(``except KvmError``: the connection still works). Any other failure — the connection lost, the
client killed, a ``KeyboardInterrupt`` — is thrown into the generator, which yields nothing
more; what it opened dies with the connection, because:

- a save opens only handles, which the daemon closes when their connection ends;
- a restore builds an *unnamed* VM (alive only while a handle of this connection holds it) and
  names it with ``vm.set_name`` as its very last request. Until then the VM exists for no one
  else, and whatever ends the restore early — an error, Ctrl-C, ``kill -9`` of the client —
  leaves no VM behind (the "temporary identity, named last" choice of docs/state.md).

The snapshot knows no device: every chip declares its own state (``Device.save_state``), which
``device.save_state`` returns as device attrs in restore order. A device whose plugin declares
no state makes the save fail with EINVAL naming its type, never a partial snapshot.

The file: a msgpack map ``{"format": "lvz-snapshot", "version": 2, "vm": …, "vcpus": […],
"devices": […]}`` (a vCPU carries its registers and the vCPU attrs that hold state,
``VCPU_ATTRS``: steal time; the VM its kernel profile; both optional) followed by the 32-byte
SHA-256 of that map's bytes. ``decode`` checks the digest first (a flipped bit or a truncated
file is EINVAL naming the file), then every field, before anything is created. Version 1 files
(no digest, written by lvz before the state journal) are still read, so an upgrade loses
nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar

import msgpack

from . import abi
from .abi import (
    CPUCFG_KVM_FEATURE,
    KVM_LOONGARCH_VCPU_CPUCFG,
    KVM_LOONGARCH_VCPU_PVTIME_CTRL,
    KVM_LOONGARCH_VCPU_PVTIME_GPA,
    MAX_PHYID_LIMIT,
    PV_FEATURES_DEFAULT,
    U64_MAX,
)
from .errors import KvmError

__all__ = [
    "CHUNK",
    "FORMAT",
    "VERSION",
    "Batch",
    "Progress",
    "Results",
    "adrive",
    "decode",
    "drive",
    "encode",
    "restore_vm",
    "save_vm",
]

FORMAT = "lvz-snapshot"
VERSION = 2
#: Requests per batch: enough to keep the socket busy, and few enough that a batch's requests
#: (under ~100 bytes each) fit in a Unix socket's buffer (~200 KiB): a client that sends a
#: whole batch before reading (the blocking one) would otherwise wait on a full socket while
#: the daemon waits for it to read the answers.
CHUNK = 1024
_DIGEST = 32

Batch = list[tuple[str, dict[str, Any]]]
Results = list["dict[str, Any] | KvmError"]
#: ``progress(done, total)``: requests answered so far and the best estimate of all of them.
Progress = Callable[[int, int], None]
T = TypeVar("T")
#: vCPU attrs a snapshot carries besides registers (QEMU saves steal time the same way).
#: ENXIO when the VM's kernel or PV features do not offer one: then it holds no state.
VCPU_ATTRS = ((KVM_LOONGARCH_VCPU_PVTIME_CTRL, KVM_LOONGARCH_VCPU_PVTIME_GPA),)


def _ok(results: Results) -> list[dict[str, Any]]:
    for r in results:
        if isinstance(r, KvmError):
            raise r
    return results  # type: ignore[return-value]


def _noop(done: int, total: int) -> None:
    pass


class _Chunks:
    """Yields a long list of requests as batches of ``CHUNK`` and keeps the progress count."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress = progress or _noop
        self.done = 0
        self.total = total

    def run(self, batch: Batch) -> Generator[Batch, Results, list[dict[str, Any]]]:
        out: list[dict[str, Any]] = []
        for start in range(0, len(batch), CHUNK):
            part = batch[start : start + CHUNK]
            out += _ok((yield part))
            self.done += len(part)
            self.progress(self.done, max(self.total, self.done))
        return out

    def values(self, batch: Batch) -> Generator[Batch, Results, list[int | None]]:
        """The ``value`` of each ``get_attr``; None where the attr does not exist (ENXIO)."""
        out: list[int | None] = []
        for start in range(0, len(batch), CHUNK):
            part = batch[start : start + CHUNK]
            for r in (yield part):
                if isinstance(r, KvmError):
                    if r.name != "ENXIO":
                        raise r
                    out.append(None)
                else:
                    out.append(r["value"])
            self.done += len(part)
            self.progress(self.done, max(self.total, self.done))
        return out


def save_vm(vm: int, progress: Progress | None = None) -> Generator[Batch, Results, dict[str, Any]]:
    """Read the whole state of the VM behind handle ``vm``."""
    info = _ok((yield [("vm.info", {"vm": vm})]))[0]
    vcpu_ids: list[int] = info["vcpus"]
    n = len(vcpu_ids)
    # open, reg list, ~4 registers, close per vCPU: re-estimated once the lists are in
    chunks = _Chunks(progress, 7 * n + 2 * len(info["devices"]) + 2)
    vcpus: list[int] = []
    devs: list[int] = []
    try:
        opened = yield from chunks.run(
            [("vm.open_vcpu", {"vm": vm, "vcpu_id": v}) for v in vcpu_ids]
        )
        vcpus = [r["vcpu"] for r in opened]
        devs = [
            r["device"]
            for r in (
                yield from chunks.run(
                    [("vm.open_device", {"vm": vm, "type": t}) for t in info["devices"]]
                )
            )
        ]
        lists = yield from chunks.run([("vcpu.get_reg_list", {"vcpu": h}) for h in vcpus])
        reads = [
            ("vcpu.get_one_reg", {"vcpu": h, "id": i})
            for h, lst in zip(vcpus, lists, strict=True)
            for i in lst["ids"]
        ]
        chunks.total = chunks.done + len(reads) + (1 + len(VCPU_ATTRS)) * n + 1 + 2 * len(devs)
        values = iter((yield from chunks.run(reads)))
        attr_values = iter(
            (
                yield from chunks.values(
                    [
                        ("vcpu.get_attr", {"vcpu": h, "group": g, "attr": a})
                        for h in vcpus
                        for g, a in VCPU_ATTRS
                    ]
                )
            )
        )
        saved_vcpus = []
        for vid, lst in zip(vcpu_ids, lists, strict=True):
            attrs = [[g, a, v] for g, a in VCPU_ATTRS if (v := next(attr_values)) is not None]
            saved_vcpus.append(
                {
                    "vcpu_id": vid,
                    "attrs": attrs,
                    "regs": [[i, next(values)["value"]] for i in lst["ids"]],
                }
            )
        pv = None
        if vcpus:  # ENXIO on a kernel without PV feature control (before 6.12): none saved
            pv = (
                yield from chunks.values(
                    [
                        (
                            "vcpu.get_attr",
                            {
                                "vcpu": vcpus[0],
                                "group": KVM_LOONGARCH_VCPU_CPUCFG,
                                "attr": CPUCFG_KVM_FEATURE,
                            },
                        )
                    ]
                )
            )[0]
        states = yield from chunks.run([("device.save_state", {"device": d}) for d in devs])
        devices = [
            {"type": kind, "attrs": state["attrs"]}
            for kind, state in zip(info["devices"], states, strict=True)
        ]
    except KvmError:
        # Refused, so the connection works: give the handles back. (Any other failure ends
        # the connection, and the daemon closes them itself.)
        yield [("close", {"handle": h}) for h in (*vcpus, *devs)]
        raise
    yield from chunks.run([("close", {"handle": h}) for h in (*vcpus, *devs)])
    return {
        "format": FORMAT,
        "version": VERSION,
        "vm": {
            "name": info["name"],
            "max_phyid": info["max_phyid"],
            "pv_features": pv,
            "profile": info.get("profile"),
        },
        "vcpus": saved_vcpus,
        "devices": devices,
    }


def _fresh(reg: int, vcpu_id: int, max_phyid: int) -> int | None:
    """The value ``reg`` holds in a vCPU just created (KVM_CREATE_VCPU), if lvz knows it."""
    if reg == abi.CPUID:
        return max_phyid
    if reg == _TMID:
        return vcpu_id
    if reg == _CRMD:
        return abi.CSR_CRMD_DA
    return None


_TMID = abi.csr_id(abi.CSR_TMID)
_CRMD = abi.csr_id(abi.CSR_CRMD)


def restore_vm(
    snap: dict[str, Any], name: str | None = None, progress: Progress | None = None
) -> Generator[Batch, Results, int]:
    """Create a VM from a decoded snapshot; returns its handle. On failure nothing is left.

    The VM is built unnamed and named last (``vm.set_name``), so until the restore is whole
    no one else can see it, and it dies with this connection if the restore stops early.
    ``name`` overrides the snapshot's; with neither, the VM stays unnamed.
    """
    spec = snap["vm"]
    name = name if name is not None else spec["name"]
    if name is not None:
        # Fail fast on a taken name rather than after building 65,536 vCPUs.
        [found] = yield [("kvm.open_vm", {"name": name})]
        if not isinstance(found, KvmError):
            yield [("close", {"handle": found["vm"]})]
            raise KvmError("EEXIST", f"kvm.create_vm: a VM named {name!r} exists")
        if found.name != "ENOENT":
            raise found
    unset = spec["max_phyid"]
    # A fresh vCPU already holds what kvm_arch_vcpu_create gives it: writing that back changes
    # nothing, and skipping it saves two requests in three on a typical VM. (An unset CPUID
    # reads as the limit, the marker; setting it would even be EINVAL.)
    writes_per_vcpu = [
        [
            (i, value)
            for i, value in v["regs"]
            if i != abi.VCPU_RESET and value != _fresh(i, v["vcpu_id"], unset)
        ]
        for v in snap["vcpus"]
    ]
    n = len(snap["vcpus"])
    vcpu_attrs = [
        ("vcpu.set_attr", {"vcpu": i, "group": g, "attr": a, "value": value})
        for i, v in enumerate(snap["vcpus"])
        for g, a, value in v.get("attrs", [])
    ]
    chunks = _Chunks(
        progress,
        2 * n
        + sum(map(len, writes_per_vcpu))
        + 2
        + len(vcpu_attrs)
        + sum(1 + len(d["attrs"]) for d in snap["devices"]),
    )
    create: dict[str, Any] = {"max_phyid": spec["max_phyid"]}
    if spec.get("profile") is not None:
        create["profile"] = spec["profile"]
    vm: int = _ok((yield [("kvm.create_vm", create)]))[0]["vm"]
    try:
        created = yield from chunks.run(
            [("vm.create_vcpu", {"vm": vm, "vcpu_id": v["vcpu_id"]}) for v in snap["vcpus"]]
        )
        vcpus = [r["vcpu"] for r in created]
        pv = spec["pv_features"]
        if vcpus and pv is not None and pv != PV_FEATURES_DEFAULT:
            yield from chunks.run(
                [
                    (
                        "vcpu.set_attr",
                        {
                            "vcpu": vcpus[0],
                            "group": KVM_LOONGARCH_VCPU_CPUCFG,
                            "attr": CPUCFG_KVM_FEATURE,
                            "value": pv,
                        },
                    )
                ]
            )
        yield from chunks.run(
            [
                ("vcpu.set_one_reg", {"vcpu": h, "id": i, "value": value})
                for h, ws in zip(vcpus, writes_per_vcpu, strict=True)
                for i, value in ws
            ]
        )
        # vCPU attrs after the PV features they depend on (steal time needs its feature bit).
        yield from chunks.run([(m, {**p, "vcpu": vcpus[p["vcpu"]]}) for m, p in vcpu_attrs])
        made = yield from chunks.run(
            [("vm.create_device", {"vm": vm, "type": d["type"]}) for d in snap["devices"]]
        )
        devs = [r["device"] for r in made]
        for dev, d in zip(devs, snap["devices"], strict=True):
            yield from chunks.run(
                [
                    ("device.set_attr", {"device": dev, "group": g, "attr": a, "value": v})
                    for g, a, v in d["attrs"]
                ]
            )
        yield from chunks.run([("close", {"handle": h}) for h in (*vcpus, *devs)])
        if name is not None:
            yield from chunks.run([("vm.set_name", {"vm": vm, "name": name})])
    except KvmError:
        # Refused, so the connection works: take the half-built VM down now rather than
        # when this connection ends.
        yield [("vm.destroy", {"vm": vm})]
        raise
    return vm


def _fail(gen: Generator[Batch, Results, Any], exc: BaseException) -> None:
    """Throw a failure of the connection into ``gen``; it must not answer with requests."""
    try:
        gen.throw(exc)
    except StopIteration:
        return
    except BaseException as raised:
        if raised is exc:
            return
        raise
    gen.close()  # it yielded again: nobody can send that batch


def drive(gen: Generator[Batch, Results, T], send: Callable[[Batch], Results]) -> T:
    """Run a snapshot generator with a blocking batch sender (sync client, daemon).

    A failure of ``send`` (the connection) is thrown into the generator, which is then
    closed, and the failure goes on up.
    """
    try:
        batch = next(gen)
        while True:
            try:
                results = send(batch)
            except BaseException as exc:
                _fail(gen, exc)
                raise
            batch = gen.send(results)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    finally:
        gen.close()


async def adrive(
    gen: Generator[Batch, Results, T], send: Callable[[Batch], Awaitable[Results]]
) -> T:
    """``drive`` for an async batch sender (the trio client)."""
    try:
        batch = next(gen)
        while True:
            try:
                results = await send(batch)
            except BaseException as exc:
                _fail(gen, exc)
                raise
            batch = gen.send(results)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    finally:
        gen.close()


def encode(snap: dict[str, Any]) -> bytes:
    """The file's bytes: the msgpack map, then the SHA-256 of those bytes."""
    body: bytes = msgpack.packb(dict(snap, format=FORMAT, version=VERSION), use_bin_type=True)
    return body + hashlib.sha256(body).digest()


def _bad(source: str, why: str) -> KvmError:
    where = f"{source}: " if source else ""
    return KvmError("EINVAL", f"{where}not a usable lvz snapshot: {why}")


def _is_u64(v: object) -> bool:
    return type(v) is int and 0 <= v <= U64_MAX


def _unpack(data: bytes) -> object:
    return msgpack.unpackb(data, raw=False, strict_map_key=True)


def decode(data: bytes, source: str = "") -> dict[str, Any]:
    """Parse and check a snapshot file completely; raises EINVAL saying what is wrong.

    ``source`` (a path) starts every error message, so a user knows which file is refused.
    """
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if len(data) > _DIGEST and hashlib.sha256(body).digest() == digest:
        try:
            snap = _unpack(body)
        except Exception as exc:  # a digest over garbage: written by something else
            raise _bad(source, f"the file is not whole msgpack ({type(exc).__name__})") from None
        if not isinstance(snap, dict) or snap.get("version") != VERSION:
            raise _bad(source, "its version is not 2")
    else:
        try:
            snap = _unpack(data)
        except Exception:
            raise _bad(
                source, "its checksum does not match: the file is damaged or truncated"
            ) from None
        if not isinstance(snap, dict) or snap.get("version") != 1:
            # Version 1 files carry no digest; anything else that fails the digest is damage.
            raise _bad(
                source, "its checksum does not match: the file is damaged or truncated"
            ) from None
    return _check(snap, source)


def _check(snap: dict[str, Any], source: str) -> dict[str, Any]:
    if snap.get("format") != FORMAT:
        raise _bad(source, "it does not start with the lvz-snapshot format marker")
    vm = snap.get("vm")
    if (
        not isinstance(vm, dict)
        or type(vm.get("max_phyid")) is not int
        or not 1 <= vm["max_phyid"] <= MAX_PHYID_LIMIT
        or not (vm.get("name") is None or isinstance(vm.get("name"), str))
        or not (vm.get("pv_features") is None or _is_u64(vm.get("pv_features")))
        or not (vm.get("profile") is None or isinstance(vm.get("profile"), str))
    ):
        raise _bad(source, "the vm section is malformed")
    vcpus = snap.get("vcpus")
    if not isinstance(vcpus, list):
        raise _bad(source, "the vcpus section is malformed")
    for v in vcpus:
        if (
            not isinstance(v, dict)
            or type(v.get("vcpu_id")) is not int
            or not isinstance(v.get("regs"), list)
            or not all(
                isinstance(r, list) and len(r) == 2 and _is_u64(r[0]) and _is_u64(r[1])
                for r in v["regs"]
            )
            or not isinstance(v.get("attrs", []), list)
            or not all(
                isinstance(a, list) and len(a) == 3 and all(_is_u64(x) for x in a)
                for a in v.get("attrs", [])
            )
        ):
            raise _bad(source, "a vcpu entry is malformed")
    devices = snap.get("devices")
    if not isinstance(devices, list):
        raise _bad(source, "the devices section is malformed")
    for d in devices:
        if (
            not isinstance(d, dict)
            or not isinstance(d.get("type"), str)
            or not isinstance(d.get("attrs"), list)
            or not all(
                isinstance(a, list) and len(a) == 3 and all(_is_u64(x) for x in a)
                for a in d["attrs"]
            )
        ):
            raise _bad(source, "a device entry is malformed")
    snap["version"] = VERSION
    return snap
