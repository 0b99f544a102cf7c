"""The ``lvz`` command: run the daemon, look at its VMs, and demonstrate the phyid map.

Every subcommand but ``serve`` is a short session of the blocking client. Exit codes are part of
the interface (scripts branch on them), so every failure is mapped to one of four, and no
traceback reaches the terminal for anything but a bug in lvz itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, TextIO

from lvz.protocol import regs, snapshot
from lvz.protocol.constants import DEV_EIOINTC, DEV_IPI, DEV_PCHPIC, U64_MAX
from lvz.protocol.endpoint import resolve_socket_path
from lvz.protocol.errors import KvmError

from .sync import EventsLost, IrqEvent, Kvm, PhyidMap, Vcpu, Vm

EXIT_OK: Final = 0
EXIT_IOCTL: Final = 1
EXIT_USAGE: Final = 2
EXIT_LVZ: Final = 125

EPILOG: Final = """\
exit status:
  0    success
  1    the emulated ioctl failed (its errno name and message go to stderr)
  2    usage error
  125  lvz itself failed, or the daemon is unreachable
  130  interrupted (Ctrl-C)

endpoint: --socket PATH, else $LVZ_SOCKET, else $XDG_RUNTIME_DIR/lvz/lvz.sock
(or /tmp/lvz-$UID/lvz.sock)."""


class Fatal(Exception):
    """lvz itself cannot go on (exit 125); the message is for a person."""


# --- output -------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], out: TextIO,
          indent: str = "") -> None:
    """Columns padded to fit; numbers right-aligned so digits line up."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    numeric = [all(isinstance(r[i], int) for r in rows) and bool(rows)
               for i in range(len(headers))]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric,
                                                                        strict=True)]
        return (indent + "  ".join(parts)).rstrip()

    print(line(cells[0]), file=out)
    print(indent + "  ".join("-" * w for w in widths), file=out)
    for row in cells[1:]:
        print(line(row), file=out)


def emit_json(value: object, out: TextIO) -> None:
    json.dump(value, out, indent=2)
    out.write("\n")


