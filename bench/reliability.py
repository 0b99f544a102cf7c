"""``python -m bench.reliability``: what a misbehaving client costs, and how fast shutdown is.

Two figures the README quotes, measured on a real ``lvz serve``:

* memory under a subscriber that never reads: one connection subscribes to a VM and stops
  reading while another drives 200,000 line changes; the daemon's RSS before and after, and
  that the driver's requests were never slowed to a halt (its rate is printed);
* SIGTERM with 64 ``vcpu.run`` calls parked: time until exit, every run answered EBADF.
"""

from __future__ import annotations

import collections
import socket
import threading
import time
from pathlib import Path

import msgpack

from lvz.testing.spawn import DaemonProcess

from .procs import daemon, rss_bytes

CHANGES = 200_000


def _call(sock: socket.socket, unpacker: msgpack.Unpacker, msgid: int, method: str,
          params: dict[str, object]) -> dict[str, object]:
    sock.sendall(msgpack.packb([0, msgid, method, params]))
    while True:
        for msg in unpacker:
            if msg[0] == 1 and msg[1] == msgid:
                if msg[2] is not None:
                    raise RuntimeError(f"{method}: {msg[2]}")
                return msg[3]  # type: ignore[no-any-return]
        unpacker.feed(sock.recv(1 << 16))


def _connect(path: Path) -> tuple[socket.socket, msgpack.Unpacker]:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(path))
    return s, msgpack.Unpacker(raw=False)


def slow_subscriber(path: Path, pid: int) -> None:
    drv, du = _connect(path)
    vm = _call(drv, du, 1, "kvm.create_vm", {"name": "slowsub"})["vm"]
    vcpu = _call(drv, du, 2, "vm.create_vcpu", {"vm": vm, "vcpu_id": 0})["vcpu"]
    sub, su = _connect(path)
    svm = _call(sub, su, 1, "kvm.open_vm", {"name": "slowsub"})["vm"]
    _call(sub, su, 2, "vm.subscribe", {"vm": svm})  # ... and never reads again
    before = rss_bytes(pid)
    t0 = time.monotonic()
    msgid = 10
    batch = 500
    for _ in range(CHANGES // batch):
        data = b"".join(msgpack.packb([0, msgid + i, "vcpu.interrupt",
                                       {"vcpu": vcpu, "irq": 5 if i % 2 == 0 else -5}])
                        for i in range(batch))
        drv.sendall(data)
        last = msgid + batch - 1
        _call(drv, du, last + 1, "kvm.get_api_version", {})
        msgid = last + 2
    elapsed = time.monotonic() - t0
    after = rss_bytes(pid)
    print(f"non-reading subscriber: {CHANGES:,} line changes in {elapsed:.2f} s "
          f"({CHANGES / elapsed:,.0f}/s for the driver); daemon RSS "
          f"{before / 2**20:.1f} -> {after / 2**20:.1f} MiB "
          f"(+{(after - before) / 2**20:.1f} MiB, queue bound --max-events 4096)")
    sub.close()
    drv.close()


def shutdown_timing(path: Path, proc: DaemonProcess) -> None:
    s, u = _connect(path)
    vm = _call(s, u, 1, "kvm.create_vm", {"name": "parked"})["vm"]
    for i in range(64):
        _call(s, u, 2 + i, "vm.create_vcpu", {"vm": vm, "vcpu_id": i})
    parked = []
    for i in range(64):
        c, cu = _connect(path)
        h = _call(c, cu, 1, "kvm.open_vm", {"name": "parked"})["vm"]
        v = _call(c, cu, 2, "vm.open_vcpu", {"vm": h, "vcpu_id": i})["vcpu"]
        c.sendall(msgpack.packb([0, 3, "vcpu.run", {"vcpu": v, "timeout": 600}]))
        parked.append((c, cu))
    time.sleep(0.3)  # the runs are waiting in the daemon now
    answers: list[str] = []

    def collect(c: socket.socket, cu: msgpack.Unpacker) -> None:
        c.settimeout(5)
        while True:
            for msg in cu:
                if msg[0] == 1 and msg[1] == 3:
                    answers.append(msg[2]["name"] if msg[2] else "ok")
                    return
            data = c.recv(1 << 16)
            if not data:
                answers.append("closed without an answer")
                return
            cu.feed(data)

    threads = [threading.Thread(target=collect, args=pc) for pc in parked]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    status = proc.stop()
    took = time.monotonic() - t0
    for t in threads:
        t.join(10)
    for c, _ in parked:
        c.close()
    s.close()
    print(f"SIGTERM with 64 vcpu.run parked: exit {status} after {took:.3f} s; "
          f"answers {dict(collections.Counter(answers))}")


def main() -> None:
    with daemon() as proc:
        slow_subscriber(proc.socket, proc.pid)
    with daemon() as proc:
        shutdown_timing(proc.socket, proc)


if __name__ == "__main__":
    main()
