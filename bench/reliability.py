"""``python -m bench.reliability [--quick]``: what a misbehaving client costs, how fast shutdown is.

The figures the README quotes, each measured on a fresh ``lvz serve`` with its default limits:

* memory under a subscriber that never reads: one connection subscribes to a VM and stops
  reading while another drives 200,000 line changes; the daemon's RSS before and after, and
  that the driver's requests were never slowed to a halt (its rate is printed);
* RSS per idle connection: 2,000 connections that each asked one thing and went quiet;
* slowloris: 1,000 connections each send all but the end of a ~1 MiB message, then trickle a
  byte a second; RSS at the peak and after, and how each connection was ended (the budget of
  partially received messages, ENOMEM, or the message timeout, ETIMEDOUT);
* header bombs: 1,000 connections each send ~3 KB of nested array headers announcing 65,535
  elements apiece: how they are refused and the daemon's RSS at the peak;
* churn: 5,000 connections opened, each asking one thing, then all closed, 3 rounds; RSS after
  each round;
* under each attack a probe client in a process of its own asks ``kvm.get_api_version`` every
  2 ms: its p99 and worst latency say whether the attack reached other clients;
* SIGTERM with 64 ``vcpu.run`` calls parked: time until exit, every run answered EBADF.
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgpack
import trio

from lvz.testing.spawn import DaemonProcess
from lvz.testing.wire import BlockingWire, WireError

from .procs import ROOT, daemon, rss_bytes

CHANGES = 200_000
MiB = 2**20


def slow_subscriber(path: Path, pid: int) -> None:
    drv = BlockingWire(path)
    vm = drv.ok("kvm.create_vm", name="slowsub")["vm"]
    vcpu = drv.ok("vm.create_vcpu", vm=vm, vcpu_id=0)["vcpu"]
    sub = BlockingWire(path)
    svm = sub.ok("kvm.open_vm", name="slowsub")["vm"]
    sub.ok("vm.subscribe", vm=svm)  # ... and never reads again
    before = rss_bytes(pid)
    t0 = time.monotonic()
    batch = 500
    for _ in range(CHANGES // batch):
        drv.send(
            b"".join(
                drv.send_request("vcpu.interrupt", {"vcpu": vcpu, "irq": 5 if i % 2 == 0 else -5})[
                    1
                ]
                for i in range(batch)
            )
        )
        last, data = drv.send_request("kvm.get_api_version", {})
        drv.send(data)
        while True:  # skip the batch's answers as sent, without building objects for them
            msg = drv.next_message()
            if msg is None:
                raise RuntimeError("the daemon closed the driver's connection")
            if msg[0] == 1 and msg[2] is not None:
                raise RuntimeError(f"vcpu.interrupt: {msg[2]}")
            if msg[0] == 1 and msg[1] == last:
                break
    elapsed = time.monotonic() - t0
    after = rss_bytes(pid)
    print(
        f"non-reading subscriber: {CHANGES:,} line changes in {elapsed:.2f} s "
        f"({CHANGES / elapsed:,.0f}/s for the driver); daemon RSS "
        f"{before / 2**20:.1f} -> {after / 2**20:.1f} MiB "
        f"(+{(after - before) / 2**20:.1f} MiB, queue bound --max-events 4096)"
    )
    sub.close()
    drv.close()


def shutdown_timing(path: Path, proc: DaemonProcess) -> None:
    owner = BlockingWire(path)
    vm = owner.ok("kvm.create_vm", name="parked")["vm"]
    for i in range(64):
        owner.ok("vm.create_vcpu", vm=vm, vcpu_id=i)
    parked: list[tuple[BlockingWire, int]] = []
    for i in range(64):
        w = BlockingWire(path, timeout=5)
        h = w.ok("kvm.open_vm", name="parked")["vm"]
        v = w.ok("vm.open_vcpu", vm=h, vcpu_id=i)["vcpu"]
        msgid, data = w.send_request("vcpu.run", {"vcpu": v, "timeout": 600})
        w.send(data)
        parked.append((w, msgid))
    time.sleep(0.3)  # the runs are waiting in the daemon now
    answers: list[str] = []

    def collect(w: BlockingWire, msgid: int) -> None:
        try:
            r = w.response(msgid)
        except (WireError, OSError):
            answers.append("closed without an answer")
            return
        answers.append(r.error.name if r.error else "ok")

    threads = [threading.Thread(target=collect, args=pm) for pm in parked]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    status = proc.stop()
    took = time.monotonic() - t0
    for t in threads:
        t.join(10)
    for w, _ in parked:
        w.close()
    owner.close()
    print(
        f"SIGTERM with 64 vcpu.run parked: exit {status} after {took:.3f} s; "
        f"answers {dict(collections.Counter(answers))}"
    )


# ---------------------------------------------------------------------- the probe ---------------


def probe_main(path: str, seconds: float) -> None:
    """Run as a child process: sequential requests every 2 ms; prints latencies as JSON."""
    wire = BlockingWire(path)
    lat: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        wire.ok("kvm.get_api_version")
        lat.append(time.perf_counter() - t0)
        time.sleep(0.002)
    wire.close()
    print(json.dumps(lat))


@contextmanager
def probe(path: Path, seconds: float, results: dict[str, float]) -> Iterator[None]:
    """A probe client for ``seconds`` in its own process; fills ``results`` when it ends."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.reliability", "--probe", str(path), str(seconds)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        yield
    finally:
        out, _ = proc.communicate(timeout=seconds + 60)
        lat = sorted(json.loads(out))
        results.update(
            n=len(lat),
            p50=lat[len(lat) // 2] * 1e3,
            p99=lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
            max=lat[-1] * 1e3,
        )


def probe_text(r: dict[str, float]) -> str:
    return (
        f"probe p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms, worst {r['max']:.1f} ms "
        f"({int(r['n']):,} requests)"
    )


async def _one_request(path: Path) -> trio.SocketStream:
    stream = await trio.open_unix_socket(str(path))
    await stream.send_all(msgpack.packb([0, 1, "kvm.get_api_version", {}]))
    unpacker = msgpack.Unpacker()
    while True:
        data = await stream.receive_some(4096)
        if not data:
            raise RuntimeError("the daemon closed a connection that asked one thing")
        unpacker.feed(data)
        for msg in unpacker:
            if msg[0] == 1:
                return stream


async def _open_many(path: Path, n: int) -> list[trio.SocketStream]:
    streams: list[trio.SocketStream] = []
    limit = trio.CapacityLimiter(64)

    async def one() -> None:
        async with limit:
            streams.append(await _one_request(path))

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    return streams


# ---------------------------------------------------------------------- the attacks -------------


def idle_connections(path: Path, pid: int, n: int) -> None:
    r: dict[str, float] = {}

    async def run() -> None:
        await trio.sleep(0.5)
        before = rss_bytes(pid)
        streams = await _open_many(path, n)
        await trio.sleep(0.5)
        after = rss_bytes(pid)
        print(
            f"idle connections: {n:,} held, daemon RSS {before / MiB:.1f} -> "
            f"{after / MiB:.1f} MiB = {(after - before) / n / 1024:.1f} KiB each"
        )
        await trio.sleep(1.0)
        for st in streams:
            await st.aclose()

    with probe(path, 3.0, r):
        trio.run(run)
    print(f"  {probe_text(r)}")


def slowloris(path: Path, pid: int, n: int, budget: int) -> None:
    body = msgpack.packb([0, 1, "kvm.get_api_version", {"pad": b"x" * ((1 << 20) - 64)}])
    head, tail = body[:-32], body[-32:]
    r: dict[str, float] = {}
    ended: collections.Counter[str] = collections.Counter()
    peak = 0
    before = rss_bytes(pid)

    async def attacker() -> None:
        stream = await trio.open_unix_socket(str(path))
        unpacker = msgpack.Unpacker()

        async def reader() -> None:
            try:
                while data := await stream.receive_some(65536):
                    unpacker.feed(data)
                    for msg in unpacker:
                        if msg[0] == 2 and msg[1] == "protocol_error":
                            ended[msg[2]["name"]] += 1
                            nursery.cancel_scope.cancel()
                            return
                ended["closed without a word"] += 1
            except trio.BrokenResourceError as exc:
                ended[f"broken ({exc.__cause__})"] += 1
            nursery.cancel_scope.cancel()

        async def writer() -> None:
            try:
                await stream.send_all(head)
                for i in range(len(tail) - 1):  # a byte a second, never the last one
                    await trio.sleep(1.0)
                    await stream.send_all(tail[i : i + 1])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await trio.sleep_forever()  # the reader reports how it ended
            ended["never ended"] += 1
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(writer)
        await stream.aclose()

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_bytes(pid))
            await trio.sleep(0.1)

    async def run() -> None:
        async with trio.open_nursery() as outer:
            outer.start_soon(sample)
            async with trio.open_nursery() as nursery:
                for _ in range(n):
                    nursery.start_soon(attacker)
            outer.cancel_scope.cancel()

    t0 = time.monotonic()
    with probe(path, 14.0, r):
        trio.run(run)
    took = time.monotonic() - t0
    after = rss_bytes(pid)
    print(
        f"slowloris: {n:,} connections with an unfinished 1 MiB message, trickling 1 B/s: "
        f"all ended in {took:.1f} s ({', '.join(f'{k} {v}' for k, v in ended.most_common())}); "
        f"daemon RSS {before / MiB:.1f} -> peak {peak / MiB:.1f} -> {after / MiB:.1f} MiB "
        f"(growth {(peak - before) / MiB:.1f} MiB, bound budget {budget / MiB:.0f} + 100 MiB)"
    )
    print(f"  {probe_text(r)}")


