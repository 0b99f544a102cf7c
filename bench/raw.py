"""The raw-protocol client driver, shared by the floor and lvz so the comparison is fair.

Both servers are driven by exactly this code: the same encoder, the same decoder, the same
socket calls. Sequential mode sends one request and waits for its answer; pipelined mode keeps
``window`` requests in flight, topping the window up after every receive. Every response is
checked (msgid in order, no error), so a figure can never come from answers that were wrong.

Requests come from a ``MakeRequest`` callback (index -> method, params) so a scenario can cycle
targets or alternate raise and acknowledge requests while the driver stays the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import trio

from lvz.protocol.abi import U32_MAX

RECEIVE_BYTES = 65536

MakeRequest = Callable[[int], tuple[str, dict[str, Any]]]
#: Called with every notification ``[2, event, params]`` that arrives on a driven connection.
OnNotification = Callable[[str, dict[str, Any]], None]


class BenchError(Exception):
    """The server answered something a benchmark did not expect: the figure is void."""


@dataclass(slots=True)
class Run:
    """One timed run: ``count`` answered requests in ``seconds`` (first send to last answer)."""

    count: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


class RawClient:
    """One connection speaking msgpack-RPC with nothing but a Packer and an Unpacker."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._pack = msgpack.Packer(use_bin_type=True).pack
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=64 << 20)
        self._next_id = 0
        self.on_notification: OnNotification | None = None

    @classmethod
    async def connect(cls, path: Path) -> RawClient:
        return cls(await trio.open_unix_socket(str(path)))

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)

    def _encode(self, method: str, params: dict[str, Any]) -> bytes:
        msgid = self._next_id
        self._next_id = (msgid + 1) & U32_MAX
        return self._pack([0, msgid, method, params])

    async def _next_message(self) -> Any:
        """The next decoded message, reading from the socket as needed."""
        while True:
            for msg in self._unpacker:
                return msg
            data = await self.stream.receive_some(RECEIVE_BYTES)
            if not data:
                raise BenchError("the server closed the connection")
            self._unpacker.feed(data)

    def _notification(self, msg: Any) -> None:
        if msg[1] == "protocol_error":
            raise BenchError(f"protocol error from the server: {msg[2]}")
        if self.on_notification is not None:
            self.on_notification(msg[1], msg[2])

    def _check(self, msg: Any, expect_id: int, method: str) -> dict[str, Any]:
        if msg[1] != expect_id:
            raise BenchError(f"{method}: answer to msgid {msg[1]}, expected {expect_id}")
        if msg[2] is not None:
            raise BenchError(f"{method}: error {msg[2]}")
        result = msg[3]
        assert isinstance(result, dict)
        return result

    async def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """One request, one answer (setup calls and the sequential mode)."""
        expect = self._next_id
        await self.stream.send_all(self._encode(method, params))
        while True:
            msg = await self._next_message()
            if msg[0] == 2:
                self._notification(msg)
                continue
            return self._check(msg, expect, method)

    async def sequential(self, make: MakeRequest, seconds: float, max_count: int) -> Run:
        """One request in flight, for ``seconds`` or ``max_count`` requests, whichever first."""
        t0 = time.perf_counter()
        deadline = t0 + seconds
        count = 0
        while count < max_count:
            method, params = make(count)
            await self.call(method, params)
            count += 1
            if time.perf_counter() >= deadline:
                break
        return Run(count, time.perf_counter() - t0)

    async def pipelined(self, make: MakeRequest, window: int, seconds: float,
                        max_count: int, unit: int = 1) -> Run:
        """``window`` requests in flight; every receive is answered by one send topping it up.

        The number of requests sent is a multiple of ``unit`` (a raise and its acknowledgement
        must both be sent, or a line is left up). Results are checked for errors and order but
        not kept; a scenario that needs results uses ``call`` or ``batch``.
        """
        encode = self._encode
        unpacker = self._unpacker
        stream = self.stream
        first_id = self._next_id
        sent = done = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        out = []
        max_count -= max_count % unit
        while sent < window and sent < max_count:
            out.append(encode(*make(sent)))
            sent += 1
        await stream.send_all(b"".join(out))
        topping = True
        while done < sent:
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:
                raise BenchError("the server closed the connection")
            unpacker.feed(data)
            answered = 0
            for msg in unpacker:
                if msg[0] == 2:
                    self._notification(msg)
                    continue
                if msg[2] is not None or msg[1] != (first_id + done) & U32_MAX:
                    raise BenchError(f"request {done}: unexpected answer {msg!r:.200}")
                done += 1
                answered += 1
            if topping and time.perf_counter() >= deadline:
                topping = False
                if sent % unit:
                    rest = [encode(*make(i)) for i in range(sent, sent + unit - sent % unit)]
                    sent += len(rest)
                    await stream.send_all(b"".join(rest))
            if topping and answered:
                out = []
                while answered and sent < max_count:
                    out.append(encode(*make(sent)))
                    sent += 1
                    answered -= 1
                if out:
                    await stream.send_all(b"".join(out))
        return Run(done, time.perf_counter() - t0)

    async def batch(self, requests: list[tuple[str, dict[str, Any]]],
                    window: int = 64) -> list[dict[str, Any]]:
        """Pipeline ``requests`` (``window`` in flight) and return every result, in order."""
        results: list[dict[str, Any]] = []
        first_id = self._next_id
        encode = self._encode
        total = len(requests)
        sent = 0
        while len(results) < total:
            top = min(total, len(results) + window)
            if top > sent:
                await self.stream.send_all(b"".join(encode(*r) for r in requests[sent:top]))
                sent = top
            msg = await self._next_message()
            while True:
                if msg[0] == 2:
                    self._notification(msg)
                else:
                    i = len(results)
                    results.append(self._check(msg, (first_id + i) & U32_MAX, requests[i][0]))
                try:  # drain what is already decoded before topping the window up again
                    msg = next(self._unpacker)
                except StopIteration:
                    break
        return results
