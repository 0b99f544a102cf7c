"""The daemon over a real socket: framing errors, check order, handles, events, vcpu.run.

These talk raw protocol on purpose: they send what a well-behaved client never would.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import msgpack
import pytest
import trio
import trio.testing

from lvz.daemon import handlers, server
from lvz.daemon.config import ServeConfig
from lvz.daemon.host import load_plugins
from lvz.daemon.server import Daemon, serve
from lvz.protocol import Notification, Response, abi
from lvz.protocol.schema import HANDLE_PARAM, METHODS
from lvz.testing.wire import Wire

from .conftest import Connect

KS0 = abi.csr_id(abi.CSR_KS0)


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


async def make_vm(raw: Wire, **kw: object) -> tuple[int, list[int]]:
    vm = (await raw.ok("kvm.create_vm", **kw))["vm"]
    vcpus = [(await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=i))["vcpu"] for i in range(3)]
    return vm, vcpus


async def snapshot(raw: Wire, vm: int, vcpus: list[int]) -> tuple[object, ...]:
    m = await raw.ok("vm.phyid_map", vm=vm)
    cpuids = [(await raw.ok("vcpu.get_one_reg", vcpu=v, id=abi.CPUID))["value"] for v in vcpus]
    return m["limit"], m["entries"], cpuids


async def test_socket_is_private(daemon: Daemon, connect: Connect) -> None:
    mode = os.stat(daemon.config.socket).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


async def test_garbage_closes_only_that_connection(connect: Connect) -> None:
    good = await connect()
    vm, vcpus = await make_vm(good, name="keep")
    await good.ok("vcpu.set_one_reg", vcpu=vcpus[1], id=abi.CPUID, value=9)
    before = await snapshot(good, vm, vcpus)
    for junk in (b"\xc1\xc1\xc1", pack(msgpack.ExtType(5, b"x")), b"\x93" + b"\xc1"):
        bad = await connect()
        await bad.send(junk)
        ev = await bad.next_event()
        assert isinstance(ev, Notification)
        assert ev.event == "protocol_error"
        assert ev.params["name"] == "EPROTO"
        assert await bad.next_event() is None  # the daemon closed it
    assert await snapshot(good, vm, vcpus) == before


@pytest.mark.parametrize(
    ("junk", "says"),
    [
        (b"\xc1", "0xc1"),
        (b"\x93\xc1", "0xc1"),
        (b"\x91" * 100_000, "nested deeper"),
    ],
)
async def test_undecodable_bytes_are_named(connect: Connect, junk: bytes, says: str) -> None:
    """msgpack's FormatError and StackError carry no text: the notification said only
    'undecodable message: ' (PROTOCOL §2: errors name what is wrong)."""
    bad = await connect()
    await bad.send(junk)
    ev = await bad.next_event()
    assert isinstance(ev, Notification) and ev.params["name"] == "EPROTO"
    assert says in ev.params["message"], ev.params["message"]


async def test_oversized_message_is_refused_and_closed(connect: Connect) -> None:
    bad = await connect()
    await bad.send(pack([0, 1, "hello", {"protocol": 1, "client": "x" * (1 << 20)}]))
    ev = await bad.next_event()
    assert isinstance(ev, Notification)
    assert ev.params["name"] == "E2BIG"
    other = await connect()
    assert (await other.ok("kvm.get_api_version"))["version"] == 12


async def test_half_a_message_then_disconnect(connect: Connect) -> None:
    good = await connect()
    vm, vcpus = await make_vm(good)
    before = await snapshot(good, vm, vcpus)
    for _ in range(5):
        half = await connect()
        await half.send(pack([0, 1, "kvm.create_vm", {"name": "half"}])[:9])
        await half.aclose()
    await trio.testing.wait_all_tasks_blocked()  # the daemon has done all it will do
    assert await snapshot(good, vm, vcpus) == before
    assert await good.err("kvm.open_vm", name="half") == "ENOENT"


async def test_malformed_but_valid_msgpack_keeps_the_connection(connect: Connect) -> None:
    raw = await connect()
    await raw.send(pack("just a string"))
    ev = await raw.next_event()
    assert isinstance(ev, Notification)
    assert ev.event == "protocol_error"
    assert ev.params == {"errno": 74, "name": "EBADMSG", "message": ev.params["message"]}
    await raw.send(pack([0, 42, 7, {}]))
    ev = await raw.next_event()
    assert isinstance(ev, Response)
    assert ev.msgid == 42
    assert ev.error is not None
    assert ev.error.name == "EBADMSG"
    assert (await raw.ok("kvm.get_api_version"))["version"] == 12


async def test_checks_come_in_protocol_order(connect: Connect) -> None:
    raw = await connect()
    vm, vcpus = await make_vm(raw)
    assert await raw.err("vcpu.nope", vcpu=99) == "ENOTTY"  # unknown method before handles
    assert await raw.err("vcpu.get_one_reg", vcpu=99, id="x") == "EINVAL"  # params before handles
    assert await raw.err("vcpu.get_one_reg", vcpu=99, id=abi.CPUID) == "EBADF"
    assert await raw.err("vcpu.get_one_reg", vcpu=vm, id=abi.CPUID) == "ENOTTY"
    assert await raw.err("vm.phyid_map", vm=vcpus[0]) == "ENOTTY"
    assert await raw.err("vcpu.get_one_reg", vcpu=vcpus[0], id=abi.csr_id(0x800)) == "EINVAL"
    assert await raw.err("hello", protocol=2) == "EPROTONOSUPPORT"
    hello = await raw.ok("hello", protocol=1)
    assert hello["protocol"] == 1
    assert hello["device_types"] == ["loongarch-eiointc", "loongarch-ipi", "loongarch-pchpic"]
    assert "vcpu.run" in hello["methods"]


async def test_unnamed_vm_lives_while_any_handle_does(connect: Connect) -> None:
    a = await connect()
    observer = await connect()
    vm = (await a.ok("kvm.create_vm"))["vm"]
    vcpu = (await a.ok("vm.create_vcpu", vm=vm, vcpu_id=4))["vcpu"]
    await a.ok("close", handle=vm)
    assert await a.err("vm.phyid_map", vm=vm) == "EBADF"
    assert len((await observer.ok("kvm.list_vms"))["vms"]) == 1  # the vCPU handle keeps it
    assert (await a.ok("vcpu.get_one_reg", vcpu=vcpu, id=abi.TMID))["value"] == 4
    await a.ok("close", handle=vcpu)
    assert (await observer.ok("kvm.list_vms"))["vms"] == []
    assert await a.err("close", handle=vcpu) == "EBADF"


async def test_named_vm_persists_and_is_shared(connect: Connect) -> None:
    a = await connect()
    vm = (await a.ok("kvm.create_vm", name="shared", max_phyid=4096))["vm"]
    v = (await a.ok("vm.create_vcpu", vm=vm, vcpu_id=300))["vcpu"]
    await a.ok("vcpu.set_one_reg", vcpu=v, id=abi.CPUID, value=4000)
    await a.aclose()
    await trio.testing.wait_all_tasks_blocked()  # the daemon has done all it will do
    b = await connect()
    assert await b.err("kvm.create_vm", name="shared") == "EEXIST"
    assert await b.err("kvm.create_vm", name="") == "EINVAL"
    assert await b.err("kvm.create_vm", max_phyid=65537) == "EINVAL"
    assert await b.err("kvm.create_vm", max_phyid=0) == "EINVAL"
    vm2 = (await b.ok("kvm.open_vm", name="shared"))["vm"]
    assert await b.ok("vm.phyid_map", vm=vm2) == {"limit": 4096, "entries": [[4000, 300]]}
    assert (await b.ok("vm.phyid_lookup", vm=vm2, phyid=4000))["vcpu_id"] == 300
    v2 = (await b.ok("vm.open_vcpu", vm=vm2, vcpu_id=300))["vcpu"]
    await b.ok("vm.destroy", vm=vm2)
    for method, params in (
        ("vm.phyid_map", {"vm": vm2}),
        ("close", {"handle": vm2}),
        ("vcpu.get_one_reg", {"vcpu": v2, "id": abi.CPUID}),
    ):
        assert await b.err(method, **params) == "EBADF"
    assert await b.err("kvm.open_vm", name="shared") == "ENOENT"
    fresh = (await b.ok("kvm.create_vm"))["vm"]
    assert fresh > v2  # handle numbers are never reused on a connection


async def test_irq_events_are_ordered_deduplicated_and_before_the_response(
    connect: Connect,
) -> None:
    raw = await connect()
    vm, vcpus = await make_vm(raw)
    await raw.ok("vm.subscribe", vm=vm)
    await raw.ok("vm.subscribe", vm=vm)  # again: a no-op, still one event per change
    vm_again = await raw.ok("vm.info", vm=vm)
    assert vm_again["vcpus"] == [0, 1, 2]
    msgid, data = raw.send_request("vcpu.interrupt", {"vcpu": vcpus[2], "irq": 5})
    await raw.send(data)
    ev = await raw.next_event()
    assert isinstance(ev, Notification)
    assert ev.params == {
        "vm": vm,
        "vcpu_id": 2,
        "irq": 5,
        "level": 1,
        "seq": 1,
        "phyid": None,
    }  # no CPUID set: no phyid (protocol-additions.md)
    ev = await raw.next_event()
    assert isinstance(ev, Response)
    assert ev.msgid == msgid
    await raw.ok("vcpu.interrupt", vcpu=vcpus[2], irq=5)  # already up: no event
    await raw.ok("vcpu.interrupt", vcpu=vcpus[2], irq=-5)
    await raw.ok("vcpu.set_one_reg", vcpu=vcpus[0], id=abi.ESTAT, value=(1 << 12) | 2)
    await raw.ok("vcpu.csr_xchg", vcpu=vcpus[0], csr=5, value=0, mask=3)
    got = [
        (n.params["vcpu_id"], n.params["irq"], n.params["level"], n.params["seq"])
        for n in raw.notifications
    ]
    assert got == [(2, 5, 0, 2), (0, 1, 1, 3), (0, 12, 1, 4), (0, 1, 0, 5)]


async def test_vcpu_run_waits_without_blocking_later_requests(connect: Connect) -> None:
    raw = await connect()
    _vm, vcpus = await make_vm(raw)
    run_id, data = raw.send_request("vcpu.run", {"vcpu": vcpus[1], "timeout": 10})
    await raw.send(data)
    assert await raw.err("vcpu.run", vcpu=vcpus[1], timeout=1) == "EBUSY"
    await raw.ok("vcpu.set_one_reg", vcpu=vcpus[1], id=abi.CPUID, value=3)
    await raw.ok("vcpu.hypercall", vcpu=vcpus[0], code=0x100, args=[1, 1, 0, 3])  # PV IPI
    r = await raw.response(run_id)
    assert r.result == {"exit_reason": "irq", "estat": 1}
    # a line already up: returns at once; no line: times out
    assert (await raw.ok("vcpu.run", vcpu=vcpus[1], timeout=5))["exit_reason"] == "irq"
    assert (await raw.ok("vcpu.run", vcpu=vcpus[2], timeout=0.01)) == {
        "exit_reason": "timeout",
        "estat": 0,
    }


async def test_vcpu_run_ends_with_ebadf_on_destroy_and_close(connect: Connect) -> None:
    raw = await connect()
    _vm, vcpus = await make_vm(raw)
    other = await connect()
    waits = []
    for v in vcpus[:2]:
        msgid, data = raw.send_request("vcpu.run", {"vcpu": v, "timeout": 30})
        await raw.send(data)
        waits.append(msgid)
    await raw.ok("vcpu.destroy", vcpu=vcpus[0])
    r = await raw.response(waits[0])
    assert r.error is not None
    assert r.error.name == "EBADF"
    await raw.ok("close", handle=vcpus[1])
    r = await raw.response(waits[1])
    assert r.error is not None
    assert r.error.name == "EBADF"
    del other


async def test_racing_connections_exactly_one_wins_a_phyid(connect: Connect) -> None:
    owner = await connect()
    vm = (await owner.ok("kvm.create_vm", name="race"))["vm"]
    n = 24
    clients = [await connect() for _ in range(n)]
    handles = []
    for i, c in enumerate(clients):
        h = (await c.ok("kvm.open_vm", name="race"))["vm"]
        handles.append((await c.ok("vm.create_vcpu", vm=h, vcpu_id=i))["vcpu"])
    results: list[str | None] = []

    async def attempt(c: Wire, v: int) -> None:
        r = await c.call("vcpu.set_one_reg", vcpu=v, id=abi.CPUID, value=77)
        results.append(None if r.error is None else r.error.name)

    async with trio.open_nursery() as nursery:
        for c, v in zip(clients, handles, strict=True):
            nursery.start_soon(attempt, c, v)
    assert results.count(None) == 1
    assert results.count("EINVAL") == n - 1
    entries = (await owner.ok("vm.phyid_map", vm=vm))["entries"]
    assert len(entries) == 1
    assert entries[0][0] == 77


async def test_limits_handles_and_vms(
    sock_dir: object, nursery: trio.Nursery, connect: Connect
) -> None:
    from pathlib import Path

    from lvz.daemon.config import ServeConfig
    from lvz.daemon.host import load_plugins
    from lvz.daemon.server import serve

    assert isinstance(sock_dir, Path)
    cfg = ServeConfig(socket=sock_dir / "l.sock", max_handles=4, max_vms=2, max_vcpus=2)
    await nursery.start(serve, cfg, load_plugins())
    raw = await connect(cfg.socket)
    vm = (await raw.ok("kvm.create_vm"))["vm"]
    await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=0)
    await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=1)
    await raw.ok("vm.open_vcpu", vm=vm, vcpu_id=1)
    assert await raw.err("vm.open_vcpu", vm=vm, vcpu_id=0) == "EMFILE"
    other = await connect(cfg.socket)
    vm2 = (await other.ok("kvm.create_vm"))["vm"]
    assert await other.err("kvm.create_vm") == "ENOSPC"
    await other.ok("vm.create_vcpu", vm=vm2, vcpu_id=0)
    await other.ok("vm.create_vcpu", vm=vm2, vcpu_id=255)
    assert await other.err("vm.create_vcpu", vm=vm2, vcpu_id=7) == "EINVAL"  # max vCPUs


async def test_a_missing_socket_directory_is_created_private(
    sock_dir: object, nursery: trio.Nursery, connect: Connect
) -> None:
    from pathlib import Path

    from lvz.daemon.config import ServeConfig
    from lvz.daemon.host import load_plugins
    from lvz.daemon.server import serve

    assert isinstance(sock_dir, Path)
    cfg = ServeConfig(socket=sock_dir / "new" / "lvz.sock")
    await nursery.start(serve, cfg, load_plugins())
    assert stat.S_IMODE(os.stat(cfg.socket.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(cfg.socket).st_mode) == 0o600
    raw = await connect(cfg.socket)
    assert (await raw.ok("kvm.get_api_version"))["version"] == 12


async def test_vcpu_kick_ends_a_waiting_run_with_eintr(connect: Connect) -> None:
    raw = await connect()
    _vm, vcpus = await make_vm(raw, name="kicked")
    msgid, data = raw.send_request("vcpu.run", {"vcpu": vcpus[0], "timeout": 60})
    await raw.send(data)
    other = await connect()  # any handle to the vCPU may kick it, as a signal to its thread
    vm2 = (await other.ok("kvm.open_vm", name="kicked"))["vm"]
    v2 = (await other.ok("vm.open_vcpu", vm=vm2, vcpu_id=0))["vcpu"]
    await other.ok("vcpu.kick", vcpu=v2)
    r = await raw.response(msgid)
    assert r.error is not None
    assert (r.error.name, r.error.errno) == ("EINTR", 4)
    await raw.ok("vcpu.kick", vcpu=vcpus[0])  # nothing waiting: a no-op
    assert (await raw.ok("vcpu.run", vcpu=vcpus[0], timeout=0.01))["exit_reason"] == "timeout"


async def test_handles_of_destroyed_objects_do_not_use_up_the_limit(
    sock_dir: object, nursery: trio.Nursery, connect: Connect
) -> None:
    from pathlib import Path

    from lvz.daemon.config import ServeConfig
    from lvz.daemon.host import load_plugins
    from lvz.daemon.server import serve

    assert isinstance(sock_dir, Path)
    cfg = ServeConfig(socket=sock_dir / "h.sock", max_handles=3)
    daemon = await nursery.start(serve, cfg, load_plugins())
    raw = await connect(cfg.socket)
    vm = (await raw.ok("kvm.create_vm"))["vm"]
    for i in range(10):  # hot-plug churn on one connection, closing each dead handle
        v = (await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=i))["vcpu"]
        await raw.ok("vcpu.set_one_reg", vcpu=v, id=abi.CPUID, value=7)
        await raw.ok("vcpu.destroy", vcpu=v)
        assert await raw.err("close", handle=v) == "EBADF"  # still EBADF, as PROTOCOL §3 says
    for i in range(10, 20):  # ... and without closing them
        v = (await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=i))["vcpu"]
        await raw.ok("vcpu.destroy", vcpu=v)
        assert await raw.err("vcpu.get_one_reg", vcpu=v, id=abi.CPUID) == "EBADF"
    assert (await raw.ok("vm.phyid_map", vm=vm))["entries"] == []
    a = (await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=30))["vcpu"]
    await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=31)
    assert await raw.err("vm.create_vcpu", vm=vm, vcpu_id=32) == "EMFILE"  # live ones count
    await raw.ok("close", handle=vm)
    assert len(daemon.vms) == 1  # the vCPU handles still hold the unnamed VM
    await raw.ok("close", handle=a)
    await raw.ok("close", handle=a + 1)
    assert daemon.vms == []  # and the last one let it go


def test_every_method_has_one_handler_in_the_table_of_its_handle_kind() -> None:
    """The dispatch tables are the whole routing: grep a method's name, find its handler."""
    tables: dict[str, dict[str, object]] = {
        "none": dict(handlers.KVM),
        "": dict(handlers.ANY),
        "vm": dict(handlers.VM),
        "vcpu": dict(handlers.VCPU),
        "device": dict(handlers.DEVICE),
    }
    seen = [name for table in tables.values() for name in table]
    assert len(seen) == len(set(seen))
    assert set(seen) | {"vcpu.run"} == set(METHODS)  # vcpu.run waits in a task of its own
    for kind, table in tables.items():
        for name in table:
            assert HANDLE_PARAM.get(name, (None, "none"))[1] == kind, name
    assert set(handlers.WRITES_MAP) <= set(handlers.VCPU)


