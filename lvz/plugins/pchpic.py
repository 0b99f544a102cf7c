"""PCH-PIC: the bridge interrupt controller that turns 64 device pins into EIOINTC irqs.

Follows the newest upstream ``arch/loongarch/kvm/intc/pch_pic.c`` (SEMANTICS.md §10): a pin's
level lands in IRR; an unmasked pin in IRR sets ISR and drives EIOINTC input
``htmsi_vector[pin]``; edge pins are only cleared by a guest CLEAR write. The chip never touches
a vCPU line itself, so it reaches EIOINTC only through ``vm.set_chip_input`` (the kernel's lock
order pch -> eiointc), and it claims its MMIO window only when the VMM sets CTRL_INIT.

Guest access works on 8-byte words like the kernel: the alignment check is on the absolute
address (``addr & (size - 1)``), the register is found by the offset rounded down to 8, and a
read returns that word shifted by ``offset & 7``, masked to ``size`` (the daemon sign-extends).
AUTO_CTRL0/1 read 0 to the guest whatever the attrs stored, as in the kernel. Accesses the chip
does not decode raise ``Unhandled`` (the kernel's -EINVAL before 7.0, 0 since 2faec60a4858).

CTRL_INIT run again adds a window and keeps the old one, as ``kvm_pch_pic_init`` does: it calls
``kvm_io_bus_register_dev`` for the new base without unregistering the old range, and
``loongarch_pch_pic_read``/``_write`` compute ``offset = addr - s->pch_pic_base`` from the *new*
base, so an access through an old window lands on whatever sits at that distance from the new
base (usually nothing: reads 0, writes ignored). A new window overlapping an old one moves that
old one instead (lvz's claims may not overlap; the kernel's two ranges would both answer).

Deliberate differences: ``set_input`` rejects pins outside 0..63 with EINVAL (kernel callers
check this before; a bad pin there would shift past the u64), attr values wider than the
register are EINVAL instead of silently truncated, and a registration failure of CTRL_INIT is
reported as EFAULT (as the kernel does) with lvz's reason in the message.
"""

from __future__ import annotations

from lvz.plugins.api import Device, DeviceType, RouteTrace, Stat, Unhandled, VmApi, explaining_copy
from lvz.plugins.bits import set_bits
from lvz.plugins.hookspecs import hookimpl
from lvz.protocol import abi
from lvz.protocol.abi import (
    ACCESS_SIZES,
    DEV_EIOINTC,
    DEV_PCHPIC,
    KVM_DEV_TYPE_LOONGARCH_PCHPIC,
    PCH_PIC_INT_ID_VAL,
    PCH_PIC_INT_ID_VER,
    PCH_PIC_IRQ_NUM,
    PCH_PIC_SIZE,
    U32_MAX,
    U64_MAX,
)
from lvz.protocol.errors import KvmError

__all__ = ["PchPic", "lvz_device_types"]

# The kernel header's short names for this chip, bound to the ABI module's constants.
CTRL_INIT = abi.KVM_DEV_LOONGARCH_PCH_PIC_CTRL_INIT
GRP_CTRL = abi.KVM_DEV_LOONGARCH_PCH_PIC_GRP_CTRL
GRP_REGS = abi.KVM_DEV_LOONGARCH_PCH_PIC_GRP_REGS
PINS = abi.KVM_IRQCHIP_NUM_PINS
CLEAR = abi.PCH_PIC_CLEAR
AUTO_CTRL0 = abi.PCH_PIC_AUTO_CTRL0
AUTO_CTRL1 = abi.PCH_PIC_AUTO_CTRL1
EDGE = abi.PCH_PIC_EDGE
HTMSI_EN = abi.PCH_PIC_HTMSI_EN
HTMSI_VEC = abi.PCH_PIC_HTMSI_VEC
INT_ID = abi.PCH_PIC_INT_ID
INT_IRR = abi.PCH_PIC_INT_IRR
INT_ISR = abi.PCH_PIC_INT_ISR
MASK = abi.PCH_PIC_MASK
POLARITY = abi.PCH_PIC_POLARITY
ROUTE_ENTRY = abi.PCH_PIC_ROUTE_ENTRY
WORD_REGS = abi.PCH_PIC_WORD_REGS

#: union pch_pic_id: byte 3 = id, byte 4 = version, byte 6 = irq_num - 1.
ID_WORD = (PCH_PIC_INT_ID_VAL << 24) | (PCH_PIC_INT_ID_VER << 32) | ((PCH_PIC_IRQ_NUM - 1) << 48)
_BYTE = 0xFF


