"""Plugins: entry-point loading, LVZ_PLUGINS, check_pending, and fault isolation over a socket."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from lvz.clients import Kvm
from lvz.clients.cli import main as cli_main
from lvz.daemon.config import ServeConfig
from lvz.daemon.host import PluginLoadError, load_plugins
from lvz.daemon.server import serve
from lvz.plugins import Device, DeviceType, VmApi, hookimpl
from lvz.protocol import abi

from .conftest import Connect
from .daemon_fixtures import start_daemon

EXT = Path(__file__).resolve().parent / "extplugin"


@pytest.fixture
def doorbell_on_path(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Make tests/extplugin an installed distribution: package + dist-info with entry points.

    And lift the suite's own-chips-only restriction (``lvz_plugins``), which would hide it.
    """
    monkeypatch.delenv("LVZ_PLUGINS", raising=False)
    site = sock_dir / "site"
    shutil.copytree(EXT / "lvz_doorbell", site / "lvz_doorbell")
    info = site / "lvz_doorbell-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lvz-doorbell\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[lvz.irqchips]\ndoorbell = lvz_doorbell\n")
    sys.path.insert(0, str(site))
    try:
        yield site
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("lvz_doorbell", None)


async def test_external_plugin_through_entry_points(
    doorbell_on_path: Path, sock_dir: Path, nursery: trio.Nursery, connect: Connect
) -> None:
    host = load_plugins()
    assert "doorbell" in [p.name for p in host.loaded]
    cfg = ServeConfig(socket=sock_dir / "ext.sock")
    await nursery.start(serve, cfg, host)
    raw = await connect(cfg.socket)
    assert "doorbell" in (await raw.ok("hello", protocol=1))["device_types"]
    plugins = (await raw.ok("kvm.list_plugins"))["plugins"]
    assert {
        "name": "doorbell",
        "version": "0.1.0",
        "dist": "lvz-doorbell",
        "device_types": ["doorbell"],
    } in plugins
    vm = (await raw.ok("kvm.create_vm"))["vm"]
    await raw.ok("vm.subscribe", vm=vm)
    v0 = (await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=0))["vcpu"]
    v1 = (await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=1))["vcpu"]
    await raw.ok("vcpu.set_one_reg", vcpu=v1, id=abi.CPUID, value=42)
    dev = (await raw.ok("vm.create_device", vm=vm, type="doorbell"))["device"]
    await raw.ok("vcpu.iocsr_write", vcpu=v0, addr=0x9000, size=4, value=42)  # rings phyid 42
    await raw.ok("vcpu.iocsr_write", vcpu=v0, addr=0x9000, size=4, value=7)  # nobody: ignored
    assert [
        (n.params["vcpu_id"], n.params["irq"], n.params["level"]) for n in raw.notifications
    ] == [(1, 11, 1)]
    assert (await raw.ok("device.get_attr", device=dev, group=1, attr=0))["value"] == 1
    assert await raw.err("device.get_attr", device=dev, group=2, attr=0) == "EINVAL"
    assert (await raw.ok("vcpu.iocsr_read", vcpu=v0, addr=0x9000, size=4))["value"] == 1


def test_lvz_plugins_restricts_what_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LVZ_PLUGINS", "loongarch-ipi, pv-ipi")
    host = load_plugins()
    assert sorted(p.name for p in host.loaded) == ["loongarch-ipi", "pv-ipi"]
    assert sorted(host.device_types) == ["loongarch-ipi"]
    monkeypatch.setenv("LVZ_PLUGINS", "loongarch-ipi,nonesuch")
    with pytest.raises(PluginLoadError, match="nonesuch"):
        load_plugins()


class Misspelled:
    @hookimpl
    def lvz_device_type(self) -> list[DeviceType]:  # missing "s": no such hook
        return []


def test_hooks_without_a_spec_are_rejected() -> None:
    with pytest.raises(PluginLoadError, match="lvz_device_type"):
        load_plugins(allow=[], extra=[("typo", Misspelled())])


