"""The least client of each shape: what 64 trio tasks or 64 threads sharing one connection can
reach at all, before any client library is involved.

The trio and blocking floors (``floor.py`` driven by ``lvz.testing.wire``) pipeline 64
requests from *one* task or thread. A client library used from 64 tasks or 64 threads pays,
on top of that, one hand-off per call: the caller parks, and whoever reads the answer wakes
it. These drivers are that shape and nothing else -- one dict of waiters, one msgpack Packer
and Unpacker, a reader that wakes each caller with its message, a writer that sends whatever
the callers queued in one syscall -- so the floor server driven by them is the ceiling of a
64-task (or 64-thread) client on trio + msgpack + AF_UNIX in CPython. ``make bench`` reports
them as floors and compares the lvz clients' 64-task and 64-thread figures with them too.

``python -m bench.handoff`` measures the hand-off alone (no socket, no encoding).
"""

from __future__ import annotations

import _thread
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import trio

from lvz.protocol import abi

from .scenarios import WINDOW, Sample, Sampler, in_threads

RECV_BYTES = 65536
MakeParams = Callable[[int], tuple[str, dict[str, Any]]]


def get_one_reg(vcpu: int) -> MakeParams:
    params = {"vcpu": vcpu, "id": abi.CPUID}
    return lambda i: ("vcpu.get_one_reg", params)


#: What a sample asks: the floor answers anything, so handle 1 will do; on lvz the connection
#: first opens vCPU 0 of "bench-main" (``scenarios.Bench.setup_main``), as the clients' rows do.
OPEN_MAIN: tuple[tuple[str, dict[str, Any]], ...] = (
    ("kvm.open_vm", {"name": "bench-main"}),
    ("vm.open_vcpu", {"vm": 1, "vcpu_id": 0}),
)


def _abort(_: object) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.SUCCEEDED


async def least_tasks(path: Path, lvz: bool, seconds: float, max_count: int) -> Sample:
    """``WINDOW`` trio tasks calling ``vcpu.get_one_reg`` in a loop for ``seconds`` on one fresh
    connection (to lvz: after ``OPEN_MAIN``)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.setblocking(False)
    pack = msgpack.Packer(use_bin_type=True).pack
    unpacker = msgpack.Unpacker(raw=False)
    waiting: dict[int, trio.lowlevel.Task] = {}
    answers: dict[int, Any] = {}
    outbox: list[bytes] = []
    writer: list[trio.lowlevel.Task | None] = [None]
    next_id = [0]

    async def call(method: str, params: dict[str, Any]) -> Any:
        msgid = next_id[0]
        next_id[0] = msgid + 1
        outbox.append(pack([0, msgid, method, params]))
        idle = writer[0]
        if idle is not None:
            writer[0] = None
            trio.lowlevel.reschedule(idle)
        waiting[msgid] = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(_abort)
        msg = answers.pop(msgid)
        if msg[2] is not None:
            raise RuntimeError(f"{method}: {msg[2]}")
        return msg[3]

    async def write_loop() -> None:
        while True:
            if not outbox:
                writer[0] = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(_abort)
                continue
            data = b"".join(outbox)
            outbox.clear()
            while data:
                try:
                    data = data[sock.send(data) :]
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)

    async def read_loop() -> None:
        while True:
            try:
                data = sock.recv(RECV_BYTES)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            if not data:
                raise RuntimeError("the server closed the connection")
            unpacker.feed(data)
            for msg in unpacker:
                answers[msg[1]] = msg
                trio.lowlevel.reschedule(waiting.pop(msg[1]))

    count = [0]
    t0 = deadline = 0.0
    make = get_one_reg(1)

    async def worker() -> None:
        while count[0] < max_count:
            await call(*make(count[0]))
            count[0] += 1
            if time.perf_counter() >= deadline:
                return

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_loop)
            nursery.start_soon(read_loop)
            if lvz:
                for method, params in OPEN_MAIN:
                    handle = await call(method, params)
                make = get_one_reg(handle["vcpu"])
            t0 = time.perf_counter()
            deadline = t0 + seconds
            async with trio.open_nursery() as workers:
                for _ in range(WINDOW):
                    workers.start_soon(worker)
            took = time.perf_counter() - t0
            nursery.cancel_scope.cancel()
    finally:
        sock.close()
    return Sample(count[0] / took, count=count[0], seconds=took)


def least_threads(path: Path, lvz: bool, seconds: float, max_count: int) -> Sample:
    """``WINDOW`` threads calling ``vcpu.get_one_reg`` in a loop for ``seconds`` on one fresh
    connection (to lvz: after ``OPEN_MAIN``)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    pack = msgpack.Packer(use_bin_type=True).pack
    send_lock = threading.Lock()
    waiting: dict[int, tuple[_thread.LockType, list[Any]]] = {}
    next_id = [0]

    def call(method: str, params: dict[str, Any], parker: _thread.LockType) -> Any:
        box: list[Any] = []
        with send_lock:  # msgids in the order their bytes go out, one writer at a time
            msgid = next_id[0]
            next_id[0] = msgid + 1
            waiting[msgid] = (parker, box)
            sock.sendall(pack([0, msgid, method, params]))
        parker.acquire()  # released by the reader with the answer in ``box``
        if not box:
            raise RuntimeError("the connection failed")
        if box[0][2] is not None:
            raise RuntimeError(f"{method}: {box[0][2]}")
        return box[0][3]

    def read_loop() -> None:
        unpacker = msgpack.Unpacker(raw=False)
        try:
            while True:
                data = sock.recv(RECV_BYTES)
                if not data:
                    return
                unpacker.feed(data)
                for msg in unpacker:
                    parker, box = waiting.pop(msg[1])
                    box.append(msg)
                    parker.release()
        except OSError:
            return
        finally:
            for parker, _box in list(waiting.values()):
                parker.release()

    reader = threading.Thread(target=read_loop, daemon=True)
    reader.start()
    make = get_one_reg(1)
    if lvz:
        lock = _thread.allocate_lock()
        lock.acquire()
        for method, params in OPEN_MAIN:
            handle = call(method, params, lock)
        make = get_one_reg(handle["vcpu"])

    def caller() -> Callable[[int], object]:
        parker = _thread.allocate_lock()  # this thread's: the reader releases it with the answer
        parker.acquire()
        return lambda n: call(*make(n), parker)

    try:
        return in_threads(caller, seconds, max_count)
    finally:
        sock.shutdown(socket.SHUT_RDWR)
        reader.join()
        sock.close()


def tasks_sampler(path: Path, lvz: bool, max_count: int) -> Sampler:
    async def sample(seconds: float) -> Sample:
        return await least_tasks(path, lvz, seconds, max_count)

    return sample


def threads_sampler(path: Path, lvz: bool, max_count: int) -> Sampler:
    async def sample(seconds: float) -> Sample:
        return await trio.to_thread.run_sync(least_threads, path, lvz, seconds, max_count)

    return sample
