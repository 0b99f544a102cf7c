"""``python -m bench [--quick] [--json PATH]``: measure lvz against the transport floor.

Two servers run side by side for the whole run: the floor (``bench.floor``) and an lvz daemon
started as a user starts it. Repetitions are interleaved (repetition i of every figure runs
before repetition i+1 of any), so slow drift on a noisy machine hits floor and lvz alike and
the ratios hold. Scale figures that need a pristine daemon (memory, creation time) start fresh
daemons of their own.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import trio

import lvz
from lvz.daemon.server import FLUSH_ANSWERS
from lvz.protocol import abi
from lvz.testing.wire import Wire

from . import least, procs
from .blocking import BlockingBench
from .clientbench import ClientBench, client_import_error
from .durable import measure_durable
from .report import Figure, Results, Target, table, to_json, write_json
from .scenarios import (
    WINDOW,
    Bench,
    Sample,
    Sampler,
    destroy_vm,
    many_connections,
    populate,
    run_sample,
)

REPS = 5
SCALE_LIMITS = (256, 4096, 65536)
CONNECTIONS = 1000
DEFAULT_JSON = Path(__file__).resolve().parent / "results.json"


@dataclass(slots=True)
class Config:
    quick: bool
    seconds: float  # per sample of a throughput figure
    reps: int
    lvz_path: Path
    floor_path: Path
    daemon_cmd: list[str]
    only: tuple[str, ...] = ()
    lvz_pid: int = 0
    floor_pid: int = 0
    floor_every_path: Path | None = None  # the floor flushing every FLUSH_ANSWERS answers
    floor_every_pid: int = 0


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def raise_nofile() -> None:
    """1,000 client sockets need more than the usual soft limit of 1,024 descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


SEQ, PIPE = "sequential", "pipelined x64"


