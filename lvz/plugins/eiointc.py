"""EIOINTC: the extended I/O interrupt controller, routing 256 irqs to vCPU lines HWI0..HWI7.

Follows the newest upstream ``arch/loongarch/kvm/intc/eiointc.c`` (SEMANTICS.md §9): the COREMAP
byte names a *physical* CPUID, resolved through the VM's phyid map into ``sw_coremap[irq]``, a
vcpu_id; delivery then goes by vcpu_id and COREISR by the accessing vCPU's vcpu_id. Guest access
works on aligned 8-byte words (merge on write, shift on read); unaligned accesses and unknown
offsets raise ``Unhandled`` (7.0: read 0, writes ignored; older profiles: the access leaves the
kernel). Every register is kept as one little-endian Python int, so a
guest word, an attr's 4 bytes and a single COREMAP byte are all slices of the same number.

Deliberate differences from the kernel, each because the kernel's behaviour there is a quirk or
undefined:

* LOAD_FINISHED rebuilds ``sw_coreisr`` with the *decoded* coremap byte (ffs in bitmap mode),
  where the kernel looks the raw byte up as a CPUID (SEMANTICS decision 6).
* In INT_ENCODE mode the kernel uses the raw IPMAP byte as the ip number, which indexes past
  ``sw_coreisr[cpu][8]`` for bytes > 7; lvz clamps such bytes to ip 7 so the line stays one of
  HWI0..HWI7.
* ``set_input`` rejects irq numbers outside 0..255 with EINVAL (kernel: out-of-bounds bitmaps;
  SEMANTICS decision 2), and u32 attrs reject values that do not fit in 32 bits.
* vCPU destroy (an lvz extension, decision 3) drops that vCPU's ``sw_coreisr``, so its lines
  stop being implied; COREISR, a guest-visible register, is kept.

Like the kernel, lvz does **not** re-resolve routes when a phyid is set later: the map is read
only when COREMAP is written and at LOAD_FINISHED, so an irq whose coremap named an unmapped
CPUID stays on its old vcpu_id until the guest or the VMM rewrites the coremap.
"""

from __future__ import annotations

from collections.abc import Callable

from lvz.plugins.api import Device, DeviceType, RouteTrace, Stat, Unhandled, VmApi, explaining_copy
from lvz.plugins.bits import set_bits
from lvz.plugins.hookspecs import hookimpl
from lvz.protocol import abi
from lvz.protocol.abi import (
    ACCESS_SIZES,
    DEV_EIOINTC,
    EIOINTC_ATTR_CPU_SHIFT,
    EIOINTC_ATTR_OFFSET_MASK,
    EIOINTC_BASE,
    EIOINTC_HAS_CPU_ENCODE,
    EIOINTC_HAS_VIRT_EXTENSION,
    EIOINTC_IRQS,
    EIOINTC_ROUTE_MAX_VCPUS,
    EIOINTC_SIZE,
    EIOINTC_STATUS_CPU_ENCODE,
    EIOINTC_STATUS_ENABLE,
    EIOINTC_STATUS_INT_ENCODE,
    EIOINTC_SW_STATUS_ROUTE,
    EIOINTC_VIRT_BASE,
    EIOINTC_VIRT_SIZE,
    HWI_LINES,
    INT_HWI0,
    KVM_DEV_TYPE_LOONGARCH_EIOINTC,
    U32_MAX,
    U64_MAX,
    eiointc_attr,
    eiointc_route_attr,
)
from lvz.protocol.errors import KvmError

__all__ = ["Eiointc", "lvz_device_types"]