class Faulty(Device):
    def __init__(self, vm: VmApi) -> None:
        super().__init__(vm)
        self.writes = 0
        vm.claim_iocsr(0x7000, 8, self)

    def read(self, vcpu_id: int, offset: int, size: int) -> int:
        return "garbage"  # type: ignore[return-value]

    def write(self, vcpu_id: int, offset: int, size: int, value: int) -> None:
        self.writes += 1
        raise ZeroDivisionError("boom")

    def get_attr(self, group: int, attr: int) -> int:
        return -5


class FaultyPlugin:
    @hookimpl
    def lvz_device_types(self) -> list[DeviceType]:
        return [DeviceType("faulty", 99, Faulty)]

    @hookimpl
    def lvz_hypercall(self, code: int) -> int | None:
        if code == 0x777:
            raise RuntimeError("hypercall bug")
        return None


async def test_a_failing_plugin_fails_only_that_request(
    sock_dir: Path, nursery: trio.Nursery, connect: Connect
) -> None:
    cfg = ServeConfig(socket=sock_dir / "f.sock")
    await nursery.start(serve, cfg, load_plugins(extra=[("faulty-chip", FaultyPlugin())]))
    raw = await connect(cfg.socket)
    vm = (await raw.ok("kvm.create_vm"))["vm"]
    v = (await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=0))["vcpu"]
    await raw.ok("vcpu.set_one_reg", vcpu=v, id=abi.CPUID, value=3)
    ipi = (await raw.ok("vm.create_device", vm=vm, type=abi.DEV_IPI))["device"]
    dev = (await raw.ok("vm.create_device", vm=vm, type="faulty"))["device"]
    for method, params in (
        ("vcpu.iocsr_write", {"vcpu": v, "addr": 0x7000, "size": 4, "value": 1}),
        ("vcpu.iocsr_read", {"vcpu": v, "addr": 0x7000, "size": 4}),
        ("device.get_attr", {"device": dev, "group": 0, "attr": 0}),
        ("vcpu.hypercall", {"vcpu": v, "code": 0x777, "args": []}),
    ):
        r = await raw.call(method, **params)
        assert r.error is not None
        assert r.error.name == "EIO", method
        assert "faulty-chip" in r.error.message, r.error.message
    # the VM's other state and the other chips are untouched
    assert (await raw.ok("vm.phyid_map", vm=vm))["entries"] == [[3, 0]]
    await raw.ok(
        "vcpu.iocsr_write",
        vcpu=v,
        addr=abi.IOCSR_IPI_BASE + abi.IPI_SEND,
        size=4,
        value=abi.ipi_send(3, 1),
    )
    assert (await raw.ok("vcpu.get_one_reg", vcpu=v, id=abi.ESTAT))["value"] == 1 << abi.INT_IPI
    assert (
        await raw.ok(
            "device.get_attr",
            device=ipi,
            group=abi.KVM_DEV_LOONGARCH_IPI_GRP_REGS,
            attr=abi.ipi_attr(0, abi.IPI_STATUS),
        )
    )["value"] == 1 << 1
    assert (
        await raw.ok(
            "vcpu.hypercall",
            vcpu=v,
            code=abi.KVM_HCALL_SERVICE,
            args=[abi.KVM_HCALL_FUNC_IPI, 1, 0, 3],
        )
    )["a0"] == abi.KVM_HCALL_SUCCESS


