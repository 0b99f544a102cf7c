"""``--state-dir`` under ``kill -9``: every change the daemon acknowledged is there after a restart.

One daemon process after another on the same state dir. After each kind of change the daemon is
killed with SIGKILL (no shutdown code runs) the moment the change is acknowledged, a new one is
started, and the VM it loads is compared with everything a client could observe before the kill.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from lvz.clients import Kvm
from lvz.protocol import KvmError, abi, snapshot

from .daemon_fixtures import DaemonProcess, start_daemon

EIO_BASE = abi.EIOINTC_BASE


def observe(kvm: Kvm, name: str) -> dict[str, Any]:
    """Everything a client can see of VM ``name``: registers, chip state, map, lines."""
    h = kvm.call("kvm.open_vm", {"name": name})["vm"]
    try:
        state = snapshot.drive(snapshot.save_vm(h), kvm.call_batch)
        for v in state["vcpus"]:
            v["regs"] = [r for r in v["regs"] if r[0] != abi.COUNTER]  # the clock moves on
        state["map"] = kvm.call("vm.phyid_map", {"vm": h})
        state["info"] = kvm.call("vm.info", {"vm": h})
        state["info"].pop("seq")  # the event counter of this daemon's subscribers
        return state
    finally:
        kvm.call("close", {"handle": h})


def names(kvm: Kvm) -> list[str]:
    return sorted(str(v["name"]) for v in kvm.call("kvm.list_vms", {})["vms"])


class Crashy:
    """A daemon on ``state`` that is killed -9 and restarted on demand."""

    def __init__(self, state: Path, *flags: str) -> None:
        self.state = state
        self.flags = flags
        self.daemon: DaemonProcess | None = None
        self._cm: Any = None

    @contextmanager
    def connected(self) -> Iterator[Kvm]:
        assert self.daemon is not None
        with Kvm.connect(self.daemon.socket) as kvm:
            yield kvm

    def start(self) -> None:
        self._cm = start_daemon("--state-dir", str(self.state), *self.flags)
        self.daemon = self._cm.__enter__()

    def kill9(self) -> None:
        assert self.daemon is not None
        self.daemon.proc.send_signal(signal.SIGKILL)
        self.daemon.proc.wait()
        self._cm.__exit__(None, None, None)
        self.daemon = None

    def stop(self) -> int:
        assert self.daemon is not None
        code = self.daemon.stop()
        self._cm.__exit__(None, None, None)
        self.daemon = None
        return code


@pytest.fixture
def crashy(sock_dir: Path) -> Iterator[Crashy]:
    c = Crashy(sock_dir / "state")
    c.start()
    try:
        yield c
    finally:
        if c.daemon is not None:
            c.kill9()


Step = Callable[[Kvm, dict[str, int]], None]


def _vcpu(kvm: Kvm, h: dict[str, int], vid: int) -> int:
    return int(kvm.call("vm.open_vcpu", {"vm": h["vm"], "vcpu_id": vid})["vcpu"])


def _dev(kvm: Kvm, h: dict[str, int], kind: str) -> int:
    return int(kvm.call("vm.open_device", {"vm": h["vm"], "type": kind})["device"])


def vcpus_created(kvm: Kvm, h: dict[str, int]) -> None:
    for v in (0, 1, 3, 7):
        kvm.call("vm.create_vcpu", {"vm": h["vm"], "vcpu_id": v})


def cpuids_set(kvm: Kvm, h: dict[str, int]) -> None:
    for v, p in ((0, 5), (1, 0), (3, 200)):
        kvm.call("vcpu.set_one_reg", {"vcpu": _vcpu(kvm, h, v), "id": abi.CPUID, "value": p})


def other_registers(kvm: Kvm, h: dict[str, int]) -> None:
    kvm.call(
        "vcpu.set_one_reg",
        {"vcpu": _vcpu(kvm, h, 1), "id": abi.csr_id(abi.CSR_KS0), "value": 0xDEADBEEF},
    )
    kvm.call(
        "vcpu.set_one_reg",
        {"vcpu": _vcpu(kvm, h, 3), "id": abi.cpucfg_id(2), "value": abi.CPUCFG2_LLFTP},
    )
    kvm.call(
        "vcpu.set_attr",
        {
            "vcpu": _vcpu(kvm, h, 0),
            "group": abi.KVM_LOONGARCH_VCPU_CPUCFG,
            "attr": abi.CPUCFG_KVM_FEATURE,
            "value": abi.KVM_FEATURE_IPI,
        },
    )


def devices_created(kvm: Kvm, h: dict[str, int]) -> None:
    for t in (abi.DEV_IPI, abi.DEV_EIOINTC, abi.DEV_PCHPIC):
        kvm.call("vm.create_device", {"vm": h["vm"], "type": t})


def device_attrs(kvm: Kvm, h: dict[str, int]) -> None:
    kvm.call(
        "device.set_attr",
        {
            "device": _dev(kvm, h, abi.DEV_EIOINTC),
            "group": abi.KVM_DEV_LOONGARCH_EXTIOI_GRP_CTRL,
            "attr": abi.KVM_DEV_LOONGARCH_EXTIOI_CTRL_INIT_NUM_CPU,
            "value": 8,
        },
    )
    kvm.call(
        "device.set_attr",
        {
            "device": _dev(kvm, h, abi.DEV_PCHPIC),
            "group": abi.KVM_DEV_LOONGARCH_PCH_PIC_GRP_CTRL,
            "attr": abi.KVM_DEV_LOONGARCH_PCH_PIC_CTRL_INIT,
            "value": abi.VIRT_PCH_PIC_BASE,
        },
    )


def guest_writes_to_chips(kvm: Kvm, h: dict[str, int]) -> None:
    v0 = _vcpu(kvm, h, 0)
    kvm.call(
        "vcpu.mmio_write",
        {
            "vcpu": v0,
            "size": 8,
            "addr": abi.VIRT_PCH_PIC_BASE + abi.PCH_PIC_MASK,
            "value": ~(1 << 4) & abi.U64_MAX,
        },
    )  # unmask pin 4
    kvm.call(
        "vcpu.iocsr_write",
        {"vcpu": v0, "size": 8, "addr": EIO_BASE + abi.EIOINTC_ENABLE, "value": 0xFFFF},
    )
    kvm.call(
        "vcpu.iocsr_write",
        {"vcpu": v0, "size": 1, "addr": EIO_BASE + abi.EIOINTC_COREMAP + 4, "value": 1},
    )


def lines(kvm: Kvm, h: dict[str, int]) -> None:
    kvm.call("vm.irq_line", {"vm": h["vm"], "irq": 4, "level": 1})
    kvm.call("vm.signal_msi", {"vm": h["vm"], "address": 0, "data": 9})
    kvm.call("vcpu.interrupt", {"vcpu": _vcpu(kvm, h, 7), "irq": abi.INT_TI})
    kvm.call(
        "vcpu.iocsr_write",
        {
            "vcpu": _vcpu(kvm, h, 0),
            "size": 4,
            "addr": abi.IOCSR_IPI_BASE + abi.IPI_SEND,
            "value": abi.ipi_send(200, 3),
        },
    )


def csrxchg_and_hypercall(kvm: Kvm, h: dict[str, int]) -> None:
    kvm.call(
        "vcpu.csr_xchg",
        {
            "vcpu": _vcpu(kvm, h, 7),
            "csr": abi.CSR_ESTAT,
            "value": 1 << abi.INT_SWI0,
            "mask": 1 << abi.INT_SWI0,
        },
    )
    kvm.call(
        "vcpu.hypercall",
        {
            "vcpu": _vcpu(kvm, h, 0),
            "code": abi.KVM_HCALL_SERVICE,
            "args": [abi.KVM_HCALL_FUNC_IPI, 1 << 5, 0, 0],
        },
    )


def vcpu_destroyed_and_recreated(kvm: Kvm, h: dict[str, int]) -> None:
    kvm.call("vcpu.destroy", {"vcpu": _vcpu(kvm, h, 3)})
    kvm.call("vm.create_vcpu", {"vm": h["vm"], "vcpu_id": 3})


STEPS: list[Step] = [
    vcpus_created,
    cpuids_set,
    other_registers,
    devices_created,
    device_attrs,
    guest_writes_to_chips,
    lines,
    csrxchg_and_hypercall,
    vcpu_destroyed_and_recreated,
]


#: Kinds of change, killed after in pairs (a restart costs a process start): the second of a
#: pair is acknowledged last, the first is checked too, and every one is compared.
PAIRS = [STEPS[i : i + 2] for i in range(0, len(STEPS), 2)]


def test_every_acknowledged_change_survives_kill_9(crashy: Crashy) -> None:
    with crashy.connected() as kvm:
        kvm.call("kvm.create_vm", {"name": "durable"})
    for pair in PAIRS:
        with crashy.connected() as kvm:
            h = {"vm": kvm.call("kvm.open_vm", {"name": "durable"})["vm"]}
            for step in pair:
                step(kvm, h)
            before = observe(kvm, "durable")
        crashy.kill9()  # the instant the last answer arrived
        crashy.start()
        with crashy.connected() as kvm:
            assert observe(kvm, "durable") == before, [step.__name__ for step in pair]
    with crashy.connected() as kvm:  # sanity: the lines really were raised before the crash
        regs = {v["vcpu_id"]: dict(v["regs"]) for v in observe(kvm, "durable")["vcpus"]}
        assert regs[1][abi.ESTAT] & (1 << abi.INT_HWI0)  # pin 4 -> EIOINTC -> phyid 0
        assert regs[7][abi.ESTAT] & (1 << abi.INT_TI)


def test_created_and_destroyed_vms_survive_kill_9(crashy: Crashy) -> None:
    with crashy.connected() as kvm:
        for name in ("a", "b", "c"):
            kvm.call("kvm.create_vm", {"name": name})
        kvm.call("kvm.create_vm", {})  # unnamed: not kept
        kvm.call("vm.destroy", {"vm": kvm.call("kvm.open_vm", {"name": "b"})["vm"]})
    crashy.kill9()
    crashy.start()
    with crashy.connected() as kvm:
        assert names(kvm) == ["a", "c"]
        kvm.call("vm.destroy", {"vm": kvm.call("kvm.open_vm", {"name": "a"})["vm"]})
        kvm.call("kvm.create_vm", {"name": "b"})  # the name is free again
    crashy.kill9()
    crashy.start()
    with crashy.connected() as kvm:
        assert names(kvm) == ["b", "c"]


def test_a_restore_named_last_survives_kill_9(crashy: Crashy) -> None:
    """``vm.set_name`` writes the whole VM: a restored VM is kept like a created one."""
    with crashy.connected() as kvm:
        h = kvm.call("kvm.create_vm", {"name": "src"})["vm"]
        for v in range(3):
            vc = kvm.call("vm.create_vcpu", {"vm": h, "vcpu_id": v})["vcpu"]
            kvm.call("vcpu.set_one_reg", {"vcpu": vc, "id": abi.CPUID, "value": 10 + v})
        saved = snapshot.drive(snapshot.save_vm(h), kvm.call_batch)
        snapshot.drive(snapshot.restore_vm(saved, "copy"), kvm.call_batch)
        before = observe(kvm, "copy")
    crashy.kill9()
    crashy.start()
    with crashy.connected() as kvm:
        assert observe(kvm, "copy") == before


def test_a_write_that_changes_nothing_is_not_journaled_and_survives_kill_9(crashy: Crashy) -> None:
    """VMMs re-put every register: a write of the value already there (the kernel's no-op)
    adds nothing to the file, yet a restart has the right value; a changing write after
    such a no-op, in one pipelined batch too, is journaled as any other."""
    ks0 = abi.csr_id(abi.CSR_KS0)

    def file_size() -> int:
        [f] = crashy.state.glob("*.lvzj")
        return f.stat().st_size

    def put(kvm: Kvm, vc: int, reg: int, value: int) -> None:
        kvm.call("vcpu.set_one_reg", {"vcpu": vc, "id": reg, "value": value})

    with crashy.connected() as kvm:
        h = kvm.call("kvm.create_vm", {"name": "noop"})["vm"]
        vc = kvm.call("vm.create_vcpu", {"vm": h, "vcpu_id": 0})["vcpu"]
        put(kvm, vc, ks0, 7)
        put(kvm, vc, abi.CPUID, 5)
        put(kvm, vc, abi.cpucfg_id(2), abi.CPUCFG2_LLFTP)
        size = file_size()
        put(kvm, vc, ks0, 7)  # each the value it holds: nothing to write
        put(kvm, vc, abi.CPUID, 5)
        put(kvm, vc, abi.cpucfg_id(2), abi.CPUCFG2_LLFTP)
        assert file_size() == size
        put(kvm, vc, abi.csr_id(0x31), 0)  # absent: 0 is what it reads, but writing lists it
        assert file_size() > size
        before = observe(kvm, "noop")
    crashy.kill9()
    crashy.start()
    with crashy.connected() as kvm:
        after = observe(kvm, "noop")
        assert after == before
        assert dict(after["vcpus"][0]["regs"])[ks0] == 7
        h = kvm.call("kvm.open_vm", {"name": "noop"})["vm"]
        vc = kvm.call("vm.open_vcpu", {"vm": h, "vcpu_id": 0})["vcpu"]
        put(kvm, vc, ks0, 7)  # not known to be a no-op since the restart: written
        put(kvm, vc, ks0, 7)  # a no-op, then a change: the change is written
        put(kvm, vc, ks0, 8)
        kvm.call(
            "vcpu.csr_xchg", {"vcpu": vc, "csr": abi.CSR_KS0, "value": 0x55, "mask": 0xFF}
        )  # the guest changes it behind the VMM's back
        put(kvm, vc, ks0, 8)  # so 8 again is a change, and must be written
        before = observe(kvm, "noop")
    crashy.kill9()
    crashy.start()
    with crashy.connected() as kvm:
        after = observe(kvm, "noop")
        assert after == before
        assert dict(after["vcpus"][0]["regs"])[ks0] == 8
        h = kvm.call("kvm.open_vm", {"name": "noop"})["vm"]
        vc = kvm.call("vm.open_vcpu", {"vm": h, "vcpu_id": 0})["vcpu"]
        alias = ks0 | 1  # the same CSR: the index's low bits are dropped, as the kernel does
        kvm.call_batch(
            [
                ("vcpu.set_one_reg", {"vcpu": vc, "id": reg, "value": v})
                for reg, v in ((ks0, 8), (ks0, 8), (ks0, 9), (ks0, 9), (alias, 10), (ks0, 9))
            ]
        )  # no-ops and changes in one read
        before = observe(kvm, "noop")
    crashy.kill9()
    crashy.start()
    with crashy.connected() as kvm:
        after = observe(kvm, "noop")
        assert after == before
        assert dict(after["vcpus"][0]["regs"])[ks0] == 9


@pytest.mark.parametrize("policy", ["always"])
def test_every_fsync_policy_keeps_what_a_crash_would_lose(sock_dir: Path, policy: str) -> None:
    crashy = Crashy(sock_dir / "state", "--fsync", policy)
    crashy.start()
    try:
        with crashy.connected() as kvm:
            h = kvm.call("kvm.create_vm", {"name": "f"})["vm"]
            kvm.call("vm.create_vcpu", {"vm": h, "vcpu_id": 2})
        crashy.kill9()
        crashy.start()
        with crashy.connected() as kvm:
            assert observe(kvm, "f")["info"]["vcpus"] == [2]
        assert crashy.stop() == 0
    finally:
        if crashy.daemon is not None:
            crashy.kill9()


def test_lvz_serve_refuses_an_unsafe_state_dir_naming_it(sock_dir: Path) -> None:
    state = sock_dir / "open"
    state.mkdir()
    state.chmod(0o777)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lvz.clients.cli",
            "serve",
            "--socket",
            str(sock_dir / "s.sock"),
            "--state-dir",
            str(state),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 125
    assert f"cannot use the state directory: {state} is group- or world-writable" in r.stderr


def test_killing_lvz_restore_leaves_nothing_or_the_whole_vm(sock_dir: Path) -> None:
    """SIGKILL of the command at whatever point: no half-built VM, ever."""
    n = 4096
    with start_daemon() as d:
        with Kvm.connect(d.socket) as kvm:
            h = kvm.call("kvm.create_vm", {"name": "src", "max_phyid": 4096})["vm"]
            made = kvm.call_batch([("vm.create_vcpu", {"vm": h, "vcpu_id": v}) for v in range(n)])
            kvm.call_batch(
                [
                    ("vcpu.set_one_reg", {"vcpu": r["vcpu"], "id": abi.CPUID, "value": v})
                    for v, r in enumerate(made)
                    if not isinstance(r, KvmError)
                ]
            )
        file = sock_dir / "src.lvz"
        sock = ["--socket", str(d.socket)]
        cli = [sys.executable, "-m", "lvz.clients.cli"]
        subprocess.run([*cli, "snapshot", "src", str(file), *sock], check=True, timeout=60)
        halfway = 0
        for _ in range(3):
            proc = subprocess.Popen(
                [*cli, "restore", str(file), "--name", "copy", *sock],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            with Kvm.connect(d.socket) as kvm:  # kill it once the daemon holds part of it
                while proc.poll() is None:
                    vms = kvm.call("kvm.list_vms", {})["vms"]
                    if any(v["name"] is None and v["vcpus"] > 0 for v in vms):
                        halfway += 1
                        break
            proc.kill()
            proc.wait()
            with Kvm.connect(d.socket) as kvm:
                deadline = time.monotonic() + 5
                while True:  # the daemon notices the closed connection, then drops the VM
                    vms = {v["name"]: v for v in kvm.call("kvm.list_vms", {})["vms"]}
                    if set(vms) <= {"src", "copy"} and None not in vms:
                        break
                    assert time.monotonic() < deadline, vms
                    time.sleep(0.01)
                if "copy" in vms:  # the restore had finished: whole
                    assert vms["copy"]["vcpus"] == n and vms["copy"]["phyids"] == n
                    kvm.call("vm.destroy", {"vm": kvm.call("kvm.open_vm", {"name": "copy"})["vm"]})
        assert halfway  # at least one kill landed mid-restore
