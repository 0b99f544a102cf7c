"""The state dir keeps what it cannot load, fits any name, refuses unsafe dirs, stays bounded.

Daemons run in-process here (``serve`` in a nursery; stopping = cancelling it), so a restart
costs no process start; the ``kill -9`` tests are in test_durability.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from itertools import count
from pathlib import Path
from typing import Any

import pytest
import trio

from lvz.daemon import state as state_mod
from lvz.daemon.config import ServeConfig
from lvz.daemon.host import load_plugins
from lvz.daemon.journal import (
    Entry,
    JournalError,
    encode_entry,
    encode_file,
    encode_group,
    parse,
)
from lvz.daemon.safedir import UnsafeDir
from lvz.daemon.server import serve
from lvz.protocol import abi, snapshot
from lvz.testing.wire import Wire as Raw

_sockets = count()


@asynccontextmanager
async def running(state: Path, sock_dir: Path, **options: Any) -> AsyncIterator[Raw]:
    config = ServeConfig(socket=sock_dir / f"s{next(_sockets)}.sock", state_dir=state, **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, config, load_plugins())
        raw = await Raw.connect(config.socket)
        try:
            yield raw
        finally:
            await raw.aclose()
            nursery.cancel_scope.cancel()


async def vm_names(raw: Raw) -> list[str]:
    return sorted(str(v["name"]) for v in (await raw.ok("kvm.list_vms"))["vms"])


def files(state: Path) -> list[str]:
    return sorted(p.name for p in state.iterdir())


async def make_vm(raw: Raw, name: str, vcpus: int = 6) -> int:
    vm = (await raw.ok("kvm.create_vm", name=name))["vm"]
    for v in range(vcpus):
        h = (await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=v))["vcpu"]
        await raw.ok("vcpu.set_one_reg", vcpu=h, id=abi.CPUID, value=v + 1)
    return int(vm)


async def test_a_vm_refused_by_stricter_flags_is_kept_and_comes_back(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = sock_dir / "state"
    async with running(state, sock_dir) as raw:
        await make_vm(raw, "big", vcpus=6)
        await make_vm(raw, "small", vcpus=2)
    async with running(state, sock_dir, max_vcpus=4) as raw:
        assert await vm_names(raw) == ["small"]  # "big" has 6 vCPUs: refused, not lost
    aside = [f for f in files(state) if f.endswith(".failed")]
    assert len(aside) == 1
    reason = (state / aside[0].replace(".failed", ".reason")).read_text()
    assert "EINVAL" in reason and "maximum of 4 vCPUs" in reason
    assert str(state) in reason  # names the file
    async with running(state, sock_dir, max_vcpus=4) as raw:  # a clean restart deletes nothing
        assert await vm_names(raw) == ["small"]
    assert aside[0] in files(state)
    async with running(state, sock_dir) as raw:  # the old flags: back, and no longer aside
        assert await vm_names(raw) == ["big", "small"]
        big = (await raw.ok("kvm.open_vm", name="big"))["vm"]
        assert len((await raw.ok("vm.phyid_map", vm=big))["entries"]) == 6
    assert not [f for f in files(state) if f.endswith((".failed", ".reason"))]
    assert len(files(state)) == 2


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
async def test_a_damaged_file_is_set_aside_and_the_rest_loads(sock_dir: Path, damage: str) -> None:
    state = sock_dir / "state"
    async with running(state, sock_dir) as raw:
        await make_vm(raw, "hurt")
        await make_vm(raw, "fine")
    target = state / state_mod.file_name("hurt")
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10  # inside the snapshot: its SHA-256 refuses it
    elif damage == "truncate":
        data = data[:100]
    else:
        data = bytearray(b"\x00not a journal")
    target.write_bytes(bytes(data))
    async with running(state, sock_dir) as raw:
        assert await vm_names(raw) == ["fine"]
    [aside] = [f for f in files(state) if f.endswith(".failed")]
    assert (state / aside).read_bytes() == bytes(data)  # kept byte for byte


async def test_names_of_any_length_and_script_fit(sock_dir: Path) -> None:
    state = sock_dir / "state"
    odd = ["虚拟机" * 40, "x" * 1000, "../../etc/passwd", "a/b\\c\nd", ".", "-rf"]
    async with running(state, sock_dir) as raw:
        for name in odd:
            await raw.ok("kvm.create_vm", name=name)
    assert all(len(f) < 64 for f in files(state))
    async with running(state, sock_dir) as raw:
        assert await vm_names(raw) == sorted(odd)


async def test_odd_entries_are_skipped_with_a_warning(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = sock_dir / "state"
    async with running(state, sock_dir) as raw:
        await make_vm(raw, "ok")
    (state / "vm-dir.lvzj").mkdir()
    os.mkfifo(state / "vm-fifo.lvzj")
    (state / "vm-link.lvzj").symlink_to(state / state_mod.file_name("ok"))
    (state / "old.lvzvm").mkdir()  # lvz before the journal named its files so
    os.mkfifo(state / "vm-x.1.failed")
    with caplog.at_level(logging.WARNING, logger="lvz.daemon"):
        async with running(state, sock_dir) as raw:
            assert await vm_names(raw) == ["ok"]
            await raw.ok("kvm.create_vm", name="new")
    for odd in ("vm-dir.lvzj", "vm-fifo.lvzj", "vm-link.lvzj", "old.lvzvm", "vm-x.1.failed"):
        assert f"skipping {odd}: not a regular file" in caplog.text
        assert odd in files(state)


async def test_a_planted_tmp_symlink_is_not_followed(sock_dir: Path) -> None:
    state = sock_dir / "state"
    victim = sock_dir / "victim"
    victim.write_text("precious")
    state.mkdir(mode=0o700)
    (state / f".{state_mod.file_name('v')}.tmp").symlink_to(victim)
    async with running(state, sock_dir) as raw:
        await raw.ok("kvm.create_vm", name="v")
    assert victim.read_text() == "precious"
    assert state_mod.file_name("v") in files(state)


@pytest.mark.parametrize("unsafe", ["group-writable", "symlink", "a file", "another user's"])
async def test_an_unsafe_state_dir_is_refused(sock_dir: Path, unsafe: str) -> None:
    real = sock_dir / "real"
    real.mkdir(mode=0o700)
    state = sock_dir / "state"
    if unsafe == "group-writable":
        state.mkdir()
        state.chmod(0o770)
    elif unsafe == "symlink":
        state.symlink_to(real)
    elif unsafe == "a file":
        state.write_text("")
    else:
        if os.getuid() != 0:
            pytest.skip("needs root to give the directory to another user")
        state.mkdir(mode=0o700)
        os.chown(state, 65534, 65534)
    with pytest.raises(BaseExceptionGroup) as exc:
        async with running(state, sock_dir):
            pass
    [refusal] = exc.value.exceptions
    assert isinstance(refusal, UnsafeDir)
    assert str(state) in str(refusal)


async def test_a_missing_state_dir_is_created_private(sock_dir: Path) -> None:
    state = sock_dir / "a" / "b" / "state"
    async with running(state, sock_dir) as raw:
        await raw.ok("kvm.create_vm", name="x")
    assert state.stat().st_mode & 0o777 == 0o700


async def test_the_journal_is_compacted_so_it_stays_bounded(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state_mod, "COMPACT_MIN", 16 << 10)
    state = sock_dir / "state"
    reg = abi.csr_id(abi.CSR_KS0)
    async with running(state, sock_dir) as raw:
        vm = await make_vm(raw, "busy", vcpus=1)
        v = (await raw.ok("vm.open_vcpu", vm=vm, vcpu_id=0))["vcpu"]
        sizes = []
        for i in range(4000):
            await raw.ok("vcpu.set_one_reg", vcpu=v, id=reg, value=i)
            if i % 100 == 0:
                sizes.append((state / state_mod.file_name("busy")).stat().st_size)
    assert max(sizes) < (16 << 10) + 4096  # a compaction whenever it passes COMPACT_MIN
    assert sizes.index(min(sizes[5:])) > 5  # and it did shrink
    assert files(state) == [state_mod.file_name("busy")]  # no temporary left
    async with running(state, sock_dir) as raw:
        vm = (await raw.ok("kvm.open_vm", name="busy"))["vm"]
        v = (await raw.ok("vm.open_vcpu", vm=vm, vcpu_id=0))["vcpu"]
        assert (await raw.ok("vcpu.get_one_reg", vcpu=v, id=reg))["value"] == 3999


async def test_a_torn_tail_is_dropped_and_everything_before_it_loads(sock_dir: Path) -> None:
    state = sock_dir / "state"
    async with running(state, sock_dir) as raw:
        vm = await make_vm(raw, "torn", vcpus=1)
        await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=9)
    target = state / state_mod.file_name("torn")
    whole = target.read_bytes()
    target.write_bytes(
        whole + encode_entry(Entry("vm.create_vcpu", None, {"vcpu_id": 5}, None))[:-3]
    )  # a write cut short
    async with running(state, sock_dir) as raw:
        vm = (await raw.ok("kvm.open_vm", name="torn"))["vm"]
        assert (await raw.ok("vm.info", vm=vm))["vcpus"] == [0, 9]
    assert parse(target.read_bytes()).torn is False  # rewritten whole


async def test_files_of_lvz_before_the_journal_are_taken_over(sock_dir: Path) -> None:
    """Upgrading keeps the VMs an older daemon saved (``<quoted name>.lvzvm`` snapshots)."""
    state = sock_dir / "state"
    state.mkdir(mode=0o700)
    async with running(sock_dir / "tmpstate", sock_dir) as raw:
        vm = await make_vm(raw, "old one", vcpus=3)
        saved = await drive(snapshot.save_vm(vm), raw)
    legacy = dict(saved, version=1)
    import msgpack

    (state / "old%20one.lvzvm").write_bytes(msgpack.packb(legacy, use_bin_type=True))
    async with running(state, sock_dir) as raw:
        assert await vm_names(raw) == ["old one"]
    assert files(state) == [state_mod.file_name("old one")]


async def drive(gen: Any, raw: Raw) -> Any:
    try:
        batch = next(gen)
        while True:
            results = []
            for method, params in batch:
                r = await raw.call(method, **params)
                results.append(r.error if r.error is not None else r.result or {})
            batch = gen.send(results)
    except StopIteration as stop:
        return stop.value


def test_journal_parse_refuses_damage_before_the_tail() -> None:
    head = encode_file(
        snapshot.encode(
            {"vm": {"name": "j", "max_phyid": 256, "pv_features": None}, "vcpus": [], "devices": []}
        ),
        "0",
        [],
    )
    e1 = encode_entry(Entry("vm.create_vcpu", None, {"vcpu_id": 1}, None))
    e2 = encode_entry(Entry("vcpu.set_one_reg", 1, {"id": 1, "value": 2}, "EINVAL"))
    parsed = parse(head + e1 + e2)
    assert [e.method for e in parsed.entries] == ["vm.create_vcpu", "vcpu.set_one_reg"]
    assert parsed.entries[1].outcome == "EINVAL" and not parsed.torn
    bad = bytearray(head + e1 + e2)
    bad[len(head) + len(e1) - 2] ^= 1  # e1's checksum, with e2 after it: damage, not a tail
    with pytest.raises(JournalError, match="group 0: its checksum"):
        parse(bytes(bad))
    bad = bytearray(head + e1 + e2)
    bad[-2] ^= 1  # the last entry: a torn write, dropped
    assert parse(bytes(bad)).torn and len(parse(bytes(bad)).entries) == 1
    assert parse(head + e1 + b"\0" * 4096).torn  # a tail the file system zero-filled
    with pytest.raises(JournalError, match="journal header"):
        parse(b"\x80")


def test_a_group_names_each_connections_handles_apart() -> None:
    """Handle numbers are per connection: handle 3 of two connections are two vCPUs."""
    head = encode_file(
        snapshot.encode(
            {"vm": {"name": "g", "max_phyid": 256, "pv_features": None}, "vcpus": [], "devices": []}
        ),
        "0",
        [],
    )
    group = encode_group(
        [(1, 3, 7), (2, 3, 9), (2, 4, abi.DEV_IPI)],
        [
            ("vcpu.interrupt", {"vcpu": 3, "irq": 2}, None, 1),
            ("vcpu.interrupt", {"vcpu": 3, "irq": 3}, "EINVAL", 2),
            ("device.set_attr", {"device": 4, "group": 1, "attr": 2, "value": 3}, None, 2),
        ],
    )
    entries = parse(head + group).entries
    assert [(e.target, e.outcome) for e in entries] == [
        (7, None),
        (9, "EINVAL"),
        (abi.DEV_IPI, None),
    ]
    unnamed = encode_group([], [("vcpu.interrupt", {"vcpu": 3, "irq": 2}, None, 1)])
    assert parse(head + unnamed).torn  # the last group: a torn write, dropped
    with pytest.raises(JournalError, match="not \\[handles, entries\\]"):
        parse(head + unnamed + group)  # followed by more: damage
