"""``python -m bench.handoff``: what 64 waiters on one connection cost before any I/O or work.

The client rows with 64 tasks or 64 threads on one connection are client-limited. These two
floors say how far down that can go: 64 workers each post a "call" and park, and one reader
completes every posted call by waking its worker, exactly the shape of ``lvz.clients``'
drivers, with no socket, encoding or parsing. A client figure can not beat its floor here.

- trio: ``wait_task_rescheduled`` / ``reschedule``, the reader checkpointing as a
  ``wait_readable`` would.
- threads: a pre-acquired ``_thread`` lock per worker released by the reader (no Event or
  Condition), the reader yielding the GIL as a ``recv`` would.
"""

from __future__ import annotations

import _thread
import argparse
import collections
import threading
import time

import trio

WORKERS = 64


def trio_floor(calls: int) -> tuple[float, float]:
    """(calls per second, CPU µs per call) of the bare trio park/reschedule handoff."""

    async def main() -> tuple[float, float]:
        posted: collections.deque[trio.lowlevel.Task] = collections.deque()
        left, done = [calls], [False]

        def abort(_: object) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.SUCCEEDED

        async def worker() -> None:
            task = trio.lowlevel.current_task()
            while left[0] > 0:
                left[0] -= 1
                posted.append(task)
                await trio.lowlevel.wait_task_rescheduled(abort)

        async def reader() -> None:
            while not done[0]:
                while posted:
                    trio.lowlevel.reschedule(posted.popleft())
                await trio.lowlevel.checkpoint()

        c0, t0 = time.process_time(), time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            async with trio.open_nursery() as workers:
                for _ in range(WORKERS):
                    workers.start_soon(worker)
            done[0] = True
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return calls / wall, cpu / calls * 1e6

    return trio.run(main)


def thread_floor(calls: int) -> tuple[float, float]:
    """(calls per second, CPU µs per call) of the bare per-thread-lock handoff."""
    posted: collections.deque[_thread.LockType] = collections.deque()
    left, done = [calls], [False]

    def worker() -> None:
        lock = _thread.allocate_lock()
        lock.acquire()
        while left[0] > 0:
            left[0] -= 1
            posted.append(lock)
            lock.acquire()

    def reader() -> None:
        while not done[0]:
            while posted:
                posted.popleft().release()
            time.sleep(0)

    c0, t0 = time.process_time(), time.perf_counter()
    read = threading.Thread(target=reader)
    read.start()
    workers = [threading.Thread(target=worker) for _ in range(WORKERS)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    done[0] = True
    read.join()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return calls / wall, cpu / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.handoff", description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    for name, floor, calls in (
        ("trio tasks", trio_floor, 200_000),
        ("threads", thread_floor, 50_000),
    ):
        runs = sorted(floor(calls) for _ in range(args.reps))
        rate, cpu = runs[len(runs) // 2]
        print(
            f"{WORKERS} {name}, bare handoff: {rate:,.0f} calls/s (median of {args.reps}), "
            f"{cpu:.2f} µs CPU per call"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