def plan_throughput(
    cfg: Config,
    res: Results,
    bench: Bench,
    blk: BlockingBench,
    cb: ClientBench | None,
    client_skip: str,
) -> list[tuple[Figure, Sampler, Callable[[Sample], None]]]:
    """Every interleaved throughput figure with its sampler, in table order.

    Two floors, one per client kind: the bare server driven by the trio raw driver
    (``floor.*``) and by the blocking-socket driver (``floor.blocking.*``). Every ratio is
    taken against the floor driven by the same kind of client, so a ratio near 1 says the
    client limits that figure and a low one that the server does.
    """
    plan: list[tuple[Figure, Sampler, Callable[[Sample], None]]] = []

    def add(
        fig: Figure, sampler: Sampler | None, on_extra: Callable[[Sample], None] | None = None
    ) -> None:
        res.add(fig)
        if sampler is not None:
            plan.append((fig, sampler, on_extra or (lambda s: None)))

    def copy_to(again: Figure) -> Callable[[Sample], None]:
        """An on_extra that gives ``again`` the same samples: one measurement, two ratios."""

        def copy(s: Sample) -> None:
            again.samples.append(s.value)
            again.ok_checks.append(s.ok)

        return copy

    def shadow(fig: Figure, ref: str, sampler: Sampler) -> None:
        """``fig``, and for get_one_reg the same samples again as a ratio to ``ref``: the
        floor driven by a minimal client of the same shape (bench/least.py)."""
        if not fig.key.startswith(("client.threads.get.", "client.async.get.")):
            add(fig, sampler)
            return
        again = Figure(
            f"{fig.key}.least",
            "  the same, against the floor with a minimal client",
            "req/s",
            ref=ref,
        )
        add(fig, sampler, copy_to(again))
        res.add(again)

    def blocking(target: str, which: str, pipelined: bool) -> Sampler:
        async def sample(seconds: float) -> Sample:
            return run_sample(
                await trio.to_thread.run_sync(blk.run, target, which, pipelined, seconds, WINDOW)
            )

        return sample

    add(Figure("floor.seq", f"floor echo, trio driver, {SEQ}", "req/s"), bench.floor_sampler(False))
    add(
        Figure("floor.pipe", f"floor echo, trio driver, {PIPE}", "req/s"), bench.floor_sampler(True)
    )
    add(
        Figure(
            "floor.every.pipe",
            f"floor echo, trio driver, {PIPE}, a send every {FLUSH_ANSWERS} answers",
            "req/s",
            ref="floor.pipe",
            note="bench/floor.py --flush-every: the floor sending as lvz's daemon does",
        ),
        bench.floor_sampler(True, every=True),
    )
    add(
        Figure("floor.blocking.seq", f"floor echo, blocking driver, {SEQ}", "req/s"),
        blocking("floor", "get", False),
    )
    add(
        Figure("floor.blocking.pipe", f"floor echo, blocking driver, {PIPE}", "req/s"),
        blocking("floor", "get", True),
    )
    # A minimal client of the two shapes a library is used in (bench/least.py): what 64 tasks
    # or 64 threads reach with nothing but the hand-off, on the floor server and on lvz.
    shapes = (
        ("tasks", "64 trio tasks", "floor.pipe", least.tasks_sampler, "a dict of parked tasks"),
        (
            "threads",
            "64 threads",
            "floor.blocking.pipe",
            least.threads_sampler,
            "a lock per thread",
        ),
    )
    for target, on_lvz in (("floor", False), ("lvz", True)):
        for kind, label, ref, sampler, how in shapes:
            add(
                Figure(
                    f"least.{kind}.{target}",
                    f"{'raw  vcpu.get_one_reg CPUID' if on_lvz else 'floor echo'}, "
                    f"{label}, a minimal client",
                    "req/s",
                    ref=ref,
                    note=f"bench/least.py: {how}",
                ),
                sampler(cfg.lvz_path if on_lvz else cfg.floor_path, on_lvz, bench.max_count),
            )
    names = {
        "get": "vcpu.get_one_reg CPUID",
        "set": "vcpu.set_one_reg CPUID (same value)",
        "lookup": "vm.phyid_lookup",
    }
    for which, name in names.items():
        add(
            Figure(
                f"raw.{which}.seq",
                f"raw  {name}, {SEQ}",
                "req/s",
                ref="floor.seq",
                target=Target("ratio_min", 0.95, "≥ 0.95x trio floor"),
            ),
            bench.raw_sampler(which, False),
        )
        pipe = Figure(
            f"raw.{which}.pipe",
            f"raw  {name}, {PIPE}",
            "req/s",
            ref="floor.pipe",
            target=Target("ratio_min", 0.75, "≥ 0.75x trio floor"),
        )
        alike = Figure(
            f"raw.{which}.pipe.every",
            f"  the same, against the floor sending every {FLUSH_ANSWERS} answers",
            "req/s",
            ref="floor.every.pipe",
        )
        add(pipe, bench.raw_sampler(which, True), copy_to(alike))
        res.add(alike)
    for mode, pipelined in ((SEQ, False), (PIPE, True)):
        key = "pipe" if pipelined else "seq"
        add(
            Figure(
                f"raw.blocking.get.{key}",
                f"raw  vcpu.get_one_reg CPUID, blocking driver, {mode}",
                "req/s",
                ref=f"floor.blocking.{key}",
            ),
            blocking("lvz", "get", pipelined),
        )
    # (kind, label, pipelined, the floor it is compared with, target ratio on get_one_reg)
    clients = (
        ("sync", f"sync client, one thread, {SEQ}", False, "floor.blocking.seq", None),
        ("threads", "sync client, 64 threads on one connection", True, "floor.blocking.pipe", 0.3),
        ("async", f"async client, one task, {SEQ}", False, "floor.seq", 0.8),
        ("async", "async client, 64 tasks on one connection", True, "floor.pipe", 0.5),
        ("gather", "async client, gather(64) from one task", True, "floor.pipe", None),
    )
    for which, name in names.items():
        for kind, label, pipelined, ref, goal in clients:
            key = f"client.{kind}.{which}.{'pipe' if pipelined else 'seq'}"
            floor = "blocking" if ref.startswith("floor.blocking") else "trio"
            fig = Figure(
                key,
                f"{label}: {name}",
                "req/s",
                ref=ref,
                target=Target("ratio_min", goal, f"≥ {goal}x {floor} floor")
                if goal is not None and which == "get"
                else None,
            )
            if client_skip or cb is None:
                fig.skipped = client_skip or "lvz.clients not available"
                add(fig, None)
            elif kind == "sync":
                add(fig, cb.sync_sampler(which))
            elif kind == "threads":
                shadow(fig, "least.threads.floor", cb.threads_sampler(which))
            elif kind == "gather":
                add(fig, cb.gather_sampler(which))
            elif pipelined:
                shadow(fig, "least.tasks.floor", cb.async_sampler(which, pipelined))
            else:
                add(fig, cb.async_sampler(which, pipelined))

    pv = Figure(
        "irq.pv_ipi",
        "PV IPI hypercall → 128 vCPUs (deliveries)",
        "deliveries/s",
        target=Target("min", 50_000, "≥ 50,000/s, every event"),
    )
    pv_events = res.add(
        Figure(
            "irq.pv_ipi.events",
            "PV IPI: events received by a subscriber",
            "events/s",
            target=Target("all", 0, "every event received"),
        )
    )

    def pv_extra(s: Sample) -> None:
        pv_events.samples.append(s.extra["events_per_s"])
        pv_events.ok_checks.append(s.ok)

    add(pv, bench.pv_sampler(), pv_extra)
    res.figures["irq.pv_ipi.events"] = res.figures.pop("irq.pv_ipi.events")  # after pv_ipi

    for which, label in (
        ("ipi_send", "IPI_SEND (iocsr) + guest IPI_CLEAR"),
        ("msi", "vm.signal_msi → EIOINTC + guest COREISR ack"),
        ("pchpic", "vm.irq_line PCH-PIC pin → EIOINTC, up + down"),
    ):
        add(
            Figure(
                f"irq.{which}",
                f"{label}, {PIPE}",
                "deliveries/s",
                target=Target("all", 0, "every event received"),
                note="one delivery = a raise and a lowering request, two irq events",
            ),
            bench.irq_sampler(which),
        )

    for limit in SCALE_LIMITS:
        fig = Figure(
            f"scale.lookup.{limit}", f"vm.phyid_lookup at max_phyid {limit}, {PIPE}", "req/s"
        )
        if limit != SCALE_LIMITS[0]:
            fig.ref = f"scale.lookup.{SCALE_LIMITS[0]}"
            if limit == SCALE_LIMITS[-1]:
                fig.target = Target("ratio_min", 1 / 1.2, "cost ≤ 1.2x of 256")
        add(fig, bench.scale_sampler(limit))
    return plan


