"""The blocking-socket raw driver: the second floor's client, and lvz's raw figures through it.

``raw.RawClient`` drives the servers from a trio loop, and a trio round trip costs the client
tens of microseconds of Python (scheduler passes, cancel scopes, ``wait_readable``): far more
than the floor server spends per request, so "floor, sequential" through it measures the trio
client. This driver does the same job with a plain blocking ``socket``: ``sendall``, ``recv``,
one Packer and one Unpacker, a few microseconds per request. Driving the floor with both shows
what each client kind can reach at all, so a figure can say whether the server or the client
limits it. It runs in a worker thread (``trio.to_thread``) while the trio loop sleeps.

The request bytes, the checks (msgid in order, no error) and the pipelining rule (every
receive is answered by one send topping the window up) are the trio driver's.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import msgpack

from lvz.protocol import abi

from .raw import RECEIVE_BYTES, U32_MAX, BenchError, MakeRequest, Run

CPUID = abi.CPUID


class BlockingRawClient:
    """One connection over a blocking AF_UNIX socket; same wire as ``raw.RawClient``."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self._pack = msgpack.Packer(use_bin_type=True).pack
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=64 << 20)
        self._next_id = 0

    def close(self) -> None:
        self.sock.close()

    def _encode(self, method: str, params: dict[str, Any]) -> bytes:
        msgid = self._next_id
        self._next_id = (msgid + 1) & U32_MAX
        return self._pack([0, msgid, method, params])

    def _next_message(self) -> Any:
        while True:
            for msg in self._unpacker:
                return msg
            data = self.sock.recv(RECEIVE_BYTES)
            if not data:
                raise BenchError("the server closed the connection")
            self._unpacker.feed(data)

    def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """One request, one answer; notifications are skipped (nothing here subscribes)."""
        expect = self._next_id
        self.sock.sendall(self._encode(method, params))
        while True:
            msg = self._next_message()
            if msg[0] == 2:
                if msg[1] == "protocol_error":
                    raise BenchError(f"protocol error from the server: {msg[2]}")
                continue
            if msg[1] != expect or msg[2] is not None:
                raise BenchError(f"{method}: unexpected answer {msg!r:.200}")
            result = msg[3]
            assert isinstance(result, dict)
            return result

    def sequential(self, make: MakeRequest, seconds: float, max_count: int) -> Run:
        t0 = time.perf_counter()
        deadline = t0 + seconds
        count = 0
        while count < max_count:
            method, params = make(count)
            self.call(method, params)
            count += 1
            if time.perf_counter() >= deadline:
                break
        return Run(count, time.perf_counter() - t0)

    def pipelined(self, make: MakeRequest, window: int, seconds: float, max_count: int) -> Run:
        encode, unpacker, sock = self._encode, self._unpacker, self.sock
        first_id = self._next_id
        sent = done = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        out = []
        while sent < window and sent < max_count:
            out.append(encode(*make(sent)))
            sent += 1
        sock.sendall(b"".join(out))
        topping = True
        while done < sent:
            data = sock.recv(RECEIVE_BYTES)
            if not data:
                raise BenchError("the server closed the connection")
            unpacker.feed(data)
            answered = 0
            for msg in unpacker:
                if msg[0] == 2:
                    continue
                if msg[2] is not None or msg[1] != (first_id + done) & U32_MAX:
                    raise BenchError(f"request {done}: unexpected answer {msg!r:.200}")
                done += 1
                answered += 1
            if topping and time.perf_counter() >= deadline:
                topping = False
            if topping and answered:
                out = []
                while answered and sent < max_count:
                    out.append(encode(*make(sent)))
                    sent += 1
                    answered -= 1
                if out:
                    sock.sendall(b"".join(out))
        return Run(done, time.perf_counter() - t0)


class BlockingBench:
    """The blocking driver's connections: one to the floor, one to lvz holding vCPU 0 of
    "bench-main" (handles are per connection, so it opens its own)."""

    def __init__(self, floor_path: Path, lvz_path: Path, max_count: int) -> None:
        self.floor = BlockingRawClient(floor_path)
        self.lvz = BlockingRawClient(lvz_path)
        self.max_count = max_count
        self.vm = self.lvz.call("kvm.open_vm", {"name": "bench-main"})["vm"]
        self.vcpu = self.lvz.call("vm.open_vcpu", {"vm": self.vm, "vcpu_id": 0})["vcpu"]

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

    def run(self, target: str, which: str, pipelined: bool, seconds: float,
            window: int) -> Run:
        """One sample, blocking (call it from a worker thread)."""
        conn = self.floor if target == "floor" else self.lvz
        make = self.make(which)
        if pipelined:
            return conn.pipelined(make, window, seconds, self.max_count)
        return conn.sequential(make, seconds, self.max_count)
