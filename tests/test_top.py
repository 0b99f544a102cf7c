"""``kvm.stats`` / ``vm.stats`` and ``lvz top``: the counters count what happened, the batch
modes print them, and the live view works in a real terminal (tmux), all against real daemons
over real sockets."""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from lvz.clients import Kvm, KvmError
from lvz.clients.top import Sample, View
from lvz.daemon.config import ServeConfig
from lvz.daemon.host import load_plugins
from lvz.daemon.server import serve
from lvz.plugins.api import Device, DeviceType, Stat, VmApi
from lvz.plugins.hookspecs import hookimpl
from lvz.protocol import abi

from . import topload
from .conftest import Connect

pytest_plugins = ["tests.daemon_fixtures"]

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 7


def values(
    schema: list[dict[str, Any]], scope: str, vals: list[Any], device: str | None = None
) -> dict[str, Any]:
    names = [d["name"] for d in schema if d["scope"] == scope and d["device"] == device]
    assert len(names) == len(vals)
    return dict(zip(names, vals, strict=True))


@pytest.fixture
def busy(lvz_socket: Path, vm_name: str) -> Iterator[tuple[Kvm, int]]:
    """A VM that went through ROUNDS of every kind of interrupt; (client, its id)."""
    with Kvm.connect(lvz_socket) as kvm:
        vm = topload.build(kvm, vm_name)
        topload.drive(vm, ROUNDS)
        vid = next(v["id"] for v in kvm.call("kvm.list_vms", {})["vms"] if v["name"] == vm_name)
        try:
            yield kvm, vid
        finally:
            vm.destroy()


# --- the method -------------------------------------------------------------------------------


def test_descriptors_come_once_then_only_values(lvz_socket: Path) -> None:
    with Kvm.connect(lvz_socket) as kvm:
        first = kvm.call("kvm.stats", {})
        descs = first["descriptors"]
        assert [d["id"] for d in descs] == list(range(len(descs)))
        for d in descs:
            assert set(d) == {"id", "name", "scope", "device", "kind", "unit", "size", "help"}
            assert d["scope"] in ("daemon", "vm", "vcpu", "device")
            assert d["kind"] in ("cumulative", "instant", "peak")
            assert d["help"], d
        assert {d["device"] for d in descs if d["scope"] == "device"} == {
            abi.DEV_IPI,
            abi.DEV_EIOINTC,
            abi.DEV_PCHPIC,
        }
        again = kvm.call("kvm.stats", {"schema": first["schema"]})
        assert "descriptors" not in again and again["schema"] == first["schema"]
        stale = kvm.call("kvm.stats", {"schema": (first["schema"] + 1) % 2**32})
        assert stale["descriptors"] == descs
        daemon = values(descs, "daemon", again["daemon"])
        assert daemon["connections"] >= 1 and daemon["connections_peak"] >= 1
        assert daemon["connections_total"] >= daemon["connections"]


def test_counters_count_each_kind_of_interrupt(busy: tuple[Kvm, int]) -> None:
    kvm, vid = busy
    r = kvm.call("kvm.stats", {"id": vid})
    descs = r["descriptors"]
    listed = next(v for v in r["vms"] if v["id"] == vid)
    vm = values(descs, "vm", r["vm"]["values"])
    assert listed["values"] == r["vm"]["values"]
    # A round: pin 5 → HWI0 on vCPU 0, an MSI → HWI0 on vCPU 2, an IPI to vCPU 1, a PV IPI
    # → SWI0 on all three; each line lowered again, so every one is raised afresh.
    assert vm["irq_lines"] == vm["msis"] == vm["hypercalls"] == vm["ipis"] == ROUNDS
    assert vm["hwis"] == 2 * ROUNDS and vm["swis"] == 3 * ROUNDS
    assert vm["deliveries"] == 6 * ROUNDS and vm["events"] == 12 * ROUNDS
    assert (vm["vcpus"], vm["phyids"], vm["max_phyid"], vm["pending"]) == (3, 3, 256, 0)
    assert vm["events_lost"] == 0
    vcpus = {c["vcpu_id"]: values(descs, "vcpu", c["values"]) for c in r["vm"]["vcpus"]}
    assert vcpus[1]["ipis"] == ROUNDS and vcpus[0]["ipis"] == 0
    assert vcpus[0]["hypercalls"] == ROUNDS and vcpus[2]["hypercalls"] == 0
    assert vcpus[2]["raises"][abi.INT_HWI0] == ROUNDS
    assert vcpus[2]["raises"][abi.INT_SWI0] == ROUNDS
    assert [v["phyid"] for v in vcpus.values()] == [0, 1, 2]
    dev = r["vm"]["devices"]
    pch = values(descs, "device", dev[abi.DEV_PCHPIC], abi.DEV_PCHPIC)
    assert pch["raises"][topload.PIN] == ROUNDS and sum(pch["raises"]) == ROUNDS
    assert pch["masked"] == [0 if pin == topload.PIN else 1 for pin in range(64)]
    eio = values(descs, "device", dev[abi.DEV_EIOINTC], abi.DEV_EIOINTC)
    assert eio["deliveries"][topload.PIN] == eio["deliveries"][topload.MSI_IRQ] == ROUNDS
    assert eio["route"][topload.MSI_IRQ] == 2
    assert eio["pending"][topload.MSI_IRQ] == 1  # an MSI sets ISR; nothing lowers it
    assert eio["masked"][topload.MSI_IRQ] == 0 and eio["masked"][7] == 1
    ipi = values(descs, "device", dev[abi.DEV_IPI], abi.DEV_IPI)
    assert ipi == {"sends": ROUNDS, "mail_sends": 0, "drops": 0, "pending": 0}