async def measure_throughput(cfg: Config, res: Results) -> None:
    bench = Bench(cfg.lvz_path, cfg.floor_path, floor_every_path=cfg.floor_every_path)
    skip = client_import_error()
    cb = None if skip else ClientBench(cfg.lvz_path, bench.max_count)
    blk: BlockingBench | None = None
    try:
        say("setup: VMs for ONE_REG/lookup, interrupt paths, PV IPI and scale")
        await bench.setup_main()
        blk = await trio.to_thread.run_sync(
            BlockingBench, cfg.floor_path, cfg.lvz_path, bench.max_count
        )
        await bench.setup_irq()
        await bench.setup_pv()
        await bench.setup_scale(SCALE_LIMITS)
        if cb is not None:
            try:
                await cb.setup()
            except Exception as exc:
                skip = f"lvz.clients failed to connect ({type(exc).__name__}: {exc})"
                cb = None
        assert blk is not None
        plan = plan_throughput(cfg, res, bench, blk, cb, skip)
        if cfg.only:
            plan = [p for p in plan if p[0].key.startswith(cfg.only)]
            for key in [k for k in res.figures if not k.startswith(cfg.only)]:
                del res.figures[key]
        assert bench.irq_sub is not None and bench.pv_sub is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bench.irq_sub.run)
            nursery.start_soon(bench.pv_sub.run)
            for rep in range(cfg.reps):
                t0 = time.perf_counter()
                for fig, sampler, on_extra in plan:
                    on_floor = fig.key.startswith("floor.") or fig.key.endswith(".floor")
                    pid = cfg.floor_pid if on_floor else cfg.lvz_pid
                    if fig.key.startswith("floor.every."):
                        pid = cfg.floor_every_pid
                    cpu0, mine0 = procs.cpu_seconds(pid), time.process_time()
                    s = await sampler(cfg.seconds)
                    cpu = procs.cpu_seconds(pid) - cpu0
                    mine = time.process_time() - mine0
                    if s.count and s.seconds:
                        fig.cpu_us.append(cpu / s.count * 1e6)
                        fig.cpu_pct.append(100 * cpu / s.seconds)
                        fig.client_us.append(mine / s.count * 1e6)
                    fig.samples.append(s.value)
                    fig.ok_checks.append(s.ok)
                    on_extra(s)
                say(
                    f"repetition {rep + 1}/{cfg.reps} of {len(plan)} throughput figures: "
                    f"{time.perf_counter() - t0:.1f} s"
                )
            nursery.cancel_scope.cancel()
        for key, sub in (("irq.pv_ipi", bench.pv_sub), ("irq.ipi_send", bench.irq_sub)):
            if not sub.ok and key in res.figures:
                res.get(key).note = f"subscriber: {sub.problem}"
        floor = res.get("floor.pipe").median if "floor.pipe" in res.figures else float("nan")
        for which in ("ipi_send", "msi", "pchpic"):
            if f"irq.{which}" not in res.figures:
                continue
            fig = res.get(f"irq.{which}")
            fig.note = (
                f"a delivery = raise + lowering request, 2 irq events; "
                f"{2 * fig.median:,.0f} req/s = {2 * fig.median / floor:.2f}x floor "
                f"pipelined"
            )
    finally:
        if cb is not None:
            await cb.aclose()
        if blk is not None:
            blk.close()
        await bench.aclose()


