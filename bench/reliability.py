"""``python -m bench.reliability``: what a misbehaving client costs, and how fast shutdown is.

Two figures the README quotes, measured on a real ``lvz serve``:

* memory under a subscriber that never reads: one connection subscribes to a VM and stops
  reading while another drives 200,000 line changes; the daemon's RSS before and after, and
  that the driver's requests were never slowed to a halt (its rate is printed);
* SIGTERM with 64 ``vcpu.run`` calls parked: time until exit, every run answered EBADF.
"""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path

from lvz.testing.spawn import DaemonProcess
from lvz.testing.wire import BlockingWire, WireError

from .procs import daemon, rss_bytes

CHANGES = 200_000


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
        drv.send(b"".join(drv.send_request("vcpu.interrupt",
                                           {"vcpu": vcpu, "irq": 5 if i % 2 == 0 else -5})[1]
                          for i in range(batch)))
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
    print(f"non-reading subscriber: {CHANGES:,} line changes in {elapsed:.2f} s "
          f"({CHANGES / elapsed:,.0f}/s for the driver); daemon RSS "
          f"{before / 2**20:.1f} -> {after / 2**20:.1f} MiB "
          f"(+{(after - before) / 2**20:.1f} MiB, queue bound --max-events 4096)")
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
    print(f"SIGTERM with 64 vcpu.run parked: exit {status} after {took:.3f} s; "
          f"answers {dict(collections.Counter(answers))}")


def main() -> None:
    with daemon() as proc:
        slow_subscriber(proc.socket, proc.pid)
    with daemon() as proc:
        shutdown_timing(proc.socket, proc)


if __name__ == "__main__":
    main()