# The kernel header's short names for this chip, bound to the ABI module's constants.
COREISR = abi.EIOINTC_COREISR
COREMAP = abi.EIOINTC_COREMAP
ENABLE = abi.EIOINTC_ENABLE
IPMAP = abi.EIOINTC_IPMAP
ISR = abi.EIOINTC_ISR
REGISTERS = abi.EIOINTC_REGISTERS
VIRT_CONFIG = abi.EIOINTC_VIRT_CONFIG
VIRT_FEATURES = abi.EIOINTC_VIRT_FEATURES
CTRL_INIT_FEATURE = abi.KVM_DEV_LOONGARCH_EXTIOI_CTRL_INIT_FEATURE
CTRL_INIT_NUM_CPU = abi.KVM_DEV_LOONGARCH_EXTIOI_CTRL_INIT_NUM_CPU
CTRL_LOAD_FINISHED = abi.KVM_DEV_LOONGARCH_EXTIOI_CTRL_LOAD_FINISHED
GRP_CTRL = abi.KVM_DEV_LOONGARCH_EXTIOI_GRP_CTRL
GRP_REGS = abi.KVM_DEV_LOONGARCH_EXTIOI_GRP_REGS
GRP_SW_STATUS = abi.KVM_DEV_LOONGARCH_EXTIOI_GRP_SW_STATUS
SW_STATUS_FEATURE = abi.KVM_DEV_LOONGARCH_EXTIOI_SW_STATUS_FEATURE
SW_STATUS_NUM_CPU = abi.KVM_DEV_LOONGARCH_EXTIOI_SW_STATUS_NUM_CPU
SW_STATUS_STATE = abi.KVM_DEV_LOONGARCH_EXTIOI_SW_STATUS_STATE

#: The kernel's sw_coremap is a u8; lvz's routes reach every vcpu_id below this.
_ROUTE_LIMIT = 1 << 16
_BYTE = 0xFF


def _bit(value: int, n: int) -> bool:
    return bool((value >> n) & 1)


def _ctz(byte: int) -> int:
    """count_trailing_zeros with the kernel's -1 for 0, which the callers fold into ip 0."""
    return (byte & -byte).bit_length() - 1


class _Window:
    """One claimed IOCSR range; EIOINTC needs two, each with its own base."""

    def __init__(
        self,
        read: Callable[[int, int, int], int],
        write: Callable[[int, int, int, int], None],
    ) -> None:
        self._read = read
        self._write = write

    def read(self, vcpu_id: int, offset: int, size: int) -> int:
        return self._read(vcpu_id, offset, size)

    def write(self, vcpu_id: int, offset: int, size: int, value: int) -> None:
        self._write(vcpu_id, offset, size, value)