async def measure_connections(cfg: Config, res: Results) -> None:
    answered = res.add(
        Figure(
            "conn.answered",
            f"{CONNECTIONS:,} connections held, answered",
            "answered",
            target=Target("min", CONNECTIONS, f"all {CONNECTIONS:,}"),
        )
    )
    opened = res.add(Figure("conn.open", f"{CONNECTIONS:,} connections: time to open all", "s"))
    replied = res.add(
        Figure("conn.reply", f"{CONNECTIONS:,} connections: one request each, all answered", "s")
    )
    for _ in range(cfg.reps):
        n, t_open, t_reply = await trio.to_thread.run_sync(
            many_connections, cfg.lvz_path, CONNECTIONS
        )
        answered.samples.append(n)
        opened.samples.append(t_open)
        replied.samples.append(t_reply)
        await trio.sleep(0.05)  # let the daemon finish tearing the connections down
    say("connections: done")


async def measure_vm_scale(cfg: Config, res: Results) -> None:
    """Creation time and daemon RSS growth for 256 and 4,096 vCPUs, a fresh daemon per rep."""
    sizes = (256, 4096)
    create = {
        n: res.add(
            Figure(
                f"create.{n}",
                f"create VM + {n:,} vCPUs with CPUIDs (raw, pipelined)",
                "s",
                target=Target("max", 2.0, "< 2 s") if n == 4096 else None,
            )
        )
        for n in sizes
    }
    rss = {
        n: res.add(
            Figure(
                f"mem.rss.{n}",
                f"daemon RSS growth per idle vCPU, {n:,} vCPUs",
                "B/vCPU",
                note="VmRSS of the daemon before/after (includes allocator slack)",
            )
        )
        for n in sizes
    }
    for _ in range(cfg.reps):
        with procs.daemon() as proc:
            path = proc.socket
            for n in sizes:
                before = procs.rss_bytes(proc.pid)
                seconds = await populate(path, f"scale-{n}", n, list(range(n)))
                await trio.sleep(0.05)
                rss[n].samples.append((procs.rss_bytes(proc.pid) - before) / n)
                create[n].samples.append(seconds)
            await destroy_vm(path, "scale-256")
    say("VM creation and RSS: done")


BIG = 65536


async def _read_map(conn: Wire, vm: int, pid: int) -> tuple[list[list[int]], float, float]:
    """One ``vm.phyid_map``: its entries, the daemon's CPU and the round trip (ms)."""
    cpu0, t0 = procs.cpu_seconds(pid), time.perf_counter()
    entries: list[list[int]] = (await conn.result("vm.phyid_map", {"vm": vm}))["entries"]
    return entries, (procs.cpu_seconds(pid) - cpu0) * 1e3, (time.perf_counter() - t0) * 1e3


