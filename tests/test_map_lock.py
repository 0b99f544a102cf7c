"""The daemon's per-VM map lock (the kernel's ``phyid_map_lock``), against a real daemon.

The test task takes the lock itself, as a durable write in progress would (it awaits while
holding it): phyid writes of that VM wait, in order, and see what happened meanwhile; every
other request, on any connection, is answered at once. Ordering is checked through events,
never through time.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from lvz.daemon import handlers
from lvz.daemon.server import Daemon
from lvz.protocol import abi

from .conftest import Connect


@pytest.fixture
def name(vm_name: str) -> str:
    return vm_name


async def test_phyid_writes_wait_for_the_lock_in_order_and_nothing_else_does(
    daemon: Daemon, connect: Connect, name: str
) -> None:
    a, b = await connect(), await connect()
    vm = (await a.ok("kvm.create_vm", name=name))["vm"]
    v0 = (await a.ok("vm.create_vcpu", vm=vm, vcpu_id=0))["vcpu"]
    await a.ok("vm.create_vcpu", vm=vm, vcpu_id=1)
    bvm = (await b.ok("kvm.open_vm", name=name))["vm"]
    bv1 = (await b.ok("vm.open_vcpu", vm=bvm, vcpu_id=1))["vcpu"]
    lock = daemon.map_locks[daemon.named[name]]
    await lock.acquire()
    set_a, data = a.send_request("vcpu.set_one_reg", {"vcpu": v0, "id": abi.CPUID, "value": 5})
    read_a, more = a.send_request("vcpu.get_one_reg", {"vcpu": v0, "id": abi.CPUID})
    await a.send(data + more)  # the read is pipelined behind the waiting write
    await trio.testing.wait_all_tasks_blocked()
    set_b, data = b.send_request("vcpu.set_one_reg", {"vcpu": bv1, "id": abi.CPUID, "value": 5})
    await b.send(data)
    await trio.testing.wait_all_tasks_blocked()
    # Another connection's requests that do not write the map are answered meanwhile.
    c = await connect()
    cvm = (await c.ok("kvm.open_vm", name=name))["vm"]
    assert (await c.ok("vm.phyid_lookup", vm=cvm, phyid=5))["vcpu_id"] is None
    assert (await c.ok("vm.info", vm=cvm))["vcpus"] == [0, 1]
    lock.release()
    assert (await a.response(set_a)).error is None
    r = await a.response(read_a)
    assert r.result == {"value": 5}  # it waited for the write before it, as on one fd
    r = await b.response(set_b)
    assert r.error is not None and r.error.name == "EINVAL"  # the lock is FIFO: a came first
    assert "belongs to vCPU 0" in r.error.message
    assert (await c.ok("vm.phyid_map", vm=cvm))["entries"] == [[5, 0]]


async def test_a_write_waiting_for_the_lock_sees_its_vm_destroyed(
    daemon: Daemon, connect: Connect, name: str
) -> None:
    a, b = await connect(), await connect()
    vm = (await a.ok("kvm.create_vm", name=name))["vm"]
    v0 = (await a.ok("vm.create_vcpu", vm=vm, vcpu_id=0))["vcpu"]
    model = daemon.named[name]
    lock = daemon.map_locks[model]
    await lock.acquire()
    pending, data = a.send_request("vcpu.set_one_reg", {"vcpu": v0, "id": abi.CPUID, "value": 9})
    await a.send(data)
    await trio.testing.wait_all_tasks_blocked()
    bvm = (await b.ok("kvm.open_vm", name=name))["vm"]
    gone, data = b.send_request("vm.destroy", {"vm": bvm})
    await b.send(data)
    await trio.testing.wait_all_tasks_blocked()
    assert not model.alive and name not in daemon.named  # dead at once, torn down later
    lock.release()
    r = await a.response(pending)
    assert r.error is not None and r.error.name == "EBADF", r.error
    assert (await b.response(gone)).error is None
    assert model.phyids == {} and model.vcpus == {}


async def test_the_same_value_again_takes_no_lock(
    daemon: Daemon, connect: Connect, name: str
) -> None:
    """VMMs re-put every register: an unchanged CPUID must not queue behind a durable write."""
    a = await connect()
    vm = (await a.ok("kvm.create_vm", name=name))["vm"]
    v0 = (await a.ok("vm.create_vcpu", vm=vm, vcpu_id=0))["vcpu"]
    await a.ok("vcpu.set_one_reg", vcpu=v0, id=abi.CPUID, value=4)
    lock = daemon.map_locks[daemon.named[name]]
    async with lock:
        await a.ok("vcpu.set_one_reg", vcpu=v0, id=abi.CPUID, value=4)
        await a.ok("vcpu.set_one_reg", vcpu=v0, id=abi.ESTAT, value=1)


async def test_a_big_phyid_map_is_built_in_chunks_and_whole(
    daemon: Daemon, connect: Connect, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setattr(handlers, "MAP_CHUNK", 8)
    a = await connect()
    vm = (await a.ok("kvm.create_vm", name=name, max_phyid=1024))["vm"]
    model = daemon.named[name]
    for i in range(50):  # the model is plain Python: set it up directly
        model.set_cpuid(model.create_vcpu(i), 1000 - i)
    r = await a.ok("vm.phyid_map", vm=vm)
    assert r["limit"] == 1024
    assert r["entries"] == [[1000 - i, i] for i in reversed(range(50))]
