"""Durability and snapshot figures (issue 9): what ``--state-dir`` costs, how fast snapshots are.

- ONE_REG and lookup on a named VM of a daemon with ``--state-dir`` (every change journaled and
  written before its answer), as a ratio to the same requests on a named VM of a daemon
  without it; repetitions interleaved so both share the machine's noise. Target: ≥ 0.9.
  Two writes: the same value again (what VMMs mostly send; a no-op, not journaled) and a
  value that changes every time (journaled: one ``write`` per request when sequential, one
  per batch when pipelined).
- ``lvz snapshot`` / ``lvz restore`` of 16,384 and 65,536 vCPUs (CPUIDs set), through the
  protocol as the command does it (the blocking client, pipelined batches). Targets: ≤ 2 s and
  ≤ 8 s each.
- SIGTERM of a ``--state-dir`` daemon holding a 65,536-vCPU named VM: until the process is
  gone. Target: ≤ 2 s.

``python -m bench.durable`` runs this section alone; ``python -m bench.durable journal`` only
its journal-cost part; ``python -m bench.durable cpu`` the daemon's CPU per write, with and
without the journal, measured in-process (``journal_cpu``).
"""

from __future__ import annotations

import functools
import itertools
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import trio

from lvz.clients import Kvm
from lvz.protocol import abi, snapshot
from lvz.testing.wire import Wire

from . import procs
from .report import Figure, Results, Target, table
from .scenarios import CPUID, WINDOW, populate

SIZES = (16_384, 65_536)
KS0 = abi.csr_id(abi.CSR_KS0)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def _named_vcpu(path: Path) -> tuple[Wire, int, int]:
    await populate(path, "bench-durable", 256, [0])
    conn = await Wire.connect(path)
    vm = (await conn.result("kvm.open_vm", {"name": "bench-durable"}))["vm"]
    vcpu = (await conn.result("vm.open_vcpu", {"vm": vm, "vcpu_id": 0}))["vcpu"]
    return conn, vm, vcpu


#: The journal-cost cases: label, and the request number i's (method, params) given the
#: named VM's handle and its vCPU 0's.
_CASES: dict[str, tuple[str, Callable[[int, int, int], tuple[str, dict[str, Any]]]]] = {
    "get": (
        "vcpu.get_one_reg CPUID",
        lambda vm, vcpu, i: ("vcpu.get_one_reg", {"vcpu": vcpu, "id": CPUID}),
    ),
    # The CPUID it holds: the kernel's no-op, which changes nothing and so is not journaled.
    "set": (
        "vcpu.set_one_reg CPUID, the same value (a no-op)",
        lambda vm, vcpu, i: ("vcpu.set_one_reg", {"vcpu": vcpu, "id": CPUID, "value": 0}),
    ),
    # Every request a change, journaled and written before its answer.
    "change": (
        "vcpu.set_one_reg KS0, alternating values (journaled)",
        lambda vm, vcpu, i: ("vcpu.set_one_reg", {"vcpu": vcpu, "id": KS0, "value": i & 1}),
    ),
    "lookup": ("vm.phyid_lookup", lambda vm, vcpu, i: ("vm.phyid_lookup", {"vm": vm, "phyid": 0})),
}


