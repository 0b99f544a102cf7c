"""Snapshot and restore through the public protocol: the restored VM is indistinguishable."""

from __future__ import annotations

import inspect
import io
import os
import sys
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.testing

from lvz.clients.cli import ProgressBar
from lvz.clients.cli import main as cli_main
from lvz.protocol import KvmError, abi
from lvz.protocol import snapshot as snap
from lvz.testing.wire import Wire

from .conftest import Connect

T = TypeVar("T")


async def drive(gen: Generator[snap.Batch, snap.Results, T], raw: Wire) -> T:
    """Pipelined driver: each batch is written at once, then its responses collected."""
    try:
        batch = next(gen)
        while True:
            ids, data = [], b""
            for method, params in batch:
                msgid, chunk = raw.send_request(method, params)
                ids.append(msgid)
                data += chunk
            await raw.send(data)
            results: snap.Results = []
            for msgid in ids:
                r = await raw.response(msgid)
                results.append(r.error if r.error is not None else r.result or {})
            batch = gen.send(results)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


IPI, EIO, PCH = abi.DEV_IPI, abi.DEV_EIOINTC, abi.DEV_PCHPIC
KS0 = abi.CSR_KS0  # a register the VMM saves and nothing interprets
IPI_IO = abi.IOCSR_IPI_BASE
EIO_ENABLE = abi.EIOINTC_BASE + abi.EIOINTC_ENABLE
EIO_COREMAP = abi.EIOINTC_BASE + abi.EIOINTC_COREMAP


async def build_busy_vm(raw: Wire) -> int:
    """A VM with state everywhere: sparse phyids, raised lines, all three chips programmed."""
    vm: int = (await raw.ok("kvm.create_vm", name="orig", max_phyid=512))["vm"]
    vcpus = {}
    for vid, phyid in ((0, 7), (1, 300), (3, 0), (5, None)):
        vcpus[vid] = (await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=vid))["vcpu"]
        if phyid is not None:
            await raw.ok("vcpu.set_one_reg", vcpu=vcpus[vid], id=abi.CPUID, value=phyid)
    await raw.ok("vcpu.set_one_reg", vcpu=vcpus[1], id=abi.csr_id(KS0), value=0xDEADBEEF)
    await raw.ok(
        "vcpu.set_one_reg",
        vcpu=vcpus[3],
        id=abi.cpucfg_id(2),
        value=abi.CPUCFG2_LLFTP | abi.CPUCFG2_FP | abi.CPUCFG2_FPSP | abi.CPUCFG2_FPDP,
    )
    await raw.ok(
        "vcpu.set_attr",
        vcpu=vcpus[0],
        group=abi.KVM_LOONGARCH_VCPU_CPUCFG,
        attr=abi.CPUCFG_KVM_FEATURE,
        value=abi.KVM_FEATURE_IPI | abi.KVM_FEATURE_STEAL_TIME,
    )
    await raw.ok("vcpu.interrupt", vcpu=vcpus[5], irq=abi.INT_TI)
    for kind in (IPI, EIO, PCH):
        await raw.ok("vm.create_device", vm=vm, type=kind)
    eio = (await raw.ok("vm.open_device", vm=vm, type=EIO))["device"]
    await raw.ok(
        "device.set_attr",
        device=eio,
        group=abi.KVM_DEV_LOONGARCH_EXTIOI_GRP_CTRL,
        attr=abi.KVM_DEV_LOONGARCH_EXTIOI_CTRL_INIT_NUM_CPU,
        value=8,
    )
    pch = (await raw.ok("vm.open_device", vm=vm, type=PCH))["device"]
    await raw.ok(
        "device.set_attr",
        device=pch,
        group=abi.KVM_DEV_LOONGARCH_PCH_PIC_GRP_CTRL,
        attr=abi.KVM_DEV_LOONGARCH_PCH_PIC_CTRL_INIT,
        value=abi.VIRT_PCH_PIC_BASE,
    )
    v0 = vcpus[0]
    await raw.ok(
        "vcpu.mmio_write",
        vcpu=v0,
        addr=abi.VIRT_PCH_PIC_BASE + abi.PCH_PIC_MASK,
        size=8,
        value=~(1 << 4) & abi.U64_MAX,
    )  # unmask pin 4
    await raw.ok("vcpu.iocsr_write", vcpu=v0, addr=EIO_ENABLE, size=8, value=0xFFFF)  # 0..15
    await raw.ok("vcpu.iocsr_write", vcpu=v0, addr=EIO_COREMAP + 4, size=1, value=1)  # -> phyid 0
    await raw.ok("vm.irq_line", vm=vm, irq=4, level=1)  # pin 4 -> irq 4 -> phyid 0 = vCPU 3
    await raw.ok(
        "vcpu.iocsr_write", vcpu=v0, addr=IPI_IO + abi.IPI_SEND, size=4, value=abi.ipi_send(300, 3)
    )
    await raw.ok(
        "vcpu.iocsr_write",
        vcpu=v0,
        addr=IPI_IO + abi.MAIL_SEND,
        size=8,
        value=abi.ipi_send(300, 2 << abi.IPI_SEND_MAILBOX_SHIFT, payload=0xCAFEF00D),
    )
    return vm


