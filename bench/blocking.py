"""The blocking-socket raw driver: the second floor's client, and lvz's raw figures through it.

``lvz.testing.wire.Wire`` drives the servers from a trio loop, and a trio round trip costs the
client tens of microseconds of Python (scheduler passes, cancel scopes, ``wait_readable``): far
more than the floor server spends per request, so "floor, sequential" through it measures the
trio client. ``BlockingWire`` (the same module) does the same job with a plain blocking
``socket``: ``sendall``, ``recv``, one Packer and one Unpacker, a few microseconds per request.
Driving the floor with both shows what each client kind can reach at all, so a figure can say
whether the server or the client limits it. It runs in a worker thread (``trio.to_thread``)
while the trio loop sleeps.

The request bytes, the checks (msgid in order, no error) and the pipelining rule (every
receive is answered by one send topping the window up) are the trio driver's.
"""

from __future__ import annotations

from pathlib import Path

from lvz.protocol import abi
from lvz.testing.wire import BlockingWire, MakeRequest, Run

CPUID = abi.CPUID


class BlockingBench:
    """The blocking driver's connections: one to the floor, one to lvz holding vCPU 0 of
    "bench-main" (handles are per connection, so it opens its own)."""

    def __init__(self, floor_path: Path, lvz_path: Path, max_count: int) -> None:
        self.floor = BlockingWire(floor_path)
        self.lvz = BlockingWire(lvz_path)
        self.max_count = max_count
        self.vm = self.lvz.result("kvm.open_vm", {"name": "bench-main"})["vm"]
        self.vcpu = self.lvz.result("vm.open_vcpu", {"vm": self.vm, "vcpu_id": 0})["vcpu"]

    def close(self) -> None:
        self.floor.close()
        self.lvz.close()

    def make(self, which: str) -> MakeRequest:
        """The same requests (and bytes) as ``scenarios.Bench``'s, on this connection."""
        vcpu, vm = self.vcpu, self.vm
        if which == "get":
            get = {"vcpu": vcpu, "id": CPUID}
            return lambda i: ("vcpu.get_one_reg", get)
        if which == "set":
            put = {"vcpu": vcpu, "id": CPUID, "value": 0}
            return lambda i: ("vcpu.set_one_reg", put)
        return lambda i: ("vm.phyid_lookup", {"vm": vm, "phyid": i & 127})

    def run(self, target: str, which: str, pipelined: bool, seconds: float, window: int) -> Run:
        """One sample, blocking (call it from a worker thread)."""
        conn = self.floor if target == "floor" else self.lvz
        make = self.make(which)
        if pipelined:
            return conn.pipelined(make, window, seconds, self.max_count)
        return conn.sequential(make, seconds, self.max_count)
