"""The ``lvz`` command: run the daemon, inspect and drive its VMs, record and replay sessions.

Commands are noun then verb (``lvz vm create``, ``lvz reg get``), as ``ip`` and ``virsh`` are.
Every one but ``serve`` is a short session of the blocking client. Exit codes are part of the
interface (scripts branch on them), so every failure is mapped to one of a few, and no
traceback reaches the terminal for anything but a bug in lvz itself.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import os
import secrets
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, TextIO

import lvz
from lvz import __version__
from lvz.protocol import abi, profiles, snapshot
from lvz.protocol.abi import (
    DEV_EIOINTC,
    DEV_IPI,
    DEV_PCHPIC,
    I64_MIN,
    U32_MAX,
    U64_MAX,
)
from lvz.protocol.endpoint import resolve_socket_path
from lvz.protocol.errors import KvmError

from .core import printable
from .sync import EventsLost, IrqEvent, Kvm, PhyidMap, Vcpu, Vm

EXIT_OK: Final = 0
EXIT_IOCTL: Final = 1
EXIT_USAGE: Final = 2
EXIT_LVZ: Final = 125
EXIT_INTERRUPTED: Final = 130
EXIT_PIPE: Final = 141  # 128 + SIGPIPE: what a shell shows for a reader that went away

EPILOG: Final = """\
exit status:
  0    success
  1    the emulated ioctl failed (its errno name and message go to stderr);
       for replay: the daemon answered differently from the recording
  2    usage error (also: a value the protocol cannot carry, an unreadable input file)
  125  lvz itself failed, or the daemon is unreachable
  130  interrupted (Ctrl-C)
  141  the reader of our output went away (as a process killed by SIGPIPE)

endpoint: --socket PATH, else $LVZ_SOCKET, else $XDG_RUNTIME_DIR/lvz/lvz.sock
(or /tmp/lvz-$UID/lvz.sock).
VM: a name, or the id `lvz vms` shows (a name wins), so unnamed VMs can be inspected."""

log = logging.getLogger("lvz.cli")


class Fatal(Exception):
    """lvz itself cannot go on (exit 125); the message is for a person."""


class Usage(Exception):
    """The command line asks for something impossible (exit 2); the message says what."""


# --- output -------------------------------------------------------------------------------------


def table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], out: TextIO, indent: str = ""
) -> None:
    """Columns padded to fit; numbers right-aligned so digits line up."""
    cells = [[str(h) for h in headers]] + [
        ["-" if c is None else printable(str(c)) for c in r] for r in rows
    ]
    numeric = [
        all(isinstance(r[i], int) or r[i] is None for r in rows) and bool(rows)
        for i in range(len(headers))
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        parts = [
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(row, widths, numeric, strict=True)
        ]
        return (indent + "  ".join(parts)).rstrip()

    print(line(cells[0]), file=out)
    print(indent + "  ".join("-" * w for w in widths), file=out)
    for row in cells[1:]:
        print(line(row), file=out)


def emit_json(value: object, out: TextIO) -> None:
    json.dump(value, out, indent=2)
    out.write("\n")


def listing(
    args: argparse.Namespace,
    headers: Sequence[str],
    keys: Sequence[str],
    rows: Sequence[dict[str, Any]],
    empty: str,
    show: Callable[[str, Any], object] | None = None,
) -> int:
    """One listing in the format asked for: JSON gets raw values, the table readable ones."""
    if args.format == "json":
        emit_json(list(rows), sys.stdout)
    elif not rows:
        print(empty)
    else:
        fmt = show or (lambda _k, v: v)
        table(headers, [[fmt(k, r[k]) for k in keys] for r in rows], sys.stdout)
    return EXIT_OK


# --- connections --------------------------------------------------------------------------------


def _diagnose(path: Path, failure: OSError | None = None) -> str | None:
    """What is wrong with the socket path itself, said plainly, or None if it looks right."""
    try:
        st = path.stat()
    except FileNotFoundError:
        parent = path.parent
        if not parent.exists():
            return (
                f"{path}: no such file, and its directory {parent} does not exist "
                "(is the daemon running? start it with `lvz serve`)"
            )
        return f"{path}: no such file (is the daemon running? start it with `lvz serve`)"
    except PermissionError:
        return f"{path}: permission denied (the daemon serves only its own user)"
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    if stat.S_ISDIR(st.st_mode):
        return f"{path} is a directory, not a socket (give the socket file inside it)"
    if stat.S_ISREG(st.st_mode):
        return f"{path} is a regular file, not a socket"
    if not stat.S_ISSOCK(st.st_mode):
        return f"{path} is not a socket"
    if failure is not None and failure.errno == errno.ECONNREFUSED:
        return (
            f"{path}: ECONNREFUSED: nothing listens on this socket (its daemon is gone, "
            "killed perhaps; `lvz serve` replaces the stale file)"
        )
    return None


class _Tracer:
    """``-vv``: every request and its answer, on stderr, as the client sends them."""

    def __init__(self, call: Callable[[str, dict[str, Any]], dict[str, Any]]) -> None:
        self._call = call

    def __call__(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        log.debug("→ %s %s", method, params)
        try:
            result = self._call(method, params)
        except KvmError as err:
            log.debug("← %s %s: %s", method, err.name, err.message)
            raise
        log.debug("← %s %s", method, result)
        return result


def connect(args: argparse.Namespace) -> Kvm:
    """The daemon named on the command line; unreachable → a sentence naming the path."""
    path = resolve_socket_path(args.socket)
    log.info("connecting to %s", path)
    try:
        kvm = Kvm.connect(path)
    except ConnectionError as exc:
        raise Fatal(_diagnose(path, exc) or str(exc)) from None
    log.info("connected to %s: %s, protocol %d", path, kvm.info.server, kvm.info.protocol)
    if log.isEnabledFor(logging.DEBUG):
        kvm.call = _Tracer(kvm.call)  # type: ignore[method-assign]
    return kvm


def open_vm(kvm: Kvm, ref: str) -> Vm:
    """A VM by name, else (for an all-digits reference) by the id ``lvz vms`` shows."""
    try:
        return kvm.open_vm(ref)
    except KvmError as err:
        if err.name != "ENOENT" or not ref.isdigit():
            raise
    try:
        handle = kvm.call("kvm.open_vm_id", {"id": int(ref)})["vm"]
    except KvmError as err:
        if err.name == "ENOENT":
            raise KvmError("ENOENT", f"no VM named {ref!r} and none with id {ref}") from None
        raise
    vm = Vm(kvm, int(handle))
    vm.name = vm.info().name
    return vm


def list_vms(kvm: Kvm) -> list[dict[str, Any]]:
    rows = kvm.call("kvm.list_vms", {})["vms"]
    return [
        {
            "id": r.get("id"),
            "name": r.get("name"),
            "vcpus": r.get("vcpus"),
            "phyids": r.get("phyids"),
            "max_phyid": r.get("max_phyid"),
            "devices": r.get("devices"),
        }
        for r in rows
    ]


# --- serve, and the read-only listings that predate the nouns -----------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    # The only place clients/ touches the daemon: in-process, through its public entry point.
    from lvz.daemon import server
    from lvz.daemon.config import ServeConfig

    options: dict[str, Any] = {}
    for name in (
        "max_message",
        "max_handles",
        "max_vms",
        "max_vcpus",
        "max_total_vcpus",
        "max_events",
        "plugin_timeout",
        "max_connections",
        "partial_budget",
        "message_timeout",
    ):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.state_dir is not None:
        options["state_dir"] = Path(args.state_dir)
    if args.fsync is not None:
        options["fsync"] = args.fsync
    if args.record is not None:
        options["record"] = Path(args.record)
    config = ServeConfig(
        socket=resolve_socket_path(args.socket), exit_with_parent=args.exit_with_parent, **options
    )
    return server.run(config, args.verbose)


def cmd_vms(args: argparse.Namespace) -> int:
    with connect(args) as kvm:
        rows = list_vms(kvm)
    return listing(
        args,
        ["ID", "NAME", "VCPUS", "PHYIDS", "MAX_PHYID", "DEVICES"],
        ["id", "name", "vcpus", "phyids", "max_phyid", "devices"],
        rows,
        "no VMs",
        lambda k, v: "(unnamed)" if k == "name" and v is None else v,
    )


def cmd_map(args: argparse.Namespace) -> int:
    with connect(args) as kvm:
        vm = open_vm(kvm, args.vm)
        pmap = vm.phyid_map()
        info = vm.info()
    mapped = set(pmap.by_vcpu())
    if args.format == "json":
        emit_json(
            {
                "vm": args.vm,
                "limit": pmap.limit,
                "entries": [{"phyid": p, "vcpu_id": v} for p, v in pmap.entries],
                "unset": [v for v in info.vcpus if v not in mapped],
            },
            sys.stdout,
        )
        return EXIT_OK
    print(
        f"VM {args.vm}: {len(pmap.entries)} of {len(info.vcpus)} vCPUs mapped, "
        f"phyids 0..{pmap.limit - 1}"
    )
    if pmap.entries:
        table(["PHYID", "VCPU"], [list(e) for e in pmap.entries], sys.stdout)
    unset = [v for v in info.vcpus if v not in mapped]
    if unset:
        print(f"unset (CPUID reads {pmap.limit}): vCPU " + ", ".join(map(str, unset)))
    return EXIT_OK


class ProgressBar:
    """A one-line bar on stderr for snapshot work that takes longer than a second.

    Drawn only when stderr and stdout are terminals (never into a pipe, a log or a test's
    capture), at most ten times a second, and erased when done.
    """

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.on = self.stream.isatty() and sys.stdout.isatty()
        self.start = time.monotonic()
        self.last = 0.0
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.on:
            return
        now = time.monotonic()
        if now - self.start < 1.0 or now - self.last < 0.1:
            return
        self.last = now
        width = 30
        filled = width * done // max(total, 1)
        self.stream.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
            f"{100 * done // max(total, 1):3d}%"
        )
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()


def write_atomically(target: Path, data: bytes) -> None:
    """Write ``target`` whole or not at all: a temporary beside it, fsync, rename.

    Every failure names ``target``; the temporary never outlives this call.
    """
    if target.is_dir():
        raise Fatal(f"cannot write {target}: it is a directory (give a file name)")
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise Fatal(f"cannot write {target}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise Fatal(f"cannot write {target}: {exc.strerror or exc}") from None
        raise


def cmd_snapshot(args: argparse.Namespace) -> int:
    target = Path(args.file)
    if target.is_dir():
        raise Fatal(f"cannot write {target}: it is a directory (give a file name)")
    bar = ProgressBar(f"saving {args.vm}")
    try:
        with connect(args) as kvm:
            vm = open_vm(kvm, args.vm)
            saved = snapshot.drive(snapshot.save_vm(vm.handle, bar), kvm.call_batch)
    except KvmError as err:
        raise KvmError(err.name, f"{target}: VM {args.vm} not saved: {err.message}") from None
    except ConnectionError as err:
        raise Fatal(f"{target}: VM {args.vm} not saved: {err}") from None
    finally:
        bar.close()
    data = snapshot.encode(saved)
    write_atomically(target, data)
    print(
        f"saved VM {args.vm}: {len(saved['vcpus'])} vCPUs, {len(saved['devices'])} devices, "
        f"{len(data)} bytes -> {target}"
    )
    return EXIT_OK


def _oserror(exc: OSError) -> str:
    """'ENOENT: No such file or directory': the errno's name, then what it means."""
    name = errno.errorcode.get(exc.errno or 0)
    text = exc.strerror or str(exc)
    return f"{name}: {text}" if name else text