class _Window:
    """One registered MMIO range of a PCH-PIC (``kvm_io_bus_register_dev``'s ``{addr, len}``).

    It hands the chip the absolute address, because the chip computes offsets from its current
    base whichever window the access came through.
    """

    def __init__(self, pic: PchPic, base: int) -> None:
        self.pic = pic
        self.base = base

    @property
    def type_name(self) -> str:
        return self.pic.type_name

    def read(self, vcpu_id: int, offset: int, size: int) -> int:
        return self.pic.read_at(self.base + offset, size)

    def write(self, vcpu_id: int, offset: int, size: int, value: int) -> None:
        self.pic.write_at(self.base + offset, size, value)


class PchPic(Device):
    """One VM's PCH-PIC: its registers and the MMIO windows CTRL_INIT registered."""

    #: Set only on the scratch copy ``explain_input`` runs: the routing code reports to it.
    _trace: RouteTrace | None = None

    def __init__(self, vm: VmApi) -> None:
        super().__init__(vm)
        self.base: int | None = None
        #: Every window CTRL_INIT registered, oldest first; the last is at ``base``.
        self.windows: list[_Window] = []
        #: start offset -> value, for the 8-byte registers; mask starts all ones (all masked).
        self.regs: dict[int, int] = dict.fromkeys(WORD_REGS, 0)
        self.regs[MASK] = U64_MAX
        self.route_entry = bytearray(PINS)
        self.htmsi_vector = bytearray(PINS)
        for pin in range(PCH_PIC_IRQ_NUM):
            self.route_entry[pin] = 1
            self.htmsi_vector[pin] = pin  # pins 32..63 stay 0: they all reach EIOINTC irq 0
        #: Per-pin raises and forwards to EIOINTC, for ``stats()``.
        self.raises = [0] * PINS
        self.forwarded = 0

    # --- pins (pch_pic_set_irq / pch_pic_update_irq) --------------------------------------------

    def set_input(self, line: int, level: int) -> None:
        """A device pin changed. Edge pins latch: a low level does not clear IRR."""
        if not 0 <= line < PINS:
            raise KvmError("EINVAL", f"PCH-PIC has pins 0..{PINS - 1}, not {line}")
        bit = 1 << line
        trace = self._trace
        if level:
            self.raises[line] += 1
            self.regs[INT_IRR] |= bit
        else:
            if self.regs[EDGE] & bit:
                if trace is not None:
                    trace.stop(
                        "edge_latched",
                        f"pin {line} is edge-triggered (EDGE bit {line} "
                        f"is 1): a low level leaves IRR set; only a CLEAR write lowers "
                        f"it",
                        "EDGE",
                        line,
                        1,
                    )
                return
            self.regs[INT_IRR] &= ~bit
        if trace is not None:
            mode = "edge" if self.regs[EDGE] & bit else "level"
            trace.hop(
                "pin",
                f"pin {line} {'raised' if level else 'lowered'}: IRR bit {line} "
                f":= {1 if level else 0} ({mode}-triggered: EDGE bit {line} is "
                f"{int(mode == 'edge')})",
                "INT_IRR",
                line,
                1 if level else 0,
            )
        self.update(line, 1 if level else 0)

    def update(self, pin: int, level: int) -> None:
        """Forward a pin to EIOINTC when it becomes deliverable or stops being requested.

        Lowering asks only that the request is gone (ISR & ~IRR), not that the pin is unmasked:
        masking a pin that is still high does not lower it.
        """
        bit = 1 << pin
        trace = self._trace
        if level:
            if not bit & self.regs[INT_IRR] & ~self.regs[MASK]:
                if trace is not None:
                    trace.stop(
                        "masked",
                        f"pin {pin} is masked (MASK bit {pin} is 1): IRR "
                        f"holds the request but nothing reaches EIOINTC until the guest "
                        f"clears the bit",
                        "MASK",
                        pin,
                        1,
                    )
                return
            self.regs[INT_ISR] |= bit
            self.forwarded += 1
        else:
            if not bit & self.regs[INT_ISR] & ~self.regs[INT_IRR]:
                if trace is not None:
                    trace.stop(
                        "not_forwarded",
                        f"ISR bit {pin} is 0: the pin was never "
                        f"forwarded to EIOINTC (masked, or already lowered), so there "
                        f"is nothing to lower",
                        "INT_ISR",
                        pin,
                        0,
                    )
                return
            self.regs[INT_ISR] &= ~bit
        if trace is not None:
            if level:
                trace.hop(
                    "mask", f"MASK bit {pin} is 0: unmasked; ISR bit {pin} := 1", "MASK", pin, 0
                )
            vec = self.htmsi_vector[pin]
            trace.hop(
                "vector",
                f"HTMSI_VEC[{pin}] = {vec}: the pin drives EIOINTC irq {vec}",
                f"HTMSI_VEC[{pin}]",
                None,
                vec,
            )
        self.vm.set_chip_input(DEV_EIOINTC, self.htmsi_vector[pin], level)

    def _update_batch(self, pins: int, level: int) -> None:
        for pin in set_bits(pins):
            self.update(pin, level)

    def explain_input(self, line: int, level: int) -> RouteTrace:
        """``set_input`` itself, run on a scratch copy that reports each decision (read-only)."""
        trace = RouteTrace(self.type_name or DEV_PCHPIC)
        twin = explaining_copy(self, trace)
        twin._trace = trace
        twin.set_input(line, level)
        return trace

    # --- guest MMIO (through a _Window) ---------------------------------------------------------

    def _offset(self, addr: int, size: int) -> int:
        """``addr - s->pch_pic_base``, after the kernel's alignment check on the address."""
        if size not in ACCESS_SIZES or addr & (size - 1):
            raise Unhandled(f"unaligned {size}-byte PCH-PIC access")
        offset = addr - (self.base or 0)
        if not 0 <= offset < PCH_PIC_SIZE:
            raise Unhandled(f"offset {offset:#x} from the current base is no PCH-PIC register")
        return offset

    def read_at(self, addr: int, size: int) -> int:
        offset = self._offset(addr, size)
        shift = offset & 7
        word = offset - shift
        data = 0
        if word == INT_ID:
            data = ID_WORD
        elif word in (MASK, HTMSI_EN, EDGE, INT_IRR, INT_ISR, POLARITY):
            data = self.regs[word]
        elif ROUTE_ENTRY <= word < ROUTE_ENTRY + PINS:
            i = word - ROUTE_ENTRY
            data = int.from_bytes(self.route_entry[i : i + 8], "little")
        elif HTMSI_VEC <= word < HTMSI_VEC + PINS:
            i = word - HTMSI_VEC
            data = int.from_bytes(self.htmsi_vector[i : i + 8], "little")
        elif word not in (AUTO_CTRL0, AUTO_CTRL1, CLEAR):
            raise Unhandled(f"no PCH-PIC register at offset {offset:#x}")
        # AUTO_CTRL0/1 (fixed distribution mode only) and CLEAR read 0
        return (data >> (8 * shift)) & ((1 << (8 * size)) - 1)

    def write_at(self, addr: int, size: int, value: int) -> None:
        offset = self._offset(addr, size)
        shift = offset & 7
        word = offset - shift
        field = (1 << (8 * size)) - 1
        mask = (field << (8 * shift)) & U64_MAX
        data = ((value & field) << (8 * shift)) & U64_MAX
        if word == MASK:
            old = self.regs[MASK]
            self.regs[MASK] = (old & ~mask) | data
            # The kernel compares against the written data, not the merged value; bits outside
            # the store stay masked, so update() finds nothing to do for them either way.
            self._update_batch(old & ~data, 1)
            self._update_batch(~old & data, 0)
        elif word in (HTMSI_EN, EDGE, POLARITY):
            self.regs[word] = (self.regs[word] & ~mask) | data
        elif word == CLEAR:
            cleared = self.regs[INT_IRR] & self.regs[EDGE] & data
            if cleared:
                self.regs[INT_IRR] &= ~cleared
                self._update_batch(cleared, 0)
        elif HTMSI_VEC <= word < HTMSI_VEC + PINS:
            i = word - HTMSI_VEC
            old = int.from_bytes(self.htmsi_vector[i : i + 8], "little")
            self.htmsi_vector[i : i + 8] = ((old & ~mask) | data).to_bytes(8, "little")
        elif not (
            word in (INT_ID, AUTO_CTRL0, AUTO_CTRL1, INT_IRR, INT_ISR)
            or ROUTE_ENTRY <= word < ROUTE_ENTRY + PINS
        ):
            raise Unhandled(f"no PCH-PIC register at offset {offset:#x}")
        # ID, AUTO_CTRL0/1, ROUTE_ENTRY (only EIOINTC is routed to), IRR and ISR: ignored

    # --- device attrs ---------------------------------------------------------------------------

    def get_attr(self, group: int, attr: int) -> int:
        if group == GRP_CTRL and attr == CTRL_INIT:
            # lvz extension: the kernel cannot read the base back, but a VMM saving a VM through
            # the protocol alone must (lvz snapshot); ENXIO while no base was set.
            if self.base is None:
                raise KvmError("ENXIO", "PCH-PIC has no MMIO base yet (CTRL_INIT not set)")
            return self.base
        if group != GRP_REGS:
            raise KvmError("EINVAL", f"PCH-PIC cannot read attr group {group:#x}")
        reg, index = self._regs_slot(attr)
        if reg == ROUTE_ENTRY:
            return self.route_entry[index]
        if reg == HTMSI_VEC:
            return self.htmsi_vector[index]
        return self.regs[reg]

    def set_attr(self, group: int, attr: int, value: int) -> None:
        if group == GRP_CTRL:
            if attr != CTRL_INIT:
                raise KvmError("EINVAL", f"PCH-PIC has no CTRL attr {attr:#x}")
            self._init(value)
            return
        if group != GRP_REGS:
            raise KvmError("EINVAL", f"PCH-PIC has no attr group {group:#x}")
        reg, index = self._regs_slot(attr)
        limit = _BYTE if reg in (ROUTE_ENTRY, HTMSI_VEC) else U64_MAX
        if not 0 <= value <= limit:
            raise KvmError(
                "EINVAL", f"PCH-PIC attr {attr:#x} holds {limit.bit_length() // 8} byte(s)"
            )
        # Raw copy, as for a state restore: nothing is forwarded to EIOINTC.
        if reg == ROUTE_ENTRY:
            self.route_entry[index] = value
        elif reg == HTMSI_VEC:
            self.htmsi_vector[index] = value
        else:
            self.regs[reg] = value

    @staticmethod
    def _regs_slot(attr: int) -> tuple[int, int]:
        """(register, byte index) of a REGS attr; exact offsets only (kernel: an int switch)."""
        off = attr & U32_MAX
        if off in WORD_REGS:
            return off, 0
        if ROUTE_ENTRY <= off < ROUTE_ENTRY + PINS:
            return ROUTE_ENTRY, off - ROUTE_ENTRY
        if HTMSI_VEC <= off < HTMSI_VEC + PINS:
            return HTMSI_VEC, off - HTMSI_VEC
        raise KvmError("EINVAL", f"PCH-PIC has no register attr at {attr:#x}")

    def _init(self, base: int) -> None:
        """CTRL_INIT (``kvm_pch_pic_init``): register a window at ``base``, keep the old ones."""
        if not 0 <= base <= U64_MAX:
            raise KvmError("EINVAL", f"PCH-PIC base {base:#x} is not a u64")
        window = next(
            (
                w
                for w in self.windows
                if w.base < base + PCH_PIC_SIZE and base < w.base + PCH_PIC_SIZE
            ),
            None,
        )
        handler = window or _Window(self, base)
        try:
            self.vm.claim_mmio(base, PCH_PIC_SIZE, handler)
        except KvmError as exc:
            raise KvmError("EFAULT", f"PCH-PIC MMIO at {base:#x}: {exc.message}") from exc
        handler.base = base
        if window is not None:
            self.windows.remove(window)
        self.windows.append(handler)
        self.base = base

    def save_state(self) -> list[tuple[int, int, int]]:
        """CTRL_INIT for every window, oldest first (the last is the base), then every
        register, raw."""
        regs, ctrl = GRP_REGS, GRP_CTRL
        out = [(ctrl, CTRL_INIT, w.base) for w in self.windows]
        attrs = [
            *WORD_REGS,
            *(ROUTE_ENTRY + pin for pin in range(PINS)),
            *(HTMSI_VEC + pin for pin in range(PINS)),
        ]
        return out + [(regs, attr, self.get_attr(regs, attr)) for attr in attrs]

    def stats(self) -> list[int | list[int]]:
        irr, mask = self.regs[INT_IRR], self.regs[MASK]
        return [
            self.raises,
            self.forwarded,
            [(irr >> pin) & 1 for pin in range(PINS)],
            [(mask >> pin) & 1 for pin in range(PINS)],
        ]


STATS = (
    Stat("raises", "cumulative", size=PINS, help="times each pin was driven high"),
    Stat("forwarded", "cumulative", help="pin assertions passed on to EIOINTC (unmasked)"),
    Stat("pending", "instant", "boolean", size=PINS, help="IRR: the pin is requesting"),
    Stat("masked", "instant", "boolean", size=PINS, help="MASK: the pin is masked"),
)


@hookimpl
def lvz_device_types() -> list[DeviceType]:
    return [DeviceType(DEV_PCHPIC, KVM_DEV_TYPE_LOONGARCH_PCHPIC, PchPic, STATS)]