async def test_a_handle_of_the_wrong_kind_is_enotty_for_every_handle_method(
    connect: Connect,
) -> None:
    """Resolution by kind happens before any handler: EBADF first, then ENOTTY, then its own."""
    raw = await connect()
    vm = (await raw.ok("kvm.create_vm"))["vm"]
    vcpu = (await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=0))["vcpu"]
    wrong = {"vm": vcpu, "vcpu": vm, "device": vm}
    for name, (param, kind) in sorted(HANDLE_PARAM.items()):
        if not kind:
            continue
        valid: dict[str, object] = {"str": "x", "source": {"pin": 0}}
        params: dict[str, object] = {
            p: valid.get(k, 0) for p, k, required in METHODS[name] if required and p != param
        }
        params[param] = wrong[kind]
        r = await raw.call(name, **params)
        assert r.error is not None and r.error.name == "ENOTTY", (name, r.error)
        params[param] = 999
        r = await raw.call(name, **params)
        assert r.error is not None and r.error.name == "EBADF", (name, r.error)


@pytest.mark.parametrize("fsync", [None, "everysec", "always"])
async def test_a_pipelined_batch_is_answered_in_chunks(
    nursery: trio.Nursery, serve_config: ServeConfig, sock_dir: Path, fsync: str | None
) -> None:
    """100 requests in one write: their answers leave in order, in sends of at most
    ``FLUSH_ANSWERS`` messages, so a pipelining client can work on the first while the daemon
    makes the rest (the pipelined figures in make bench). With ``--fsync always`` a send that
    carries a change costs a disk sync, so there they leave in one send."""
    if fsync is not None:
        serve_config.state_dir = sock_dir / "state"
        serve_config.fsync = fsync
    daemon: Daemon = await nursery.start(serve, serve_config, load_plugins())
    raw = await Wire.open(daemon.config.socket)
    _, vcpus = await make_vm(raw, name="chunks")
    (conn,) = (c for c in daemon.connections if c.handles)
    stream = conn.stream
    assert stream is not None
    sent: list[bytes] = []
    send_all = stream.send_all

    async def counting(data: bytes | bytearray | memoryview) -> None:
        sent.append(bytes(data))
        await send_all(data)

    stream.send_all = counting  # type: ignore[method-assign]
    assert server.FLUSH_ANSWERS < 100  # or this batch would show nothing
    # Changing writes: with a state dir each one is journaled before its answer leaves.
    requests = [
        raw.send_request("vcpu.set_one_reg", {"vcpu": vcpus[0], "id": KS0, "value": i})
        for i in range(100)
    ]
    await raw.send(b"".join(data for _, data in requests))
    answers = [await raw.next_message() for _ in requests]
    await raw.aclose()
    assert [(a[1], a[2]) for a in answers] == [(msgid, None) for msgid, _ in requests]
    per_send = [len(list(msgpack.Unpacker(io.BytesIO(chunk)))) for chunk in sent]
    assert sum(per_send) == len(requests)
    if fsync == "always":
        assert len(sent) == 1
    else:
        assert max(per_send) <= server.FLUSH_ANSWERS
        assert len(sent) > len(requests) // server.FLUSH_ANSWERS