async def measure_journal_cost(res: Results, reps: int, seconds: float) -> None:
    """Interleaved: each figure on the plain daemon, then on the journaling one.

    Twice ``reps`` runs of half ``seconds`` each: on a shared machine the ratio of two rates
    moves with whatever else runs, and more, shorter pairs give a steadier median.
    """
    reps, seconds = 2 * reps, seconds / 2
    with (
        tempfile.TemporaryDirectory(prefix="lvzb") as tmp,
        procs.daemon() as plain,
        procs.daemon("--state-dir", str(Path(tmp) / "state")) as durable,
    ):
        conns = {
            "plain": await _named_vcpu(plain.socket),
            "durable": await _named_vcpu(durable.socket),
        }
        pids = {"plain": plain.proc.pid, "durable": durable.proc.pid}
        figs: dict[tuple[str, str, str], Figure] = {}
        for which, (label, _) in _CASES.items():
            for mode in ("seq", "pipe"):
                text = "sequential" if mode == "seq" else f"pipelined x{WINDOW}"
                base = res.add(
                    Figure(
                        f"durable.plain.{which}.{mode}",
                        f"named VM, no --state-dir: {label}, {text}",
                        "req/s",
                    )
                )
                figs[which, mode, "plain"] = base
                figs[which, mode, "durable"] = res.add(
                    Figure(
                        f"durable.{which}.{mode}",
                        f"named VM, --state-dir: {label}, {text}",
                        "req/s",
                        ref=base.key,
                        target=Target("ratio_min", 0.9, "≥ 0.9x without (cost ≤ 10%)"),
                    )
                )
        for _ in range(reps):
            for which, (_, request) in _CASES.items():
                for mode in ("seq", "pipe"):
                    for side in ("plain", "durable"):
                        conn, vm, vcpu = conns[side]
                        make = functools.partial(request, vm, vcpu)
                        fig = figs[which, mode, side]
                        cpu0, mine0 = procs.cpu_seconds(pids[side]), time.process_time()
                        if mode == "seq":
                            run = await conn.sequential(make, seconds, 2_000_000)
                        else:
                            run = await conn.pipelined(make, WINDOW, seconds, 2_000_000)
                        # The daemon's CPU per request: what the journal costs it, steadier
                        # than a rate on a shared machine (README, "Snapshots and restarts").
                        cpu = procs.cpu_seconds(pids[side]) - cpu0
                        fig.cpu_us.append(cpu / run.count * 1e6)
                        fig.cpu_pct.append(100 * cpu / run.seconds)
                        fig.client_us.append((time.process_time() - mine0) / run.count * 1e6)
                        fig.samples.append(run.rate)
        for conn, _, _ in conns.values():
            await conn.aclose()
    _say("durability: journal cost done")


def journal_cpu() -> list[tuple[str, float]]:
    """The daemon's CPU per ``set_one_reg``, without sockets, best of 5 (``bench.micro``'s way):
    what the journal adds to a request, free of the scheduling noise that moves the rates.

    A real ``Daemon`` (and ``StateDir`` in a temporary directory); requests go through
    ``Daemon._dispatch`` as a socket's would, and ``StateDir.flush`` is what ``Connection.flush``
    runs before sending: once per request (a sequential client) or per 64 (a pipelined batch).
    """
    with tempfile.TemporaryDirectory(prefix="lvzb") as tmp:
        return _cpu_rows(None) + _cpu_rows(Path(tmp) / "state")


