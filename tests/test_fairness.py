"""Fairness against a real daemon: no client's work keeps another client waiting for it all.

Each test proves the daemon yields by event order, never by time: a recording plugin logs the
work as the daemon does it, the test task (which runs only when the daemon yields) sends a
probe on another connection as soon as the work has begun, and the probe must be logged
before the work is done.
"""

from __future__ import annotations

from collections.abc import ValuesView
from pathlib import Path

import pytest
import trio
import trio.testing

from lvz.daemon import server
from lvz.daemon.config import ServeConfig
from lvz.daemon.host import load_plugins
from lvz.daemon.peer import Handle
from lvz.daemon.server import Daemon, serve
from lvz.plugins import Device, DeviceType, VmApi, hookimpl
from lvz.protocol import abi
from lvz.testing.wire import Wire

from .conftest import Connect

PROBE = 0x9902
WORK = 0x9901


class Recorder:
    """Logs vCPU teardowns (through its "recorder" chip) and hypercalls; ``started`` is set
    at the first piece of work."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.started = trio.Event()

    @hookimpl
    def lvz_device_types(self) -> list[DeviceType]:
        return [DeviceType("recorder", 97, lambda vm: Witness(vm, self))]

    @hookimpl
    def lvz_hypercall(self, code: int) -> int | None:
        if code == WORK:
            self.log.append("work")
            self.started.set()
            return 0
        if code == PROBE:
            self.log.append("probe")
            return 0
        return None


class Witness(Device):
    def __init__(self, vm: VmApi, rec: Recorder) -> None:
        super().__init__(vm)
        self.rec = rec

    def vcpu_destroyed(self, vcpu_id: int) -> None:
        self.rec.log.append("work")
        self.rec.started.set()


async def recording_daemon(
    nursery: trio.Nursery, sock_dir: Path, max_handles: int = 66_000
) -> tuple[Recorder, Path, Daemon]:
    rec = Recorder()
    cfg = ServeConfig(socket=sock_dir / "fair.sock", max_handles=max_handles)
    daemon = await nursery.start(serve, cfg, load_plugins(extra=[("recorder", rec)]))
    return rec, cfg.socket, daemon


async def probe_vcpu(raw: Wire) -> int:
    vm = (await raw.ok("kvm.create_vm"))["vm"]
    return int((await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=0))["vcpu"])


def probe_came_during_the_work(log: list[str]) -> bool:
    return "probe" in log and "work" in log[log.index("probe") :]


async def test_a_huge_destroy_lets_other_clients_in(
    nursery: trio.Nursery, sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "DESTROY_CHUNK", 4)  # 64 vCPUs: 16 chunks, as 65,536 are 64
    rec, path, _ = await recording_daemon(nursery, sock_dir)
    a, b = await Wire.open(path), await Wire.open(path)
    vm = (await a.ok("kvm.create_vm"))["vm"]
    await a.ok("vm.create_device", vm=vm, type="recorder")
    for i in range(64):
        v = (await a.ok("vm.create_vcpu", vm=vm, vcpu_id=i))["vcpu"]
        await a.ok("vcpu.set_one_reg", vcpu=v, id=abi.CPUID, value=i)
    pv = await probe_vcpu(b)
    msgid, data = a.send_request("vm.destroy", {"vm": vm})
    await a.send(data)
    await rec.started.wait()
    assert (await b.ok("vcpu.hypercall", vcpu=pv, code=PROBE))["a0"] == 0
    assert (await a.response(msgid)).error is None
    assert rec.log.count("work") == 64
    assert probe_came_during_the_work(rec.log), rec.log
    await a.aclose()
    await b.aclose()


async def test_a_huge_orphaned_vm_is_torn_down_in_the_background(
    nursery: trio.Nursery, sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unnamed VM dies with its client's connection: in chunks too, and never half-way."""
    monkeypatch.setattr(server, "DESTROY_CHUNK", 4)
    rec, path, daemon = await recording_daemon(nursery, sock_dir)
    a, b = await Wire.open(path), await Wire.open(path)
    vm = (await a.ok("kvm.create_vm"))["vm"]
    await a.ok("vm.create_device", vm=vm, type="recorder")
    for i in range(64):
        await a.ok("vm.create_vcpu", vm=vm, vcpu_id=i)
    pv = await probe_vcpu(b)
    await a.aclose()
    await rec.started.wait()
    assert (await b.ok("vcpu.hypercall", vcpu=pv, code=PROBE))["a0"] == 0
    listed = (await b.ok("kvm.list_vms"))["vms"]
    assert [v["vcpus"] for v in listed] == [1]  # gone from the list at once: only b's VM
    await trio.testing.wait_all_tasks_blocked()
    assert rec.log.count("work") == 64 and probe_came_during_the_work(rec.log), rec.log
    assert daemon.map_locks.keys() == set(daemon.vms)
    await b.aclose()