async def measure_big_vm(cfg: Config, res: Results) -> None:
    """The largest VM there is: its creation time and the daemon CPU of its ``vm.phyid_map``.

    A fresh daemon per repetition, so each build starts from the same heap; the map is read
    three times per repetition and each read's daemon CPU (main thread) is one sample. The
    CPUIDs are set in order, as VMMs number their CPUs, so the model keeps the map as they are
    set and every read only encodes it. Then vCPU 0 is unplugged (its entry is taken out of
    the kept map) and read again, and plugged back with CPUID 0: a set below the highest phyid
    in a map that big drops the kept map, and the next read shows what a rebuild costs.
    """
    create = res.add(
        Figure(
            f"create.{BIG}",
            f"create VM + {BIG:,} vCPUs with CPUIDs (raw, pipelined)",
            "s",
            target=Target("max", 0.8, "≤ 0.8 s"),
        )
    )
    create_cpu = res.add(Figure(f"create.{BIG}.server", "  of which the daemon's CPU", "s"))
    create_client = res.add(
        Figure(
            f"create.{BIG}.client",
            "  and the benchmark client's CPU",
            "s",
            note="the raw trio driver, 33 connections",
        )
    )
    first = res.add(
        Figure(
            f"map.cpu.first.{BIG}",
            f"vm.phyid_map of {BIG:,} entries, daemon CPU, first read",
            "ms",
            target=Target("max", 15, "≤ 15 ms"),
            note="the map the model kept while the CPUIDs were set in order: encoded, not built",
        )
    )
    cpu = res.add(
        Figure(
            f"map.cpu.{BIG}",
            f"vm.phyid_map of {BIG:,} entries, daemon CPU",
            "ms",
            target=Target("max", 15, "≤ 15 ms"),
            note="reads 2 and 3, and one after vCPU 0 was unplugged (65,535 entries)",
        )
    )
    rebuilt = res.add(
        Figure(
            f"map.cpu.rebuilt.{BIG}",
            f"vm.phyid_map of {BIG:,} entries, daemon CPU, rebuilt",
            "ms",
            note="after vCPU 0 came back with CPUID 0, below the others: sorted and built again",
        )
    )
    wall = res.add(
        Figure(
            f"map.wall.{BIG}",
            f"vm.phyid_map of {BIG:,} entries, round trip",
            "ms",
            note="includes the raw client decoding the answer",
        )
    )
    for _ in range(3 if cfg.quick else cfg.reps):
        with procs.daemon() as proc:
            path = proc.socket
            cpu0, mine0 = procs.cpu_seconds(proc.pid), time.process_time()
            create.samples.append(await populate(path, "big", BIG, list(range(BIG))))
            create_cpu.samples.append(procs.cpu_seconds(proc.pid) - cpu0)
            create_client.samples.append(time.process_time() - mine0)
            conn = await Wire.connect(path)
            try:
                vm = (await conn.result("kvm.open_vm", {"name": "big"}))["vm"]
                for read in range(3):
                    entries, cpu_ms, wall_ms = await _read_map(conn, vm, proc.pid)
                    fig = cpu if read else first
                    fig.samples.append(cpu_ms)
                    fig.ok_checks.append(len(entries) == BIG)
                    wall.samples.append(wall_ms)
                vcpu = (await conn.result("vm.open_vcpu", {"vm": vm, "vcpu_id": 0}))["vcpu"]
                await conn.result("vcpu.destroy", {"vcpu": vcpu})
                entries, cpu_ms, _ = await _read_map(conn, vm, proc.pid)
                cpu.samples.append(cpu_ms)
                cpu.ok_checks.append(len(entries) == BIG - 1 and entries[0][0] == 1)
                vcpu = (await conn.result("vm.create_vcpu", {"vm": vm, "vcpu_id": 0}))["vcpu"]
                await conn.result("vcpu.set_one_reg", {"vcpu": vcpu, "id": abi.CPUID, "value": 0})
                entries, cpu_ms, _ = await _read_map(conn, vm, proc.pid)
                rebuilt.samples.append(cpu_ms)
                rebuilt.ok_checks.append(len(entries) == BIG and entries[0] == [0, 0])
            finally:
                await conn.aclose()
    say(f"{BIG:,}-vCPU VM: done")