async def read_all(raw: Wire, vm: int) -> dict[str, Any]:
    """Everything a client can observe of a VM, handles aside."""
    state = await drive(snap.save_vm(vm), raw)
    info = await raw.ok("vm.info", vm=vm)
    state["vm"]["name"] = None
    state["map"] = await raw.ok("vm.phyid_map", vm=vm)
    state["info"] = {k: info[k] for k in ("vcpus", "devices", "max_phyid")}
    for v in state["vcpus"]:
        v["regs"] = [r for r in v["regs"] if r[0] != abi.COUNTER]  # wall clock moves on
    return state


async def test_restore_is_indistinguishable(connect: Connect) -> None:
    raw = await connect()
    vm = await build_busy_vm(raw)
    before = await read_all(raw, vm)
    data = snap.encode(await drive(snap.save_vm(vm), raw))
    copy = await drive(snap.restore_vm(snap.decode(data), name="copy"), raw)
    after = await read_all(raw, copy)
    assert after == before
    assert before["map"]["entries"] == [[0, 3], [7, 0], [300, 1]]
    estat = {v["vcpu_id"]: dict(v["regs"]).get(abi.ESTAT, 0) for v in before["vcpus"]}
    assert estat[3] & (1 << abi.INT_HWI0)  # from the device pin
    assert estat[1] & (1 << abi.INT_IPI)
    assert estat[5] & (1 << abi.INT_TI)

    # and it routes the same: a new pin on both VMs reaches the same vCPU and line
    for handle in (vm, copy):
        await raw.ok("vm.subscribe", vm=handle)
    raw.notifications.clear()
    for handle in (vm, copy):
        await raw.ok("vm.signal_msi", vm=handle, address=0, data=9)
        await raw.ok(
            "vcpu.hypercall",
            code=abi.KVM_HCALL_SERVICE,
            args=[abi.KVM_HCALL_FUNC_IPI, 1 << 7, 0, 0],
            vcpu=(await raw.ok("vm.open_vcpu", vm=handle, vcpu_id=0))["vcpu"],
        )
    seen = [
        (n.params["vm"], n.params["vcpu_id"], n.params["irq"], n.params["level"])
        for n in raw.notifications
    ]
    # irq 9's coremap byte was never written: it still goes to vcpu_id 0 (not phyid 0's
    # vCPU 3), in the copy too, because the snapshot carries the live route.
    assert seen == [(vm, 0, 2, 1), (vm, 0, 0, 1), (copy, 0, 2, 1), (copy, 0, 0, 1)]


