"""``python -m bench.profile``: where the daemon's time goes under one benchmark load.

Starts the daemon as ``lvz serve`` under cProfile (``python -m cProfile -o FILE -m ...``),
drives it with the benchmark's own raw client (sequential or pipelined get_one_reg, set_one_reg
or phyid_lookup), stops it with SIGTERM so the profile is written, and prints the functions by
own time and by cumulative time. cProfile slows Python code down, so read the shares, not the
absolute rates.
"""

from __future__ import annotations

import argparse
import io
import pstats
import sys
import tempfile
from pathlib import Path

import trio

from lvz.testing.wire import Wire

from . import procs
from .scenarios import WINDOW, Bench


async def drive(path: Path, method: str, pipelined: bool, seconds: float) -> float:
    bench = Bench(path, path)  # the "floor" connection is unused here: point it at lvz
    try:
        await bench.setup_main()
        assert bench.main is not None
        make = {"get": bench.get_one_reg, "set": bench.set_one_reg, "lookup": bench.phyid_lookup}[
            method
        ]()
        conn: Wire = bench.main.conn
        if pipelined:
            run = await conn.pipelined(make, WINDOW, seconds, 10_000_000)
        else:
            run = await conn.sequential(make, seconds, 10_000_000)
        return run.rate
    finally:
        await bench.aclose()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=("get", "set", "lookup"), default="get")
    ap.add_argument("--pipelined", action="store_true", help="64 in flight (default: 1)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--top", type=int, default=35)
    ap.add_argument("--out", type=Path, default=None, help="keep the .prof file here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lvz-prof-") as tmpname:
        tmp = Path(tmpname)
        prof = args.out or tmp / "daemon.prof"
        with procs.profiled_daemon(prof) as daemon:
            rate = trio.run(drive, daemon.socket, args.method, args.pipelined, args.seconds)
        stats = pstats.Stats(str(prof), stream=(buf := io.StringIO()))
        stats.strip_dirs()
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)
        mode = "pipelined x64" if args.pipelined else "sequential"
        print(f"{args.method} {mode}: {rate:,.0f} req/s under cProfile")
        print(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