def cmd_restore(args: argparse.Namespace) -> int:
    try:
        data = Path(args.file).read_bytes()
    except OSError as exc:
        # An input file that cannot be read is a usage error (exit 2), as for lvz replay.
        raise Usage(f"cannot read {args.file}: {_oserror(exc)}") from None
    saved = snapshot.decode(data, args.file)  # EINVAL (exit 1) before anything is created
    name = args.name if args.name is not None else saved["vm"]["name"]
    if name is None:
        raise Usage(
            f"{args.file} is a snapshot of an unnamed VM; give it a name with --name "
            "(an unnamed VM would die when this command disconnects)"
        )
    bar = ProgressBar(f"restoring {name}")
    try:
        with connect(args) as kvm:
            snapshot.drive(snapshot.restore_vm(saved, name, bar), kvm.call_batch)
    except KvmError as err:
        raise KvmError(err.name, f"{args.file}: not restored: {err.message}") from None
    except ConnectionError as err:
        raise Fatal(f"{args.file}: not restored (nothing of it is left): {err}") from None
    finally:
        bar.close()
    print(f"restored VM {name}: {len(saved['vcpus'])} vCPUs, {len(saved['devices'])} devices")
    return EXIT_OK


def cmd_lookup(args: argparse.Namespace) -> int:
    with connect(args) as kvm:
        vcpu_id = open_vm(kvm, args.vm).phyid_lookup(args.phyid)
    if args.format == "json":
        emit_json({"vm": args.vm, "phyid": args.phyid, "vcpu_id": vcpu_id}, sys.stdout)
    elif vcpu_id is None:
        print(f"phyid {args.phyid}: no vCPU")
    else:
        print(f"phyid {args.phyid} → vCPU {vcpu_id}")
    return EXIT_OK


def cmd_plugins(args: argparse.Namespace) -> int:
    with connect(args) as kvm:
        plugins = kvm.list_plugins()
    rows = [
        {"name": p.name, "version": p.version, "dist": p.dist, "device_types": list(p.device_types)}
        for p in plugins
    ]
    return listing(
        args,
        ["NAME", "VERSION", "DIST", "DEVICE TYPES"],
        ["name", "version", "dist", "device_types"],
        rows,
        "no plugins",
        lambda k, v: ", ".join(v) or "-" if k == "device_types" else v,
    )


# --- vm -----------------------------------------------------------------------------------------


def cmd_profiles(args: argparse.Namespace) -> int:
    """The kernel profiles ``kvm.create_vm`` takes, newest first, each with what it changes.

    Read from lvz.protocol.profiles, the table the daemon itself resolves, so no daemon is
    needed (like ``lvz completion``).
    """
    rows = [
        {
            "name": name,
            "summary": profiles.SUMMARY[name],
            "changes": [
                {
                    "key": r.key,
                    "value": list(r.value) if isinstance(r.value, tuple) else r.value,
                    "change": r.change,
                }
                for r in profiles.rows_of(name)
            ],
        }
        for name in profiles.PROFILES
    ]
    return listing(
        args,
        ["PROFILE", "KERNEL", "DIFFERS FROM THE NEXT NEWER"],
        ["name", "summary", "changes"],
        rows,
        "no profiles",
        lambda k, v: (
            (", ".join(f"{c['key']}={c['value']}" for c in v) or "-") if k == "changes" else v
        ),
    )