async def test_corrupt_or_truncated_files_create_nothing(connect: Connect) -> None:
    raw = await connect()
    vm = await build_busy_vm(raw)
    data = snap.encode(await drive(snap.save_vm(vm), raw))
    for bad in (
        data[: len(data) // 2],
        b"\x00" + data,
        b"",
        data[:-1],
        data.replace(b"lvz-snapshot", b"lvz-snapshoX"),
    ):
        with pytest.raises(KvmError) as exc:
            snap.decode(bad)
        assert exc.value.name == "EINVAL"
    assert len((await raw.ok("kvm.list_vms"))["vms"]) == 1


async def test_failed_restore_leaves_no_vm(connect: Connect) -> None:
    raw = await connect()
    vm = await build_busy_vm(raw)
    saved = await drive(snap.save_vm(vm), raw)
    saved["vcpus"][0]["regs"].append([abi.CPUID, 999])  # a second, different CPUID
    with pytest.raises(KvmError) as exc:
        await drive(snap.restore_vm(saved, name="broken"), raw)
    assert exc.value.name == "EINVAL"
    names = [v["name"] for v in (await raw.ok("kvm.list_vms"))["vms"]]
    assert names == ["orig"]
    with pytest.raises(KvmError) as exc:
        await drive(snap.restore_vm(saved), raw)  # the original name is taken
    assert exc.value.name == "EEXIST"


async def test_routes_to_vcpu_ids_past_255_survive_a_restore(connect: Connect) -> None:
    """A max_phyid 4096 VM may route an EIOINTC irq to vcpu_id 300 (found by the fuzzer)."""
    raw = await connect()
    vm = (await raw.ok("kvm.create_vm", name="wide", max_phyid=4096))["vm"]
    v = (await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=300))["vcpu"]
    await raw.ok("vcpu.set_one_reg", vcpu=v, id=abi.CPUID, value=2)
    await raw.ok("vm.create_device", vm=vm, type=EIO)
    await raw.ok("vcpu.iocsr_write", vcpu=v, addr=EIO_COREMAP, size=8, value=4)  # irq 0 -> phyid 2
    saved = await drive(snap.save_vm(vm), raw)
    copy = await drive(snap.restore_vm(saved, name="wide2"), raw)
    assert await read_all(raw, copy) == await read_all(raw, vm)
    eio = (await raw.ok("vm.open_device", vm=copy, type=EIO))["device"]
    assert (
        await raw.ok(
            "device.get_attr",
            device=eio,
            group=abi.KVM_DEV_LOONGARCH_EXTIOI_GRP_SW_STATUS,
            attr=abi.eiointc_route_attr(0),
        )
    )["value"] == 300


def test_every_single_bit_flip_is_refused_naming_the_file() -> None:
    saved = {
        "vm": {"name": "tiny", "max_phyid": 256, "pv_features": 0},
        "vcpus": [{"vcpu_id": 0, "regs": [[abi.CPUID, 3], [abi.csr_id(KS0), 7]]}],
        "devices": [{"type": IPI, "attrs": []}],
    }
    data = snap.encode(saved)
    assert snap.decode(data, "/x/tiny.lvz")["vm"]["name"] == "tiny"
    for bit in range(8 * len(data)):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(KvmError) as exc:
            snap.decode(bytes(flipped), "/x/tiny.lvz")
        assert exc.value.name == "EINVAL", bit
        assert exc.value.message.startswith("/x/tiny.lvz: "), bit


def test_version_1_files_still_load() -> None:
    """A snapshot written before the checksum (and a state dir of an older daemon) is read."""
    import msgpack

    old = {
        "format": "lvz-snapshot",
        "version": 1,
        "vm": {"name": "old", "max_phyid": 256, "pv_features": None},
        "vcpus": [{"vcpu_id": 2, "regs": [[abi.CPUID, 1]]}],
        "devices": [],
    }
    assert snap.decode(msgpack.packb(old))["vcpus"][0]["vcpu_id"] == 2


class Killed(ConnectionError):
    pass


class KillAt:
    """A batch sender whose client dies right after sending batch ``k`` (0-based)."""

    def __init__(self, k: int, raw: Wire) -> None:
        self.k = k
        self.raw = raw
        self.sent = 0

    async def send(self, batch: snap.Batch) -> snap.Results:
        if self.sent == self.k:
            await self.raw.send(b"".join(self.raw.send_request(m, p)[1] for m, p in batch))
            await self.raw.aclose()  # the daemon got the batch, and the client is gone
            raise Killed(f"killed at step {self.k}")
        self.sent += 1
        return await drive_one(batch, self.raw)


class RefuseAt:
    """A batch sender whose daemon refuses the whole of batch ``k``."""

    def __init__(self, k: int, raw: Wire) -> None:
        self.k = k
        self.raw = raw
        self.sent = 0

    async def send(self, batch: snap.Batch) -> snap.Results:
        self.sent += 1
        if self.sent == self.k + 1:
            return [KvmError("EIO", "injected") for _ in batch]
        return await drive_one(batch, self.raw)


