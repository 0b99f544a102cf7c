"""Plugin faults against a real daemon: whatever a chip or hook does fails only its request.

A ``BaseException`` (``sys.exit``, ``KeyboardInterrupt``, ``GeneratorExit``) from plugin code is
EIO naming the plugin; plugin code that runs past ``--plugin-timeout`` is interrupted by the
watchdog's SIGALRM (ETIMEDOUT naming the plugin) and its device answers EIO until its VM is
destroyed. The daemon, its other VMs and the other chips of the same VM go on serving.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from lvz.clients.cli import build_parser
from lvz.daemon.config import ServeConfig
from lvz.daemon.host import load_plugins
from lvz.daemon.server import serve
from lvz.plugins import Device, DeviceType, VmApi, hookimpl
from lvz.protocol import abi
from lvz.testing.wire import Wire

PLUGIN = "hostile-chip"


class Hostile(Device):
    """A chip whose IOCSR store misbehaves as its value says."""

    def __init__(self, vm: VmApi) -> None:
        super().__init__(vm)
        vm.claim_iocsr(0x7100, 8, self)

    def read(self, vcpu_id: int, offset: int, size: int) -> int:
        return 0

    def write(self, vcpu_id: int, offset: int, size: int, value: int) -> None:
        if value == 1:
            raise SystemExit(3)
        if value == 2:
            raise KeyboardInterrupt
        if value == 3:
            raise GeneratorExit
        if value == 4:
            time.sleep(30)  # blocks the event loop: the watchdog must cut it short
        if value == 5:
            while True:  # a busy loop, the same
                pass

    def get_attr(self, group: int, attr: int) -> int:
        return 7


class HostilePlugin:
    @hookimpl
    def lvz_device_types(self) -> list[DeviceType]:
        return [DeviceType("hostile", 98, Hostile)]

    @hookimpl
    def lvz_hypercall(self, code: int) -> int | None:
        if code == 0x701:
            raise SystemExit(1)
        if code == 0x702:
            raise KeyboardInterrupt
        if code == 0x703:
            time.sleep(30)
        return None


async def hostile_daemon(nursery: trio.Nursery, sock_dir: Path) -> Wire:
    cfg = ServeConfig(socket=sock_dir / "h.sock", plugin_timeout=0.3)
    await nursery.start(serve, cfg, load_plugins(extra=[(PLUGIN, HostilePlugin())]))
    return await Wire.open(cfg.socket)


async def vm_with_chips(raw: Wire) -> tuple[int, int, int, int]:
    vm = (await raw.ok("kvm.create_vm"))["vm"]
    v = (await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=0))["vcpu"]
    await raw.ok("vcpu.set_one_reg", vcpu=v, id=abi.CPUID, value=3)
    ipi = (await raw.ok("vm.create_device", vm=vm, type="loongarch-ipi"))["device"]
    dev = (await raw.ok("vm.create_device", vm=vm, type="hostile"))["device"]
    return vm, v, ipi, dev


async def failure(raw: Wire, method: str, **params: object) -> tuple[str, str]:
    r = await raw.call(method, **params)
    assert r.error is not None, f"{method} succeeded: {r.result}"
    return r.error.name, r.error.message


async def test_base_exceptions_from_a_plugin_fail_only_that_request(
    nursery: trio.Nursery, sock_dir: Path
) -> None:
    raw = await hostile_daemon(nursery, sock_dir)
    _vm, v, ipi, dev = await vm_with_chips(raw)
    for value, kind in ((1, "SystemExit"), (2, "KeyboardInterrupt"), (3, "GeneratorExit")):
        name, message = await failure(
            raw, "vcpu.iocsr_write", vcpu=v, addr=0x7100, size=4, value=value
        )
        assert name == "EIO" and PLUGIN in message and kind in message, message
    for code, kind in ((0x701, "SystemExit"), (0x702, "KeyboardInterrupt")):
        name, message = await failure(raw, "vcpu.hypercall", vcpu=v, code=code)
        assert name == "EIO" and PLUGIN in message and kind in message, message
    # An exception is not a hang: the device is not marked broken, and everything else works.
    assert (await raw.ok("device.get_attr", device=dev, group=0, attr=0))["value"] == 7
    await raw.ok("vcpu.iocsr_write", vcpu=v, addr=0x1040, size=4, value=(3 << 16) | 1)
    assert (await raw.ok("vcpu.get_one_reg", vcpu=v, id=abi.ESTAT))["value"] == 1 << 12
    assert (await raw.ok("device.get_attr", device=ipi, group=0x40000001, attr=0))["value"] == 2
    await raw.aclose()


@pytest.mark.parametrize("value", [4, 5], ids=["sleep", "busy-loop"])
async def test_a_hung_chip_is_interrupted_and_its_device_broken(
    nursery: trio.Nursery, sock_dir: Path, value: int
) -> None:
    raw = await hostile_daemon(nursery, sock_dir)
    other = await Wire.open(sock_dir / "h.sock")
    vm, v, ipi, dev = await vm_with_chips(raw)
    _vm2, v2, _ipi2, dev2 = await vm_with_chips(other)
    name, message = await failure(raw, "vcpu.iocsr_write", vcpu=v, addr=0x7100, size=4, value=value)
    assert name == "ETIMEDOUT" and PLUGIN in message and "--plugin-timeout" in message, message
    # From now on the device answers EIO, however it is reached, until the VM is destroyed.
    for method, params in (
        ("device.get_attr", {"device": dev, "group": 0, "attr": 0}),
        ("vcpu.iocsr_write", {"vcpu": v, "addr": 0x7100, "size": 4, "value": 0}),
        ("vcpu.iocsr_read", {"vcpu": v, "addr": 0x7100, "size": 4}),
    ):
        name, message = await failure(raw, method, **params)
        assert name == "EIO" and PLUGIN in message and "broken" in message, (method, message)
    # Its VM's other chips, and the same chip in another VM, are unaffected.
    await raw.ok("vcpu.iocsr_write", vcpu=v, addr=0x1040, size=4, value=(3 << 16) | 1)
    assert (await raw.ok("vcpu.get_one_reg", vcpu=v, id=abi.ESTAT))["value"] == 1 << 12
    assert (await raw.ok("device.get_attr", device=ipi, group=0x40000001, attr=0))["value"] == 2
    assert (await other.ok("device.get_attr", device=dev2, group=0, attr=0))["value"] == 7
    await other.ok("vcpu.iocsr_write", vcpu=v2, addr=0x7100, size=4, value=0)
    await raw.ok("vm.destroy", vm=vm)
    _vm3, _v3, _ipi3, dev3 = await vm_with_chips(raw)
    assert (await raw.ok("device.get_attr", device=dev3, group=0, attr=0))["value"] == 7
    await raw.aclose()
    await other.aclose()


async def test_a_hung_hook_is_interrupted_and_the_next_call_works(
    nursery: trio.Nursery, sock_dir: Path
) -> None:
    raw = await hostile_daemon(nursery, sock_dir)
    _vm, v, _ipi, _dev = await vm_with_chips(raw)
    name, message = await failure(raw, "vcpu.hypercall", vcpu=v, code=0x703)
    assert name == "ETIMEDOUT" and PLUGIN in message, message
    assert (await raw.ok("vcpu.hypercall", vcpu=v, code=0x100, args=[1, 1, 0, 3]))["a0"] == 0
    await raw.aclose()


def test_lvz_serve_takes_plugin_timeout() -> None:
    args = build_parser().parse_args(["serve", "--plugin-timeout", "0.25"])
    assert args.plugin_timeout == 0.25
    assert ServeConfig(socket=Path("x")).plugin_timeout == 1.0