def test_line_up_now_is_pending(busy: tuple[Kvm, int], lvz_socket: Path) -> None:
    kvm, vid = busy
    name = next(v["name"] for v in kvm.call("kvm.list_vms", {})["vms"] if v["id"] == vid)
    vm = kvm.open_vm(name)
    vm.irq_line(topload.PIN, 1)
    r = kvm.call("kvm.stats", {"id": vid})
    assert values(r["descriptors"], "vm", r["vm"]["values"])["pending"] == 1
    vcpu0 = values(r["descriptors"], "vcpu", r["vm"]["vcpus"][0]["values"])
    assert vcpu0["lines"] == 1 << abi.INT_HWI0
    vm.irq_line(topload.PIN, 0)


def test_vm_stats_takes_a_handle(busy: tuple[Kvm, int]) -> None:
    kvm, vid = busy
    by_id = kvm.call("kvm.stats", {"id": vid})
    h = kvm.call("kvm.open_vm_id", {"id": vid})["vm"]
    by_handle = kvm.call("vm.stats", {"vm": h, "schema": by_id["schema"]})
    kvm.call("close", {"handle": h})
    assert "descriptors" not in by_handle
    for key in ("id", "name", "vcpus", "devices"):
        assert by_handle[key] == by_id["vm"][key], key


def test_bad_requests_are_named(lvz_socket: Path) -> None:
    with Kvm.connect(lvz_socket) as kvm:
        with pytest.raises(KvmError) as err:
            kvm.call("kvm.stats", {"id": 2**40})
        assert err.value.name == "ENOENT" and "no VM with id" in err.value.message
        with pytest.raises(KvmError) as err:
            kvm.call("kvm.stats", {"schema": "x"})
        assert err.value.name == "EINVAL" and "schema" in err.value.message
        with pytest.raises(KvmError) as err:
            kvm.call("vm.stats", {"vm": 999})
        assert err.value.name == "EBADF"


def test_events_lost_are_counted_per_vm() -> None:
    """A subscriber over --max-events loses events; the VM's events_lost says how many."""
    from .daemon_fixtures import start_daemon

    with start_daemon("--max-events", "4") as d, Kvm.connect(d.socket) as kvm:
        vm = kvm.create_vm(name="lossy")
        cpus = [vm.create_vcpu(i) for i in range(8)]
        for i, c in enumerate(cpus):
            c.set_one_reg(abi.CPUID, i)
        cpus[0].set_attr(abi.KVM_LOONGARCH_VCPU_CPUCFG, abi.CPUCFG_KVM_FEATURE, abi.KVM_FEATURE_IPI)
        vm.subscribe()
        # One request raising 8 lines: 4 fit the subscriber's queue, 4 are dropped.
        cpus[0].hypercall(abi.KVM_HCALL_SERVICE, abi.KVM_HCALL_FUNC_IPI, 0xFF, 0, 0)
        r = kvm.call("kvm.stats", {})
        vmv = values(r["descriptors"], "vm", r["vms"][0]["values"])
        assert (vmv["events"], vmv["events_lost"], vmv["subscribers"]) == (8, 4, 1)


# --- a plugin's counters ----------------------------------------------------------------------


class Counter(Device):
    """A chip with a counter and a per-line array; ``answer`` lets a test break it."""

    answer: Callable[[Counter], Any] = staticmethod(lambda self: [self.hits, [0, 1, 0]])

    def __init__(self, vm: VmApi) -> None:
        super().__init__(vm)
        self.hits = 0

    def set_input(self, line: int, level: int) -> None:
        self.hits += 1

    def stats(self) -> list[int | list[int]]:
        result: list[int | list[int]] = type(self).answer(self)
        return result


