"""The soak's witness: a well-behaved client whose VM no other connection may disturb.

Used by tests/test_fuzz_daemon.py and ``make fuzz`` around the wire fuzzers: whatever the
fuzzed connections send, ``Watcher.observe()`` must read back the same state and the same
routing as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lvz.protocol import abi
from lvz.protocol.abi import (
    CSR_ESTAT,
    DEV_EIOINTC,
    DEV_IPI,
    DEV_PCHPIC,
    KVM_HCALL_FUNC_IPI,
    KVM_HCALL_SERVICE,
    U64_MAX,
)
from lvz.testing.wire import BlockingWire

from .chips import EIO_BASE, IPI_BASE, IPI_BIT, E, I, P

__all__ = ["Watcher"]


class Watcher:
    """A well-behaved client holding a named VM whose state no other connection may disturb.

    The VM has vCPUs with vcpu_id != phyid (one unmapped, one beyond 255), all three chips, a
    routed and enabled EIOINTC irq behind an unmasked PCH-PIC pin, an IPI pending on vCPU 0 and a
    mailbox word. ``observe()`` reads that state back and runs a routing probe that raises and
    lowers lines through IRQ_LINE, IPI_SEND and PV IPI, ending where it began.
    """

    PIN = 5
    PCH_BASE = abi.VIRT_PCH_PIC_BASE
    LAYOUT: tuple[tuple[int, int | None], ...] = ((0, 7), (5, 2), (9, None), (300, 4000))
    PROBE_CHANGES = 6

    def __init__(self, path: str | Path, name: str) -> None:
        self.wire = BlockingWire(path)
        self.name = name
        self.last_seq: int | None = None
        w = self.wire
        self.vm: int = w.ok("kvm.create_vm", name=name, max_phyid=4096)["vm"]
        self.vcpus: dict[int, int] = {}
        for vid, phyid in self.LAYOUT:
            h = w.ok("vm.create_vcpu", vm=self.vm, vcpu_id=vid)["vcpu"]
            self.vcpus[vid] = h
            if phyid is not None:
                w.ok("vcpu.set_one_reg", vcpu=h, id=abi.CPUID, value=phyid)
        self.dev = {
            t: w.ok("vm.create_device", vm=self.vm, type=t)["device"]
            for t in (DEV_IPI, DEV_EIOINTC, DEV_PCHPIC)
        }
        w.ok(
            "device.set_attr",
            device=self.dev[DEV_PCHPIC],
            group=P.GRP_CTRL,
            attr=P.CTRL_INIT,
            value=self.PCH_BASE,
        )
        v0 = self.vcpus[0]
        # irq PIN: enabled, IPMAP group 0 -> ip 1 (HWI1), coremap byte -> CPUID 2 -> vCPU 5.
        w.ok("vcpu.iocsr_write", vcpu=v0, addr=EIO_BASE + E.ENABLE, size=8, value=1 << self.PIN)
        w.ok("vcpu.iocsr_write", vcpu=v0, addr=EIO_BASE + E.IPMAP, size=8, value=0x2)
        w.ok(
            "vcpu.iocsr_write",
            vcpu=v0,
            addr=EIO_BASE + E.COREMAP,
            size=8,
            value=0x4 << (8 * self.PIN),
        )
        w.ok(
            "vcpu.mmio_write",
            vcpu=v0,
            addr=self.PCH_BASE + P.MASK,
            size=8,
            value=U64_MAX ^ (1 << self.PIN),
        )
        w.ok("vcpu.iocsr_write", vcpu=v0, addr=IPI_BASE + abi.IPI_BUF, size=8, value=0xFEEDFACE)
        w.ok(
            "vcpu.iocsr_write", vcpu=v0, addr=IPI_BASE + I.IPI_SEND, size=4, value=(7 << 16) | 3
        )  # vCPU 0 (CPUID 7) sends itself vector 3: stays pending
        self.baseline = self.observe()

    def _estat(self, vid: int) -> int:
        value: int = self.wire.ok("vcpu.get_one_reg", vcpu=self.vcpus[vid], id=abi.ESTAT)["value"]
        return value

    def observe(self) -> dict[str, Any]:
        w = self.wire
        vm = self.vm
        info = w.ok("vm.info", vm=vm)
        seq = info.pop("seq")
        seen: dict[str, Any] = {
            "info": info,
            # Line changes since the last probe ended: none may happen but the probe's own.
            "seq_delta": 0 if self.last_seq is None else seq - self.last_seq,
            "map": w.ok("vm.phyid_map", vm=vm),
            "lookups": [
                w.ok("vm.phyid_lookup", vm=vm, phyid=p)["vcpu_id"]
                for p in (7, 2, 4000, 0, -1, 4096)
            ],
            "regs": {
                vid: [
                    w.ok("vcpu.get_one_reg", vcpu=h, id=r)["value"]
                    for r in (abi.CPUID, abi.TMID, abi.ESTAT)
                ]
                for vid, h in self.vcpus.items()
            },
            "attrs": [
                w.ok(
                    "device.get_attr",
                    device=self.dev[DEV_IPI],
                    group=I.KVM_DEV_LOONGARCH_IPI_GRP_REGS,
                    attr=off,
                )["value"]
                for off in (I.IPI_STATUS, abi.IPI_BUF)
            ]
            + [
                w.ok("device.get_attr", device=self.dev[DEV_EIOINTC], group=E.GRP_REGS, attr=off)[
                    "value"
                ]
                for off in (E.ENABLE, E.IPMAP, E.COREMAP, E.ISR)
            ]
            + [
                w.ok("device.get_attr", device=self.dev[DEV_PCHPIC], group=P.GRP_REGS, attr=P.MASK)[
                    "value"
                ],
            ],
        }
        # Routing probe: each path raises a line on the expected vCPU, then lowers it again.
        probe = []
        w.ok("vm.irq_line", vm=vm, irq=self.PIN, level=1)
        probe.append(self._estat(5))
        w.ok("vm.irq_line", vm=vm, irq=self.PIN, level=0)
        probe.append(self._estat(5))
        w.ok(
            "vcpu.iocsr_write",
            vcpu=self.vcpus[9],
            addr=IPI_BASE + I.IPI_SEND,
            size=4,
            value=(2 << 16) | 9,
        )
        probe.append(self._estat(5))
        w.ok(
            "vcpu.iocsr_write",
            vcpu=self.vcpus[5],
            addr=IPI_BASE + I.IPI_CLEAR,
            size=4,
            value=1 << 9,
        )
        probe.append(self._estat(5))
        a0 = w.ok(
            "vcpu.hypercall",
            vcpu=self.vcpus[9],
            code=KVM_HCALL_SERVICE,
            args=[KVM_HCALL_FUNC_IPI, 1, 0, 4000],
        )["a0"]
        probe += [a0, self._estat(300)]
        w.ok("vcpu.csr_xchg", vcpu=self.vcpus[300], csr=CSR_ESTAT, value=0, mask=1)
        probe.append(self._estat(300))
        seen["probe"] = probe
        self.last_seq = seq + self.PROBE_CHANGES
        return seen

    def check_probe_meaning(self) -> None:
        """The baseline itself must show routing working, or 'unchanged' proves nothing."""
        p = self.baseline["probe"]
        hwi1 = 1 << (2 + 1)
        assert p[0] & hwi1 and not p[1] & hwi1, p
        assert p[2] & IPI_BIT and not p[3] & IPI_BIT, p
        assert p[4] == 0 and p[5] & 1 and not p[6] & 1, p
        assert self.baseline["regs"][0][2] & IPI_BIT  # the pending self-IPI

    def cleanup_others(self) -> int:
        """Destroy every other named VM (fuzz payloads create them), so none run out."""
        w = self.wire
        gone = 0
        for entry in w.ok("kvm.list_vms")["vms"]:
            name = entry["name"]
            if name is None or name == self.name:
                continue
            opened = w.call("kvm.open_vm", name=name)
            if opened.error is None and opened.result is not None:
                w.call("vm.destroy", vm=opened.result["vm"])
                gone += 1
        return gone

    def close(self) -> None:
        self.wire.close()