class Eiointc(Device):
    """One VM's EIOINTC. Creation claims both IOCSR ranges, as kvm_eiointc_create does."""

    #: Set only on the scratch copy ``explain_input`` runs: the routing code reports to it.
    _trace: RouteTrace | None = None

    def __init__(self, vm: VmApi) -> None:
        super().__init__(vm)
        self.num_cpu = 0
        self.features = 0
        self.status = 0
        #: The CONFIG bits the guest's last CONFIG write asked for and did not get (diagnostic
        #: only, for ``explain_input``: the kernel drops them silently).
        self.config_refused = 0
        #: start offset -> register contents (little-endian int); COREISR lives in ``coreisr``.
        self.regs: dict[int, int] = {start: 0 for start in REGISTERS if start != COREISR}
        #: vcpu_id -> that vCPU's COREISR (256 bits), created on first touch.
        self.coreisr: dict[int, int] = {}
        #: irq -> vcpu_id it is delivered to (u8 in the kernel; every route starts at vcpu 0).
        self.sw_coremap: list[int] = [0] * EIOINTC_IRQS
        #: vcpu_id -> per-ip 256-bit sets of irqs asserted there; a line is up iff its set is.
        self.sw_coreisr: dict[int, list[int]] = {}
        #: Per-irq assertions that reached a vCPU, and those that reached none, for ``stats()``.
        self.deliveries = [0] * EIOINTC_IRQS
        self.drops = 0
        self.main_window = _Window(self._guest_read, self._guest_write)
        self.virt_window = _Window(self._virt_read, self._virt_write)
        vm.claim_iocsr(EIOINTC_BASE, EIOINTC_SIZE, self.main_window)
        vm.claim_iocsr(EIOINTC_VIRT_BASE, EIOINTC_VIRT_SIZE, self.virt_window)

    # --- decoding ------------------------------------------------------------------------------

    def coremap_byte(self, irq: int) -> int:
        return (self.regs[COREMAP] >> (8 * irq)) & _BYTE

    def decode_coremap_byte(self, byte: int) -> int:
        """The physical CPUID a coremap byte names.

        Bitmap mode addresses at most 4 CPUs and the lowest set bit wins; an empty byte or one
        naming CPUs 4..7 falls back to CPUID 0 (b97bd69eb0f6, where ffs(0) - 1 used to index
        phys_map[-1]). CPU_ENCODE mode is the virt extension's way to reach 256 CPUs.
        """
        if self.status & EIOINTC_STATUS_CPU_ENCODE:
            return byte
        cpuid = _ctz(byte)
        if cpuid < 0 and not self.vm.compat("eiointc_empty_coremap_fix"):
            return cpuid  # before 7.0: -1, looked up as a CPUID (the VM says what that does)
        return cpuid if 0 <= cpuid < 4 else 0

    def ipnum(self, irq: int) -> int:
        """The HWI line (0..7) of ``irq``'s group of 32, decoded from IPMAP at each use.

        Decoding at use rather than caching mirrors the kernel: an IPMAP write does not move
        lines already up, and lowering afterwards acts on the new ip.
        """
        byte = (self.regs[IPMAP] >> (8 * (irq // 32))) & _BYTE
        if self.status & EIOINTC_STATUS_INT_ENCODE:
            return min(byte, HWI_LINES - 1)  # kernel: unchecked, > 7 is out of bounds
        ip = _ctz(byte)
        return ip if 0 <= ip < 4 else 0

    # --- routing core (eiointc_update_irq / update_sw_coremap / set_irq) ------------------------

    def update_irq(self, irq: int, level: int) -> None:
        """Assert or deassert ``irq`` on its routed vCPU, sharing lines per (vCPU, ip).

        Only the first irq on a line raises it and only the last one lowers it, which is why
        sw_coreisr is kept per ip rather than recomputed from COREISR.
        """
        ip = self.ipnum(irq)
        vid = self.sw_coremap[irq]
        trace = self._trace
        if not self.vm.vcpu_exists(vid):
            self.drops += level
            if trace is not None:
                trace.stop(
                    "no_such_vcpu",
                    f"irq {irq} is routed to vcpu_id {vid}, which does "
                    f"not exist: dropped (the kernel logs 'invalid target cpu')",
                    "SW_STATUS_ROUTE",
                    None,
                    vid,
                )
            return  # kernel: kvm_err("invalid target cpu") and drop
        bit = 1 << irq
        pending = self.sw_coreisr.setdefault(vid, [0] * HWI_LINES)
        if level:
            if not _bit(self.regs[ENABLE], irq):
                if trace is not None:
                    trace.stop(
                        "not_enabled",
                        f"irq {irq} is not enabled (ENABLE bit {irq} is "
                        f"0): ISR records it, and enabling it later delivers it",
                        "ENABLE",
                        irq,
                        0,
                    )
                return
            self.deliveries[irq] += 1
            if trace is not None:
                trace.hop(
                    "enable",
                    f"ENABLE bit {irq} is 1; COREISR bit {irq} of vCPU {vid} := 1",
                    "ENABLE",
                    irq,
                    1,
                )
            self.coreisr[vid] = self.coreisr.get(vid, 0) | bit
            found = pending[ip] != 0
            pending[ip] |= bit
        else:
            self.coreisr[vid] = self.coreisr.get(vid, 0) & ~bit
            pending[ip] &= ~bit
            found = pending[ip] != 0
        if found:
            if trace is not None:
                others = ", ".join(str(i) for i in set_bits(pending[ip]) if i != irq)
                why = (
                    f"irqs {others} routed there keep it up"
                    if others
                    else f"irq {irq} is already pending there"
                )
                trace.hop(
                    "shared",
                    f"HWI{ip} of vCPU {vid} does not change: {why}",
                    "COREISR",
                    irq,
                    1 if level else 0,
                )
                trace.deliver(vid, INT_HWI0 + ip, level, False)
            return
        if level:
            self.vm.queue_irq(vid, INT_HWI0 + ip)
        else:
            self.vm.dequeue_irq(vid, INT_HWI0 + ip)

    def update_sw_coremap(self, first_irq: int, value: int, nbytes: int, notify: bool) -> None:
        """Resolve coremap bytes to vcpu_ids; an unmapped CPUID leaves that irq's route alone."""
        for i in range(nbytes):
            irq = first_irq + i
            cpuid = self.decode_coremap_byte((value >> (8 * i)) & _BYTE)
            # Before 7.0 an empty byte decodes to -1, and the guest's store meets the VM's
            # verdict on that lookup (EINVAL). A restore (LOAD_FINISHED, notify=False) would
            # read out of bounds the same way; lvz skips the byte there instead, so snapshots
            # of such VMs load (SEMANTICS "Kernel-version profiles", 6.18).
            vid = self.vm.vcpu_by_phyid(cpuid) if cpuid >= 0 or notify else None
            if vid is None or self.sw_coremap[irq] == vid:
                continue
            if notify and _bit(self.regs[ISR], irq):
                self.update_irq(irq, 0)  # lower on the old vCPU, raise on the new one
                self.sw_coremap[irq] = vid
                self.update_irq(irq, 1)
            else:
                self.sw_coremap[irq] = vid

    def set_input(self, line: int, level: int) -> None:
        """eiointc_set_irq: the entry point for PCH-PIC and MSI. ISR tracks the input level."""
        if not 0 <= line < EIOINTC_IRQS:
            raise KvmError("EINVAL", f"EIOINTC has irqs 0..{EIOINTC_IRQS - 1}, not {line}")
        if level:
            self.regs[ISR] |= 1 << line
        else:
            self.regs[ISR] &= ~(1 << line)
        self.update_irq(line, 1 if level else 0)

    # --- route explanations (vm.explain_route) --------------------------------------------------

    def explain_input(self, line: int, level: int) -> RouteTrace:
        """``set_input`` run on a scratch copy that reports each decision, after the hops that
        explain the route it takes: COREMAP byte → phyid (in the mode CONFIG selects) →
        ``sw_coremap`` → vCPU, and IPMAP → HWI line. Changes nothing, emits nothing."""
        trace = RouteTrace(self.type_name or DEV_EIOINTC)
        twin = explaining_copy(self, trace)
        twin._trace = trace
        twin.set_input(line, level)  # EINVAL for an irq outside 0..255, before any hop
        decided, trace.hops = trace.hops, []
        self._explain_route(trace, line, level)
        trace.hops += decided
        return trace

    def _explain_route(self, trace: RouteTrace, irq: int, level: int) -> None:
        was = int(_bit(self.regs[ISR], irq))
        trace.hop(
            "input",
            f"irq {irq} {'asserted' if level else 'deasserted'}: ISR bit {irq} "
            f":= {1 if level else 0} (was {was})",
            "ISR",
            irq,
            1 if level else 0,
        )
        byte = self.coremap_byte(irq)
        trace.hop(
            "coremap", f"COREMAP byte of irq {irq} is {byte:#04x}", f"COREMAP[{irq}]", None, byte
        )
        phyid = self.decode_coremap_byte(byte)
        self._explain_decode(trace, byte, phyid)
        holder = self.vm.vcpu_by_phyid(phyid)
        route = self.sw_coremap[irq]
        if holder is None:
            trace.hop("phyid", f"no vCPU holds phyid {phyid}", None, None, phyid)
            trace.redirect(
                "phyid_unmapped",
                f"COREMAP names phyid {phyid}, which no vCPU "
                f"held when it was resolved: the kernel then leaves the route as it "
                f"was (vcpu_id {route}; every route starts at 0)",
                f"COREMAP[{irq}]",
                None,
                byte,
            )
        else:
            trace.hop("phyid", f"phyid {phyid} is held by vCPU {holder}", None, None, phyid)
            if holder != route:
                trace.redirect(
                    "stale_route",
                    f"phyid {phyid} is held by vCPU {holder} now, "
                    f"but the route was resolved to vcpu_id {route} earlier: routes "
                    f"are re-read only when COREMAP is written or at LOAD_FINISHED",
                    "SW_STATUS_ROUTE",
                    None,
                    route,
                )
        how = (
            "no vCPU held the phyid, so the route stayed as it was"
            if holder is None
            else "sw_coremap, resolved when COREMAP was written"
        )
        trace.hop(
            "route",
            f"irq {irq} is routed to vcpu_id {route} ({how})",
            "SW_STATUS_ROUTE",
            None,
            route,
        )
        group = irq // 32
        ipbyte = (self.regs[IPMAP] >> (8 * group)) & _BYTE
        ip = self.ipnum(irq)
        how = (
            "INT_ENCODE: the byte is the line number"
            if self.status & EIOINTC_STATUS_INT_ENCODE
            else "bitmap: the lowest set bit of bits 0..3, else HWI0"
        )
        trace.hop(
            "ipmap",
            f"IPMAP byte {group} (irqs {32 * group}..{32 * group + 31}) is "
            f"{ipbyte:#04x} → HWI{ip} ({how})",
            f"IPMAP[{group}]",
            None,
            ipbyte,
        )

    def _explain_decode(self, trace: RouteTrace, byte: int, phyid: int) -> None:
        """How the coremap byte was read, and why in that mode (the INIT_FEATURE pitfall)."""
        status_bit = EIOINTC_STATUS_CPU_ENCODE.bit_length() - 1
        if self.status & EIOINTC_STATUS_CPU_ENCODE:
            trace.hop(
                "decode",
                f"CPU-encode mode (CONFIG bit {status_bit} ENABLE_CPU_ENCODE "
                f"is 1): the byte is phyid {phyid}",
                "CONFIG",
                status_bit,
                1,
            )
            return
        trace.hop(
            "decode",
            f"bitmap mode (CONFIG bit {status_bit} ENABLE_CPU_ENCODE is 0): the "
            f"lowest set bit of {byte:#04x} among bits 0..3 is phyid {phyid}"
            f"{'' if phyid == byte else f' (CPU-encode mode would say {byte})'}",
            "CONFIG",
            status_bit,
            0,
        )
        if not self.config_refused & EIOINTC_STATUS_CPU_ENCODE or phyid == byte:
            return
        virt = EIOINTC_HAS_VIRT_EXTENSION.bit_length() - 1
        cpu = EIOINTC_HAS_CPU_ENCODE.bit_length() - 1
        asked = (
            f"the guest asked for CPU encoding (CONFIG write {self.config_refused:#x}) "
            f"and did not get it"
        )
        if not self.features & EIOINTC_HAS_VIRT_EXTENSION:
            why = (
                "EIOINTC is always enabled and every non-zero CONFIG write is ignored"
                if self.status & EIOINTC_STATUS_ENABLE
                else "CONFIG keeps none of it"
            )
            trace.redirect(
                "config_ignored",
                f"{asked}: INIT_FEATURE {self.features:#x} lacks "
                f"HAS_VIRT_EXTENSION (bit {virt}), so {why}; byte {byte:#04x} reads "
                f"as a bitmap: phyid {phyid}, not {byte}",
                "INIT_FEATURE",
                virt,
                0,
            )
        elif not self.features & EIOINTC_HAS_CPU_ENCODE:
            trace.redirect(
                "cpu_encode_unsupported",
                f"{asked}: INIT_FEATURE "
                f"{self.features:#x} lacks HAS_CPU_ENCODE (bit {cpu}), and CONFIG "
                f"keeps only the features offered; byte {byte:#04x} reads as a "
                f"bitmap: phyid {phyid}, not {byte}",
                "INIT_FEATURE",
                cpu,
                0,
            )
        else:
            enable = EIOINTC_STATUS_ENABLE.bit_length() - 1
            trace.redirect(
                "config_ignored",
                f"{asked}: CONFIG was written while ENABLE (bit "
                f"{enable}) was set, and then only a write of 0 is accepted; byte "
                f"{byte:#04x} reads as a bitmap: phyid {phyid}, not {byte}",
                "CONFIG",
                enable,
                1,
            )

    def _rebuild_sw_coreisr(self) -> None:
        """LOAD_FINISHED's eiointc_set_sw_coreisr, with the decoded byte (decision 6)."""
        for irq in range(EIOINTC_IRQS):
            ip = self.ipnum(irq)
            cpuid = self.decode_coremap_byte(self.coremap_byte(irq))
            # The kernel looks the raw byte up here (decision 6), which is never negative.
            vid = self.vm.vcpu_by_phyid(cpuid) if cpuid >= 0 else None
            if vid is None:
                continue
            pending = self.sw_coreisr.setdefault(vid, [0] * HWI_LINES)
            if _bit(self.coreisr.get(vid, 0), irq):
                pending[ip] |= 1 << irq
            else:
                pending[ip] &= ~(1 << irq)

    # --- guest access: main block ---------------------------------------------------------------

    @staticmethod
    def _locate(offset: int) -> int | None:
        for start, size in REGISTERS.items():
            if start <= offset < start + size:
                return start
        return None

    def _load(self, start: int, cpu: int) -> int:
        return self.coreisr.get(cpu, 0) if start == COREISR else self.regs[start]

    def _guest_read(self, vcpu_id: int, offset: int, size: int) -> int:
        if size not in ACCESS_SIZES or offset % size:
            raise Unhandled(f"unaligned {size}-byte EIOINTC load")
        shift = offset & 7
        word = offset - shift
        start = self._locate(word)
        if start is None or start == ISR:  # ISR is attr-only
            raise Unhandled(f"no EIOINTC register to load at offset {offset:#x}")
        data = (self._load(start, vcpu_id) >> (8 * (word - start))) & U64_MAX
        return (data >> (8 * shift)) & ((1 << (8 * size)) - 1)

    def _guest_write(self, vcpu_id: int, offset: int, size: int, value: int) -> None:
        if size not in ACCESS_SIZES or offset % size:
            raise Unhandled(f"unaligned {size}-byte EIOINTC store")
        shift = offset & 7
        word = offset - shift
        start = self._locate(word)
        if start is None or start == ISR:
            raise Unhandled(f"no EIOINTC register to store at offset {offset:#x}")
        field = (1 << (8 * size)) - 1
        pos = 8 * (word - start) + 8 * shift  # bit position of the store inside the register
        mask = field << pos
        data = (value & field) << pos
        if start == COREISR:
            old = self.coreisr.get(vcpu_id, 0)
            cleared = old & data  # write 1 to clear
            self.coreisr[vcpu_id] = old & ~data
            for irq in set_bits(cleared):
                self.update_irq(irq, 0)  # acts on sw_coremap[irq], maybe not the writer
            return
        old = self.regs[start]
        new = (old & ~mask) | data
        self.regs[start] = new
        if start == ENABLE:
            isr = self.regs[ISR]
            for irq in set_bits(new & ~old & isr):
                self.update_irq(irq, 1)
            for irq in set_bits(~new & old & isr):
                self.update_irq(irq, 0)
        elif start == COREMAP:
            first = word - COREMAP  # one byte per irq: the whole 8-byte word is re-resolved
            self.update_sw_coremap(first, (new >> (8 * first)) & U64_MAX, 8, notify=True)
        # NODETYPE, IPMAP and BOUNCE are stored only; IPMAP does not re-route pending irqs.

    # --- guest access: virt extension -----------------------------------------------------------

    def _virt_read(self, vcpu_id: int, offset: int, size: int) -> int:
        if offset == VIRT_FEATURES:
            data = self.features
        elif offset == VIRT_CONFIG:
            data = self.status
        else:
            raise Unhandled(f"no EIOINTC virt-extension register at offset {offset:#x}")
        return data & ((1 << (8 * min(size, 4))) - 1)

    def _virt_write(self, vcpu_id: int, offset: int, size: int, value: int) -> None:
        """CONFIG: the kernel reads a u32 from the source register whatever the store width."""
        if offset != VIRT_CONFIG:
            raise Unhandled(
                f"EIOINTC virt-extension offset {offset:#x} takes no store"
                + (" (FEATURES is read-only)" if offset == VIRT_FEATURES else "")
            )
        value &= U32_MAX
        if self.status & EIOINTC_STATUS_ENABLE and value:
            self.config_refused = value
            return  # features are chosen while disabled; only a write of 0 gets through
        self.status = value & self.features
        self.config_refused = value & ~self.features

    # --- device attrs ---------------------------------------------------------------------------

    @staticmethod
    def _u32(value: int, what: str) -> int:
        if not 0 <= value <= U32_MAX:
            raise KvmError("EINVAL", f"EIOINTC {what} is a u32; {value:#x} does not fit")
        return value

    def _regs_slot(self, attr: int) -> tuple[int, int, int]:
        """(register start, cpu, byte offset in the register) of a REGS attr's 4 bytes.

        The kernel reads the attr into an int, so bits 32 and up are dropped; a cpu field with
        bit 15 set (negative there, an out-of-bounds index) is simply >= num_cpu here.
        """
        cpu = (attr & U32_MAX) >> EIOINTC_ATTR_CPU_SHIFT
        off = attr & EIOINTC_ATTR_OFFSET_MASK
        start = self._locate(off)
        if start is None:
            raise KvmError("EINVAL", f"EIOINTC has no register at offset {off:#x}")
        if start == COREISR and cpu >= self.num_cpu:
            raise KvmError(
                "EINVAL", f"EIOINTC COREISR attr for cpu {cpu}, but num_cpu is {self.num_cpu}"
            )
        return start, cpu, (off - start) // 4 * 4

    def get_attr(self, group: int, attr: int) -> int:
        if group == GRP_REGS:
            start, cpu, byte = self._regs_slot(attr)
            return (self._load(start, cpu) >> (8 * byte)) & U32_MAX
        if group == GRP_SW_STATUS:
            which = attr & EIOINTC_ATTR_OFFSET_MASK
            if which == SW_STATUS_NUM_CPU:
                return self.num_cpu
            if which == SW_STATUS_FEATURE:
                return self.features
            if which == SW_STATUS_STATE:
                return self.status
            if which == EIOINTC_SW_STATUS_ROUTE:
                return self.sw_coremap[self._route_irq(attr)]
            raise KvmError("EINVAL", f"EIOINTC has no SW_STATUS attr {attr:#x}")
        raise KvmError("EINVAL", f"EIOINTC cannot read attr group {group:#x}")

    @staticmethod
    def _route_irq(attr: int) -> int:
        irq = (attr >> EIOINTC_ATTR_CPU_SHIFT) & EIOINTC_ATTR_OFFSET_MASK
        if irq >= EIOINTC_IRQS:
            raise KvmError("EINVAL", f"EIOINTC has no irq {irq} (0..255)")
        return irq

    def _set_route(self, irq: int, vid: int) -> None:
        """Restore a live route, moving the irq's pending bit with it; no line changes."""
        if vid >= _ROUTE_LIMIT:
            # The kernel's sw_coremap is a u8 because its vcpu_ids stop at 255; lvz's stop at
            # max(256, max_phyid) - 1, and a coremap write may route to any of them.
            raise KvmError("EINVAL", f"EIOINTC routes to vcpu_ids below 65536, not {vid}")
        self.sw_coremap[irq] = vid
        bit = 1 << irq
        for pending in self.sw_coreisr.values():
            for ip in range(HWI_LINES):
                pending[ip] &= ~bit
        if _bit(self.coreisr.get(vid, 0), irq) and self.vm.vcpu_exists(vid):
            self.sw_coreisr.setdefault(vid, [0] * HWI_LINES)[self.ipnum(irq)] |= bit

    def set_attr(self, group: int, attr: int, value: int) -> None:
        if group == GRP_CTRL:
            self._ctrl(attr, value)
        elif group == GRP_REGS:
            start, cpu, byte = self._regs_slot(attr)
            self._u32(value, "register attr")
            keep = ~(U32_MAX << (8 * byte))
            new = (self._load(start, cpu) & keep) | (value << (8 * byte))
            if start == COREISR:
                self.coreisr[cpu] = new
            else:
                self.regs[start] = new  # raw copy: nothing is re-routed or re-delivered
        elif group == GRP_SW_STATUS:
            which = attr & EIOINTC_ATTR_OFFSET_MASK
            if which not in (
                SW_STATUS_NUM_CPU,
                SW_STATUS_FEATURE,
                SW_STATUS_STATE,
                EIOINTC_SW_STATUS_ROUTE,
            ):
                raise KvmError("EINVAL", f"EIOINTC has no SW_STATUS attr {attr:#x}")
            self._u32(value, "SW_STATUS attr")
            if which == SW_STATUS_STATE:
                self.status = value
            elif which == EIOINTC_SW_STATUS_ROUTE:
                self._set_route(self._route_irq(attr), value)
            # NUM_CPU and FEATURE are read-only here; the kernel accepts and ignores writes.
        else:
            raise KvmError("EINVAL", f"EIOINTC has no attr group {group:#x}")

    def _ctrl(self, attr: int, value: int) -> None:
        if attr == CTRL_INIT_NUM_CPU:
            if self._u32(value, "INIT_NUM_CPU") > EIOINTC_ROUTE_MAX_VCPUS:
                raise KvmError(
                    "EINVAL", f"EIOINTC routes at most {EIOINTC_ROUTE_MAX_VCPUS} vCPUs, not {value}"
                )
            self.num_cpu = value
        elif attr == CTRL_INIT_FEATURE:
            self.features = self._u32(value, "INIT_FEATURE")
            if not self.features & EIOINTC_HAS_VIRT_EXTENSION:
                self.status |= EIOINTC_STATUS_ENABLE  # without the extension it is always on
        elif attr == CTRL_LOAD_FINISHED:
            # After a state restore: rebuild the derived routing, without touching any line
            # (the vCPUs' own interrupt state is restored separately).
            self._rebuild_sw_coreisr()
            coremap = self.regs[COREMAP]
            for first in range(0, EIOINTC_IRQS, 8):
                word = (coremap >> (8 * first)) & U64_MAX
                self.update_sw_coremap(first, word, 8, notify=False)
        # other CTRL attrs are accepted and ignored, as in the kernel

    # --- lifecycle and introspection -------------------------------------------------------------

    def vcpu_destroyed(self, vcpu_id: int) -> None:
        self.sw_coreisr.pop(vcpu_id, None)

    def save_state(self) -> list[tuple[int, int, int]]:
        """CTRL init, then the registers, then LOAD_FINISHED, then the live routes.

        The order is KVM's restore order: INIT_NUM_CPU before the COREISR attrs it bounds,
        INIT_FEATURE before STATE (INIT_FEATURE forces ENABLE on without the virt extension),
        the raw registers, LOAD_FINISHED to rebuild routing from them, and last the live routes
        LOAD_FINISHED cannot know (a coremap byte that named an unmapped phyid when written).
        """
        regs, sw, ctrl = (GRP_REGS, GRP_SW_STATUS, GRP_CTRL)
        out = [
            (ctrl, CTRL_INIT_NUM_CPU, self.num_cpu),
            (ctrl, CTRL_INIT_FEATURE, self.features),
            (sw, SW_STATUS_STATE, self.status),
        ]
        attrs = [
            eiointc_attr(off)
            for start, size in REGISTERS.items()
            if start != COREISR
            for off in range(start, start + size, 4)
        ]
        attrs += [
            eiointc_attr(off, cpu)
            for cpu in range(self.num_cpu)
            for off in range(COREISR, COREISR + REGISTERS[COREISR], 4)
        ]
        out += [(regs, attr, self.get_attr(regs, attr)) for attr in attrs]
        out.append((ctrl, CTRL_LOAD_FINISHED, 0))
        out += [(sw, eiointc_route_attr(irq), self.sw_coremap[irq]) for irq in range(EIOINTC_IRQS)]
        return out

    def stats(self) -> list[int | list[int]]:
        isr, enable = self.regs[ISR], self.regs[ENABLE]
        return [
            self.deliveries,
            self.drops,
            [(isr >> irq) & 1 for irq in range(EIOINTC_IRQS)],
            [((enable >> irq) & 1) ^ 1 for irq in range(EIOINTC_IRQS)],
            list(self.sw_coremap),
        ]


STATS = (
    Stat(
        "deliveries",
        "cumulative",
        size=EIOINTC_IRQS,
        help="assertions of each irq that reached its routed vCPU",
    ),
    Stat("drops", "cumulative", help="assertions whose routed vCPU does not exist"),
    Stat("pending", "instant", "boolean", size=EIOINTC_IRQS, help="ISR: the input is high"),
    Stat("masked", "instant", "boolean", size=EIOINTC_IRQS, help="the irq is not enabled"),
    Stat("route", "instant", "id", size=EIOINTC_IRQS, help="the vcpu_id each irq goes to"),
)


@hookimpl
def lvz_device_types() -> list[DeviceType]:
    return [DeviceType(DEV_EIOINTC, KVM_DEV_TYPE_LOONGARCH_EIOINTC, Eiointc, STATS)]
