"""The whole interrupt chain end to end: device pin → PCH-PIC → EIOINTC → vCPU line, and MSI.

Against a real daemon over a real Unix socket, with a VM whose vcpu_ids and phyids differ on
purpose (vcpu_id k holds phyid 3 - k), so the vCPU a COREMAP byte names must be found through the
phyid map and not by index. Each step checks the ``irq`` events (vcpu_id, irq, level, and seq with
no gaps) and every vCPU's ESTAT; then the route is moved while the pin is high; then an MSI takes
the short path; finally ``vcpu.run`` on the target wakes with "irq" when another connection
drives the pin.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from lvz.clients import AsyncKvm, AsyncVcpu, AsyncVm, IrqEvent, KvmError, open_kvm
from lvz.daemon.server import Daemon

U64 = (1 << 64) - 1
CPUID, ESTAT = 0x9030000000010100, 0x9030000000010028
INT_HWI0 = 2
IPI, EIOINTC, PCHPIC = "loongarch-ipi", "loongarch-eiointc", "loongarch-pchpic"
EIO_IPMAP, EIO_ENABLE, EIO_COREISR, EIO_COREMAP = 0x14C0, 0x1600, 0x1800, 0x1C00
PCH_BASE, PCH_MASK, PCH_GRP_CTRL = 0x10000000, 0x20, 0x40000006

#: vcpu_id -> phyid. COREMAP bitmap bytes name phyids: 0x04 is phyid 2 (vcpu_id 1), 0x08 is
#: phyid 3 (vcpu_id 0), 0x02 is phyid 1 (vcpu_id 2).
LAYOUT = {0: 3, 1: 2, 2: 1, 3: 0}
PIN = 12  # PCH-PIC pin; its default HTMSI vector is EIOINTC irq 12
MSI_IRQ = 100  # group 3 (irqs 96..127)

Change = tuple[int, int, int]


class Chain:
    def __init__(self, vm: AsyncVm, vcpus: dict[int, AsyncVcpu]) -> None:
        self.vm = vm
        self.v = vcpus
        self.seq: list[int] = []

    async def events(self, count: int) -> list[Change]:
        """The next ``count`` events, then insist that no further one is queued."""
        out: list[Change] = []
        with trio.fail_after(5):
            while len(out) < count:
                ev = await self.vm.next_event()
                assert isinstance(ev, IrqEvent), ev
                self.seq.append(ev.seq)
                out.append((ev.vcpu_id, ev.irq, ev.level))
        with trio.move_on_after(0.01):
            extra = await self.vm.next_event()
            pytest.fail(f"unexpected event {extra}")
        return out

    async def estats(self) -> dict[int, int]:
        return {vid: await v.get_one_reg(ESTAT) for vid, v in self.v.items()}

    def lines(self, **up: int) -> dict[int, int]:
        """Expected ESTATs: every vCPU 0 except ``v<id>=bits``."""
        expected = dict.fromkeys(self.v, 0)
        for key, value in up.items():
            expected[int(key[1:])] = value
        return expected


async def build(kvm: AsyncKvm, name: str | None = None) -> Chain:
    """All three chips; EIOINTC irq 12 → phyid 2 on HWI1; irq 100 → phyid 1 on HWI2."""
    vm = await kvm.create_vm(name=name)
    vcpus = {}
    for vcpu_id, phyid in LAYOUT.items():
        vcpus[vcpu_id] = await vm.create_vcpu(vcpu_id)
        await vcpus[vcpu_id].set_one_reg(CPUID, phyid)
    for chip in (IPI, EIOINTC, PCHPIC):
        dev = await vm.create_device(chip)
        if chip == PCHPIC:
            await dev.set_attr(PCH_GRP_CTRL, 0, PCH_BASE)
    guest = vcpus[3]  # the "boot CPU" programming the chips
    await guest.iocsr_write(EIO_IPMAP + 0, 1, 0x02)  # irqs 0..31 → HWI1
    await guest.iocsr_write(EIO_IPMAP + 3, 1, 0x04)  # irqs 96..127 → HWI2
    await guest.iocsr_write(EIO_COREMAP + PIN, 1, 0x04)  # phyid 2
    await guest.iocsr_write(EIO_COREMAP + MSI_IRQ, 1, 0x02)  # phyid 1
    await guest.iocsr_write(EIO_ENABLE + PIN // 8, 1, 1 << PIN % 8)
    await guest.iocsr_write(EIO_ENABLE + MSI_IRQ // 8, 1, 1 << MSI_IRQ % 8)
    await guest.mmio_write(PCH_BASE + PCH_MASK, 8, U64 & ~(1 << PIN))
    await vm.subscribe()
    return Chain(vm, vcpus)


HWI1, HWI2 = INT_HWI0 + 1, INT_HWI0 + 2


async def test_pin_reaches_the_vcpu_whose_phyid_the_coremap_names(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        c = await build(kvm)
        assert await c.vm.phyid_lookup(2) == 1
        await c.vm.irq_line(PIN, 1)
        assert await c.events(1) == [(1, HWI1, 1)]
        assert await c.estats() == c.lines(v1=1 << HWI1)  # not vcpu_id 2, not vcpu_id 0
        await c.vm.irq_line(PIN, 0)
        assert await c.events(1) == [(1, HWI1, 0)]
        assert await c.estats() == c.lines()

        # Move the route while the pin is high: the line follows to phyid 3 = vcpu_id 0.
        await c.vm.irq_line(PIN, 1)
        assert await c.events(1) == [(1, HWI1, 1)]
        await c.v[3].iocsr_write(EIO_COREMAP + PIN, 1, 0x08)
        assert await c.events(2) == [(1, HWI1, 0), (0, HWI1, 1)]
        assert await c.estats() == c.lines(v0=1 << HWI1)
        await c.vm.irq_line(PIN, 0)
        assert await c.events(1) == [(0, HWI1, 0)]

        # An MSI takes the short path: EIOINTC irq 100 → phyid 1 = vcpu_id 2, on HWI2.
        await c.vm.signal_msi(0x2FF00000, MSI_IRQ)
        assert await c.events(1) == [(2, HWI2, 1)]
        assert await c.estats() == c.lines(v2=1 << HWI2)
        coreisr = await c.v[2].iocsr_read(EIO_COREISR + 8 * (MSI_IRQ // 64), 8) & U64
        assert coreisr == 1 << (MSI_IRQ % 64)
        # The guest on vcpu_id 2 acknowledges it (COREISR write-1-to-clear).
        await c.v[2].iocsr_write(EIO_COREISR + 4 * (MSI_IRQ // 32), 4, 1 << MSI_IRQ % 32)
        assert await c.events(1) == [(2, HWI2, 0)]
        assert await c.estats() == c.lines()

        # Every change was reported, numbered without gaps.
        assert c.seq == list(range(c.seq[0], c.seq[0] + 8))


async def test_vcpu_run_wakes_when_another_connection_fires_the_chain(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm, open_kvm(daemon.config.socket) as other:
        c = await build(kvm, name="chain")
        target = c.v[1]
        assert (await target.run(0)).exit_reason == "timeout"  # nothing pending yet

        vm2 = await other.open_vm("chain")
        probe = await vm2.open_vcpu(1)
        results = []

        async def run() -> None:
            results.append(await target.run(5))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            # Let the run request go out; a later request on the same connection takes effect
            # after it (PROTOCOL §2), so once that one is answered the run is parked, which a
            # second run from the other connection confirms with EBUSY.
            await trio.testing.wait_all_tasks_blocked()
            assert await target.get_one_reg(ESTAT) == 0
            with pytest.raises(KvmError) as busy:
                await probe.run(0)
            assert busy.value.name == "EBUSY"
            assert results == []
            await vm2.irq_line(PIN, 1)  # from the other connection
        assert len(results) == 1
        assert results[0].exit_reason == "irq"
        assert results[0].estat == 1 << HWI1
        assert await c.events(1) == [(1, HWI1, 1)]  # the first connection saw it too
        await vm2.destroy()
