"""``vm.phyid_map`` keeps its last answer between reads: it must still be the map's truth.

The daemon rebuilds the answer only when a phyid was set or dropped since (the VM's map
generation). Against a real daemon over a real socket: every read after a set, a vCPU's
destroy (which drops its phyid) and a re-take of that phyid matches the map, small and big.
"""

from __future__ import annotations

import pytest

from lvz.daemon import handlers
from lvz.daemon.server import Daemon
from lvz.protocol import abi

from .conftest import Connect


@pytest.mark.parametrize("chunk", [4096, 2], ids=["small", "chunked"])
async def test_the_map_after_set_destroy_and_retake_of_phyids(
    daemon: Daemon, connect: Connect, monkeypatch: pytest.MonkeyPatch, vm_name: str, chunk: int
) -> None:
    monkeypatch.setattr(handlers, "MAP_CHUNK", chunk)
    a = await connect()
    vm = (await a.ok("kvm.create_vm", name=vm_name))["vm"]
    vcpus = [(await a.ok("vm.create_vcpu", vm=vm, vcpu_id=i))["vcpu"] for i in range(4)]
    for i in range(3):
        await a.ok("vcpu.set_one_reg", vcpu=vcpus[i], id=abi.CPUID, value=10 + i)
    want = [[10, 0], [11, 1], [12, 2]]
    assert (await a.ok("vm.phyid_map", vm=vm))["entries"] == want
    assert (await a.ok("vm.phyid_map", vm=vm))["entries"] == want  # the kept answer

    await a.ok("vcpu.set_one_reg", vcpu=vcpus[3], id=abi.CPUID, value=5)
    assert (await a.ok("vm.phyid_map", vm=vm))["entries"] == [[5, 3], *want]

    await a.ok("vcpu.destroy", vcpu=vcpus[1])  # drops phyid 11
    assert (await a.ok("vm.phyid_map", vm=vm))["entries"] == [[5, 3], [10, 0], [12, 2]]

    v4 = (await a.ok("vm.create_vcpu", vm=vm, vcpu_id=4))["vcpu"]
    await a.ok("vcpu.set_one_reg", vcpu=v4, id=abi.CPUID, value=11)  # phyid 11 re-taken
    got = await a.ok("vm.phyid_map", vm=vm)
    assert got == {"limit": 256, "entries": [[5, 3], [10, 0], [11, 4], [12, 2]]}

    # The same value again changes nothing, and the answer stays the map's.
    await a.ok("vcpu.set_one_reg", vcpu=v4, id=abi.CPUID, value=11)
    assert await a.ok("vm.phyid_map", vm=vm) == got


async def test_a_destroyed_vm_leaves_no_map_behind(
    daemon: Daemon, connect: Connect, vm_name: str
) -> None:
    a = await connect()
    vm = (await a.ok("kvm.create_vm", name=vm_name))["vm"]
    v = (await a.ok("vm.create_vcpu", vm=vm, vcpu_id=0))["vcpu"]
    await a.ok("vcpu.set_one_reg", vcpu=v, id=abi.CPUID, value=7)
    assert (await a.ok("vm.phyid_map", vm=vm))["entries"] == [[7, 0]]
    await a.ok("vm.destroy", vm=vm)
    err = await a.err("vm.phyid_map", vm=vm)
    assert err == "EBADF"
    again = (await a.ok("kvm.create_vm", name=vm_name))["vm"]  # a new VM of the same name
    assert (await a.ok("vm.phyid_map", vm=again))["entries"] == []