def header_bombs(path: Path, pid: int, n: int) -> None:
    """``n`` connections each send ~3 KB of nested array16 headers announcing 65,535 elements
    apiece and stay open: unchecked, msgpack allocates each list at its header (tens of MiB a
    connection); the decoder's header walker refuses them (E2BIG) first."""
    bomb = b"\xdc\xff\xff" * 1000
    r: dict[str, float] = {}
    ended: collections.Counter[str] = collections.Counter()
    before = rss_bytes(pid)
    peak = 0

    async def attacker() -> None:
        stream = await trio.open_unix_socket(str(path))
        unpacker = msgpack.Unpacker()
        try:
            await stream.send_all(bomb)
            with trio.move_on_after(10):
                while data := await stream.receive_some(65536):
                    unpacker.feed(data)
                    for msg in unpacker:
                        if msg[0] == 2 and msg[1] == "protocol_error":
                            ended[msg[2]["name"]] += 1
                            await trio.sleep(1.0)  # held open, as an attacker would
                            await stream.aclose()
                            return
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            ended[f"broken ({exc.__cause__})"] += 1
            return
        ended["no answer"] += 1
        await stream.aclose()

    async def run() -> None:
        nonlocal peak
        limit = trio.CapacityLimiter(100)

        async def one() -> None:
            async with limit:
                await attacker()

        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)
            while len(nursery.child_tasks) > 0:
                peak = max(peak, rss_bytes(pid))
                await trio.sleep(0.05)

    with probe(path, 6.0, r):
        trio.run(run)
    print(
        f"header bombs: {n:,} connections each sending {len(bomb):,} bytes of nested "
        f"array16 headers: {', '.join(f'{k} {v}' for k, v in ended.most_common())}; daemon "
        f"RSS {before / MiB:.1f} -> peak {peak / MiB:.1f} MiB "
        f"(growth {(peak - before) / MiB:.1f} MiB)"
    )
    print(f"  {probe_text(r)}")