def _cpu_rows(state_dir: Path | None) -> list[tuple[str, float]]:
    from lvz.daemon.config import ServeConfig
    from lvz.daemon.host import load_plugins
    from lvz.daemon.peer import Connection
    from lvz.daemon.server import Daemon
    from lvz.daemon.state import StateDir
    from lvz.protocol.connection import ServerConnection

    from .micro import per_call

    n = 20_000
    config = ServeConfig(socket=Path("/nonexistent"))
    daemon = Daemon(load_plugins(), config)
    conn = Connection(None, config, 1)
    vm_h = daemon._execute(conn, "kvm.create_vm", {"name": "m", "max_phyid": 256})["vm"]
    vcpu_h = daemon._execute(conn, "vm.create_vcpu", {"vm": vm_h, "vcpu_id": 0})["vcpu"]
    state = None
    if state_dir is not None:
        state = daemon.state = StateDir(daemon, state_dir, "everysec")
        state.named(conn.handles[vm_h].vm)

    def event(value: int) -> Any:
        p = ServerConnection()
        p.receive_data(
            msgpack.packb([0, 1, "vcpu.set_one_reg", {"vcpu": vcpu_h, "id": KS0, "value": value}])
        )
        return p.next_event()

    def run(evs: list[Any], per_flush: int) -> Callable[[], None]:
        nxt = itertools.cycle(evs).__next__  # alternating across flushes too

        def go() -> None:
            for _ in range(per_flush):
                daemon._dispatch(conn, nxt())
            if state is not None:
                state.flush()
            conn.out.clear()
            conn.out_bytes = 0

        return go

    side = "no --state-dir" if state is None else "--state-dir"
    same = event(1)
    rows = [
        (
            f"{side}: changing set_one_reg, a flush per request",
            per_call(run([event(0), event(1)], 1), n),
        ),
        (
            f"{side}: changing set_one_reg, a flush per 64",
            per_call(run([event(0), event(1)], 64), n // 64) / 64,
        ),
        (f"{side}: same-value set_one_reg, a flush per request", per_call(run([same], 1), n)),
    ]
    if state is not None:
        state.close()
    return rows


def _snapshot_round(path: Path, n: int) -> tuple[float, float]:
    """Save and restore the named VM "big" (n vCPUs) as ``lvz snapshot`` / ``lvz restore``."""
    with Kvm.connect(path) as kvm:
        vm = kvm.open_vm("big")
        t0 = time.perf_counter()
        saved = snapshot.drive(snapshot.save_vm(vm.handle), kvm.call_batch)
        data = snapshot.encode(saved)
        t1 = time.perf_counter()
        snapshot.drive(snapshot.restore_vm(snapshot.decode(data), "copy"), kvm.call_batch)
        t2 = time.perf_counter()
        assert len(saved["vcpus"]) == n
        copy = kvm.open_vm("copy")
        copy.destroy()
    return t1 - t0, t2 - t1


async def measure_snapshots(res: Results, reps: int, big_reps: int) -> None:
    for n in SIZES:
        limit = 2.0 if n == SIZES[0] else 8.0
        save = res.add(
            Figure(
                f"snapshot.save.{n}",
                f"lvz snapshot, {n:,} vCPUs with CPUIDs",
                "s",
                target=Target("max", limit, f"≤ {limit:g} s"),
            )
        )
        restore = res.add(
            Figure(
                f"snapshot.restore.{n}",
                f"lvz restore, {n:,} vCPUs",
                "s",
                target=Target("max", limit, f"≤ {limit:g} s"),
            )
        )
        with procs.daemon() as proc:
            await populate(proc.socket, "big", 65536, list(range(n)))
            for _ in range(reps if n == SIZES[0] else big_reps):
                s, r = await trio.to_thread.run_sync(_snapshot_round, proc.socket, n)
                save.samples.append(s)
                restore.samples.append(r)
        _say(f"snapshots of {n:,} vCPUs: done")


async def measure_shutdown(res: Results, reps: int) -> None:
    """``reps`` daemons, each holding a 65,536-vCPU named VM, stopped with SIGTERM."""
    n = SIZES[-1]
    fig = res.add(
        Figure(
            "shutdown.state.65536",
            f"SIGTERM with a {n:,}-vCPU named VM, --state-dir",
            "s",
            target=Target("max", 2.0, "≤ 2 s"),
            note="signal to process exit; the VM's file is already current",
        )
    )
    for _ in range(reps):
        with (
            tempfile.TemporaryDirectory(prefix="lvzb") as tmp,
            procs.daemon("--state-dir", str(Path(tmp) / "state")) as proc,
        ):
            await populate(proc.socket, "big", 65536, list(range(n)))
            t0 = time.perf_counter()
            proc.proc.send_signal(signal.SIGTERM)
            await trio.to_thread.run_sync(proc.proc.wait)
            fig.samples.append(time.perf_counter() - t0)
            fig.ok_checks.append(proc.proc.returncode == 0)
    _say("shutdown with a big named VM: done")


async def measure_durable(res: Results, reps: int, seconds: float, quick: bool = False) -> None:
    """The whole section; 65,536-vCPU figures take 3 repetitions (1 with ``quick``)."""
    big = 1 if quick else min(reps, 3)
    await measure_journal_cost(res, reps, seconds)
    for i, (label, us) in enumerate(journal_cpu()):
        res.add(
            Figure(
                f"durable.cpu.{i}",
                f"daemon CPU per request, in-process: {label}",
                "us",
                samples=[us],
                note="best of 5; the journal's own cost, without noise",
            )
        )
    await measure_snapshots(res, reps, big)
    await measure_shutdown(res, big)


def main(argv: list[str]) -> int:
    """``python -m bench.durable [journal]``: the whole section, or its journal-cost part."""
    res = Results()
    if argv[1:] == ["cpu"]:
        for label, us in journal_cpu():
            print(f"  {label:<58} {us:6.2f} us")
        return 0
    if argv[1:] == ["journal"]:
        trio.run(measure_journal_cost, res, 5, 0.5)
        print(table(res, "lvz --state-dir journal cost: medians of 10 runs of 0.25 s"))
        return 0
    trio.run(measure_durable, res, 5, 0.5)
    print(table(res, "lvz durability and snapshots: medians of 5 (65,536 vCPUs: 3)"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