class CounterPlugin:
    @hookimpl
    def lvz_device_types(self) -> list[DeviceType]:
        return [
            DeviceType(
                "counter",
                98,
                Counter,
                (
                    Stat("hits", "cumulative", help="inputs driven"),
                    Stat("up", "instant", "boolean", size=3, help="lines up"),
                ),
            )
        ]


@pytest.mark.parametrize(
    ("answer", "complaint"),
    [
        (lambda self: [1], "not a list of the 2 values"),
        (lambda self: [1, [0, 1]], "not a list of 3 ints"),
        (lambda self: ["1", [0, 1, 0]], "'hits' is not an int"),
        (lambda self: 1 / 0, "ZeroDivisionError"),
    ],
)
async def test_plugin_counters_are_described_and_checked(
    sock_dir: Path,
    nursery: trio.Nursery,
    connect: Connect,
    monkeypatch: pytest.MonkeyPatch,
    answer: Callable[[Counter], Any],
    complaint: str,
) -> None:
    cfg = ServeConfig(socket=sock_dir / "c.sock")
    await nursery.start(
        serve, cfg, load_plugins(allow=[], extra=[("counter-chip", CounterPlugin())])
    )
    raw = await connect(cfg.socket)
    vm = (await raw.ok("kvm.create_vm"))["vm"]
    await raw.ok("vm.create_device", vm=vm, type="counter")
    r = await raw.ok("vm.stats", vm=vm)
    assert [
        (d["name"], d["device"], d["size"]) for d in r["descriptors"] if d["scope"] == "device"
    ] == [("hits", "counter", 1), ("up", "counter", 3)]
    assert r["devices"] == {"counter": [0, [0, 1, 0]]}
    monkeypatch.setattr(Counter, "answer", staticmethod(answer))
    err = await raw.call("vm.stats", vm=vm)
    assert err.error is not None and err.error.name == "EIO"
    assert "counter-chip" in err.error.message and complaint in err.error.message
    # kvm.stats without a drill-down does not ask the chip, so the list still works
    assert len((await raw.ok("kvm.stats"))["vms"]) == 1


class Hung(Counter):
    """A chip whose attrs hang, so the first get_attr breaks the device for good."""

    def get_attr(self, group: int, attr: int) -> int:
        time.sleep(1)
        return 0


class HungPlugin:
    @hookimpl
    def lvz_device_types(self) -> list[DeviceType]:
        return [DeviceType("hung", 97, Hung, (Stat("hits", "cumulative"),))]