# --- subcommands --------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    # The only place clients/ touches the daemon: in-process, through its public entry point.
    from lvz.daemon import server
    from lvz.daemon.config import ServeConfig

    options: dict[str, Any] = {}
    for name in ("max_message", "max_handles", "max_vms", "max_vcpus", "max_events"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.state_dir is not None:
        options["state_dir"] = Path(args.state_dir)
    config = ServeConfig(socket=resolve_socket_path(args.socket), **options)
    return server.run(config, args.verbose)


def cmd_vms(args: argparse.Namespace) -> int:
    with Kvm.connect(args.socket) as kvm:
        vms = kvm.list_vms()
    if args.format == "json":
        emit_json([{"name": v.name, "vcpus": v.vcpus, "devices": v.devices} for v in vms],
                  sys.stdout)
    elif not vms:
        print("no VMs")
    else:
        table(["NAME", "VCPUS", "DEVICES"],
              [[v.name if v.name is not None else "(unnamed)", v.vcpus, v.devices] for v in vms],
              sys.stdout)
    return EXIT_OK


def cmd_map(args: argparse.Namespace) -> int:
    with Kvm.connect(args.socket) as kvm:
        vm = kvm.open_vm(args.vm)
        pmap = vm.phyid_map()
        info = vm.info()
    mapped = set(pmap.by_vcpu())
    if args.format == "json":
        emit_json({"vm": args.vm, "limit": pmap.limit,
                   "entries": [{"phyid": p, "vcpu_id": v} for p, v in pmap.entries],
                   "unset": [v for v in info.vcpus if v not in mapped]}, sys.stdout)
        return EXIT_OK
    print(f"VM {args.vm}: {len(pmap.entries)} of {len(info.vcpus)} vCPUs mapped, "
          f"phyids 0..{pmap.limit - 1}")
    if pmap.entries:
        table(["PHYID", "VCPU"], [list(e) for e in pmap.entries], sys.stdout)
    unset = [v for v in info.vcpus if v not in mapped]
    if unset:
        print(f"unset (CPUID reads {pmap.limit}): vCPU " + ", ".join(map(str, unset)))
    return EXIT_OK


def cmd_snapshot(args: argparse.Namespace) -> int:
    with Kvm.connect(args.socket) as kvm:
        vm = kvm.open_vm(args.vm)
        saved = kvm.save_vm(vm)
    data = snapshot.encode(saved)
    target = Path(args.file)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(target)  # a crash mid-write never leaves half a snapshot under the real name
    print(f"saved VM {args.vm}: {len(saved['vcpus'])} vCPUs, {len(saved['devices'])} devices, "
          f"{len(data)} bytes -> {target}")
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    try:
        data = Path(args.file).read_bytes()
    except OSError as exc:
        raise Fatal(f"cannot read {args.file}: {exc.strerror or exc}") from None
    saved = snapshot.decode(data)  # EINVAL (exit 1) before anything is created
    name = args.name if args.name is not None else saved["vm"]["name"]
    if name is None:
        print("lvz restore: the snapshot is of an unnamed VM; give it one with --name "
              "(an unnamed VM would die when this command disconnects)", file=sys.stderr)
        return EXIT_USAGE
    with Kvm.connect(args.socket) as kvm:
        kvm.restore_vm(saved, name)
    print(f"restored VM {name}: {len(saved['vcpus'])} vCPUs, {len(saved['devices'])} devices")
    return EXIT_OK


def cmd_lookup(args: argparse.Namespace) -> int:
    with Kvm.connect(args.socket) as kvm:
        vcpu_id = kvm.open_vm(args.vm).phyid_lookup(args.phyid)
    if args.format == "json":
        emit_json({"vm": args.vm, "phyid": args.phyid, "vcpu_id": vcpu_id}, sys.stdout)
    elif vcpu_id is None:
        print(f"phyid {args.phyid}: no vCPU")
    else:
        print(f"phyid {args.phyid} → vCPU {vcpu_id}")
    return EXIT_OK


def cmd_plugins(args: argparse.Namespace) -> int:
    with Kvm.connect(args.socket) as kvm:
        plugins = kvm.list_plugins()
    if args.format == "json":
        emit_json([{"name": p.name, "version": p.version, "dist": p.dist,
                    "device_types": list(p.device_types)} for p in plugins], sys.stdout)
    elif not plugins:
        print("no plugins")
    else:
        table(["NAME", "VERSION", "DIST", "DEVICE TYPES"],
              [[p.name, p.version, p.dist, ", ".join(p.device_types) or "-"] for p in plugins],
              sys.stdout)
    return EXIT_OK


# --- demo ---------------------------------------------------------------------------------------

#: vcpu_id i gets DEMO_PHYIDS[i]: sparse, and deliberately not vcpu_id order, so that every
#: routed interrupt below shows the map (not the vcpu_id) choosing its target.
DEMO_PHYIDS: Final = (255, 200, 128, 99, 42, 17, 2, 0)
IOCSR_IPI_SEND: Final = 0x1040
IOCSR_EIOINTC_ENABLE: Final = 0x1600
IOCSR_EIOINTC_COREMAP: Final = 0x1C00
PCHPIC_GRP_CTRL: Final = 0x40000006
PCHPIC_CTRL_INIT: Final = 0
PCHPIC_BASE: Final = 0x10000000
PCHPIC_MASK: Final = 0x20
HCALL_SERVICE: Final = 0x100
HCALL_FUNC_IPI: Final = 1
MSI_ADDRESS: Final = 0x2FF00000
LINE_NAMES: Final = {0: "SWI0", 1: "SWI1", 11: "TI", 12: "IPI"} | {
    2 + n: f"HWI{n}" for n in range(8)}


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(os.fspath(path))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def private_daemon(verbose: int = 0, timeout: float = 15.0) -> Iterator[Path]:
    """A daemon of our own in a fresh 0700 directory, stopped with SIGTERM when we are done."""
    tmp = Path(tempfile.mkdtemp(prefix="lvz"))
    path = tmp / "lvz.sock"
    log = tmp / "daemon.log"
    cmd = [sys.executable, "-m", "lvz.clients.cli", "serve", "--socket", os.fspath(path)]
    cmd += ["-v"] * verbose
    try:
        with open(log, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err)
        try:
            deadline = time.monotonic() + timeout
            while not _accepts(path):
                if proc.poll() is not None:
                    raise Fatal(f"the daemon exited with status {proc.returncode} before it "
                                f"was ready: {_tail(log)}")
                if time.monotonic() > deadline:
                    raise Fatal(f"the daemon did not accept connections within {timeout} s")
                time.sleep(0.02)
            yield path
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tail(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(lines[-3:]) or "(nothing on stderr)"


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
            vcpus[i].set_one_reg(regs.CPUID, phyid)
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
        got = _attempt(lambda: v0.set_one_reg(regs.CPUID, p0))
        now = v0.get_one_reg(regs.CPUID)
        self.check("same value again", got == "ok" and now == p0,
                   f"vCPU 0 := {p0} again → {got}, CPUID {now}", f"ok, CPUID {p0}")

        got = _attempt(lambda: v0.set_one_reg(regs.CPUID, 7))
        now = v0.get_one_reg(regs.CPUID)
        free = vm.phyid_lookup(7)
        self.check("change refused", got == "EINVAL" and now == p0 and free is None,
                   f"vCPU 0 := 7 → {got}, CPUID {now}", f"EINVAL, CPUID {p0}")

        v8 = vcpus[8] = vm.create_vcpu(8)
        limit = vm.info().max_phyid
        got = _attempt(lambda: v8.set_one_reg(regs.CPUID, p0))
        now = v8.get_one_reg(regs.CPUID)
        owner = vm.phyid_lookup(p0)
        self.check("sharing refused", got == "EINVAL" and now == limit and owner == 0,
                   f"vCPU 8 := {p0} → {got}, CPUID {now} (unset)",
                   f"EINVAL, CPUID {limit}")

        p3 = DEMO_PHYIDS[3]
        vcpus.pop(3).destroy()
        freed = vm.phyid_lookup(p3)
        got = _attempt(lambda: v8.set_one_reg(regs.CPUID, p3))
        owner = vm.phyid_lookup(p3)
        self.check("destroy then reuse", freed is None and got == "ok" and owner == 8,
                   f"destroy vCPU 3; vCPU 8 := {p3} → {got}, {p3} is vCPU {owner}",
                   f"ok, {p3} is vCPU 8")

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
            self.say(f"{'':26} → vCPU {vcpu_id} (phyid {phyid_of.get(vcpu_id, '-')}) "
                     f"{LINE_NAMES.get(irq, irq)}")

    def _routing(self, vm: Vm, vcpus: dict[int, Vcpu]) -> None:
        vm.create_device(DEV_IPI)
        vm.create_device(DEV_EIOINTC)
        pch = vm.create_device(DEV_PCHPIC)
        vm.subscribe()
        by_phyid = vm.phyid_map().by_phyid()
        sender = vcpus[0]

        # 1. IPI device: a guest store to IPI_SEND names the target by phyid.
        target, vector = 42, 1
        sender.iocsr_write(IOCSR_IPI_SEND, 4, (target << 16) | vector)
        self._report("IPI", f"vCPU 0 IPI_SEND to phyid {target}", vm,
                     {(by_phyid[target], 12)})

        # 2. PV IPI: hvcl 0x100 with a 128-bit bitmap relative to a base phyid, clustered the
        # way Linux's pv_send_ipi_mask does when the targets span more than 128 ids.
        phyids = sorted(by_phyid)
        clusters: dict[int, int] = {}
        for phyid in phyids:
            base = next((b for b in clusters if b <= phyid < b + 128), phyid)
            clusters[base] = clusters.get(base, 0) | 1 << (phyid - base)
        answers = []
        for base, bitmap in clusters.items():
            answers.append(sender.hypercall(HCALL_SERVICE, HCALL_FUNC_IPI, bitmap & U64_MAX,
                                            bitmap >> 64, base))
        self._report("PV IPI", f"hvcl 0x100 to {len(phyids)} phyids, "
                     f"{len(clusters)} calls → a0 {answers}", vm,
                     {(v, 0) for v in by_phyid.values()} if set(answers) == {0} else set())

        # 3. A device interrupt: PCH-PIC pin → EIOINTC irq (= pin) → COREMAP → phyid → HWI0.
        pin, dev_phyid = 5, 0
        pch.set_attr(PCHPIC_GRP_CTRL, PCHPIC_CTRL_INIT, PCHPIC_BASE)
        sender.mmio_write(PCHPIC_BASE + PCHPIC_MASK, 8, U64_MAX & ~(1 << pin))
        sender.iocsr_write(IOCSR_EIOINTC_ENABLE, 4, 1 << pin)
        sender.iocsr_write(IOCSR_EIOINTC_COREMAP + pin, 1, 1 << dev_phyid)
        vm.irq_line(pin, 1)
        self._report("device interrupt", f"pin {pin} → EIOINTC {pin} → phyid {dev_phyid}",
                     vm, {(by_phyid[dev_phyid], 2)})
        vm.irq_line(pin, 0)

        # 4. MSI: the data is the EIOINTC irq; bitmap-mode coremap bit n names phyid n.
        irq, msi_phyid = 66, 2
        sender.iocsr_write(IOCSR_EIOINTC_ENABLE + irq // 32 * 4, 4, 1 << (irq % 32))
        sender.iocsr_write(IOCSR_EIOINTC_COREMAP + irq, 1, 1 << msi_phyid)
        vm.signal_msi(MSI_ADDRESS, irq)
        self._report("MSI", f"data {irq} → EIOINTC {irq} → phyid {msi_phyid}", vm,
                     {(by_phyid[msi_phyid], 2)})


def cmd_demo(args: argparse.Namespace) -> int:
    explicit = args.socket or os.environ.get("LVZ_SOCKET")
    if explicit and _accepts(Path(explicit)):
        print(f"lvz demo: using the daemon at {explicit}")
        with Kvm.connect(explicit) as kvm:
            return Demo(kvm, sys.stdout).run()
    if explicit:
        print(f"lvz demo: nothing answers at {explicit}; starting a private daemon")
    with private_daemon(args.verbose) as path:
        print(f"lvz demo: private daemon at {path}")
        with Kvm.connect(path) as kvm:
            return Demo(kvm, sys.stdout).run()


# --- argument parsing ---------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _any_int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", metavar="PATH",
                        help="daemon socket (default: $LVZ_SOCKET, else the per-user path)")
    listing = argparse.ArgumentParser(add_help=False)
    listing.add_argument("--format", choices=("table", "json"), default="table",
                         help="output format (default: table)")

    parser = argparse.ArgumentParser(
        prog="lvz", formatter_class=fmt, epilog=EPILOG,
        description="LoongArch KVM's vCPU identity (phyid map) and interrupt routing, emulated.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str, parents: list[argparse.ArgumentParser],
            func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=parents, epilog=EPILOG,
                           formatter_class=fmt)
        p.set_defaults(func=func)
        return p

    serve = add("serve", "run the daemon in the foreground until SIGINT/SIGTERM", [common],
                cmd_serve)
    serve.add_argument("--max-message", type=_positive_int, metavar="BYTES",
                       help="largest request accepted (default: 1 MiB)")
    serve.add_argument("--max-handles", type=_positive_int, metavar="N",
                       help="handles per connection (default: 66000)")
    serve.add_argument("--max-vms", type=_positive_int, metavar="N",
                       help="VMs per daemon (default: 1024)")
    serve.add_argument("--max-vcpus", type=_positive_int, metavar="N",
                       help="vCPUs per VM (default: the whole vcpu_id range)")
    serve.add_argument("--max-events", type=_positive_int, metavar="N",
                       help="irq events queued per subscriber before dropping (default: 4096)")
    serve.add_argument("--state-dir", metavar="DIR", help="where named VMs are kept")
    serve.add_argument("-v", "--verbose", action="count", default=0,
                       help="log more (repeat for debug)")

    demo = add("demo", "a guided tour: a VM, its phyid map, its rules, interrupts routed by it",
               [common], cmd_demo)
    demo.add_argument("-v", "--verbose", action="count", default=0,
                      help="verbose private daemon (its log is discarded)")
    add("vms", "list the daemon's VMs", [common, listing], cmd_vms)
    mp = add("map", "show a VM's phyid map", [common, listing], cmd_map)
    mp.add_argument("vm", metavar="VM", help="VM name")
    lk = add("lookup", "which vCPU has a phyid (kvm_get_vcpu_by_cpuid)", [common, listing],
             cmd_lookup)
    lk.add_argument("vm", metavar="VM", help="VM name")
    lk.add_argument("phyid", metavar="PHYID", type=_any_int, help="physical CPU id (may be hex)")
    add("plugins", "list the irqchip plugins the daemon loaded", [common, listing], cmd_plugins)
    sn = add("snapshot", "save a named VM's whole state to FILE (versioned msgpack)", [common],
             cmd_snapshot)
    sn.add_argument("vm", metavar="VM", help="VM name")
    sn.add_argument("file", metavar="FILE", help="snapshot file to write")
    rs = add("restore", "create a VM from a snapshot FILE", [common], cmd_restore)
    rs.add_argument("file", metavar="FILE", help="snapshot file to read")
    rs.add_argument("--name", metavar="NEW", help="name of the new VM (default: the saved name)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KvmError as err:
        print(f"lvz {args.command}: {err.name}: {err.message}", file=sys.stderr)
        return EXIT_IOCTL
    except ConnectionError as err:
        print(f"lvz {args.command}: {err}", file=sys.stderr)
        return EXIT_LVZ
    except Fatal as err:
        print(f"lvz {args.command}: {err}", file=sys.stderr)
        return EXIT_LVZ
    except KeyboardInterrupt:
        print(f"lvz {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        print(f"lvz {args.command}: {err.strerror or err}", file=sys.stderr)
        return EXIT_LVZ


if __name__ == "__main__":
    sys.exit(main())