def churn(path: Path, pid: int, n: int, rounds: int) -> None:
    r: dict[str, float] = {}
    sizes = [rss_bytes(pid)]

    async def run() -> None:
        for _ in range(rounds):
            streams = await _open_many(path, n)
            for st in streams:
                await st.aclose()
            await trio.sleep(0.5)  # the daemon notices the closes
            sizes.append(rss_bytes(pid))

    with probe(path, 0.5, r):
        pass  # a baseline first, then the same probe for as long as the churn lasts
    base = dict(r)
    t0 = time.monotonic()
    threading_probe: dict[str, float] = {}
    with probe(path, 12.0, threading_probe):
        trio.run(run)
    took = time.monotonic() - t0
    print(
        f"churn: {n:,} connections opened (one request each) and closed, {rounds} rounds in "
        f"{took:.1f} s: daemon RSS "
        + " -> ".join(f"{x / MiB:.1f}" for x in sizes)
        + f" MiB (growth after round 1: {(sizes[-1] - sizes[1]) / MiB:+.1f} MiB)"
    )
    print(f"  {probe_text(threading_probe)}; idle baseline {probe_text(base)}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.reliability")
    ap.add_argument("--quick", action="store_true", help="smaller counts")
    ap.add_argument(
        "--only",
        nargs="*",
        default=(),
        help="slowsub, idle, slowloris, bombs, churn, shutdown (default: all)",
    )
    ap.add_argument("--probe", nargs=2, metavar=("SOCKET", "SECONDS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        probe_main(args.probe[0], float(args.probe[1]))
        return
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    scale = 10 if args.quick else 1
    from lvz.daemon.config import ServeConfig

    budget = ServeConfig(socket=Path()).partial_budget

    def wanted(name: str) -> bool:
        return not args.only or name in args.only

    if wanted("slowsub"):
        with daemon() as proc:
            slow_subscriber(proc.socket, proc.pid)
    if wanted("idle"):
        with daemon() as proc:
            idle_connections(proc.socket, proc.pid, 2000 // scale)
    if wanted("slowloris"):
        with daemon() as proc:
            slowloris(proc.socket, proc.pid, 1000 // scale, budget)
    if wanted("bombs"):
        with daemon() as proc:
            header_bombs(proc.socket, proc.pid, 1000 // scale)
    if wanted("churn"):
        with daemon() as proc:
            churn(proc.socket, proc.pid, 5000 // scale, 3)
    if wanted("shutdown"):
        with daemon() as proc:
            shutdown_timing(proc.socket, proc)


if __name__ == "__main__":
    main()
