"""A doorbell irqchip: the worked example of docs/plugins.md.

A guest stores a physical CPU id to IOCSR 0x9000; the vCPU holding that id gets its TI line
raised (a "doorbell"). A store to 0x9008 lowers the accessing vCPU's line. Reading 0x9000 gives
how many doorbells rang. Device attr group 1, attr 0 reads/sets that counter.
"""

from __future__ import annotations

from lvz.plugins import Device, DeviceType, VmApi, hookimpl
from lvz.protocol.abi import INT_TI
from lvz.protocol.errors import KvmError

BASE = 0x9000


class Doorbell(Device):
    def __init__(self, vm: VmApi) -> None:
        super().__init__(vm)
        self.rings = 0
        vm.claim_iocsr(BASE, 0x10, self)

    # IoHandler
    def read(self, vcpu_id: int, offset: int, size: int) -> int:
        return self.rings if offset == 0 else 0

    def write(self, vcpu_id: int, offset: int, size: int, value: int) -> None:
        if offset == 0:
            target = self.vm.vcpu_by_phyid(value & 0xFFFF)  # by phyid, through the map
            if target is not None:
                self.rings += 1
                self.vm.queue_irq(target, INT_TI)
        elif offset == 8:
            self.vm.dequeue_irq(vcpu_id, INT_TI)

    # device attrs
    def get_attr(self, group: int, attr: int) -> int:
        if (group, attr) != (1, 0):
            raise KvmError("EINVAL", f"doorbell: no attr {group:#x}/{attr:#x}")
        return self.rings

    def set_attr(self, group: int, attr: int, value: int) -> None:
        if (group, attr) != (1, 0):
            raise KvmError("EINVAL", f"doorbell: no attr {group:#x}/{attr:#x}")
        self.rings = value

    # snapshots: the state to save, as the attrs that restore it
    def save_state(self) -> list[tuple[int, int, int]]:
        return [(1, 0, self.rings)]


@hookimpl
def lvz_device_types() -> list[DeviceType]:
    return [DeviceType("doorbell", 0x1000, Doorbell)]
