"""``python -m bench.fuzz [--quick]``: the long fuzzers behind ``make fuzz``.

(a) The chip fuzzer (``fuzzers.chips``) against the pure VM model until every chip -- IPI,
    EIOINTC, PCH-PIC and the PV IPI hypercall -- has taken at least a million accesses, with the
    line/chip agreement and the phyid bijection checked after every single step. The run is a
    series of segments, each a fresh VM shaped by its own seed (max_phyid 16 / 256 / 4096 /
    65536, 3-7 vCPUs), so one unlucky early state (say, PV IPI switched off) cannot dominate it.
(b) A socket soak of a real ``lvz serve`` subprocess: at least a million messages, most of them
    pipelined on a few long connections (valid requests reaching the chips, random methods and
    parameters, malformed shapes with and without a msgid), the rest junk on throwaway
    connections (random bytes, corrupted and oversized messages). Every reply is checked for
    shape and counted against what PROTOCOL.md §2 says each message must get. Meanwhile a
    watcher connection holds a named VM; afterwards its state and a routing probe must be
    unchanged, the daemon alive, and its RSS is reported before and after.

(c) A disconnect storm against a real ``lvz serve`` (issue 8): while drivers keep PV IPI
    hypercalls (every vCPU's SWI0 up, then acknowledged) and EIOINTC MSIs (raised, then the
    guest's COREISR acknowledgement) flowing on a 32-vCPU VM, subscribers to that VM misbehave
    at random moments: close, reset (SO_LINGER 0), shut their read or write side, stop reading,
    or send junk. Every one of them may only end its own connection: the drivers' requests all
    succeed, the daemon stays up, and a watcher VM on another connection is unchanged.

Everything is bounded: a step count and a deadline for (a), a message count and a deadline for
(b), a connection count and a deadline for (c); Unix sockets on loopback only; the daemon is
stopped (SIGTERM, then SIGKILL) whatever happens. ``--quick`` scales all down to finish within
a minute or so. Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import msgpack
import trio

from fuzzers.chips import CHIPS, FuzzFailure, FuzzStats, fuzz_seed
from fuzzers.watcher import Watcher
from fuzzers.wire import HANDLE_SETUP as SETUP
from fuzzers.wire import SENTINEL, SENTINEL_ID, exchange, wire_message_problem
from lvz.daemon.host import load_plugins
from lvz.protocol import abi
from lvz.protocol.abi import U64_MAX
from lvz.protocol.schema import METHODS

from . import procs

MAX_MESSAGE = 1 << 16
#: Messages per pipelined connection before it is replaced by a fresh one.
CONN_MESSAGES = 2000

#: Numbers the daemon gives meaning to: chip addresses, attr groups, register ids.
_INTERESTING = (
    abi.IOCSR_IPI_BASE + abi.IPI_SET,
    abi.IOCSR_IPI_BASE + abi.IPI_SEND,
    abi.EIOINTC_BASE,
    abi.EIOINTC_BASE + abi.EIOINTC_ENABLE,
    abi.EIOINTC_BASE + abi.EIOINTC_COREISR,
    abi.CPUCFG_KVM_FEATURE,
    abi.VIRT_PCH_PIC_BASE + abi.PCH_PIC_MASK,
    abi.CPUID,
    abi.ESTAT,
)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- (a) chips ---------------


def chip_fuzz(target: int, segment: int, deadline: float, seed0: int) -> tuple[FuzzStats, bool]:
    """Segments of ``segment`` steps until every chip has ``target`` accesses or time runs out."""
    host = load_plugins()
    total = FuzzStats()
    seed = seed0
    while min(total.accesses[c] for c in CHIPS) < target:
        if time.monotonic() > deadline:
            return total, False
        try:
            total.merge(fuzz_seed(seed, segment, host=host))
        except FuzzFailure as exc:
            say(f"chip fuzz FAILED, seed {seed} ({segment} steps reproduce it):\n{exc}")
            raise
        seed += 1
        say(
            f"  chips: {total.steps:,} steps, "
            + ", ".join(f"{c} {total.accesses[c]:,}" for c in CHIPS)
            + f" ({total.steps / total.seconds:,.0f} steps/s)"
        )
    return total, True


# ---------------------------------------------------------------------- (b) socket soak ---------


class Junk:
    """Random messages from one seeded generator, each with the reply §2 says it must get."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.methods = sorted(m for m in METHODS if m != "vcpu.run")

    def int_(self) -> int:
        rng = self.rng
        return rng.choice(
            (
                rng.randrange(300),
                rng.randrange(9),
                rng.getrandbits(64),
                rng.getrandbits(32),
                U64_MAX,
                -(1 << 63),
                -1,
                *_INTERESTING,
            )
        )

    def scalar(self) -> Any:
        rng = self.rng
        return rng.choice(
            (
                None,
                True,
                1.5,
                "x",
                b"\x00",
                self.int_(),
                "loongarch-ipi",
                [self.int_()],
                {"k": 1},
                "z" * rng.randrange(40),
            )
        )

    def params(self, method: str) -> dict[str, Any]:
        rng = self.rng
        out: dict[str, Any] = {}
        for name, kind, required in METHODS[method]:
            if rng.random() < (0.95 if required else 0.4):
                if rng.random() < 0.15:
                    out[name] = self.scalar()
                elif kind in ("vm", "vcpu", "device", "handle"):
                    out[name] = rng.randrange(9)
                elif kind == "str":
                    out[name] = rng.choice(
                        (
                            "loongarch-ipi",
                            "loongarch-eiointc",
                            "one_reg",
                            "",
                            f"soak-{rng.randrange(40)}",
                        )
                    )
                elif kind == "args":
                    out[name] = [self.int_() for _ in range(rng.randrange(7))]
                else:
                    out[name] = self.int_()
        if rng.random() < 0.05:
            out["bogus"] = 1
        return out

    def message(self, msgid: int) -> tuple[Any, str]:
        """(message, "response" | "protocol_error")."""
        rng = self.rng
        r = rng.random()
        if r < 0.7:
            method = rng.choice(self.methods)
            return [0, msgid, method, self.params(method)], "response"
        if r < 0.78:
            return [0, msgid, rng.choice(("vm.nope", "", "KVM.LIST_VMS")), {}], "response"
        if r < 0.9:
            return rng.choice(
                (
                    [0, msgid, 5, {}],
                    [0, msgid, "hello", []],
                    [1, msgid],
                    [0, msgid, "hello"],
                    [7, msgid, None, None, 1],
                )
            ), "response"
        return rng.choice(
            ([], {"a": 1}, 17, "hi", [0, -1, "hello", {}], [0, 1 << 32, "x", {}], [0], None)
        ), "protocol_error"