async def test_once_shows_a_broken_device_instead_of_crashing(
    sock_dir: Path, nursery: trio.Nursery, connect: Connect
) -> None:
    """vm.stats answers nil for a broken device (protocol-additions): the drill-down says so.

    It used to end in a TypeError traceback, exit 1, on the one screen an operator opens to
    see what is wrong with that VM.
    """
    cfg = ServeConfig(socket=sock_dir / "b.sock", plugin_timeout=0.3)
    await nursery.start(
        serve, cfg, load_plugins(allow=["loongarch-ipi"], extra=[("hung-chip", HungPlugin())])
    )
    raw = await connect(cfg.socket)
    vm = (await raw.ok("kvm.create_vm", name="broken-chip"))["vm"]
    await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=0)
    await raw.ok("vm.create_device", vm=vm, type="loongarch-ipi")
    hung = (await raw.ok("vm.create_device", vm=vm, type="hung"))["device"]
    assert await raw.err("device.get_attr", device=hung, group=0, attr=0) == "ETIMEDOUT"
    assert (await raw.ok("vm.stats", vm=vm))["devices"]["hung"] is None
    r = await trio.run_process(
        [
            sys.executable,
            "-m",
            "lvz.clients.cli",
            "top",
            "--once",
            "--interval",
            "0",
            "--vm",
            "broken-chip",
            "--socket",
            str(cfg.socket),
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0 and "Traceback" not in err, err
    assert "hung: broken" in out and "loongarch-ipi: sends 0" in out, out


def test_a_stat_is_checked_when_declared() -> None:
    for bad in (
        {"name": "Hits", "kind": "cumulative"},
        {"name": "hits", "kind": "total"},
        {"name": "hits", "kind": "instant", "unit": "furlongs"},
        {"name": "hits", "kind": "instant", "size": 0},
    ):
        with pytest.raises(ValueError, match="stat"):
            Stat(**bad)


# --- the view's arithmetic --------------------------------------------------------------------


def test_rates_and_reset() -> None:
    view = View()
    a = Sample(10.0, {}, [], flat={("vm", 1, "deliveries"): 100})
    b = Sample(12.0, {}, [], flat={("vm", 1, "deliveries"): 150})
    assert view.rate(a, b, ("vm", 1, "deliveries")) == 25.0
    assert view.rate(None, b, ("vm", 1, "deliveries")) is None
    view.reset(b)
    assert view.total(b, ("vm", 1, "deliveries")) == 0
    # a counter that went back (its vCPU was re-created) counts from zero again
    c = Sample(13.0, {}, [], flat={("vm", 1, "deliveries"): 4})
    assert view.rate(b, c, ("vm", 1, "deliveries")) == 4.0
    assert view.total(c, ("vm", 1, "deliveries")) == 4


# --- the batch modes --------------------------------------------------------------------------


def lvz(*argv: str, socket: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    extra = ["--socket", str(socket)] if socket else []
    return subprocess.run(
        [sys.executable, "-m", "lvz.clients.cli", *argv, *extra],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def test_once_shows_each_vm(busy: tuple[Kvm, int], lvz_socket: Path, vm_name: str) -> None:
    r = lvz("top", "--once", "--interval", "0", "--filter", vm_name, socket=lvz_socket)
    assert r.returncode == 0, r.stderr
    title, header, row = r.stdout.splitlines()[:3]
    assert title.startswith("lvz top") and "VMs" in title
    assert header.split()[:4] == ["ID", "NAME", "VCPUS", "MAP"]
    cells = row.split()
    assert cells[1] == vm_name and cells[2] == "3" and cells[3] == "3/256"
    assert cells[5] == str(6 * ROUNDS)  # DELIV


def test_once_drills_into_one_vm(busy: tuple[Kvm, int], lvz_socket: Path, vm_name: str) -> None:
    r = lvz("top", "--once", "--interval", "0.05", "--vm", vm_name, socket=lvz_socket)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith(f"VM {busy[1]} {vm_name}: 3 vCPUs, phyid map 3/256")
    assert f"{abi.DEV_PCHPIC}: forwarded {ROUNDS}" in out
    assert f"{abi.DEV_IPI}: sends {ROUNDS}" in out
    lines = out.splitlines()
    vcpu1 = next(ln for ln in lines if ln.split()[:2] == ["1", "1"])
    assert vcpu1.split()[3] == str(2 * ROUNDS)  # IPI and SWI0, ROUNDS each
    # EIOINTC lists only the lines that counted something or are pending
    eio = lines.index(next(ln for ln in lines if ln.startswith(abi.DEV_EIOINTC)))
    listed = [ln.split()[0] for ln in lines[eio + 2 : eio + 4]]
    assert listed == [str(topload.PIN), str(topload.MSI_IRQ)]


def test_csv_prints_a_row_per_vm_per_interval(
    busy: tuple[Kvm, int], lvz_socket: Path, vm_name: str
) -> None:
    r = lvz(
        "top", "--csv", "--count", "2", "--interval", "0.05", "--filter", vm_name, socket=lvz_socket
    )
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 2
    for row in rows:
        assert row["name"] == vm_name and int(row["deliveries"]) == 6 * ROUNDS
        assert float(row["deliveries_per_s"]) == 0.0 and row["time"].endswith("Z")
    # Intervals under a second are told apart: the stamps carry milliseconds.
    assert rows[0]["time"] < rows[1]["time"]
    assert len(rows[0]["time"]) == len("2026-01-01T00:00:00.000Z")
    r = lvz(
        "top", "--log", "--count", "1", "--interval", "0.05", "--filter", vm_name, socket=lvz_socket
    )
    header, line = r.stdout.splitlines()
    assert header.split()[:3] == ["time", "id", "name"] and line.split()[2] == vm_name


@pytest.mark.parametrize(
    ("argv", "code", "says"),
    [
        (["--vm", "x"], 2, "--vm goes with --once"),
        ([], 2, "needs a terminal"),
        (["--interval", "-1"], 2, "0..3600"),
        (["--log", "--interval", "0"], 2, "need an --interval above 0"),
        (["--csv", "--count", "0"], 2, "a count is"),
        (["--once", "--filter", "("], 2, "not a regex"),
        (["--once", "--log"], 2, "not allowed with"),
        (["--once", "--vm", "no-such-vm-here"], 1, "ENOENT"),
    ],
)
def test_usage_errors(lvz_socket: Path, argv: list[str], code: int, says: str) -> None:
    r = lvz("top", *argv, socket=lvz_socket)
    assert r.returncode == code and says in r.stderr, (r.returncode, r.stderr)


def test_no_daemon_is_a_named_failure(tmp_path: Path) -> None:
    r = lvz("top", "--once", socket=tmp_path / "nothing.sock")
    assert r.returncode == 125 and "nothing.sock" in r.stderr


# --- the live view, in a real terminal --------------------------------------------------------


class Tmux:
    """A detached tmux server of our own (its own socket), one window of a fixed size."""

    def __init__(self, where: Path) -> None:
        self.sock = str(where / "tmux.sock")

    def __call__(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-S", self.sock, *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "top")

    def wait_for(self, what: Callable[[str], bool], timeout: float = 10.0) -> str:
        """Poll the screen until ``what`` holds (the view redraws on its own clock)."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if what(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"the screen never matched:\n{screen}")
            time.sleep(0.05)

    def keys(self, *keys: str) -> None:
        self("send-keys", "-t", "top", *keys)


@pytest.mark.skipif(
    shutil.which("tmux") is None,
    reason="tmux is not installed (apt-get install tmux): the live view is "
    "tested in a real terminal only",
)
def test_live_view_in_a_terminal(
    busy: tuple[Kvm, int], lvz_socket: Path, vm_name: str, sock_dir: Path
) -> None:
    kvm, vid = busy
    other = f"{vm_name}-b"
    quiet = kvm.create_vm(name=other)
    quiet.create_vcpu(0)
    tmux = Tmux(sock_dir)
    cmd = (
        f"env LANG=C.UTF-8 PYTHONPATH={ROOT} {sys.executable} -m lvz.clients.cli top "
        f"--socket {lvz_socket} --interval 0.2 --filter '^{vm_name}'; "
        f"echo EXIT=$?; sleep 60"
    )
    tmux("new-session", "-d", "-s", "top", "-x", "160", "-y", "40", cmd)

    def row(screen: str, name: str) -> list[str] | None:
        return next((ln.split() for ln in screen.splitlines() if ln.split()[1:2] == [name]), None)

    try:
        # Both VMs with their counts; the cursor starts on the first (the busy one: equal
        # rates keep creation order).
        # (Every check waits for the whole screen it expects: tmux may be captured while
        # curses is halfway through redrawing it.)
        tmux.wait_for(
            lambda s: (
                s.startswith("lvz top")
                and "DELIV/s▼" in s
                and (row(s, vm_name) or [""] * 6)[5] == str(6 * ROUNDS)
                and (row(s, other) or [""] * 6)[2:4] == ["1", "0/256"]
            )
        )
        # Interrupts driven now show up: totals grow, the rate is no longer zero.
        topload.drive(kvm.open_vm(vm_name), ROUNDS)
        tmux.wait_for(lambda s: (row(s, vm_name) or [""] * 6)[5] == str(12 * ROUNDS))
        # Enter drills into the selected VM: its vCPUs and its chips' lines.
        tmux.keys("Enter")
        tmux.wait_for(
            lambda s: (
                s.startswith(f"VM {vid} {vm_name}: 3 vCPUs")
                and "PHYID" in s
                and f"{abi.DEV_IPI}: sends {2 * ROUNDS}" in s
            )
        )
        # b goes back to the list
        tmux.keys("b")
        tmux.wait_for(lambda s: s.startswith("lvz top"))
        # s: the sort column moves on from DELIV/s to IPI/s
        tmux.keys("s")
        tmux.wait_for(lambda s: "IPI/s▼" in s and "DELIV/s▼" not in s)
        # r: totals start again from zero
        tmux.keys("r")
        tmux.wait_for(lambda s: "totals reset" in s and (row(s, vm_name) or [""] * 6)[5] == "0")
        # f: a filter typed at the prompt leaves one VM; c clears it
        tmux.keys("f")
        tmux.wait_for(lambda s: "filter (regex" in s)
        tmux.keys(f"{other}$", "Enter")
        tmux.wait_for(
            lambda s: (
                f"filter /{other}$/" in s and row(s, vm_name) is None and row(s, other) is not None
            )
        )
        tmux.keys("c")
        tmux.wait_for(lambda s: "filter cleared" in s and row(s, vm_name) is not None)
        # q quits, with status 0, leaving the terminal usable
        tmux.keys("q")
        tmux.wait_for(lambda s: "EXIT=0" in s)
    finally:
        subprocess.run(["tmux", "-S", tmux.sock, "kill-server"], check=False, capture_output=True)
        quiet.destroy()
