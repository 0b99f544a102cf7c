"""``--max-total-vcpus``: named VMs outlive their connections, so the daemon bounds the vCPUs of
all VMs together; the budget is a counter that creation takes from and every free gives back.

Real daemons over real sockets, in-process (as test_state.py), so a restart costs no process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from itertools import count
from pathlib import Path
from typing import Any

import trio

from lvz.daemon.config import ServeConfig
from lvz.daemon.host import load_plugins
from lvz.daemon.server import serve
from lvz.protocol import abi
from lvz.testing.wire import Wire as Raw

_sockets = count()


@asynccontextmanager
async def running(sock_dir: Path, **options: Any) -> AsyncIterator[Raw]:
    """A daemon with ``options``, and a client connection to it (``raw.socket_path``)."""
    config = ServeConfig(socket=sock_dir / f"b{next(_sockets)}.sock", **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, config, load_plugins())
        raw = await Raw.connect(config.socket)
        raw.socket_path = config.socket  # type: ignore[attr-defined]
        try:
            yield raw
        finally:
            await raw.aclose()
            nursery.cancel_scope.cancel()


async def test_the_budget_spans_vms_and_connections_and_is_refused_with_enospc(
    sock_dir: Path,
) -> None:
    async with running(sock_dir, max_total_vcpus=3) as raw:
        a = (await raw.ok("kvm.create_vm", name="a"))["vm"]
        await raw.ok("vm.create_vcpu", vm=a, vcpu_id=0)
        await raw.ok("vm.create_vcpu", vm=a, vcpu_id=1)
        other = await Raw.connect(raw.socket_path)  # type: ignore[attr-defined]
        b = (await other.ok("kvm.create_vm", name="b"))["vm"]
        await other.ok("vm.create_vcpu", vm=b, vcpu_id=0)
        reply = await other.call("vm.create_vcpu", vm=b, vcpu_id=1)
        assert reply.error is not None and reply.error.name == "ENOSPC"
        assert "3 vCPUs" in reply.error.message and "--max-total-vcpus" in reply.error.message
        # A refused vCPU does not exist: it is not listed and its id stays free.
        assert (await other.ok("vm.info", vm=b))["vcpus"] == [0]
        await other.aclose()


async def test_named_vms_keep_their_vcpus_after_their_connection_closes(sock_dir: Path) -> None:
    config = ServeConfig(socket=sock_dir / "keep.sock", max_total_vcpus=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, config, load_plugins())
        first = await Raw.connect(config.socket)
        vm = (await first.ok("kvm.create_vm", name="kept"))["vm"]
        await first.ok("vm.create_vcpu", vm=vm, vcpu_id=0)
        await first.ok("vm.create_vcpu", vm=vm, vcpu_id=1)
        await first.aclose()
        second = await Raw.connect(config.socket)
        vm2 = (await second.ok("kvm.create_vm"))["vm"]
        assert await second.err("vm.create_vcpu", vm=vm2, vcpu_id=0) == "ENOSPC"
        await second.aclose()
        nursery.cancel_scope.cancel()


async def test_destroying_a_vcpu_or_a_vm_gives_its_vcpus_back(sock_dir: Path) -> None:
    async with running(sock_dir, max_total_vcpus=2) as raw:
        vm = (await raw.ok("kvm.create_vm", name="x"))["vm"]
        v0 = (await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=0))["vcpu"]
        await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=1)
        assert await raw.err("vm.create_vcpu", vm=vm, vcpu_id=2) == "ENOSPC"
        await raw.ok("vcpu.destroy", vcpu=v0)
        await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=2)  # the freed one's room
        assert await raw.err("vm.create_vcpu", vm=vm, vcpu_id=3) == "ENOSPC"
        await raw.ok("vm.destroy", vm=vm)
        y = (await raw.ok("kvm.create_vm", name="y"))["vm"]
        await raw.ok("vm.create_vcpu", vm=y, vcpu_id=0)
        await raw.ok("vm.create_vcpu", vm=y, vcpu_id=1)
        assert await raw.err("vm.create_vcpu", vm=y, vcpu_id=2) == "ENOSPC"


async def test_restored_vms_count_against_the_budget(sock_dir: Path) -> None:
    state = sock_dir / "state"
    async with running(sock_dir, state_dir=state) as raw:
        vm = (await raw.ok("kvm.create_vm", name="saved"))["vm"]
        for v in range(2):
            h = (await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=v))["vcpu"]
            await raw.ok("vcpu.set_one_reg", vcpu=h, id=abi.CPUID, value=v)
    async with running(sock_dir, state_dir=state, max_total_vcpus=3) as raw:
        saved = (await raw.ok("kvm.open_vm", name="saved"))["vm"]
        assert (await raw.ok("vm.info", vm=saved))["vcpus"] == [0, 1]
        new = (await raw.ok("kvm.create_vm"))["vm"]
        await raw.ok("vm.create_vcpu", vm=new, vcpu_id=0)
        assert await raw.err("vm.create_vcpu", vm=new, vcpu_id=1) == "ENOSPC"