def cmd_vm_create(args: argparse.Namespace) -> int:
    with connect(args) as kvm:
        kvm.create_vm(name=args.name, max_phyid=args.max_phyid, profile=args.profile)
        ids = [r["id"] for r in list_vms(kvm) if r["name"] == args.name]
    print(f"created VM {args.name} (id {ids[0] if ids else '?'})")
    return EXIT_OK


def cmd_vm_destroy(args: argparse.Namespace) -> int:
    with connect(args) as kvm:
        open_vm(kvm, args.vm).destroy()
    print(f"destroyed VM {args.vm}")
    return EXIT_OK


def cmd_vm_info(args: argparse.Namespace) -> int:
    with connect(args) as kvm:
        vm = open_vm(kvm, args.vm)
        raw = vm.kvm.call("vm.info", {"vm": vm.handle})
        pmap = vm.phyid_map()
        vm_id = (
            int(args.vm)
            if raw["name"] is None
            else next((r["id"] for r in list_vms(kvm) if r["name"] == raw["name"]), None)
        )
    info = {
        "id": vm_id,
        "name": raw["name"],
        "max_phyid": raw["max_phyid"],
        "vcpus": list(raw["vcpus"]),
        "phyids_set": len(pmap.entries),
        "devices": list(raw["devices"]),
        "seq": raw.get("seq"),
        "profile": raw.get("profile"),
    }
    if args.format == "json":
        emit_json(info, sys.stdout)
        return EXIT_OK
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(map(str, value)) or "-"
        print(f"{key:<{width}}  {'-' if value is None else printable(str(value))}")
    return EXIT_OK


# --- vcpu ---------------------------------------------------------------------------------------


def cmd_vcpu_create(args: argparse.Namespace) -> int:
    with connect(args) as kvm:
        vcpu = open_vm(kvm, args.vm).create_vcpu(args.vcpu_id)
        if args.phyid is not None:
            vcpu.set_one_reg(abi.CPUID, args.phyid)
    at = "" if args.phyid is None else f" at phyid {args.phyid}"
    print(f"created vCPU {args.vcpu_id}{at} in VM {printable(args.vm)}")
    return EXIT_OK


LINE_NAMES: Final = abi.LINE_NAMES


def raised_lines(estat: int) -> list[str]:
    """The interrupt lines (PROTOCOL.md §6) that are up in an ESTAT value."""
    return [name for bit, name in sorted(LINE_NAMES.items()) if estat >> bit & 1]


def cmd_vcpu_ls(args: argparse.Namespace) -> int:
    rows = []
    with connect(args) as kvm:
        vm = open_vm(kvm, args.vm)
        info = vm.info()
        phyid_of = vm.phyid_map().by_vcpu()
        for vcpu_id in info.vcpus:
            with vm.open_vcpu(vcpu_id) as vcpu:  # one handle at a time, whatever the VM's size
                estat = vcpu.get_one_reg(abi.ESTAT)
            rows.append(
                {
                    "vcpu_id": vcpu_id,
                    "phyid": phyid_of.get(vcpu_id),
                    "lines": raised_lines(estat),
                    "estat": estat,
                }
            )
    return listing(
        args,
        ["VCPU", "PHYID", "LINES", "ESTAT"],
        ["vcpu_id", "phyid", "lines", "estat"],
        rows,
        "no vCPUs",
        lambda k, v: (", ".join(v) or "-") if k == "lines" else f"{v:#x}" if k == "estat" else v,
    )


# --- registers ----------------------------------------------------------------------------------


def register_names() -> dict[str, int]:
    """Public register-id constants of ``lvz.protocol.abi`` by name (``cpuid``, ``estat``…)."""
    names: dict[str, int] = {}
    for key, value in vars(abi).items():
        if (
            key.isupper()
            and type(value) is int
            and value & abi.KVM_REG_LOONGARCH == abi.KVM_REG_LOONGARCH
            and key.lower() not in names
            and _is_register(value)
        ):
            names[key.lower()] = value
    return names


def _is_register(value: int) -> bool:
    try:
        abi.decode(value)
    except KvmError:
        return False
    return True


def parse_register(text: str) -> int:
    """A register id from a name (``cpuid``), ``csr:0x20`` / ``cpucfg:2``, or a raw id."""
    low = text.lower()
    names = register_names()
    if low in names:
        return names[low]
    kind, sep, index = low.partition(":")
    if sep and kind in ("csr", "cpucfg"):
        number = _any_int(index)
        if not 0 <= number <= abi.KVM_REG_INDEX_MASK >> abi.KVM_REG_INDEX_SHIFT:
            raise argparse.ArgumentTypeError(f"{kind} index out of range: {index}")
        return abi.csr_id(number) if kind == "csr" else abi.cpucfg_id(number)
    try:
        return _u64(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"unknown register {text!r}: use a name ({', '.join(sorted(names))}), "
            "csr:N, cpucfg:N or a 64-bit register id"
        ) from None


def register_label(reg_id: int) -> str:
    for name, value in register_names().items():
        if value == reg_id:
            return name
    cls = reg_id & abi.KVM_REG_LOONGARCH_MASK
    index = (reg_id & abi.KVM_REG_INDEX_MASK) >> abi.KVM_REG_INDEX_SHIFT
    if cls == abi.RegClass.CSR:
        return f"csr:{index:#x}"
    if cls == abi.RegClass.CPUCFG:
        return f"cpucfg:{index}"
    return f"{reg_id:#x}"


def _vcpu(kvm: Kvm, args: argparse.Namespace) -> Vcpu:
    return open_vm(kvm, args.vm).open_vcpu(args.vcpu)


def cmd_reg_get(args: argparse.Namespace) -> int:
    with connect(args) as kvm:
        value = _vcpu(kvm, args).get_one_reg(args.reg)
    if args.format == "json":
        emit_json({"id": args.reg, "name": register_label(args.reg), "value": value}, sys.stdout)
    else:
        print(f"{register_label(args.reg)} = {value:#x} ({value})")
    return EXIT_OK


def cmd_reg_set(args: argparse.Namespace) -> int:
    with connect(args) as kvm:
        vcpu = _vcpu(kvm, args)
        vcpu.set_one_reg(args.reg, args.value)
        now = vcpu.get_one_reg(args.reg)
    print(f"{register_label(args.reg)} = {now:#x} ({now})")
    return EXIT_OK


def cmd_reg_ls(args: argparse.Namespace) -> int:
    with connect(args) as kvm:
        vcpu = _vcpu(kvm, args)
        ids = [int(i) for i in kvm.call("vcpu.get_reg_list", {"vcpu": vcpu.handle})["ids"]]
        rows = [{"id": i, "name": register_label(i), "value": vcpu.get_one_reg(i)} for i in ids]
    return listing(
        args,
        ["REGISTER", "ID", "VALUE"],
        ["name", "id", "value"],
        rows,
        "no registers",
        lambda k, v: f"{v:#x}" if k in ("id", "value") else v,
    )


# --- device and vCPU attributes -----------------------------------------------------------------