async def vm_names(raw: Wire) -> list[str | None]:
    return sorted((v["name"] for v in (await raw.ok("kvm.list_vms"))["vms"]), key=str)


async def test_killing_the_client_at_any_step_leaves_no_vm_behind(
    connect: Connect, daemon: Any
) -> None:
    """The client dies after sending batch k (the daemon ran it): nothing of the restore stays.

    The generators see the failure thrown in and close without a request (no yield in
    ``finally``): what they opened dies with the connection.
    """
    raw = await connect()
    vm = await build_busy_vm(raw)
    saved = await drive(snap.save_vm(vm), raw)
    gen = snap.restore_vm(saved, name="copy")
    steps = 0
    try:
        batch = next(gen)
        while True:
            steps += 1
            batch = gen.send(await drive_one(batch, raw))
    except StopIteration:
        pass
    await raw.ok("vm.destroy", vm=(await raw.ok("kvm.open_vm", name="copy"))["vm"])
    assert steps > 5
    for k in range(steps + 1):
        for make in (lambda: snap.restore_vm(saved, name="copy"), lambda: save_by_name("orig")):
            victim = await connect()
            g = make()
            try:
                await snap.adrive(g, KillAt(k, victim).send)
                await victim.aclose()
            except Killed:
                pass
            assert inspect.getgeneratorstate(g) == "GEN_CLOSED"  # not left suspended
            await trio.testing.wait_all_tasks_blocked()
            if k >= steps - 1 and await vm_names(raw) == ["copy", "orig"]:
                # vm.set_name reached the daemon: the restore was whole, the VM is kept
                await raw.ok("vm.destroy", vm=(await raw.ok("kvm.open_vm", name="copy"))["vm"])
            assert await vm_names(raw) == ["orig"], k
    assert len(daemon.connections) == 1  # every victim's handles went with it


def save_by_name(name: str) -> Generator[snap.Batch, snap.Results, dict[str, Any]]:
    [opened] = yield [("kvm.open_vm", {"name": name})]
    assert not isinstance(opened, KvmError)
    return (yield from snap.save_vm(opened["vm"]))


async def test_a_refusal_at_any_step_cleans_up_through_the_connection(connect: Connect) -> None:
    raw = await connect()
    vm = await build_busy_vm(raw)
    saved = await drive(snap.save_vm(vm), raw)
    handles_before = len((await raw.ok("kvm.list_vms"))["vms"])
    for k in range(12):
        for make in (lambda: snap.restore_vm(saved, name="copy"), lambda: snap.save_vm(vm)):
            errors: list[KvmError] = []
            try:
                await snap.adrive(make(), RefuseAt(k, raw).send)
            except KvmError as err:
                errors.append(err)
            assert all(e.message == "injected" or e.name == "EEXIST" for e in errors)
            assert await vm_names(raw) in (["orig"], ["copy", "orig"])
            copy = await raw.call("kvm.open_vm", name="copy")
            if copy.error is None:  # the injection came after the last step: a whole copy
                await raw.ok("vm.destroy", vm=copy.result["vm"])  # type: ignore[index]
    assert len((await raw.ok("kvm.list_vms"))["vms"]) == handles_before


async def drive_one(batch: snap.Batch, raw: Wire) -> snap.Results:
    ids, data = [], b""
    for method, params in batch:
        msgid, chunk = raw.send_request(method, params)
        ids.append(msgid)
        data += chunk
    await raw.send(data)
    results: snap.Results = []
    for msgid in ids:
        r = await raw.response(msgid)
        results.append(r.error if r.error is not None else r.result or {})
    return results


async def test_an_unnamed_restore_is_invisible_until_named(connect: Connect) -> None:
    """``vm.set_name`` is the last request: before it, the VM has no name anyone could open."""
    raw = await connect()
    vm = await build_busy_vm(raw)
    saved = await drive(snap.save_vm(vm), raw)
    gen = snap.restore_vm(saved, name="late")
    batch = next(gen)
    seen = []
    try:
        while True:
            seen.append([m for m, _ in batch])
            if batch[0][0] != "kvm.open_vm":
                assert await raw.err("kvm.open_vm", name="late") == "ENOENT"
            batch = gen.send(await drive_one(batch, raw))
    except StopIteration:
        pass
    assert seen[-1] == ["vm.set_name"]
    assert "late" in await vm_names(raw)
    h = (await raw.ok("kvm.open_vm", name="late"))["vm"]
    assert await raw.err("vm.set_name", vm=h, name="other") == "EINVAL"  # names never change
    anon = (await raw.ok("kvm.create_vm"))["vm"]
    assert await raw.err("vm.set_name", vm=anon, name="late") == "EEXIST"
    assert await raw.err("vm.set_name", vm=anon, name="") == "EINVAL"


