"""A subscriber that never reads must cost bounded memory and not slow anyone else down."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from lvz.daemon.config import ServeConfig
from lvz.daemon.host import load_plugins
from lvz.daemon.server import Daemon, serve
from lvz.protocol import Notification, abi

from .conftest import Connect


async def test_non_reading_subscriber_is_bounded_and_told_what_it_lost(
    sock_dir: Path, nursery: trio.Nursery, connect: Connect
) -> None:
    cfg = ServeConfig(socket=sock_dir / "s.sock", max_events=500)
    daemon: Daemon = await nursery.start(serve, cfg, load_plugins())
    driver = await connect(cfg.socket)
    vm = (await driver.ok("kvm.create_vm", name="busy"))["vm"]
    v = (await driver.ok("vm.create_vcpu", vm=vm, vcpu_id=0))["vcpu"]

    slow = await connect(cfg.socket)
    svm = (await slow.ok("kvm.open_vm", name="busy"))["vm"]
    await slow.ok("vm.subscribe", vm=svm)  # ... and then it stops reading
    [subs] = daemon.subscribers.values()
    [slow_conn] = subs

    changes = 20_000  # far more events than the socket buffer and the queue hold
    with trio.fail_after(30):  # the driver is never held up by the slow reader
        for _ in range(changes // 500):
            for irq in (5, -5) * 250:
                msgid, data = driver.send_request("vcpu.interrupt", {"vcpu": v, "irq": irq})
                await driver.send(data)
            await driver.response(msgid)
            assert slow_conn.queued_events <= cfg.max_events
            assert slow_conn.out_bytes < 200 * cfg.max_events
    assert (await driver.ok("vcpu.get_one_reg", vcpu=v, id=abi.ESTAT))["value"] == 0

    # now the slow subscriber reads everything that is there
    seqs: list[int] = []
    lost = 0
    with trio.move_on_after(1.0):
        while True:
            ev = await slow.next_event()
            assert isinstance(ev, Notification)
            if ev.event == "irq":
                seqs.append(ev.params["seq"])
            elif ev.event == "events_lost":
                assert ev.params["vm"] == svm  # the handle this connection subscribed with
                lost += ev.params["count"]
    assert seqs == sorted(seqs)
    assert lost > 0
    assert len(seqs) + lost == changes  # every change is either delivered or counted
    # once drained, the subscriber gets events again, and seq shows how many it missed
    await driver.ok("vcpu.interrupt", vcpu=v, irq=6)
    ev = await slow.next_event()
    assert isinstance(ev, Notification)
    assert ev.params["seq"] == changes + 1
    assert ev.params["seq"] - len(seqs) - 1 == lost


async def test_a_client_that_never_reads_answers_stops_being_read(
    daemon: Daemon, connect: Connect
) -> None:
    """Backpressure: the daemon buffers at most ~FLUSH_BYTES of answers per connection, then
    blocks on that connection's send and reads no more of its requests."""
    from lvz.daemon.server import FLUSH_BYTES

    raw = await connect()
    vm = (await raw.ok("kvm.create_vm", max_phyid=65536))["vm"]
    v = 0
    for i in range(512):  # make vm.phyid_map a ~5 KiB answer
        v = (await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=i))["vcpu"]
        await raw.ok("vcpu.set_one_reg", vcpu=v, id=abi.CPUID, value=i * 100)
    [model] = daemon.vms
    # each pair: a big answer, and a line toggle that counts (vm.seq) how far the daemon got
    burst = b"".join(
        raw.send_request(m, p)[1]
        for _ in range(50)
        for m, p in (
            ("vm.phyid_map", {"vm": vm}),
            ("vcpu.interrupt", {"vcpu": v, "irq": 3}),
            ("vm.phyid_map", {"vm": vm}),
            ("vcpu.interrupt", {"vcpu": v, "irq": -3}),
        )
    )
    sent = 0
    with trio.move_on_after(1.0):
        while True:
            await raw.send(burst)  # and never reads an answer
            sent += 100
    processed = model.seq
    assert processed < sent  # the daemon did not swallow everything it was sent
    await trio.testing.wait_all_tasks_blocked()  # the daemon has done all it will do
    assert model.seq == processed  # it stopped reading: nothing more gets processed
    [conn] = [
        c for c in daemon.connections if c.number == max(c.number for c in daemon.connections)
    ]
    assert conn.out_bytes <= FLUSH_BYTES + 64 * 1024  # at most one flush threshold queued
    other = await connect()  # and everyone else is served as before
    with trio.fail_after(2):
        assert (await other.ok("kvm.get_api_version"))["version"] == 12
