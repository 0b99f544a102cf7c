"""The in-kernel LoongArch IPI device (KVM_DEV_TYPE_LOONGARCH_IPI), SEMANTICS.md §8.

Follows the newest upstream ``arch/loongarch/kvm/intc/ipi.c`` (chenhuacai/linux @bf9ce89b):

* STATUS / EN / SET / CLEAR / BUF act on the vCPU making the access; IPI_SEND, MAIL_SEND and
  ANY_SEND name their target by *physical CPUID* (a 10-bit field), looked up in the VM's phyid map.
  A target nobody holds is ignored, for all three sends (older kernels sent MAIL/ANY to userspace).
* EN is stored and read back but never gates delivery: the kernel does not look at it (QEMU does).
* INT_IPI is raised only when STATUS goes from 0 to non-zero, and lowered whenever a CLEAR leaves
  STATUS at 0, as ``ipi_set`` / ``ipi_clear`` do.
* A store hands the handler the whole 64-bit source register whatever its width, so a 32-bit
  ``iocsrwr.w`` to MAIL_SEND or ANY_SEND takes its payload from the register's upper half.
* Unaligned accesses, offsets the device does not decode and STATUS stores raise ``Unhandled``:
  from 7.0 they read 0 and ignore writes (2faec60a4858: the in-kernel devices never exit to a
  VMM that cannot emulate them); on older kernel profiles they leave the kernel as unclaimed.
  MAIL_SEND / ANY_SEND to a CPUID nobody holds are ignored, as in 7.0.
* Device attrs address a vCPU by **vcpu_id** (``kvm_get_vcpu_by_id``) and copy raw state: setting
  STATUS through an attr neither raises nor lowers INT_IPI.

Deliberate differences:

* Loads are returned zero-extended to the access width; the daemon sign-extends them (v6.18's
  "Add sign extension with kernel IOCSR read emulation"). Like the kernel, an 8-byte load of STATUS
  returns STATUS alone, not EN in the upper half.
* The kernel reads a 4- or 8-byte user buffer for an attr, so it can never see a wider value;
  lvz's attr value is an integer on the wire, and one that does not fit the register's width (or
  is negative) is refused with EINVAL rather than silently truncated.
* The EFAULT paths (bad user pointers) do not exist here, and "a second IPI device → EINVAL" is
  the daemon's rule (one device per VM and type), not this module's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lvz.plugins.api import Device, DeviceType, Stat, Unhandled, VmApi
from lvz.plugins.hookspecs import hookimpl
from lvz.protocol.abi import (
    ANY_SEND,
    DEV_IPI,
    INT_IPI,
    IOCSR_IPI_BASE,
    IOCSR_IPI_SIZE,
    IPI_ATTR_CPU_MASK,
    IPI_ATTR_CPU_SHIFT,
    IPI_ATTR_REG_MASK,
    IPI_ATTR_REGS,
    IPI_BUF,
    IPI_BUF_END,
    IPI_CLEAR,
    IPI_EN,
    IPI_SEND,
    IPI_SEND_ADDR_MASK,
    IPI_SEND_CPU_MASK,
    IPI_SEND_CPU_SHIFT,
    IPI_SEND_KEEP_MASK,
    IPI_SEND_KEEP_SHIFT,
    IPI_SEND_MAILBOX_MASK,
    IPI_SEND_MAILBOX_SHIFT,
    IPI_SEND_VECTOR_MASK,
    IPI_SET,
    IPI_STATUS,
    KVM_DEV_LOONGARCH_IPI_GRP_REGS,
    KVM_DEV_TYPE_LOONGARCH_IPI,
    MAIL_SEND,
    U32_MAX,
    U64_MAX,
    ipi_attr,
)
from lvz.protocol.errors import KvmError

__all__ = ["IpiDevice", "IpiState", "lvz_device_types"]

_BYTE = 0xFF

#: SEND bits 27..30 -> the 32-bit mask of the bytes the store keeps (bit 27+i keeps byte i).
_KEEP_MASK = tuple(
    sum(_BYTE << (8 * i) for i in range(4) if (nibble >> i) & 1)
    for nibble in range(IPI_SEND_KEEP_MASK + 1)
)


def _send_target_phyid(data: int) -> int:
    """The 10-bit physical CPUID field every SEND register carries (≥ max_phyid finds nobody)."""
    return ((data & U32_MAX) >> IPI_SEND_CPU_SHIFT) & IPI_SEND_CPU_MASK


def _keep_mask(data: int) -> int:
    return _KEEP_MASK[(data >> IPI_SEND_KEEP_SHIFT) & IPI_SEND_KEEP_MASK]


@dataclass(slots=True)
class IpiState:
    """A vCPU's ``ipi_state``. ``set`` and ``clear`` are attr storage only, as in the kernel."""

    status: int = 0
    en: int = 0
    set: int = 0
    clear: int = 0
    buf: bytearray = field(default_factory=lambda: bytearray(IPI_BUF_END - IPI_BUF))