def test_trace_env_logs_every_hook_call(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from lvz.daemon.model import Vm

    monkeypatch.setenv("LVZ_TRACE_PLUGINS", "1")
    host = load_plugins()
    vm = Vm(host, name=None, max_phyid=abi.KVM_MAX_PHYID)
    with caplog.at_level(logging.INFO, logger="lvz.plugins"):
        assert host.call_first(
            "lvz_hypercall",
            vm=vm.chip_api,
            vcpu_id=0,
            code=abi.KVM_HCALL_SERVICE,
            args=[abi.KVM_HCALL_FUNC_IPI, 0, 0, 0, 0, 0],
        ) == (0, "pv-ipi")
    assert "hook lvz_hypercall: pv-ipi(0, 256, [1, 0, 0, 0, 0, 0]) -> 0" in caplog.text


async def test_doorbell_state_survives_lvz_snapshot_and_restore(
    doorbell_on_path: Path, sock_dir: Path, nursery: trio.Nursery, connect: Connect
) -> None:
    """A third-party chip declares its state (Device.save_state); the CLI saves and restores it."""
    cfg = ServeConfig(socket=sock_dir / "bell.sock")
    await nursery.start(serve, cfg, load_plugins())
    raw = await connect(cfg.socket)
    vm = (await raw.ok("kvm.create_vm", name="bell"))["vm"]
    v0 = (await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=0))["vcpu"]
    v1 = (await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=1))["vcpu"]
    await raw.ok("vcpu.set_one_reg", vcpu=v1, id=abi.CPUID, value=42)
    await raw.ok("vm.create_device", vm=vm, type="doorbell")
    for _ in range(3):
        await raw.ok("vcpu.iocsr_write", vcpu=v0, addr=0x9000, size=4, value=42)
    file = sock_dir / "bell.lvzsnap"
    sock = ["--socket", str(cfg.socket)]
    assert await trio.to_thread.run_sync(cli_main, ["snapshot", "bell", str(file), *sock]) == 0
    assert (
        await trio.to_thread.run_sync(cli_main, ["restore", str(file), "--name", "bell2", *sock])
        == 0
    )
    copy = (await raw.ok("kvm.open_vm", name="bell2"))["vm"]
    bell = (await raw.ok("vm.open_device", vm=copy, type="doorbell"))["device"]
    assert (await raw.ok("device.get_attr", device=bell, group=1, attr=0))["value"] == 3
    c0 = (await raw.ok("vm.open_vcpu", vm=copy, vcpu_id=0))["vcpu"]
    c1 = (await raw.ok("vm.open_vcpu", vm=copy, vcpu_id=1))["vcpu"]
    assert (await raw.ok("vcpu.get_one_reg", vcpu=c1, id=abi.ESTAT))["value"] == 1 << abi.INT_TI
    await raw.ok("vcpu.iocsr_write", vcpu=c0, addr=0x9000, size=4, value=42)  # routes as before
    assert (await raw.ok("vcpu.iocsr_read", vcpu=c0, addr=0x9000, size=4))["value"] == 4


class Stateless(Device):
    """Declares no state: a VM holding it cannot be saved."""


class Garbled(Device):
    def save_state(self) -> list[tuple[int, int, int]]:
        return [(1, 2)]  # type: ignore[list-item]


class StatePlugin:
    @hookimpl
    def lvz_device_types(self) -> list[DeviceType]:
        return [DeviceType("stateless", 98, Stateless), DeviceType("garbled", 97, Garbled)]


async def test_a_device_without_declared_state_is_refused_by_name(
    sock_dir: Path, nursery: trio.Nursery, connect: Connect
) -> None:
    cfg = ServeConfig(socket=sock_dir / "s.sock")
    await nursery.start(serve, cfg, load_plugins(extra=[("state-chips", StatePlugin())]))
    raw = await connect(cfg.socket)
    vm = (await raw.ok("kvm.create_vm", name="nostate"))["vm"]
    dev = (await raw.ok("vm.create_device", vm=vm, type="stateless"))["device"]
    r = await raw.call("device.save_state", device=dev)
    assert r.error is not None and r.error.name == "EINVAL"
    assert "stateless cannot be saved" in r.error.message
    file = sock_dir / "nostate.lvzsnap"
    code = await trio.to_thread.run_sync(
        cli_main, ["snapshot", "nostate", str(file), "--socket", str(cfg.socket)]
    )
    assert code == 1 and not file.exists()
    garbled = (await raw.ok("vm.create_device", vm=vm, type="garbled"))["device"]
    r = await raw.call("device.save_state", device=garbled)
    assert r.error is not None and r.error.name == "EIO"
    assert "state-chips" in r.error.message