async def test_a_pipeline_of_requests_lets_other_clients_in(
    nursery: trio.Nursery, sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A storm (LOAD_FINISHED, hypercalls, ...) in one send is served in slices."""
    monkeypatch.setattr(server, "SLICE", 0.0)  # every request ends a slice
    rec, path, _ = await recording_daemon(nursery, sock_dir)
    a, b = await Wire.open(path), await Wire.open(path)
    va, pv = await probe_vcpu(a), await probe_vcpu(b)
    ids, chunks = [], []
    for _ in range(200):
        msgid, data = a.send_request("vcpu.hypercall", {"vcpu": va, "code": WORK})
        ids.append(msgid)
        chunks.append(data)
    await a.send(b"".join(chunks))
    await rec.started.wait()
    assert (await b.ok("vcpu.hypercall", vcpu=pv, code=PROBE))["a0"] == 0
    for msgid in ids:
        assert (await a.response(msgid)).error is None
    assert probe_came_during_the_work(rec.log), rec.log
    await a.aclose()
    await b.aclose()


class CountingHandles(dict[int, Handle]):
    """A connection's handle table that counts full scans."""

    scans = 0

    def values(self) -> ValuesView[Handle]:  # type: ignore[override]
        CountingHandles.scans += 1
        return super().values()


async def test_refusals_at_the_handle_limit_cost_no_scan(
    nursery: trio.Nursery, sock_dir: Path
) -> None:
    _rec, path, daemon = await recording_daemon(nursery, sock_dir, max_handles=4)
    a = await Wire.open(path)
    vm = (await a.ok("kvm.create_vm"))["vm"]
    vcpus = [(await a.ok("vm.create_vcpu", vm=vm, vcpu_id=i))["vcpu"] for i in range(3)]
    [conn] = daemon.connections
    conn.handles = CountingHandles(conn.handles)
    for i in range(3, 50):
        assert await a.err("vm.create_vcpu", vm=vm, vcpu_id=i) == "EMFILE"
    assert CountingHandles.scans <= 1  # one sweep at most, then O(1) per refusal
    # A death makes a sweep worth it again: the destroyed vCPU's handle frees its slot.
    await a.ok("vcpu.destroy", vcpu=vcpus[0])
    await a.ok("vm.create_vcpu", vm=vm, vcpu_id=3)
    assert await a.err("vm.create_vcpu", vm=vm, vcpu_id=4) == "EMFILE"
    await a.aclose()


async def test_subscribe_is_idempotent_per_connection_and_vm(
    daemon: Daemon, connect: Connect, vm_name: str
) -> None:
    a = await connect()
    vm = (await a.ok("kvm.create_vm", name=vm_name))["vm"]
    v = (await a.ok("vm.create_vcpu", vm=vm, vcpu_id=0))["vcpu"]
    second = (await a.ok("kvm.open_vm", name=vm_name))["vm"]
    ids = []
    chunks = []
    for h in [second] * 500 + [vm] * 500:
        msgid, data = a.send_request("vm.subscribe", {"vm": h})
        ids.append(msgid)
        chunks.append(data)
    await a.send(b"".join(chunks))
    for msgid in ids:
        assert (await a.response(msgid)).error is None
    [sub] = daemon.subscribers[daemon.named[vm_name]].values()
    assert sorted(sub.numbers) == [vm, second]  # two handles, however many calls
    await a.ok("vcpu.interrupt", vcpu=v, irq=12)
    assert [(n.params["vm"], n.params["irq"]) for n in a.notifications] == [(vm, 12)]
    await a.ok("close", handle=vm)  # the lowest goes: events carry the next one
    await a.ok("vcpu.interrupt", vcpu=v, irq=-12)
    assert [(n.params["vm"], n.params["level"]) for n in a.notifications][-1] == (second, 0)
    await a.ok("close", handle=second)
    await a.ok("vcpu.interrupt", vcpu=v, irq=12)
    await a.ok("vm.info", vm=(await a.ok("kvm.open_vm", name=vm_name))["vm"])
    assert len(a.notifications) == 2  # unsubscribed with its last handle