class IpiDevice(Device):
    """One IPI block per VM, on the IOCSR bus at 0x1000; it is its own ``IoHandler``.

    Every vCPU has zeroed IPI state from birth (the kernel keeps it in ``vcpu->arch``), so state is
    made for the vCPUs that exist when the device is created, for each new one, and, defensively,
    on first touch; it goes when the vCPU is destroyed.
    """

    def __init__(self, vm: VmApi) -> None:
        super().__init__(vm)
        #: vcpu_id -> its IPI registers.
        self.states: dict[int, IpiState] = {vcpu_id: IpiState() for vcpu_id in vm.vcpu_ids()}
        # Counters for ``stats()``: bumped where the send already happens, nothing more.
        self.sends = 0
        self.mail_sends = 0
        self.drops = 0
        vm.claim_iocsr(IOCSR_IPI_BASE, IOCSR_IPI_SIZE, self)

    # --- lifecycle ----------------------------------------------------------------------------
    def vcpu_created(self, vcpu_id: int) -> None:
        # A reused vcpu_id is a new vCPU: it must not inherit a predecessor's mailboxes.
        self.states[vcpu_id] = IpiState()

    def vcpu_destroyed(self, vcpu_id: int) -> None:
        self.states.pop(vcpu_id, None)

    def _state(self, vcpu_id: int) -> IpiState:
        st = self.states.get(vcpu_id)
        if st is None:
            st = self.states[vcpu_id] = IpiState()
        return st

    # --- the interrupt line -------------------------------------------------------------------
    def _ipi_set(self, vcpu_id: int, bits: int) -> None:
        """Raise only on 0 → non-zero: later vectors merge into a line that is already up."""
        st = self._state(vcpu_id)
        old = st.status
        st.status = old | bits
        if old == 0 and bits:
            self.vm.queue_irq(vcpu_id, INT_IPI)

    def _ipi_clear(self, vcpu_id: int, bits: int) -> None:
        """Lower whenever STATUS ends at 0, even if it already was (the kernel does too)."""
        st = self._state(vcpu_id)
        st.status &= ~bits & U32_MAX
        if st.status == 0:
            self.vm.dequeue_irq(vcpu_id, INT_IPI)

    # --- guest IOCSR access ---------------------------------------------------------------------
    def read(self, vcpu_id: int, offset: int, size: int) -> int:
        if offset & (size - 1):
            raise Unhandled(f"unaligned {size}-byte IPI load")
        st = self._state(vcpu_id)
        if offset == IPI_STATUS:
            value = st.status
        elif offset == IPI_EN:
            value = st.en
        elif IPI_BUF <= offset < IPI_BUF_END:
            start = offset - IPI_BUF
            value = int.from_bytes(st.buf[start : start + size], "little")
        elif offset in (IPI_SET, IPI_CLEAR):
            return 0
        else:
            raise Unhandled(f"no IPI register to load at offset {offset:#x}")
        return value & ((1 << (8 * size)) - 1)

    def write(self, vcpu_id: int, offset: int, size: int, value: int) -> None:
        if offset & (size - 1):
            raise Unhandled(f"unaligned {size}-byte IPI store")
        data = value & U64_MAX
        if offset == IPI_EN:
            self._state(vcpu_id).en = data & U32_MAX
        elif offset == IPI_SET:
            self._ipi_set(vcpu_id, data & U32_MAX)
        elif offset == IPI_CLEAR:
            self._ipi_clear(vcpu_id, data)
        elif IPI_BUF <= offset < IPI_BUF_END:
            if offset + size <= IPI_BUF_END:
                start = offset - IPI_BUF
                st = self._state(vcpu_id)
                st.buf[start : start + size] = (data & ((1 << (8 * size)) - 1)).to_bytes(
                    size, "little"
                )
        elif offset == IPI_SEND:
            target = self.vm.vcpu_by_phyid(_send_target_phyid(data))
            if target is not None:
                self.sends += 1
                self._ipi_set(target, 1 << (data & IPI_SEND_VECTOR_MASK))
            else:
                self.drops += 1
        elif offset == MAIL_SEND:
            self._mail_send(data)
        elif offset == ANY_SEND:
            self._any_send(data)
        else:
            raise Unhandled(
                f"no IPI register to store at offset {offset:#x}"
                + (" (STATUS is read-only)" if offset == IPI_STATUS else "")
            )

    def _mail_send(self, data: int) -> None:
        target = self.vm.vcpu_by_phyid(_send_target_phyid(data))
        if target is None:
            self.drops += 1
            return
        self.mail_sends += 1
        start = 4 * (((data & U32_MAX) >> IPI_SEND_MAILBOX_SHIFT) & IPI_SEND_MAILBOX_MASK)
        buf = self._state(target).buf
        keep = _keep_mask(data)
        old = int.from_bytes(buf[start : start + 4], "little")
        new = (old & keep) | ((data >> 32) & ~keep & U32_MAX)
        buf[start : start + 4] = new.to_bytes(4, "little")

    def _any_send(self, data: int) -> None:
        """A 4-byte store to any IOCSR address, made *as the target vCPU* (so 0x1008 is its SET).

        The old word is read only when some bytes are kept; if nothing answers that read the send
        is dropped, while an unanswered store is simply lost, both as in ``send_ipi_data``.
        """
        target = self.vm.vcpu_by_phyid(_send_target_phyid(data))
        if target is None:
            self.drops += 1
            return
        addr = data & IPI_SEND_ADDR_MASK
        keep = _keep_mask(data)
        new = (data >> 32) & ~keep & U32_MAX
        try:
            if keep:
                new |= self.vm.iocsr_read(target, addr, 4) & keep
            self.vm.iocsr_write(target, addr, 4, new)
        except KvmError as err:
            if err.name != "ENXIO":
                raise

    # --- device attrs (the VMM's raw view, by vcpu_id) -------------------------------------------
    def _attr_reg(self, group: int, attr: int) -> tuple[IpiState, int, int]:
        """Decode like ``kvm_ipi_regs_access``: cpu = bits 16..25, register = the low byte."""
        if group != KVM_DEV_LOONGARCH_IPI_GRP_REGS:
            raise KvmError("EINVAL", f"{DEV_IPI}: no attribute group {group:#x}")
        vcpu_id = (attr >> IPI_ATTR_CPU_SHIFT) & IPI_ATTR_CPU_MASK
        off = attr & IPI_ATTR_REG_MASK
        if not self.vm.vcpu_exists(vcpu_id):
            raise KvmError("EINVAL", f"{DEV_IPI}: attr {attr:#x} names no vCPU (vcpu_id {vcpu_id})")
        width = IPI_ATTR_REGS.get(off)
        if width is None:
            raise KvmError("EINVAL", f"{DEV_IPI}: attr {attr:#x} names no register ({off:#x})")
        return self._state(vcpu_id), off, width

    def set_attr(self, group: int, attr: int, value: int) -> None:
        st, off, width = self._attr_reg(group, attr)
        if value < 0 or value >> (8 * width):
            raise KvmError(
                "EINVAL",
                f"{DEV_IPI}: {value:#x} is a value wider than the attribute's size ({width} bytes)",
            )
        if off == IPI_STATUS:
            st.status = value
        elif off == IPI_EN:
            st.en = value
        elif off == IPI_SET:
            st.set = value
        elif off == IPI_CLEAR:
            st.clear = value
        else:
            start = off - IPI_BUF
            st.buf[start : start + 8] = value.to_bytes(8, "little")

    def get_attr(self, group: int, attr: int) -> int:
        st, off, _ = self._attr_reg(group, attr)
        if off == IPI_STATUS:
            return st.status
        if off == IPI_EN:
            return st.en
        if off == IPI_SET:
            return st.set
        if off == IPI_CLEAR:
            return st.clear
        start = off - IPI_BUF
        return int.from_bytes(st.buf[start : start + 8], "little")

    def save_state(self) -> list[tuple[int, int, int]]:
        """Every vCPU's registers, as ``kvm_ipi_regs_access`` copies them (any order restores)."""
        grp = KVM_DEV_LOONGARCH_IPI_GRP_REGS
        out = []
        for vcpu_id in self.vm.vcpu_ids():
            for off in IPI_ATTR_REGS:
                attr = ipi_attr(vcpu_id, off)
                out.append((grp, attr, self.get_attr(grp, attr)))
        return out

    def stats(self) -> list[int | list[int]]:
        pending = sum(1 for st in self.states.values() if st.status)
        return [self.sends, self.mail_sends, self.drops, pending]


STATS = (
    Stat("sends", "cumulative", help="IPI_SEND stores that reached a vCPU"),
    Stat("mail_sends", "cumulative", help="MAIL_SEND stores that reached a vCPU"),
    Stat("drops", "cumulative", help="sends whose target phyid maps to no vCPU"),
    Stat("pending", "instant", help="vCPUs whose IPI STATUS is non-zero (INT_IPI up)"),
)


@hookimpl
def lvz_device_types() -> list[DeviceType]:
    return [DeviceType(DEV_IPI, KVM_DEV_TYPE_LOONGARCH_IPI, IpiDevice, STATS)]
