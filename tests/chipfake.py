"""A minimal in-memory VmApi for testing chips as pure state machines, without a daemon.

It keeps the phyid map, each vCPU's interrupt lines (as a bitmask of INT_* numbers) and the
claimed IOCSR / MMIO ranges, and records every line change in ``events`` as
``(vcpu_id, irq, level)`` so tests can assert de-duplication and order.
"""

from __future__ import annotations

from typing import Any

# implied_lines (what the chips' state says the lines are) is the chip fuzzer's invariant.
from fuzzers.chips import implied_lines as implied_lines
from lvz.plugins.api import Device, IoHandler, Unhandled
from lvz.protocol.abi import KVM_MAX_PHYID, PV_FEATURES_DEFAULT
from lvz.protocol.errors import KvmError
from lvz.protocol.profiles import resolve


class FakeVm:
    def __init__(self, max_phyid: int = KVM_MAX_PHYID, profile: str = "newest") -> None:
        self._max_phyid = max_phyid
        self.profile = resolve(profile)
        self.steal: dict[int, int] = {}
        self._pv_features = PV_FEATURES_DEFAULT
        self.phyids: dict[int, int] = {}  # phyid -> vcpu_id
        self.lines: dict[int, int] = {}  # vcpu_id -> bitmask of raised INT_* lines
        self.events: list[tuple[int, int, int]] = []
        self.iocsr: list[tuple[int, int, IoHandler]] = []
        self.mmio: list[tuple[int, int, IoHandler]] = []
        self.devices: dict[str, Device] = {}

    # --- test helpers -------------------------------------------------------------------------
    def add_vcpu(self, vcpu_id: int, phyid: int | None = None) -> None:
        self.lines[vcpu_id] = 0
        for dev in self.devices.values():
            dev.vcpu_created(vcpu_id)
        if phyid is not None:
            self.phyids[phyid] = vcpu_id
            for dev in self.devices.values():
                dev.phyid_set(vcpu_id, phyid)

    def line(self, vcpu_id: int, irq: int) -> int:
        return (self.lines[vcpu_id] >> irq) & 1

    def add_device(self, name: str, dev: Device) -> Device:
        dev.type_name = name
        self.devices[name] = dev
        return dev

    def _find(self, table: list[tuple[int, int, IoHandler]], addr: int) -> tuple[int, IoHandler]:
        for base, size, handler in table:
            if base <= addr < base + size:
                return base, handler
        raise KvmError("ENXIO", f"nothing claims {addr:#x}")

    def _unhandled(self, exc: Unhandled) -> int:
        """What the daemon does with a chip's ``Unhandled``: 0 from 7.0, else unclaimed."""
        if not self.profile["io_default_return_zero"]:
            raise KvmError("ENXIO", str(exc))
        return 0

    def guest_iocsr_read(self, vcpu_id: int, addr: int, size: int) -> int:
        base, h = self._find(self.iocsr, addr)
        try:
            return h.read(vcpu_id, addr - base, size)
        except Unhandled as exc:
            return self._unhandled(exc)

    def guest_iocsr_write(self, vcpu_id: int, addr: int, size: int, value: int) -> None:
        base, h = self._find(self.iocsr, addr)
        try:
            h.write(vcpu_id, addr - base, size, value)
        except Unhandled as exc:
            self._unhandled(exc)

    def guest_mmio_read(self, vcpu_id: int, addr: int, size: int) -> int:
        base, h = self._find(self.mmio, addr)
        try:
            return h.read(vcpu_id, addr - base, size)
        except Unhandled as exc:
            return self._unhandled(exc)

    def guest_mmio_write(self, vcpu_id: int, addr: int, size: int, value: int) -> None:
        base, h = self._find(self.mmio, addr)
        try:
            h.write(vcpu_id, addr - base, size, value)
        except Unhandled as exc:
            self._unhandled(exc)

    # --- VmApi --------------------------------------------------------------------------------
    @property
    def max_phyid(self) -> int:
        return self._max_phyid

    @property
    def pv_features(self) -> int:
        return self._pv_features

    @pv_features.setter
    def pv_features(self, value: int) -> None:
        self._pv_features = value

    def compat(self, key: str) -> Any:
        return self.profile.get(key)

    def set_steal_time(self, vcpu_id: int, gpa: int) -> None:
        self.steal[vcpu_id] = gpa

    def vcpu_by_phyid(self, phyid: int) -> int | None:
        if phyid < 0 and not self.profile["negative_cpuid_check"]:
            raise KvmError("EINVAL", f"phys_map[{phyid}] (before 2db06c15d8c7)")
        if phyid < 0 or phyid >= self._max_phyid:
            return None
        return self.phyids.get(phyid)

    def vcpu_exists(self, vcpu_id: int) -> bool:
        return vcpu_id in self.lines

    def vcpu_ids(self) -> list[int]:
        return sorted(self.lines)

    def queue_irq(self, vcpu_id: int, irq: int) -> None:
        if not (self.lines[vcpu_id] >> irq) & 1:
            self.lines[vcpu_id] |= 1 << irq
            self.events.append((vcpu_id, irq, 1))

    def dequeue_irq(self, vcpu_id: int, irq: int) -> None:
        if (self.lines[vcpu_id] >> irq) & 1:
            self.lines[vcpu_id] &= ~(1 << irq)
            self.events.append((vcpu_id, irq, 0))

    def claim_iocsr(self, base: int, size: int, handler: IoHandler) -> None:
        self.iocsr.append((base, size, handler))

    def claim_mmio(self, base: int, size: int, handler: IoHandler) -> None:
        self.mmio = [e for e in self.mmio if e[2] is not handler]
        self.mmio.append((base, size, handler))

    def set_chip_input(self, device_type: str, line: int, level: int) -> None:
        dev = self.devices.get(device_type)
        if dev is None:
            raise KvmError("ENXIO", f"no {device_type}")
        dev.set_input(line, level)

    def iocsr_read(self, vcpu_id: int, addr: int, size: int) -> int:
        return self.guest_iocsr_read(vcpu_id, addr, size) & ((1 << (8 * size)) - 1)

    def iocsr_write(self, vcpu_id: int, addr: int, size: int, value: int) -> None:
        self.guest_iocsr_write(vcpu_id, addr, size, value)