def attr_names(kind: str) -> dict[str, int]:
    """Attribute group (``kind`` "group") or attr ("attr") names from ``lvz.protocol.abi``.

    Each by its constant's name and by a short one without the ``KVM_DEV_LOONGARCH_`` /
    ``KVM_LOONGARCH_VCPU_`` prefix (``pch_pic_grp_ctrl``, ``pvtime_ctrl``), lower case. Register
    and offset attrs are computed from a vCPU and an offset, so they stay numbers.
    """
    names: dict[str, int] = {}
    for key, value in vars(abi).items():
        if not (key.isupper() and type(value) is int):
            continue
        if key.startswith("KVM_DEV_LOONGARCH_"):
            short = key.removeprefix("KVM_DEV_LOONGARCH_")
            wanted = "_GRP_" in short if kind == "group" else "_CTRL_" in short
        elif key.startswith("KVM_LOONGARCH_VCPU_"):
            short = key.removeprefix("KVM_LOONGARCH_VCPU_")
            wanted = (key != "KVM_LOONGARCH_VCPU_PVTIME_GPA") == (kind == "group")
        elif key == "CPUCFG_KVM_FEATURE":
            short, wanted = key, kind == "attr"
        else:
            continue
        if wanted:
            names[key.lower()] = names[short.lower()] = value
    return names