async def test_chips_get_a_facade_not_the_vm(
    sock_dir: Path, nursery: trio.Nursery, connect: Connect
) -> None:
    seen: list[object] = []

    class Peek(Device):
        def __init__(self, vm: VmApi) -> None:
            super().__init__(vm)
            seen.append(vm)

    class PeekPlugin:
        @hookimpl
        def lvz_device_types(self) -> list[DeviceType]:
            return [DeviceType("peek", 96, Peek)]

    cfg = ServeConfig(socket=sock_dir / "p.sock")
    await nursery.start(serve, cfg, load_plugins(extra=[("peek", PeekPlugin())]))
    raw = await connect(cfg.socket)
    vm = (await raw.ok("kvm.create_vm"))["vm"]
    await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=3)
    await raw.ok("vm.create_device", vm=vm, type="peek")
    (api,) = seen
    assert type(api).__name__ == "ChipApi"
    assert api.vcpu_ids() == [3]  # type: ignore[attr-defined]
    for private in ("vcpus", "phyids", "set_cpuid", "set_one_reg", "devices", "host", "destroy"):
        assert not hasattr(api, private), private
    # every member of the documented contract is there
    for member in (
        "max_phyid",
        "pv_features",
        "vcpu_by_phyid",
        "vcpu_exists",
        "vcpu_ids",
        "queue_irq",
        "dequeue_irq",
        "claim_iocsr",
        "claim_mmio",
        "set_chip_input",
        "iocsr_read",
        "iocsr_write",
    ):
        assert hasattr(api, member), member


def test_doorbell_state_survives_a_daemon_restart(
    doorbell_on_path: Path, sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--state-dir`` saves a third-party chip through its declared state, like a snapshot."""
    monkeypatch.setenv("PYTHONPATH", str(doorbell_on_path))  # the daemons find the plugin
    state = sock_dir / "state"
    with start_daemon("--state-dir", str(state)) as d:
        with Kvm.connect(d.socket) as kvm:
            vm = kvm.create_vm(name="bell")
            vm.create_vcpu(0).set_one_reg(abi.CPUID, 7)
            vm.create_device("doorbell").set_attr(1, 0, 41)
        assert d.stop() == 0
    with start_daemon("--state-dir", str(state)) as d:
        with Kvm.connect(d.socket) as kvm:
            vm = kvm.open_vm("bell")
            assert vm.open_device("doorbell").get_attr(1, 0) == 41
            assert vm.phyid_map().entries == ((7, 0),)
        assert d.stop() == 0


EXITING_PLUGIN = """
import os, sys, time
from lvz.plugins import hookimpl
if os.environ.get("EXIT_AT") == "import":
    sys.exit(0)
if os.environ.get("EXIT_AT") == "import-hang":
    time.sleep(60)

@hookimpl
def lvz_device_types():
    if os.environ.get("EXIT_AT") == "hook-hang":
        time.sleep(60)
    raise SystemExit(0)
"""


@pytest.mark.parametrize(
    ("where", "says"),
    [
        ("import", "SystemExit"),
        ("hook", "SystemExit"),
        ("import-hang", "--plugin-timeout"),
        ("hook-hang", "--plugin-timeout"),
    ],
)
def test_a_plugin_that_exits_or_hangs_while_loading_is_named(
    sock_dir: Path, where: str, says: str
) -> None:
    """sys.exit in a plugin's module or its lvz_device_types made `lvz serve` exit 0 without
    a word: a supervisor saw a clean stop, the pytest fixture 'exited with status 0'. A sleep
    there kept the daemon from ever being ready, silently; now --plugin-timeout covers it."""
    site = sock_dir / "site"
    (site / "lvz_exiting-0.1.0.dist-info").mkdir(parents=True)
    (site / "lvz_exiting.py").write_text(EXITING_PLUGIN)
    (site / "lvz_exiting-0.1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: lvz-exiting\nVersion: 0.1.0\n"
    )
    (site / "lvz_exiting-0.1.0.dist-info" / "entry_points.txt").write_text(
        "[lvz.irqchips]\nexiting = lvz_exiting\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = dict(
        os.environ, PYTHONPATH=f"{site}{os.pathsep}{root}", LVZ_PLUGINS="exiting", EXIT_AT=where
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lvz.clients.cli",
            "serve",
            "--socket",
            str(sock_dir / "x.sock"),
            "--plugin-timeout",
            "0.2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=50,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 125, (r.returncode, r.stderr)
    assert "plugin 'exiting'" in r.stderr and says in r.stderr, r.stderr
