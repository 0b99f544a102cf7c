"""``python -m bench.micro``: the daemon's per-request CPU, stage by stage, without sockets.

The socket figures say *how much* slower lvz is than the floor; this says *where*, in
microseconds per request, by running the real sans-I/O objects in a loop: the floor's whole job
(decode + encode), then lvz's decode + validate (``ServerConnection.next_event``), its dispatch
(``Daemon._dispatch``: handle, handler, encode, queue) and the pieces inside it. No
profiler is attached, so the figures are not inflated by per-call instrumentation.

It reaches into daemon internals on purpose (a benchmark helper, not an API user); if those
change, the affected rows say so instead of failing the run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import trio

from lvz.daemon import handlers
from lvz.daemon.config import ServeConfig
from lvz.daemon.host import load_plugins
from lvz.daemon.peer import Connection, VcpuHandle
from lvz.daemon.server import Daemon
from lvz.protocol import abi
from lvz.protocol.connection import NEED_DATA, ServerConnection
from lvz.protocol.schema import validate

N = 200_000


def per_call(fn: Callable[[], object], n: int = N) -> float:
    """Best of 5 runs of ``n`` calls, in microseconds per call."""
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


async def main() -> None:
    rows: list[tuple[str, float]] = []
    pack = msgpack.Packer(use_bin_type=True).pack
    req = pack([0, 1, "vcpu.get_one_reg", {"vcpu": 2, "id": abi.CPUID}])
    batch = req * 64

    # --- the floor: streaming decode of a 64-request batch, one encode per request ---------
    def floor_batch() -> None:
        u = msgpack.Unpacker(raw=False)
        u.feed(batch)
        out = [pack([1, m[1], None, {}]) for m in u]
        b"".join(out)

    rows.append(
        ("floor: decode + encode (per request, batches of 64)", per_call(floor_batch, N // 64) / 64)
    )

    # --- lvz decode + validate -------------------------------------------------------------
    def lvz_decode_batch() -> None:
        p = ServerConnection()
        p.receive_data(batch)
        while p.next_event() is not NEED_DATA:
            pass

    rows.append(
        (
            "lvz: ServerConnection.next_event (decode+shape+validate+Request)",
            per_call(lvz_decode_batch, N // 64) / 64,
        )
    )
    params = {"vcpu": 2, "id": abi.CPUID}
    rows.append(
        ("  of which methods.validate", per_call(lambda: validate("vcpu.get_one_reg", params)))
    )

    # --- lvz dispatch on a real daemon object ------------------------------------------------
    try:
        config = ServeConfig(socket=Path("/nonexistent"))
        daemon = Daemon(load_plugins(), config)
        conn = Connection(None, config, 1)
        vm_h = daemon._execute(conn, "kvm.create_vm", {"max_phyid": 256})["vm"]
        vcpu_h = daemon._execute(conn, "vm.create_vcpu", {"vm": vm_h, "vcpu_id": 0})["vcpu"]
        p = ServerConnection()
        p.receive_data(pack([0, 1, "vcpu.get_one_reg", {"vcpu": vcpu_h, "id": abi.CPUID}]))
        event = p.next_event()
        vh = daemon._resolve(conn, vcpu_h, VcpuHandle, "m")

        def dispatch() -> None:
            daemon._dispatch(conn, event)  # type: ignore[arg-type]
            conn.out.clear()
            conn.out_bytes = 0

        rows.append(("lvz: Daemon._dispatch (resolve, handler, encode, put)", per_call(dispatch)))
        rows.append(
            (
                "  _resolve (handle lookup + liveness + kind)",
                per_call(lambda: daemon._resolve(conn, vcpu_h, VcpuHandle, "m")),
            )
        )
        lock = daemon.map_locks[vh.vm]

        def lock_cycle() -> None:
            lock.acquire_nowait()
            lock.release()

        rows.append(
            ("  (a trio.Lock cycle: what a free map lock no longer costs)", per_call(lock_cycle))
        )
        rows.append(
            (
                "  handlers.vcpu_get_one_reg handler",
                per_call(lambda: handlers.vcpu_get_one_reg(daemon, conn, params, vh)),
            )
        )
        rows.append(("    abi.decode(CPUID)", per_call(lambda: abi.decode(abi.CPUID))))
        rows.append(
            ("  send_result (encode)", per_call(lambda: conn.proto.send_result(1, {"value": 256})))
        )
    except Exception as exc:  # internals moved: say so, keep the rows we have
        rows.append((f"dispatch rows unavailable: {type(exc).__name__}: {exc}", float("nan")))

    width = max(len(r[0]) for r in rows)
    print("per-request CPU, microseconds (best of 5, no profiler)")
    for name, us in rows:
        print(f"  {name.ljust(width)}  {us:6.2f}")


if __name__ == "__main__":
    trio.run(main)
    sys.exit(0)
