"""``vm.phyid_map`` answers from a map the model keeps: it must always be the map's truth.

The model keeps the sorted entries while CPUIDs are set in increasing order (and the highest is
the one dropped), and the daemon rebuilds them at the next read once they were not. Against a
real daemon over a real socket: every read after an in-order set, an out-of-order set, a vCPU's
destroy (which drops its phyid) and a re-take of that phyid matches the map, small and big; and
the model's kept list against any sequence of sets and drops.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lvz.daemon import handlers, model
from lvz.daemon.host import load_plugins
from lvz.daemon.model import Vm
from lvz.daemon.server import Daemon
from lvz.protocol import abi
from lvz.protocol.errors import KvmError

from .conftest import Connect


@pytest.mark.parametrize(
    ("chunk", "keep"), [(4096, 4096), (4096, 0), (2, 0)], ids=["kept", "rebuilt", "chunked"]
)
async def test_the_map_after_set_destroy_and_retake_of_phyids(
    daemon: Daemon,
    connect: Connect,
    monkeypatch: pytest.MonkeyPatch,
    vm_name: str,
    chunk: int,
    keep: int,
) -> None:
    """With ``keep`` 0 every set below the highest phyid drops the kept map: rebuilt reads."""
    monkeypatch.setattr(handlers, "MAP_CHUNK", chunk)
    monkeypatch.setattr(model, "KEEP_SORTED", keep)
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


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 7), st.integers(0, 15)), max_size=60))
def test_the_kept_map_is_the_map_or_nothing(steps: list[tuple[bool, int, int]]) -> None:
    """Sets (in order, out of order, taken, repeated) and drops (the highest or not)."""
    vm = Vm(load_plugins(), name=None, max_phyid=16)
    vcpus = [vm.create_vcpu(i) for i in range(8)]
    for is_set, which, phyid in steps:
        if is_set:
            try:
                vm.set_one_reg(vcpus[which], abi.CPUID, phyid)
            except KvmError:
                pass  # taken, or this vCPU already has another: the map is unchanged
        else:
            vm.destroy_vcpu(vcpus[which])
            vcpus[which] = vm.create_vcpu(8 + len(steps) + which)  # a fresh one in its place
        kept = vm.map_entries
        truth = sorted((p, v.vcpu_id) for p, v in vm.phyids.items())
        assert kept is None or kept == truth


def kept(vm: Vm) -> list[tuple[int, int]] | None:
    """The model's kept map, read afresh (a method call between two reads may change it)."""
    return vm.map_entries


def test_the_map_is_kept_through_unplugs_and_small_out_of_order_sets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kept: in-order sets, an unplug anywhere, an out-of-order set in a small map; a big map
    (past KEEP_SORTED) given an out-of-order set is dropped, and so is a destroyed VM's."""
    monkeypatch.setattr(model, "KEEP_SORTED", 4)
    vm = Vm(load_plugins(), name=None, max_phyid=256)
    vcpus = [vm.create_vcpu(i) for i in range(6)]
    for i in (1, 2, 3):
        vm.set_one_reg(vcpus[i], abi.CPUID, 2 * i)
    assert kept(vm) == [(2, 1), (4, 2), (6, 3)]
    vm.set_one_reg(vcpus[0], abi.CPUID, 0)  # below the others, in a small map: in place
    assert kept(vm) == [(0, 0), (2, 1), (4, 2), (6, 3)]
    vm.destroy_vcpu(vcpus[2])  # an unplug in the middle
    assert kept(vm) == [(0, 0), (2, 1), (6, 3)]
    vm.set_one_reg(vcpus[4], abi.CPUID, 8)
    vm.set_one_reg(vcpus[5], abi.CPUID, 5)  # below the highest, with KEEP_SORTED entries
    assert kept(vm) is None

    small = Vm(load_plugins(), name=None, max_phyid=256)
    small.set_one_reg(small.create_vcpu(0), abi.CPUID, 1)
    assert kept(small) == [(1, 0)]
    small.destroy()  # a VM's teardown forgets the map rather than emptying it entry by entry
    assert kept(small) is None