async def measure_model_memory(cfg: Config, res: Results) -> None:
    proc = await trio.run_process(
        [sys.executable, "-m", "bench.memory", "256", "4096"], capture_stdout=True, cwd=procs.ROOT
    )
    data = json.loads(proc.stdout)
    for n in ("256", "4096"):
        fig = res.add(
            Figure(
                f"mem.model.{n}",
                f"VM model heap per idle vCPU, {int(n):,} vCPUs",
                "B/vCPU",
                target=Target("max", 2048, "≤ 2 KiB"),
                note="tracemalloc in a helper process: Vm + IPI/EIOINTC/PCH-PIC, "
                "vCPUs created and CPUIDs set; no handles",
            )
        )
        fig.samples.extend(data[n])
    say("model memory: done")


async def run_all(cfg: Config) -> Results:
    res = Results()
    if cfg.only:  # A/B runs: the throughput figures asked for, and the big VM if asked for
        if any(not p.startswith(("create", "map")) for p in cfg.only):
            await measure_throughput(cfg, res)
        if any(p.startswith(("create", "map")) for p in cfg.only):
            await measure_big_vm(cfg, res)
        return res
    await measure_throughput(cfg, res)
    await measure_connections(cfg, res)
    await measure_vm_scale(cfg, res)
    await measure_big_vm(cfg, res)
    await measure_model_memory(cfg, res)
    await measure_durable(res, cfg.reps, cfg.seconds, cfg.quick)  # --state-dir, snapshots
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter samples (under 60 s)")
    ap.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        metavar="PATH",
        help=f"where to write the results (default {DEFAULT_JSON})",
    )
    ap.add_argument(
        "--only",
        default="",
        metavar="PREFIXES",
        help="comma-separated figure-key prefixes (e.g. floor,raw): run just those "
        "throughput figures and skip the scale section (for A/B runs); "
        "create or map runs the 65,536-vCPU VM figures",
    )
    ap.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when a target is missed (default: report it, exit 0 when the "
        "benchmark itself ran)",
    )
    ap.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="seconds per throughput sample (default 0.2 quick, 0.8 full)",
    )
    args = ap.parse_args(argv)
    raise_nofile()
    started = time.perf_counter()
    with ExitStack() as stack:
        floor = stack.enter_context(procs.floor())
        floor_every = stack.enter_context(procs.floor("--flush-every", str(FLUSH_ANSWERS)))
        daemon = stack.enter_context(procs.daemon())
        cfg = Config(
            quick=args.quick,
            seconds=args.seconds or (0.2 if args.quick else 0.8),
            reps=REPS,
            lvz_path=daemon.socket,
            floor_path=floor.socket,
            floor_every_path=floor_every.socket,
            daemon_cmd=daemon.command,
            only=tuple(p for p in args.only.split(",") if p),
        )
        say(f"floor: {' '.join(floor.command)}")
        say(f"lvz:   {' '.join(cfg.daemon_cmd)}")
        cfg.floor_pid, cfg.lvz_pid = floor.pid, daemon.pid
        cfg.floor_every_pid = floor_every.pid
        res = trio.run(run_all, cfg)
    elapsed = time.perf_counter() - started
    title = (
        f"lvz benchmark ({'quick' if cfg.quick else 'full'}, {lvz.build}): medians of "
        f"{cfg.reps} repetitions, {cfg.seconds:g} s per throughput sample, "
        f"{elapsed:.0f} s in all"
    )
    print(table(res, title))
    write_json(
        args.json,
        to_json(
            res,
            quick=cfg.quick,
            reps=cfg.reps,
            seconds=cfg.seconds,
            elapsed=elapsed,
            daemon_cmd=cfg.daemon_cmd,
        ),
    )
    print(f"results written to {args.json}")
    missed = [f.label for f in res.figures.values() if res.verdict(f) is False]
    if missed:
        print(f"{len(missed)} target(s) missed in this run: " + "; ".join(missed))
    return 1 if missed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
