"""The same ONE_REG and lookup figures through the ``lvz.clients`` libraries.

Compared with the raw-protocol rows they show what the client library costs: object model,
typed results, event buffering. Pipelined figures come three ways, each with 64 requests in
flight on one connection: 64 threads sharing one blocking client, 64 trio tasks sharing one
trio client, and one trio task issuing ``kvm.gather`` batches of 64 (no task per call).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from lvz.protocol import abi

from .scenarios import WINDOW, Sample, Sampler, in_threads

CPUID = abi.CPUID


def client_import_error() -> str:
    """Empty when ``lvz.clients`` imports, else why not (the rows are then skipped)."""
    try:
        import lvz.clients  # noqa: F401
    except Exception as exc:
        return f"lvz.clients not available ({type(exc).__name__}: {exc})"
    return ""


class ClientBench:
    """One blocking and one trio client, each holding vCPU 0 of "bench-main"."""

    def __init__(self, path: Path, max_count: int) -> None:
        self.path = path
        self.max_count = max_count
        self.stack = contextlib.AsyncExitStack()
        self.sync_kvm: Any = None
        self.sync_vm: Any = None
        self.sync_vcpu: Any = None
        self.avm: Any = None
        self.avcpu: Any = None

    async def setup(self) -> None:
        from lvz.clients import Kvm, open_kvm

        def connect() -> None:
            self.sync_kvm = Kvm.connect(self.path)
            self.sync_vm = self.sync_kvm.open_vm("bench-main")
            self.sync_vcpu = self.sync_vm.open_vcpu(0)

        await trio.to_thread.run_sync(connect)
        kvm = await self.stack.enter_async_context(open_kvm(self.path))
        self.avm = await kvm.open_vm("bench-main")
        self.avcpu = await self.avm.open_vcpu(0)

    async def aclose(self) -> None:
        await self.stack.aclose()
        if self.sync_kvm is not None:
            self.sync_kvm.close()

    def _sync_call(self, which: str) -> Callable[[int], object]:
        vcpu, vm = self.sync_vcpu, self.sync_vm
        if which == "get":
            return lambda i: vcpu.get_one_reg(CPUID)
        if which == "set":
            return lambda i: vcpu.set_one_reg(CPUID, 0)
        return lambda i: vm.phyid_lookup(i & 127)

    def _async_call(self, which: str) -> Callable[[int], Awaitable[object]]:
        vcpu, vm = self.avcpu, self.avm
        if which == "get":
            return lambda i: vcpu.get_one_reg(CPUID)
        if which == "set":
            return lambda i: vcpu.set_one_reg(CPUID, 0)
        return lambda i: vm.phyid_lookup(i & 127)

    def sync_sampler(self, which: str) -> Sampler:
        call = self._sync_call(which)
        limit = self.max_count

        def loop(seconds: float) -> Sample:
            t0 = time.perf_counter()
            deadline = t0 + seconds
            n = 0
            while n < limit:
                call(n)
                n += 1
                if time.perf_counter() >= deadline:
                    break
            took = time.perf_counter() - t0
            return Sample(n / took, count=n, seconds=took)

        async def sample(seconds: float) -> Sample:
            return await trio.to_thread.run_sync(loop, seconds)

        return sample

    def threads_sampler(self, which: str) -> Sampler:
        """64 threads calling through one blocking client: its pipelining across threads."""
        call = self._sync_call(which)
        limit = self.max_count

        def loop(seconds: float) -> Sample:
            return in_threads(lambda: call, seconds, limit)

        async def sample(seconds: float) -> Sample:
            return await trio.to_thread.run_sync(loop, seconds)

        return sample

    def gather_sampler(self, which: str) -> Sampler:
        """One trio task sending batches of 64 calls with ``kvm.gather``."""
        from lvz.clients import ops
        from lvz.clients.core import Call

        vcpu, vm = self.avcpu, self.avm
        limit = self.max_count
        batch: list[Call[Any]]
        if which == "get":
            batch = [ops.get_one_reg(vcpu, CPUID)] * WINDOW
        elif which == "set":
            batch = [ops.set_one_reg(vcpu, CPUID, 0)] * WINDOW
        else:
            batch = [ops.phyid_lookup(vm, i & 127) for i in range(WINDOW)]

        async def sample(seconds: float) -> Sample:
            t0 = time.perf_counter()
            deadline = t0 + seconds
            n = 0
            while n < limit:
                await vm.kvm.gather(batch)
                n += WINDOW
                if time.perf_counter() >= deadline:
                    break
            took = time.perf_counter() - t0
            return Sample(n / took, count=n, seconds=took)

        return sample

    def async_sampler(self, which: str, pipelined: bool) -> Sampler:
        call = self._async_call(which)
        limit = self.max_count
        tasks = WINDOW if pipelined else 1

        async def sample(seconds: float) -> Sample:
            t0 = time.perf_counter()
            deadline = t0 + seconds
            count = [0]

            async def worker() -> None:
                while count[0] < limit:
                    await call(count[0])
                    count[0] += 1
                    if time.perf_counter() >= deadline:
                        return

            async with trio.open_nursery() as nursery:
                for _ in range(tasks):
                    nursery.start_soon(worker)
            took = time.perf_counter() - t0
            return Sample(count[0] / took, count=count[0], seconds=took)

        return sample