@dataclass(slots=True)
class SoakCounts:
    sent: int = 0
    responses: int = 0
    protocol_errors: int = 0
    throwaway: int = 0
    closed_with: Counter[str] | None = None


async def pipelined(path: str, junk: Junk, count: int, window: int, counts: SoakCounts) -> None:
    """``count`` messages on one connection, at most ``window`` unanswered, every reply checked."""
    stream = await trio.open_unix_socket(path)
    pack = msgpack.Packer().pack
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=1 << 26)
    expected: list[str] = []
    for i, (method, params) in enumerate(SETUP):
        expected.append("setup")
        await stream.send_all(pack([0, i + 1, method, params]))
    sent_plan: list[bytes] = []
    for i in range(count):
        msg, kind = junk.message(100 + i % 1000)
        sent_plan.append(pack(msg))
        expected.append(kind)
    expected.append("sentinel")
    sent_plan.append(SENTINEL)
    got = 0
    budget = trio.Semaphore(window)

    async def sender() -> None:
        for i in range(0, len(sent_plan), 64):
            for _ in range(min(64, len(sent_plan) - i)):
                await budget.acquire()
            await stream.send_all(b"".join(sent_plan[i : i + 64]))

    async def receiver() -> None:
        nonlocal got
        while got < len(expected):
            data = await stream.receive_some(1 << 16)
            if not data:
                raise RuntimeError(f"the daemon closed a pipelined connection after {got} replies")
            unpacker.feed(data)
            for msg in unpacker:
                problem = wire_message_problem(msg)
                if problem:
                    raise RuntimeError(f"bad reply: {problem}")
                if msg[0] == 2 and msg[1] != "protocol_error":
                    continue
                want = expected[got]
                kind = "response" if msg[0] == 1 else "protocol_error"
                if want == "setup":
                    if msg[2] is not None:
                        raise RuntimeError(f"set-up request failed: {msg[2]}")
                elif want == "sentinel":
                    if msg[1] != SENTINEL_ID or msg[3] != {"version": 12}:
                        raise RuntimeError(f"expected the sentinel's answer, got {msg!r:.200}")
                elif kind != want:
                    raise RuntimeError(f"reply {got}: expected a {want}, got {msg!r:.200}")
                if kind == "response":
                    counts.responses += 1
                else:
                    counts.protocol_errors += 1
                if got >= len(SETUP):
                    budget.release()
                got += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        nursery.start_soon(receiver)
    counts.sent += len(expected)
    await stream.aclose()