async def test_cli_errors_name_the_path_and_leave_no_temporary(
    connect: Connect, daemon: Any, sock_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = await connect()
    await build_busy_vm(raw)
    sock = ["--socket", str(daemon.config.socket)]
    target = sock_dir / "adir"
    target.mkdir()

    def cli(*argv: str) -> int:
        return cli_main([*argv, *sock])

    assert await trio.to_thread.run_sync(cli, "snapshot", "orig", str(target)) == 125
    err = capsys.readouterr().err
    assert f"cannot write {target}: it is a directory" in err
    assert sorted(n for n in os.listdir(sock_dir) if "adir" in n) == ["adir"]
    assert await trio.to_thread.run_sync(cli, "snapshot", "nonesuch", str(sock_dir / "n")) == 1
    assert str(sock_dir / "n") in capsys.readouterr().err
    good = sock_dir / "good.lvz"
    assert await trio.to_thread.run_sync(cli, "snapshot", "orig", str(good)) == 0
    out = capsys.readouterr()
    assert "\r" not in out.err  # no progress bar off a terminal
    assert sorted(n for n in os.listdir(sock_dir) if "good" in n) == ["good.lvz"]
    flipped = bytearray(good.read_bytes())
    flipped[10] ^= 4
    bad = sock_dir / "bad.lvz"
    bad.write_bytes(bytes(flipped))
    assert await trio.to_thread.run_sync(cli, "restore", str(bad), "--name", "x") == 1
    assert f"EINVAL: {bad}: not a usable lvz snapshot" in capsys.readouterr().err
    assert await trio.to_thread.run_sync(cli, "restore", str(good)) == 1  # "orig" exists
    assert f"EEXIST: {good}: not restored" in capsys.readouterr().err
    # An unreadable input file is a usage error (exit 2), as --help and lvz replay say.
    missing = sock_dir / "missing.lvz"
    assert await trio.to_thread.run_sync(cli, "restore", str(missing), "--name", "x") == 2
    assert f"cannot read {missing}: ENOENT: " in capsys.readouterr().err
    assert await vm_names(raw) == ["orig"]


def test_the_progress_bar_shows_only_on_a_terminal_after_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdout", Tty())
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    tty = Tty()
    bar = ProgressBar("saving x", tty)
    bar(10, 100)
    assert tty.getvalue() == ""  # under a second: nothing
    clock[0] += 1.5
    bar(50, 100)
    assert "saving x [###############...............]  50%" in tty.getvalue()
    bar.close()
    assert tty.getvalue().endswith("\r\033[K")
    pipe = io.StringIO()
    quiet = ProgressBar("saving x", pipe)
    clock[0] += 5
    quiet(50, 100)
    quiet.close()
    assert pipe.getvalue() == ""


def test_a_batch_of_requests_fits_a_socket_buffer() -> None:
    """A blocking client writes a whole batch before it reads: the batch must fit the socket
    buffer (Linux: ~208 KiB for AF_UNIX), or client and daemon wait on each other."""
    import msgpack

    big = abi.U64_MAX
    widest = max(
        len(msgpack.packb([0, 0xFFFFFFFF, method, params]))
        for method, params in (
            ("device.set_attr", {"device": 0xFFFFFFFF, "group": big, "attr": big, "value": big}),
            ("vcpu.set_one_reg", {"vcpu": 0xFFFFFFFF, "id": big, "value": big}),
            ("vcpu.set_attr", {"vcpu": 0xFFFFFFFF, "group": big, "attr": big, "value": big}),
            ("vm.create_vcpu", {"vm": 0xFFFFFFFF, "vcpu_id": 0xFFFFFFFF}),
        )
    )
    assert widest * snap.CHUNK < 160 * 1024