def _attr_number(kind: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        names = attr_names(kind)
        if text.lower() in names:
            return names[text.lower()]
        try:
            return _u64(text)
        except argparse.ArgumentTypeError:
            short = sorted(n for n in names if not n.startswith("kvm_"))
            raise argparse.ArgumentTypeError(
                f"{text!r} is neither a number nor an attribute {kind} name ({', '.join(short)})"
            ) from None

    return parse


def cmd_device_create(args: argparse.Namespace) -> int:
    text: str = args.type
    dev_type = SHORT_DEVICES.get(text.lower(), text)
    with connect(args) as kvm:
        open_vm(kvm, args.vm).create_device(dev_type)
    print(f"created device {printable(dev_type)} in VM {printable(args.vm)}")
    return EXIT_OK


def cmd_device_ls(args: argparse.Namespace) -> int:
    with connect(args) as kvm:
        devices = open_vm(kvm, args.vm).info().devices
    return listing(
        args,
        ["DEVICE"],
        ["type"],
        [{"type": d} for d in devices],
        "no devices",
        lambda _k, v: printable(str(v)),
    )


SHORT_DEVICES: Final = {
    "ipi": DEV_IPI,
    "eiointc": DEV_EIOINTC,
    "pchpic": DEV_PCHPIC,
    "pch-pic": DEV_PCHPIC,
}


def _attr_target(kvm: Kvm, args: argparse.Namespace) -> tuple[str, Any]:
    """``vcpuN`` / ``vcpu:N`` is a vCPU's attrs; anything else a device type (short or full)."""
    vm = open_vm(kvm, args.vm)
    text: str = args.target
    low = text.lower().replace(":", "")
    if low.startswith("vcpu") and low[4:].isdigit():
        return f"vCPU {low[4:]}", vm.open_vcpu(int(low[4:]))
    dev_type = SHORT_DEVICES.get(low, text)
    return dev_type, vm.open_device(dev_type)


def cmd_attr_get(args: argparse.Namespace) -> int:
    with connect(args) as kvm:
        label, target = _attr_target(kvm, args)
        value = target.get_attr(args.group, args.attr)
    if args.format == "json":
        emit_json(
            {"target": label, "group": args.group, "attr": args.attr, "value": value}, sys.stdout
        )
    else:
        print(f"{label} group {args.group:#x} attr {args.attr:#x} = {value:#x} ({value})")
    return EXIT_OK


def cmd_attr_set(args: argparse.Namespace) -> int:
    with connect(args) as kvm:
        label, target = _attr_target(kvm, args)
        target.set_attr(args.group, args.attr, args.value)
    print(f"{label} group {args.group:#x} attr {args.attr:#x} := {args.value:#x}")
    return EXIT_OK


# --- interrupts ---------------------------------------------------------------------------------


def cmd_irq(args: argparse.Namespace) -> int:
    with connect(args) as kvm:
        open_vm(kvm, args.vm).irq_line(args.gsi, args.level)
    print(f"irq line {args.gsi} := {args.level}")
    return EXIT_OK


def cmd_msi(args: argparse.Namespace) -> int:
    with connect(args) as kvm:
        open_vm(kvm, args.vm).signal_msi(args.addr, args.data)
    print(f"MSI address {args.addr:#x} data {args.data}")
    return EXIT_OK


def cmd_why(args: argparse.Namespace) -> int:
    """Why an interrupt goes where it goes: the hops, then where it ends (exit 0 either way)."""
    want = 2 if args.kind == "msi" else 1
    if len(args.numbers) != want:
        shape = "ADDR DATA" if args.kind == "msi" else "N"
        raise Usage(f"`why VM {args.kind}` takes {shape}, not {len(args.numbers)} number(s)")
    with connect(args) as kvm:
        vm = open_vm(kvm, args.vm)
        if args.kind == "pin":
            route = vm.explain_route(args.numbers[0], level=args.level)
        elif args.kind == "msi":
            route = vm.explain_route(msi=(args.numbers[0], args.numbers[1]), level=args.level)
        else:
            route = vm.explain_route(eiointc_irq=args.numbers[0], level=args.level)
    if args.format == "json":
        emit_json(dataclasses.asdict(route), sys.stdout)
    else:
        print(route)
    return EXIT_OK


#: Seconds without events after which ``lvz events`` checks that its VM still exists.
DESTROY_CHECK: Final = 1.0


def cmd_events(args: argparse.Namespace) -> int:
    """Follow a VM's line changes until Ctrl-C, ``--count`` events or ``--timeout`` quiet."""
    with connect(args) as kvm:
        vm = open_vm(kvm, args.vm)
        vm.subscribe()
        print(
            f"lvz events: watching VM {args.vm}"
            + (" (Ctrl-C to stop)" if args.count is None else ""),
            file=sys.stderr,
            flush=True,
        )
        if args.format == "table":
            print(f"{'SEQ':>8}  {'VCPU':>6}  {'LINE':<5}  LEVEL", flush=True)
        seen = 0
        timeout: float | None = args.timeout
        quiet_until = None if timeout is None else time.monotonic() + timeout
        while args.count is None or seen < args.count:
            # The protocol has no "VM destroyed" event: look every DESTROY_CHECK quiet seconds,
            # or a watch on a destroyed VM would wait for ever (or --timeout) and exit 0.
            wait = (
                DESTROY_CHECK
                if quiet_until is None
                else max(0.0, min(DESTROY_CHECK, quiet_until - time.monotonic()))
            )
            item = vm.next_event(wait)
            if item is None:
                if quiet_until is not None and time.monotonic() >= quiet_until:
                    break
                try:
                    vm.info()
                except KvmError as err:
                    if err.name != "EBADF":
                        raise
                    raise KvmError("EBADF", f"VM {args.vm} was destroyed") from None
                continue
            if timeout is not None:
                quiet_until = time.monotonic() + timeout
            if isinstance(item, EventsLost):
                row: dict[str, Any] = {"event": "events_lost", "count": item.count}
                text = f"{'':>8}  ({item.count} events lost: the reader fell behind)"
            else:
                seen += 1
                row = {
                    "event": "irq",
                    "seq": item.seq,
                    "vcpu_id": item.vcpu_id,
                    "irq": item.irq,
                    "line": LINE_NAMES.get(item.irq, str(item.irq)),
                    "level": item.level,
                }
                text = (
                    f"{item.seq:>8}  {item.vcpu_id:>6}  {row['line']:<5}  "
                    f"{'up' if item.level else 'down'}"
                )
            if args.format == "json":
                print(json.dumps(row), flush=True)
            else:
                print(text, flush=True)
    return EXIT_OK


# --- demo ---------------------------------------------------------------------------------------

#: vcpu_id i gets DEMO_PHYIDS[i]: sparse, and deliberately not vcpu_id order, so that every
#: routed interrupt below shows the map (not the vcpu_id) choosing its target.
DEMO_PHYIDS: Final = (255, 200, 128, 99, 42, 17, 2, 0)
IOCSR_IPI_SEND: Final = abi.IOCSR_IPI_BASE + abi.IPI_SEND
IOCSR_EIOINTC_ENABLE: Final = abi.EIOINTC_BASE + abi.EIOINTC_ENABLE
IOCSR_EIOINTC_COREMAP: Final = abi.EIOINTC_BASE + abi.EIOINTC_COREMAP
PCHPIC_GRP_CTRL: Final = abi.KVM_DEV_LOONGARCH_PCH_PIC_GRP_CTRL
PCHPIC_CTRL_INIT: Final = abi.KVM_DEV_LOONGARCH_PCH_PIC_CTRL_INIT
PCHPIC_BASE: Final = abi.VIRT_PCH_PIC_BASE
PCHPIC_MASK: Final = abi.PCH_PIC_MASK
HCALL_SERVICE: Final = abi.KVM_HCALL_SERVICE
HCALL_FUNC_IPI: Final = abi.KVM_HCALL_FUNC_IPI
MSI_ADDRESS: Final = abi.VIRT_PCH_MSI_ADDR


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(os.fspath(path))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def private_daemon(
    verbose: int = 0,
    timeout: float = 15.0,
    extra: Sequence[str] = (),
    plugins: Sequence[str] | None = None,
) -> Iterator[Path]:
    """A daemon of our own (lvz.testing.spawn, as the test fixtures start theirs), stopped after."""
    from lvz.testing.spawn import SpawnError, spawn

    try:
        daemon = spawn(*extra, verbose=verbose, timeout=timeout, plugins=plugins)
    except SpawnError as exc:
        raise Fatal(str(exc)) from None
    with daemon:
        yield daemon.socket


def _attempt(action: Callable[[], object]) -> str:
    """What the daemon answered, as the errno name (``"ok"`` for success)."""
    try:
        action()
    except KvmError as err:
        return err.name
    return "ok"


class Demo:
    """The scripted tour; each ``check`` prints one verdict and remembers what differed."""

    def __init__(self, kvm: Kvm, out: TextIO) -> None:
        self.kvm = kvm
        self.out = out
        self.failures: list[str] = []
        self.steps = 0

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def check(self, label: str, ok: bool, detail: str, expected: str = "") -> None:
        self.steps += 1
        self.say(f"  {'ok  ' if ok else 'FAIL'}  {label:<18} {detail}")
        if not ok:
            self.failures.append(f"{label}: got {detail}, expected {expected}")
            self.say(f"{'':26} expected {expected}")

    def show_map(self, vm: Vm) -> PhyidMap:
        pmap = vm.phyid_map()
        table(["PHYID", "VCPU"], [list(e) for e in pmap.entries], self.out, indent="  ")
        return pmap

    def run(self) -> int:
        name = f"demo-{os.getpid()}-{secrets.token_hex(2)}"
        vm = self.kvm.create_vm(name=name)
        try:
            self._tour(vm)
        finally:
            with contextlib.suppress(KvmError):
                vm.destroy()
        self.say()
        if self.failures:
            self.say(f"{len(self.failures)} of {self.steps} steps differed:")
            for failure in self.failures:
                self.say(f"  - {failure}")
            return EXIT_IOCTL
        self.say(f"All {self.steps} steps behaved as expected.")
        return EXIT_OK

    def _tour(self, vm: Vm) -> None:
        vcpus = {i: vm.create_vcpu(i) for i in range(len(DEMO_PHYIDS))}
        for i, phyid in enumerate(DEMO_PHYIDS):
            vcpus[i].set_one_reg(abi.CPUID, phyid)
        self.say(f"VM {vm.name}: {len(vcpus)} vCPUs, CPUID set with KVM_SET_ONE_REG")
        self.say()
        self.show_map(vm)
        self.say()
        self.say("Rules of the map (kvm_set_cpuid), with the errno the daemon answered:")
        self._rules(vm, vcpus)
        self.say()
        self.say("Map after the rules:")
        self.show_map(vm)
        self.say()
        wanted = {DEV_IPI, DEV_EIOINTC, DEV_PCHPIC}
        missing = wanted - set(self.kvm.info.device_types)
        if missing:
            self.say(f"Routing skipped: the daemon has no {', '.join(sorted(missing))}.")
            return
        self.say("Interrupt routing, each target found through the map:")
        self._routing(vm, vcpus)

    def _rules(self, vm: Vm, vcpus: dict[int, Vcpu]) -> None:
        v0, p0 = vcpus[0], DEMO_PHYIDS[0]
        got = _attempt(lambda: v0.set_one_reg(abi.CPUID, p0))
        now = v0.get_one_reg(abi.CPUID)
        self.check(
            "same value again",
            got == "ok" and now == p0,
            f"vCPU 0 := {p0} again → {got}, CPUID {now}",
            f"ok, CPUID {p0}",
        )

        got = _attempt(lambda: v0.set_one_reg(abi.CPUID, 7))
        now = v0.get_one_reg(abi.CPUID)
        free = vm.phyid_lookup(7)
        self.check(
            "change refused",
            got == "EINVAL" and now == p0 and free is None,
            f"vCPU 0 := 7 → {got}, CPUID {now}",
            f"EINVAL, CPUID {p0}",
        )

        v8 = vcpus[8] = vm.create_vcpu(8)
        limit = vm.info().max_phyid
        got = _attempt(lambda: v8.set_one_reg(abi.CPUID, p0))
        now = v8.get_one_reg(abi.CPUID)
        owner = vm.phyid_lookup(p0)
        self.check(
            "sharing refused",
            got == "EINVAL" and now == limit and owner == 0,
            f"vCPU 8 := {p0} → {got}, CPUID {now} (unset)",
            f"EINVAL, CPUID {limit}",
        )

        p3 = DEMO_PHYIDS[3]
        vcpus.pop(3).destroy()
        freed = vm.phyid_lookup(p3)
        got = _attempt(lambda: v8.set_one_reg(abi.CPUID, p3))
        owner = vm.phyid_lookup(p3)
        self.check(
            "destroy then reuse",
            freed is None and got == "ok" and owner == 8,
            f"destroy vCPU 3; vCPU 8 := {p3} → {got}, {p3} is vCPU {owner}",
            f"ok, {p3} is vCPU 8",
        )

    def _collect(self, vm: Vm, expected: set[tuple[int, int]]) -> set[tuple[int, int]]:
        """Rising lines seen: what has arrived, waiting briefly only for what is still missing."""
        seen: set[tuple[int, int]] = set()
        deadline = time.monotonic() + 2.0
        timeout = 0.0
        while True:
            item = vm.next_event(timeout)
            if item is None:
                if expected <= seen or time.monotonic() >= deadline:
                    return seen
                timeout = max(0.0, deadline - time.monotonic())
                continue
            if isinstance(item, EventsLost):
                self.say(f"        ({item.count} events lost)")
            elif isinstance(item, IrqEvent) and item.level:
                seen.add((item.vcpu_id, item.irq))
            timeout = 0.0 if expected <= seen else max(0.0, deadline - time.monotonic())

    def _report(self, label: str, detail: str, vm: Vm, expected: set[tuple[int, int]]) -> None:
        seen = self._collect(vm, expected)
        phyid_of = vm.phyid_map().by_vcpu()

        def show(pairs: set[tuple[int, int]]) -> str:
            return ", ".join(f"vCPU {v} {LINE_NAMES.get(i, i)}" for v, i in sorted(pairs)) or "none"

        self.check(label, seen == expected, detail, show(expected))
        for vcpu_id, irq in sorted(seen):
            self.say(
                f"{'':26} → vCPU {vcpu_id} (phyid {phyid_of.get(vcpu_id, '-')}) "
                f"{LINE_NAMES.get(irq, irq)}"
            )

    def _routing(self, vm: Vm, vcpus: dict[int, Vcpu]) -> None:
        vm.create_device(DEV_IPI)
        vm.create_device(DEV_EIOINTC)
        pch = vm.create_device(DEV_PCHPIC)
        vm.subscribe()
        by_phyid = vm.phyid_map().by_phyid()
        sender = vcpus[0]

        # 1. IPI device: a guest store to IPI_SEND names the target by phyid.
        target, vector = 42, 1
        sender.iocsr_write(IOCSR_IPI_SEND, 4, abi.ipi_send(target, vector))
        self._report(
            "IPI", f"vCPU 0 IPI_SEND to phyid {target}", vm, {(by_phyid[target], abi.INT_IPI)}
        )

        # 2. PV IPI: hvcl KVM_HCALL_SERVICE with a 128-bit bitmap relative to a base phyid,
        # clustered the way Linux's pv_send_ipi_mask does when the targets span more than 128 ids.
        phyids = sorted(by_phyid)
        clusters: dict[int, int] = {}
        for phyid in phyids:
            base = next((b for b in clusters if b <= phyid < b + 128), phyid)
            clusters[base] = clusters.get(base, 0) | 1 << (phyid - base)
        answers = []
        for base, bitmap in clusters.items():
            answers.append(
                sender.hypercall(
                    HCALL_SERVICE, HCALL_FUNC_IPI, bitmap & U64_MAX, bitmap >> 64, base
                )
            )
        self._report(
            "PV IPI",
            f"hvcl {HCALL_SERVICE:#x} to {len(phyids)} phyids, "
            f"{len(clusters)} calls → a0 {answers}",
            vm,
            {(v, abi.INT_SWI0) for v in by_phyid.values()}
            if set(answers) == {abi.KVM_HCALL_SUCCESS}
            else set(),
        )

        # 3. A device interrupt: PCH-PIC pin → EIOINTC irq (= pin) → COREMAP → phyid → HWI0.
        pin, dev_phyid = 5, 0
        pch.set_attr(PCHPIC_GRP_CTRL, PCHPIC_CTRL_INIT, PCHPIC_BASE)
        sender.mmio_write(PCHPIC_BASE + PCHPIC_MASK, 8, U64_MAX & ~(1 << pin))
        sender.iocsr_write(IOCSR_EIOINTC_ENABLE, 4, 1 << pin)
        sender.iocsr_write(IOCSR_EIOINTC_COREMAP + pin, 1, 1 << dev_phyid)
        vm.irq_line(pin, 1)
        self._report(
            "device interrupt",
            f"pin {pin} → EIOINTC {pin} → phyid {dev_phyid}",
            vm,
            {(by_phyid[dev_phyid], abi.INT_HWI0)},
        )
        vm.irq_line(pin, 0)

        # 4. MSI: the data is the EIOINTC irq; bitmap-mode coremap bit n names phyid n.
        irq, msi_phyid = 66, 2
        sender.iocsr_write(IOCSR_EIOINTC_ENABLE + irq // 32 * 4, 4, 1 << (irq % 32))
        sender.iocsr_write(IOCSR_EIOINTC_COREMAP + irq, 1, 1 << msi_phyid)
        vm.signal_msi(MSI_ADDRESS, irq)
        self._report(
            "MSI",
            f"data {irq} → EIOINTC {irq} → phyid {msi_phyid}",
            vm,
            {(by_phyid[msi_phyid], abi.INT_HWI0)},
        )


def cmd_demo(args: argparse.Namespace) -> int:
    explicit = args.socket or os.environ.get("LVZ_SOCKET")
    if explicit and _accepts(Path(explicit)):
        if args.record:
            raise Usage(
                "--record records a private daemon; to record a daemon of your own, "
                "start it with `lvz serve --record FILE`"
            )
        print(f"lvz demo: using the daemon at {explicit}")
        with Kvm.connect(explicit) as kvm:
            return Demo(kvm, sys.stdout).run()
    if explicit:
        print(f"lvz demo: nothing answers at {explicit}; starting a private daemon")
    extra = ["--record", os.path.abspath(args.record)] if args.record else []
    with private_daemon(args.verbose, extra=extra) as path:
        print(f"lvz demo: private daemon at {path}")
        with Kvm.connect(path) as kvm:
            return Demo(kvm, sys.stdout).run()


def cmd_replay(args: argparse.Namespace) -> int:
    from lvz.protocol.recording import RecordingError

    from .replay import read_header, read_recording, replay, to_pytest

    path = Path(args.file)
    try:
        next(read_recording(path), None)  # a bad file is refused before a daemon is started
        if args.pytest:
            print(to_pytest(path), end="")
            return EXIT_OK
        # The recorded daemon's plugins exactly: a venv with one more chip installed would
        # differ at the first answer (hello lists the device types).
        plugins = [name for name, _ in read_header(path).plugins]
        with private_daemon(args.verbose, plugins=plugins) as sock:
            log.info("replaying %s against a private daemon at %s", path, sock)
            report = replay(path, sock, timeout=args.timeout)
    except RecordingError as exc:
        raise Usage(str(exc)) from None
    except OSError as exc:
        if exc.filename is None or Path(exc.filename) != path:
            raise
        raise Usage(f"cannot read {path}: {_oserror(exc)}") from None
    if report.header is not None:
        log.info("recorded by lvz %s: %s", report.header.lvz, " ".join(report.header.argv))
    if report.difference is None:
        print(
            f"lvz replay: {report.records} records, {report.messages} answers and events "
            f"on {report.connections} connections: all as recorded"
        )
        return EXIT_OK
    print(f"lvz replay: differs at {report.difference}")
    return EXIT_IOCTL


def cmd_vm_names(args: argparse.Namespace) -> int:
    """``lvz _vm-names``, for shell completion: each VM's name (or an unnamed one's id), one a
    line. Names a line could not carry (control characters) are left out."""
    try:
        with connect(args) as kvm:
            rows = list_vms(kvm)
    except (Fatal, KvmError, OSError):
        return EXIT_IOCTL  # no daemon: complete nothing, say nothing
    for row in rows:
        name = row["id"] if row["name"] is None else row["name"]
        if printable(str(name)) == str(name):
            print(name)
    return EXIT_OK


def cmd_completion(args: argparse.Namespace) -> int:
    from .completion import script

    print(script(build_parser(), args.shell), end="")
    return EXIT_OK


# --- argument parsing ---------------------------------------------------------------------------


def _int_in(text: str, lo: int, hi: int, what: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not lo <= value <= hi:
        raise argparse.ArgumentTypeError(
            f"{text} does not fit {what} ({lo}..{hi}); the protocol cannot carry it"
        )
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text}")
    return value


def _positive_int(text: str) -> int:
    value = _int_in(text, 1, U64_MAX, "an unsigned 64-bit integer")
    return value


def _any_int(text: str) -> int:
    return _int_in(text, I64_MIN, U64_MAX, "a 64-bit integer")


def _u64(text: str) -> int:
    return _int_in(text, 0, U64_MAX, "an unsigned 64-bit integer")


def _u32(text: str) -> int:
    return _int_in(text, 0, U32_MAX, "an unsigned 32-bit integer")


def _level(text: str) -> int:
    if text.lower() in ("0", "1", "up", "down", "on", "off"):
        return 1 if text.lower() in ("1", "up", "on") else 0
    raise argparse.ArgumentTypeError(f"a line level is 0 or 1 (or up/down): {text!r}")


def _socket_path(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("an empty path; leave --socket out for the default")
    return text


class _Version(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print lvz's version and exit")

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        print(f"lvz {__version__} ({'compiled' if lvz.compiled else 'pure Python'})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a command's own default must not undo `lvz --socket P COMMAND` (as -v below).
    common.add_argument(
        "--socket",
        metavar="PATH",
        type=_socket_path,
        default=argparse.SUPPRESS,
        help="daemon socket (default: $LVZ_SOCKET, else the per-user path)",
    )
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="show connections (-v) and every request (-vv) on stderr",
    )
    listing_ = argparse.ArgumentParser(add_help=False)
    listing_.add_argument(
        "--format",
        choices=("table", "json"),
        default="table",
        help="output format (default: table)",
    )

    parser = argparse.ArgumentParser(
        prog="lvz",
        formatter_class=fmt,
        epilog=EPILOG,
        description="LoongArch KVM's vCPU identity (phyid map) and interrupt routing, emulated.",
    )
    parser.add_argument("--version", action=_Version)
    parser.add_argument(
        "--socket",
        metavar="PATH",
        type=_socket_path,
        default=None,
        help="daemon socket, for any command (as after it)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="show connections (-v) and every request (-vv) on stderr",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def adder(
        group: argparse._SubParsersAction[argparse.ArgumentParser], prefix: str = ""
    ) -> Callable[..., argparse.ArgumentParser]:
        def add(
            name: str,
            help: str,
            parents: list[argparse.ArgumentParser],
            func: Callable[[argparse.Namespace], int] | None = None,
        ) -> argparse.ArgumentParser:
            p = group.add_parser(
                name,
                help=help,
                description=help,
                parents=parents,
                epilog=EPILOG,
                formatter_class=fmt,
            )
            if func is not None:
                p.set_defaults(func=func, command=prefix + name)
            return p

        return add

    add = adder(sub)
    base = [common]
    lists = [common, listing_]

    serve = add(
        "serve", "run the daemon in the foreground until SIGINT/SIGTERM/SIGHUP", base, cmd_serve
    )
    serve.add_argument(
        "--max-message",
        type=_positive_int,
        metavar="BYTES",
        help="largest request accepted (default: 1 MiB)",
    )
    serve.add_argument(
        "--max-handles",
        type=_positive_int,
        metavar="N",
        help="handles per connection (default: 66000)",
    )
    serve.add_argument(
        "--max-vms", type=_positive_int, metavar="N", help="VMs per daemon (default: 1024)"
    )
    serve.add_argument(
        "--max-vcpus",
        type=_positive_int,
        metavar="N",
        help="vCPUs per VM (default: the whole vcpu_id range)",
    )
    serve.add_argument(
        "--max-total-vcpus",
        type=_positive_int,
        metavar="N",
        help="vCPUs of all VMs together (default: 1048576, ~0.6 GiB)",
    )
    serve.add_argument(
        "--max-events",
        type=_positive_int,
        metavar="N",
        help="irq events queued per subscriber before dropping (default: 4096)",
    )
    serve.add_argument(
        "--plugin-timeout",
        type=float,
        metavar="SECONDS",
        help="longest a plugin call may run; 0 = no limit (default: 1)",
    )
    serve.add_argument(
        "--max-connections",
        type=_positive_int,
        metavar="N",
        help="connections at once (default: the fd limit minus 64)",
    )
    serve.add_argument(
        "--partial-budget",
        type=_positive_int,
        metavar="BYTES",
        help="bytes of unfinished messages, all clients (default: 64 MiB)",
    )
    serve.add_argument(
        "--message-timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="longest a message may stay unfinished (default: 10)",
    )
    serve.add_argument(
        "--state-dir",
        metavar="DIR",
        help="keep named VMs here: every acknowledged change survives a crash",
    )
    serve.add_argument(
        "--fsync",
        choices=("always", "everysec", "no"),
        help="when --state-dir changes reach the disk: before each answer, "
        "once a second (default), or when the OS decides",
    )
    serve.add_argument(
        "--record",
        metavar="FILE",
        help="write every byte of every connection to FILE (for `lvz replay`)",
    )
    serve.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="shut down when the parent process dies (for test runners)",
    )

    demo = add(
        "demo",
        "a guided tour: a VM, its phyid map, its rules, interrupts routed by it",
        base,
        cmd_demo,
    )
    demo.add_argument(
        "--record",
        metavar="FILE",
        help="record the private daemon's traffic to FILE (for `lvz replay`)",
    )
    add("vms", "list the daemon's VMs (as `lvz vm ls`)", lists, cmd_vms)
    mp = add("map", "show a VM's phyid map", lists, cmd_map)
    mp.add_argument("vm", metavar="VM", help="VM name or id")
    lk = add("lookup", "which vCPU has a phyid (kvm_get_vcpu_by_cpuid)", lists, cmd_lookup)
    lk.add_argument("vm", metavar="VM", help="VM name or id")
    lk.add_argument("phyid", metavar="PHYID", type=_any_int, help="physical CPU id (may be hex)")
    add("plugins", "list the irqchip plugins the daemon loaded", lists, cmd_plugins)
    add(
        "profiles", "list the kernel-version profiles a VM can be created with", lists, cmd_profiles
    )
    sn = add("snapshot", "save a VM's whole state to FILE (versioned msgpack)", base, cmd_snapshot)
    sn.add_argument("vm", metavar="VM", help="VM name or id")
    sn.add_argument("file", metavar="FILE", help="snapshot file to write")
    rs = add("restore", "create a VM from a snapshot FILE", base, cmd_restore)
    rs.add_argument("file", metavar="FILE", help="snapshot file to read")
    rs.add_argument("--name", metavar="NEW", help="name of the new VM (default: the saved name)")

    vm = add("vm", "create, destroy, list and describe VMs", [])
    vm_add = adder(vm.add_subparsers(dest="verb", metavar="VERB", required=True), "vm ")
    vc = vm_add(
        "create", "create a named VM (it lives until `lvz vm destroy`)", base, cmd_vm_create
    )
    vc.add_argument("name", metavar="NAME", help="the new VM's name")
    vc.add_argument(
        "--max-phyid",
        type=lambda t: _int_in(t, 1, 65536, "max_phyid"),
        metavar="N",
        help="phyids 0..N-1 (default: 256, as the kernel)",
    )
    vc.add_argument(
        "--profile",
        choices=profiles.PROFILES,
        metavar="KERNEL",
        help="the kernel version it behaves as (`lvz profiles`; default: newest)",
    )
    vd = vm_add("destroy", "destroy a VM, its vCPUs and devices", base, cmd_vm_destroy)
    vd.add_argument("vm", metavar="VM", help="VM name or id")
    vi = vm_add("info", "a VM's limits, vCPUs and devices", lists, cmd_vm_info)
    vi.add_argument("vm", metavar="VM", help="VM name or id")
    vm_add("ls", "list the daemon's VMs", lists, cmd_vms)

    vcpu = add("vcpu", "create a VM's vCPUs and look at them", [])
    vcpu_add = adder(vcpu.add_subparsers(dest="verb", metavar="VERB", required=True), "vcpu ")
    vl = vcpu_add("ls", "each vCPU's id, phyid and raised interrupt lines", lists, cmd_vcpu_ls)
    vl.add_argument("vm", metavar="VM", help="VM name or id")

    vcc = vcpu_add(
        "create",
        "create a vCPU (KVM_CREATE_VCPU), optionally setting its phyid",
        base,
        cmd_vcpu_create,
    )
    vcc.add_argument("vm", metavar="VM", help="VM name or id")
    vcc.add_argument("vcpu_id", metavar="VCPU_ID", type=_any_int, help="the new vCPU's id")
    vcc.add_argument(
        "--phyid",
        type=_u64,
        metavar="N",
        help="set its CPUID register (its phyid) too, as `lvz reg set … cpuid N`",
    )

    device = add("device", "create and list a VM's irqchip devices (KVM_CREATE_DEVICE)", [])
    device_add = adder(device.add_subparsers(dest="verb", metavar="VERB", required=True), "device ")
    dc = device_add("create", "create a device of TYPE in a VM", base, cmd_device_create)
    dc.add_argument("vm", metavar="VM", help="VM name or id")
    dc.add_argument(
        "type", metavar="TYPE", help="ipi, eiointc, pchpic, or a device type `lvz plugins` lists"
    )
    dl = device_add("ls", "a VM's devices", lists, cmd_device_ls)
    dl.add_argument("vm", metavar="VM", help="VM name or id")

    reg = add("reg", "read and write vCPU registers (KVM ONE_REG)", [])
    reg_add = adder(reg.add_subparsers(dest="verb", metavar="VERB", required=True), "reg ")
    reg_help = "cpuid, tmid, estat, …, csr:N, cpucfg:N or a raw register id"
    for verb, what, func, parents in (
        ("get", "read one register", cmd_reg_get, lists),
        ("set", "write one register", cmd_reg_set, base),
        ("ls", "every register that holds state, with its value", cmd_reg_ls, lists),
    ):
        r = reg_add(verb, what, parents, func)
        r.add_argument("vm", metavar="VM", help="VM name or id")
        r.add_argument("vcpu", metavar="VCPU", type=_any_int, help="vcpu_id")
        if verb != "ls":
            r.add_argument("reg", metavar="REG", type=parse_register, help=reg_help)
        if verb == "set":
            r.add_argument("value", metavar="VALUE", type=_u64, help="64-bit value (may be hex)")

    attr = add("attr", "read and write device and vCPU attributes (KVM_GET/SET_DEVICE_ATTR)", [])
    attr_add = adder(attr.add_subparsers(dest="verb", metavar="VERB", required=True), "attr ")
    for verb, what, func, parents in (
        ("get", "read one attribute", cmd_attr_get, lists),
        ("set", "write one attribute", cmd_attr_set, base),
    ):
        a = attr_add(verb, what, parents, func)
        a.add_argument("vm", metavar="VM", help="VM name or id")
        a.add_argument(
            "target",
            metavar="DEVICE",
            help="ipi, eiointc, pchpic (or a full device type), or vcpuN",
        )
        a.add_argument(
            "group",
            metavar="GROUP",
            type=_attr_number("group"),
            help="attribute group: a number or an abi name (pch_pic_grp_ctrl, …)",
        )
        a.add_argument(
            "attr",
            metavar="ATTR",
            type=_attr_number("attr"),
            help="attribute: a number or an abi name (pch_pic_ctrl_init, …)",
        )
        if verb == "set":
            a.add_argument("value", metavar="VALUE", type=_u64, help="value (may be hex)")

    irq = add("irq", "set an interrupt line (KVM_IRQ_LINE: a PCH-PIC pin)", base, cmd_irq)
    irq.add_argument("vm", metavar="VM", help="VM name or id")
    irq.add_argument("gsi", metavar="GSI", type=_any_int, help="PCH-PIC pin 0..63")
    irq.add_argument("level", metavar="LEVEL", type=_level, help="1 (up) or 0 (down)")
    msi = add("msi", "signal an MSI (KVM_SIGNAL_MSI)", base, cmd_msi)
    msi.add_argument("vm", metavar="VM", help="VM name or id")
    msi.add_argument("addr", metavar="ADDR", type=_u64, help="MSI address")
    msi.add_argument("data", metavar="DATA", type=_u64, help="MSI data: the EIOINTC irq")
    why = add(
        "why",
        "why an interrupt goes where it goes: each hop, and the register and bit "
        "that stop or redirect it (read-only)",
        lists,
        cmd_why,
    )
    why.add_argument("vm", metavar="VM", help="VM name or id")
    why.add_argument(
        "kind",
        choices=("pin", "msi", "irq"),
        help="pin N (a PCH-PIC pin, as `lvz irq`), msi ADDR DATA (as `lvz msi`) "
        "or irq N (an EIOINTC irq)",
    )
    why.add_argument("numbers", metavar="N", nargs="+", type=_u64, help="N, or ADDR DATA")
    why.add_argument(
        "--level",
        type=_level,
        default=1,
        help="explain raising (1, the default) or lowering (0) it",
    )
    from . import top  # its terminal library is imported only when the live view starts

    tp = add(
        "top",
        "a live view of interrupts per VM, vCPU and line, as kvm_stat",
        base,
        lambda a: top.run(a, connect, str(resolve_socket_path(a.socket)), Usage),
    )
    top.add_arguments(tp)
    ev = add("events", "follow a VM's interrupt-line changes live", lists, cmd_events)
    ev.add_argument("vm", metavar="VM", help="VM name or id")
    ev.add_argument("--count", type=_positive_int, metavar="N", help="stop after N events")
    ev.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="stop after SECONDS without an event (default: never)",
    )

    rp = add(
        "replay",
        "run a recording against a fresh private daemon; exit 1 where it differs",
        [common],
        cmd_replay,
    )
    rp.add_argument("file", metavar="FILE", help="a recording from `lvz serve --record`")
    rp.add_argument(
        "--pytest", action="store_true", help="print an equivalent pytest test instead of replaying"
    )
    rp.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for each expected answer (default: 5)",
    )
    names = sub.add_parser("_vm-names", parents=base, add_help=False)  # not in --help
    names.set_defaults(func=cmd_vm_names, command="_vm-names")
    cp = add("completion", "print a shell completion script", [], cmd_completion)
    cp.add_argument(
        "shell",
        choices=("bash", "zsh"),
        help='eval "$(lvz completion bash)" in ~/.bashrc (zsh: ~/.zshrc)',
    )
    return parser


def _quiet_stdout() -> int:
    """The reader went away: stop writing (and the interpreter's final flush) without a word."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    verbose = getattr(args, "verbose", 0) or 0
    if args.command != "serve" and verbose:
        logging.basicConfig(
            level=logging.INFO if verbose == 1 else logging.DEBUG,
            format="lvz: %(message)s",
            stream=sys.stderr,
            force=True,
        )
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        code = func(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # the client turns a lost daemon into ConnectionLost: this is stdout
        return _quiet_stdout()
    except KvmError as err:
        print(f"lvz {args.command}: {err.name}: {err.message}", file=sys.stderr)
        return EXIT_IOCTL
    except Usage as err:
        print(f"lvz {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (ConnectionError, Fatal) as err:
        print(f"lvz {args.command}: {err}", file=sys.stderr)
        return EXIT_LVZ
    except KeyboardInterrupt:
        print(f"lvz {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        print(f"lvz {args.command}: {where}{err.strerror or err}", file=sys.stderr)
        return EXIT_LVZ


if __name__ == "__main__":
    sys.exit(main())