def throwaway_payload(rng: random.Random, junk: Junk) -> bytes:
    """Junk for one short connection: random bytes, a corrupted message, or an oversized one."""
    r = rng.random()
    if r < 0.4:
        return rng.randbytes(rng.randrange(1, 200))
    raw = msgpack.packb(junk.message(rng.randrange(50))[0])
    if r < 0.8:
        at = rng.randrange(len(raw) + 1)
        return raw[:at] + rng.randbytes(rng.randrange(1, 4)) + raw[at:]
    if r < 0.9:
        return msgpack.packb([0, 1, "kvm.list_vms", {"pad": b"x" * (MAX_MESSAGE + 1)}])
    return b"\x91" * rng.randrange(900, 1200) + b"\xc0"


def soak(
    messages: int, connections: int, throwaway: int, deadline: float, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    out: dict[str, Any] = {}
    with procs.daemon("--max-vms", "512", "--max-message", str(MAX_MESSAGE)) as proc:
        path = str(proc.socket)
        watcher = Watcher(path, f"soak-watch-{os.getpid()}")
        watcher.check_probe_meaning()
        out["rss_before"] = procs.rss_bytes(proc.pid)
        counts = SoakCounts(closed_with=Counter())
        t0 = time.perf_counter()
        per_conn = (messages - throwaway) // connections + 1
        rounds = 4  # the watcher checks in between rounds, not only at the end
        for rnd in range(rounds):
            if time.monotonic() > deadline:
                raise RuntimeError("soak deadline passed")

            async def lane(junk: Junk, total: int) -> None:
                # Short-lived connections of CONN_MESSAGES each: a random `close` or
                # `vm.destroy` soon leaves a connection without handles, so fresh set-ups
                # keep the requests reaching the chips.
                while total > 0:
                    n = min(CONN_MESSAGES, total)
                    await pipelined(path, junk, n, 256, counts)
                    total -= n

            async def main(r: int = rnd) -> None:
                async with trio.open_nursery() as nursery:
                    for c in range(connections):
                        junk = Junk(random.Random(seed * 1000 + r * 100 + c))
                        nursery.start_soon(lane, junk, per_conn // rounds)

            trio.run(main)
            for _ in range(throwaway // rounds):
                junk = Junk(rng)
                ex = exchange(path, throwaway_payload(rng, junk))
                counts.throwaway += 1
                counts.sent += 1
                assert counts.closed_with is not None
                counts.closed_with[ex.closed_with or "answered"] += 1
            if watcher.observe() != watcher.baseline:
                raise RuntimeError("the watcher's VM changed during the soak")
            watcher.cleanup_others()
            say(
                f"  soak: {counts.sent:,} messages, {counts.responses:,} responses, "
                f"{counts.protocol_errors:,} protocol_errors, {counts.throwaway:,} throwaway "
                f"connections ({counts.sent / (time.perf_counter() - t0):,.0f} msg/s), "
                f"daemon RSS {procs.rss_bytes(proc.pid) / 2**20:.1f} MiB"
            )
        seconds = time.perf_counter() - t0
        if not proc.alive():
            raise RuntimeError(f"the daemon died (status {proc.proc.returncode})")
        if watcher.observe() != watcher.baseline:
            raise RuntimeError("the watcher's VM changed during the soak")
        out["rss_after"] = procs.rss_bytes(proc.pid)
        watcher.close()
        out.update(
            seconds=seconds,
            sent=counts.sent,
            responses=counts.responses,
            protocol_errors=counts.protocol_errors,
            throwaway=counts.throwaway,
            closed_with=dict(counts.closed_with or {}),
        )
    return out


# ---------------------------------------------------------------------- (c) disconnect storm ----

STORM_VCPUS = 32
STORM_MSI_IRQ = 3
EIOINTC_ENABLE, EIOINTC_COREISR, EIOINTC_COREMAP = (
    abi.EIOINTC_BASE + abi.EIOINTC_ENABLE,
    abi.EIOINTC_BASE + abi.EIOINTC_COREISR,
    abi.EIOINTC_BASE + abi.EIOINTC_COREMAP,
)
BEHAVIOURS = ("close", "reset", "shut-read", "shut-write", "stop-reading", "junk")


class Lane:
    """One pipelined connection: send a batch, collect its answers, skip notifications."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        self.msgid = 0

    @classmethod
    async def open(cls, path: str) -> Lane:
        return cls(await trio.open_unix_socket(path))

    async def batch(self, calls: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        first = self.msgid + 1
        data = []
        for method, params in calls:
            self.msgid += 1
            data.append(msgpack.packb([0, self.msgid, method, params]))
        await self.stream.send_all(b"".join(data))
        answers: dict[int, Any] = {}
        while len(answers) < len(calls):
            chunk = await self.stream.receive_some(1 << 16)
            if not chunk:
                raise RuntimeError("the daemon closed a driver's connection")
            self.unpacker.feed(chunk)
            for msg in self.unpacker:
                if msg[0] == 1:
                    if msg[2] is not None:
                        raise RuntimeError(f"a driver's request failed: {msg[2]}")
                    answers[msg[1]] = msg[3]
        return [answers[i] for i in range(first, self.msgid + 1)]

    async def call(self, method: str, **params: Any) -> Any:
        return (await self.batch([(method, params)]))[0]


async def storm_vm(path: str, name: str) -> tuple[Lane, int, list[int]]:
    """A VM of STORM_VCPUS vCPUs (CPUID = vcpu_id), EIOINTC irq STORM_MSI_IRQ routed to CPUID 1."""
    lane = await Lane.open(path)
    vm = (await lane.call("kvm.create_vm", name=name))["vm"]
    made = await lane.batch(
        [("vm.create_vcpu", {"vm": vm, "vcpu_id": i}) for i in range(STORM_VCPUS)]
    )
    vcpus = [m["vcpu"] for m in made]
    await lane.batch(
        [
            ("vcpu.set_one_reg", {"vcpu": v, "id": abi.CPUID, "value": i})
            for i, v in enumerate(vcpus)
        ]
    )
    for chip in (abi.DEV_IPI, abi.DEV_EIOINTC, abi.DEV_PCHPIC):
        await lane.call("vm.create_device", vm=vm, type=chip)
    await lane.call(
        "vcpu.iocsr_write", vcpu=vcpus[0], addr=EIOINTC_ENABLE, size=8, value=1 << STORM_MSI_IRQ
    )
    await lane.call(
        "vcpu.iocsr_write",
        vcpu=vcpus[0],
        addr=EIOINTC_COREMAP,
        size=8,
        value=0x2 << (8 * STORM_MSI_IRQ),
    )
    return lane, vm, vcpus


async def drive(
    lane: Lane, vm: int, vcpus: list[int], until: trio.Event, counts: Counter[str]
) -> None:
    """PV IPI bursts and MSI pairs until ``until`` is set; every answer must be a success."""
    pv = [
        (
            "vcpu.hypercall",
            {
                "vcpu": vcpus[0],
                "code": abi.KVM_HCALL_SERVICE,
                "args": [abi.KVM_HCALL_FUNC_IPI, U64_MAX, 0, 0],
            },
        )
    ]
    acks = [
        ("vcpu.csr_xchg", {"vcpu": v, "csr": abi.CSR_ESTAT, "value": 0, "mask": 1}) for v in vcpus
    ]
    msi = [
        ("vm.signal_msi", {"vm": vm, "address": 0, "data": STORM_MSI_IRQ}),
        (
            "vcpu.iocsr_write",
            {"vcpu": vcpus[1], "addr": EIOINTC_COREISR, "size": 8, "value": 1 << STORM_MSI_IRQ},
        ),
    ] * 16
    while not until.is_set():
        [answer] = await lane.batch(pv)
        if answer["a0"] != 0:
            raise RuntimeError(f"PV IPI hypercall answered {answer}")
        await lane.batch(acks)
        await lane.batch(msi)
        counts["line changes"] += 2 * STORM_VCPUS + len(msi)


async def misbehave(path: str, name: str, rng: random.Random, counts: Counter[str]) -> None:
    """One subscriber that ends badly at a random moment."""
    behaviour = rng.choice(BEHAVIOURS)
    lane = await Lane.open(path)
    stream = lane.stream
    try:
        vm = (await lane.call("kvm.open_vm", name=name))["vm"]
        await lane.call("vm.subscribe", vm=vm)
        await trio.sleep(rng.random() * 0.05)
        if rng.random() < 0.5:  # read some events first, or none at all
            with trio.move_on_after(rng.random() * 0.02):
                while await stream.receive_some(rng.choice((1, 64, 4096, 65536))):
                    pass
        sock = stream.socket
        if behaviour == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif behaviour == "shut-read":
            sock.shutdown(socket.SHUT_RD)
            await trio.sleep(rng.random() * 0.1)
        elif behaviour == "shut-write":
            await stream.send_eof()
            with trio.move_on_after(rng.random() * 0.1):
                while await stream.receive_some(65536):
                    pass
        elif behaviour == "stop-reading":
            await trio.sleep(rng.random() * 0.3)
        elif behaviour == "junk":
            await stream.send_all(
                rng.choice((b"\xc1", rng.randbytes(rng.randrange(1, 64)), b"\x91" * 1100))
            )
            with trio.move_on_after(0.5):
                while await stream.receive_some(65536):
                    pass
        counts[behaviour] += 1
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        counts[behaviour + " (refused on the way)"] += 1
    finally:
        await trio.aclose_forcefully(stream)


def storm(total: int, concurrent: int, deadline: float, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with procs.daemon() as proc:
        path = str(proc.socket)
        watcher = Watcher(path, f"storm-watch-{os.getpid()}")
        watcher.check_probe_meaning()
        out["rss_before"] = procs.rss_bytes(proc.pid)
        counts: Counter[str] = Counter()
        rounds = 4
        t0 = time.perf_counter()
        for rnd in range(rounds):
            if time.monotonic() > deadline:
                raise RuntimeError("storm deadline passed")

            async def main(r: int = rnd) -> None:
                name = f"storm-{r}"
                first, vm, vcpus = await storm_vm(path, name)
                second = await Lane.open(path)  # a second driver on its own connection
                vm2 = (await second.call("kvm.open_vm", name=name))["vm"]
                vcpus2 = [
                    a["vcpu"]
                    for a in await second.batch(
                        [("vm.open_vcpu", {"vm": vm2, "vcpu_id": i}) for i in range(STORM_VCPUS)]
                    )
                ]
                stop = trio.Event()
                limit = trio.Semaphore(concurrent)

                async def one(i: int) -> None:
                    async with limit:
                        await misbehave(
                            path, name, random.Random(seed * 7919 + r * 1000 + i), counts
                        )

                with trio.fail_after(max(1.0, deadline - time.monotonic())):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(drive, first, vm, vcpus, stop, counts)
                        nursery.start_soon(drive, second, vm2, vcpus2, stop, counts)
                        async with trio.open_nursery() as chaos:
                            for i in range(total // rounds):
                                chaos.start_soon(one, i)
                        stop.set()
                await first.call("vm.destroy", vm=vm)
                await first.stream.aclose()
                await second.stream.aclose()

            trio.run(main)
            if not proc.alive():
                raise RuntimeError(f"the daemon died (status {proc.proc.returncode})")
            if watcher.observe() != watcher.baseline:
                raise RuntimeError("the watcher's VM changed during the storm")
            say(
                f"  storm: {sum(v for k, v in counts.items() if k != 'line changes'):,} "
                f"misbehaving subscribers, {counts['line changes']:,} line changes "
                f"({time.perf_counter() - t0:.1f} s), daemon RSS "
                f"{procs.rss_bytes(proc.pid) / 2**20:.1f} MiB"
            )
        out["seconds"] = time.perf_counter() - t0
        out["rss_after"] = procs.rss_bytes(proc.pid)
        watcher.close()
        out["counts"] = dict(counts)
    return out


# ---------------------------------------------------------------------- main --------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    ap.add_argument("--seed", type=int, default=1, help="first seed of the chip segments")
    args = ap.parse_args(argv)
    if args.quick:
        chip_target, segment, chip_budget = 100_000, 50_000, 30.0
        messages, connections, throwaway, soak_budget = 200_000, 2, 1_000, 25.0
        storm_total, storm_budget = 400, 30.0
    else:
        chip_target, segment, chip_budget = 1_000_000, 200_000, 420.0
        messages, connections, throwaway, soak_budget = 1_000_000, 2, 10_000, 150.0
        storm_total, storm_budget = 4_000, 120.0
    start = time.monotonic()
    say(f"(a) chip fuzzer: >= {chip_target:,} accesses per chip, invariants after every step")
    try:
        chips, complete = chip_fuzz(chip_target, segment, start + chip_budget, args.seed)
    except FuzzFailure:
        return 1
    say(f"(b) socket soak: >= {messages:,} messages to lvz serve")
    try:
        s = soak(messages, connections, throwaway, time.monotonic() + soak_budget, args.seed)
    except (RuntimeError, AssertionError) as exc:
        say(f"socket soak FAILED: {exc}")
        return 1
    say(f"(c) disconnect storm: {storm_total:,} misbehaving subscribers during IRQ storms")
    try:
        st = storm(storm_total, 16, time.monotonic() + storm_budget, args.seed)
    except (RuntimeError, trio.TooSlowError) as exc:
        say(f"disconnect storm FAILED: {exc!r}")
        return 1
    rate = chips.steps / chips.seconds
    print()
    print(
        f"## make fuzz{' --quick' if args.quick else ''} "
        f"({os.cpu_count()} CPUs, {time.monotonic() - start:.0f} s)"
    )
    print()
    print("| fuzzer | total | rate | notes |")
    print("|---|---:|---:|---|")
    print(
        f"| chips: steps (invariants checked after each) | {chips.steps:,} | "
        f"{rate:,.0f} steps/s | {-(-chips.steps // segment)} VMs, 0 violations |"
    )
    for c in CHIPS:
        print(
            f"| chips: {c} accesses | {chips.accesses[c]:,} | "
            f"{chips.accesses[c] / chips.seconds:,.0f} /s | |"
        )
    up = chips.lines_up
    print(
        f"| chips: steps with a line up | | | HWI {up['hwi']:,}, IPI {up['ipi']:,}, "
        f"SWI0 {up['swi0']:,} |"
    )
    print(
        f"| socket soak: messages | {s['sent']:,} | {s['sent'] / s['seconds']:,.0f} msg/s | "
        f"{s['responses']:,} responses, {s['protocol_errors']:,} protocol_errors |"
    )
    closed = ", ".join(f"{k} {v:,}" for k, v in sorted(s["closed_with"].items()))
    print(f"| socket soak: throwaway junk connections | {s['throwaway']:,} | | {closed} |")
    print(
        f"| daemon RSS before / after | {s['rss_before'] / 2**20:.1f} MiB / "
        f"{s['rss_after'] / 2**20:.1f} MiB | | watcher VM unchanged, daemon alive |"
    )
    ended = ", ".join(f"{k} {v:,}" for k, v in sorted(st["counts"].items()) if k != "line changes")
    print(
        f"| disconnect storm: misbehaving subscribers | "
        f"{sum(v for k, v in st['counts'].items() if k != 'line changes'):,} | | {ended} |"
    )
    print(
        f"| disconnect storm: line changes (PV IPI, EIOINTC) meanwhile | "
        f"{st['counts']['line changes']:,} | "
        f"{st['counts']['line changes'] / st['seconds']:,.0f} /s | every driver request "
        f"succeeded |"
    )
    print(
        f"| disconnect storm: daemon RSS before / after | {st['rss_before'] / 2**20:.1f} MiB / "
        f"{st['rss_after'] / 2**20:.1f} MiB | | watcher VM unchanged, daemon alive |"
    )
    if not complete:
        say(f"chip fuzz stopped at its deadline before {chip_target:,} accesses per chip")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
