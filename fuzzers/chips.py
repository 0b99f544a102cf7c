"""A chip fuzzer in the spirit of QEMU's generic device fuzzer, checking invariants every step.

One ``ChipFuzzer`` drives the real VM model (``lvz.daemon.model.Vm`` with the plugins
``load_plugins()`` finds) holding every chip -- IPI, EIOINTC, PCH-PIC (MMIO base set) and the PV
IPI hypercall -- through the same entry points the daemon uses: guest IOCSR / MMIO loads and
stores (any address, size and value, biased towards the chips' windows), device attr writes and
reads, ``set_chip_input`` as IRQ_LINE and SIGNAL_MSI do, PV IPI hypercalls, CPUID sets (valid and
invalid), ``csrxchg`` on ESTAT (how a guest acknowledges SWI), vCPU create/destroy and the PV
feature word. Randomness comes from one ``random.Random`` (seeded, for the long runs in
``bench.fuzz``) or from hypothesis (``st.randoms()``, so failures shrink); nothing else is random,
so a seed and a step count reproduce a failure exactly.

After **every** step the fuzzer checks:

* nothing but ``KvmError`` left the model, and never EIO (the model turns a chip's own exception
  into EIO naming the plugin, so an EIO *is* an escaped exception);
* every vCPU's interrupt lines agree with the chips' state: HWI0-7 (ESTAT bits 2-9) equal the OR
  of EIOINTC's ``implied_lines`` (tests/chipfake.py), the IPI bit equals the IPI chip's, TI is
  down, and SWI0/SWI1 equal a shadow kept here (SWI0 is raised only by PV IPI, whose targets
  the fuzzer computes on its own from SEMANTICS §7, and only a guest ``csrxchg`` changes SWI0/SWI1);
* the phyid map is a bijection between the set vCPUs and their ids: ``vm.phyids`` is exactly
  ``{v.csrs[CPUID]: v for live v if CPUID < max_phyid}`` with no id held twice, and the map the
  model keeps for ``vm.phyid_map`` (``Vm.map_entries``), when it keeps one, is that map in order.

Operations whose outcome the spec decides are checked against an independent prediction too
(attr validity and read-back, CPUID sets per ``kvm_set_cpuid``, vCPU creation, PV IPI's return
value, csrxchg's old value, ENXIO for unclaimed addresses, EINVAL for bad sizes, pins and MSI
data).

**Which device attrs are written, and why.** Some attrs are raw copies of registers that carry
lines: IPI STATUS; EIOINTC REGS over ISR, COREISR, ENABLE, IPMAP and COREMAP, SW_STATUS STATE and
ROUTE, CTRL LOAD_FINISHED; PCH-PIC REGS MASK, IRR and ISR. The kernel deliberately copies them
without touching any vCPU line (a VMM restoring a snapshot restores ESTAT separately), so writing
them *successfully* would make state and lines disagree by design, not by bug. The fuzzer
therefore writes those only with a value too wide for the register (which must be refused with
EINVAL and change nothing) and never issues LOAD_FINISHED (it takes no value that could be
refused). Every other attr -- IPI EN / SET / CLEAR / mailboxes, EIOINTC NODETYPE / BOUNCE,
SW_STATUS NUM_CPU / FEATURE, CTRL INIT_NUM_CPU / INIT_FEATURE / unknown CTRL attrs, PCH-PIC
HTMSI_EN / EDGE / AUTO_CTRL0/1 / POLARITY / ROUTE_ENTRY / HTMSI_VEC / CTRL_INIT -- is written with
any value, plus unknown groups and offsets and out-of-range values, which must be ``KvmError``.

The model is plain Python (the map lock is the daemon's), so the fuzzer drives it directly.
"""

from __future__ import annotations

import random
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lvz.daemon.host import PluginHost, load_plugins
from lvz.daemon.model import Vcpu, Vm
from lvz.plugins.api import Device
from lvz.plugins.eiointc import Eiointc
from lvz.plugins.ipi import IpiDevice
from lvz.plugins.pchpic import PchPic
from lvz.protocol import abi
from lvz.protocol.abi import (
    CPUCFG_KVM_FEATURE,
    CSR_CPUID,
    CSR_ESTAT,
    DEV_EIOINTC,
    DEV_IPI,
    DEV_PCHPIC,
    INT_HWI0,
    INT_IPI,
    KVM_FEATURE_IPI,
    KVM_HCALL_FUNC_IPI,
    KVM_HCALL_SERVICE,
    KVM_LOONGARCH_VCPU_CPUCFG,
    U32_MAX,
    U64_MAX,
)
from lvz.protocol.errors import KvmError


class E:
    """EIOINTC's ABI (lvz.protocol.abi) under the short names of kvm_eiointc.h."""

    EIOINTC_BASE, EIOINTC_SIZE = abi.EIOINTC_BASE, abi.EIOINTC_SIZE
    EIOINTC_VIRT_BASE, EIOINTC_VIRT_SIZE = abi.EIOINTC_VIRT_BASE, abi.EIOINTC_VIRT_SIZE
    NODETYPE, IPMAP, ENABLE = abi.EIOINTC_NODETYPE, abi.EIOINTC_IPMAP, abi.EIOINTC_ENABLE
    BOUNCE, ISR, COREISR = abi.EIOINTC_BOUNCE, abi.EIOINTC_ISR, abi.EIOINTC_COREISR
    COREMAP, REGISTERS = abi.EIOINTC_COREMAP, abi.EIOINTC_REGISTERS
    VIRT_FEATURES, VIRT_CONFIG = abi.EIOINTC_VIRT_FEATURES, abi.EIOINTC_VIRT_CONFIG
    GRP_REGS = abi.KVM_DEV_LOONGARCH_EXTIOI_GRP_REGS
    GRP_SW_STATUS = abi.KVM_DEV_LOONGARCH_EXTIOI_GRP_SW_STATUS
    GRP_CTRL = abi.KVM_DEV_LOONGARCH_EXTIOI_GRP_CTRL
    SW_STATUS_NUM_CPU = abi.KVM_DEV_LOONGARCH_EXTIOI_SW_STATUS_NUM_CPU
    SW_STATUS_FEATURE = abi.KVM_DEV_LOONGARCH_EXTIOI_SW_STATUS_FEATURE
    SW_STATUS_STATE = abi.KVM_DEV_LOONGARCH_EXTIOI_SW_STATUS_STATE
    SW_STATUS_ROUTE = abi.EIOINTC_SW_STATUS_ROUTE
    CTRL_INIT_NUM_CPU = abi.KVM_DEV_LOONGARCH_EXTIOI_CTRL_INIT_NUM_CPU
    CTRL_INIT_FEATURE = abi.KVM_DEV_LOONGARCH_EXTIOI_CTRL_INIT_FEATURE
    CTRL_LOAD_FINISHED = abi.KVM_DEV_LOONGARCH_EXTIOI_CTRL_LOAD_FINISHED


class I:  # noqa: E742
    """The IPI's ABI (lvz.protocol.abi)."""

    IOCSR_IPI_BASE, IOCSR_IPI_SIZE = abi.IOCSR_IPI_BASE, abi.IOCSR_IPI_SIZE
    IPI_STATUS, IPI_SET, IPI_CLEAR = abi.IPI_STATUS, abi.IPI_SET, abi.IPI_CLEAR
    IPI_SEND, MAIL_SEND, ANY_SEND = abi.IPI_SEND, abi.MAIL_SEND, abi.ANY_SEND
    KVM_DEV_LOONGARCH_IPI_GRP_REGS = abi.KVM_DEV_LOONGARCH_IPI_GRP_REGS


class P:
    """PCH-PIC's ABI (lvz.protocol.abi) under the short names of kvm_pch_pic.h."""

    PCH_PIC_SIZE = abi.PCH_PIC_SIZE
    INT_ID, MASK, HTMSI_EN, EDGE = (
        abi.PCH_PIC_INT_ID,
        abi.PCH_PIC_MASK,
        abi.PCH_PIC_HTMSI_EN,
        abi.PCH_PIC_EDGE,
    )
    CLEAR, AUTO_CTRL0, AUTO_CTRL1 = (
        abi.PCH_PIC_CLEAR,
        abi.PCH_PIC_AUTO_CTRL0,
        abi.PCH_PIC_AUTO_CTRL1,
    )
    ROUTE_ENTRY, HTMSI_VEC = abi.PCH_PIC_ROUTE_ENTRY, abi.PCH_PIC_HTMSI_VEC
    INT_IRR, INT_ISR, POLARITY = abi.PCH_PIC_INT_IRR, abi.PCH_PIC_INT_ISR, abi.PCH_PIC_POLARITY
    WORD_REGS = abi.PCH_PIC_WORD_REGS
    GRP_REGS = abi.KVM_DEV_LOONGARCH_PCH_PIC_GRP_REGS
    GRP_CTRL = abi.KVM_DEV_LOONGARCH_PCH_PIC_GRP_CTRL
    CTRL_INIT = abi.KVM_DEV_LOONGARCH_PCH_PIC_CTRL_INIT


__all__ = [
    "CHIPS",
    "ChipFuzzer",
    "FuzzFailure",
    "FuzzStats",
    "fuzz_seed",
    "implied_lines",
    "run_fuzzer",
]

#: The chips accesses are counted for (``bench.fuzz`` wants a million of each).
CHIPS = ("ipi", "eiointc", "pchpic", "pv_ipi")

HWI_MASK = abi.CSR_GINTC_HWIS << abi.ESTAT_HWI_SHIFT
IPI_BIT = 1 << INT_IPI
SWI_MASK = abi.GUEST_WRITABLE_ESTAT
LINE_BITS = abi.LINE_MASK

IPI_BASE, IPI_END = I.IOCSR_IPI_BASE, I.IOCSR_IPI_BASE + I.IOCSR_IPI_SIZE
EIO_BASE, EIO_END = E.EIOINTC_BASE, E.EIOINTC_BASE + E.EIOINTC_SIZE
VIRT_BASE, VIRT_END = E.EIOINTC_VIRT_BASE, E.EIOINTC_VIRT_BASE + E.EIOINTC_VIRT_SIZE

_IPI_ATTR_WIDTH = abi.IPI_ATTR_REGS
#: Line-carrying EIOINTC registers: attr writes there must be refused (too-wide values only).
_EIO_FORBIDDEN = (E.ISR, E.COREISR, E.ENABLE, E.IPMAP, E.COREMAP)
_EIO_ALLOWED = (E.NODETYPE, E.BOUNCE)
_PCH_FORBIDDEN = (P.MASK, P.INT_IRR, P.INT_ISR)
_PCH_ALLOWED_WORDS = (P.HTMSI_EN, P.EDGE, P.AUTO_CTRL0, P.AUTO_CTRL1, P.POLARITY)
_PCH_BASES = (abi.VIRT_PCH_PIC_BASE, 0xE0000000, 0x2000, 0xFFFFFC18)


def implied_lines(dev: Device) -> dict[int, int]:
    """vcpu_id -> the INT_* lines a built-in chip's state says are up (for invariant checks).

    A test helper, not part of the plugin contract: it reads the chips' own state. IPI: INT_IPI
    iff STATUS is non-zero (which stops holding after a device attr copies STATUS raw, exactly as
    the kernel's ``kvm_ipi_regs_access`` does). EIOINTC: HWIn iff its sw_coreisr set for ip n is
    non-empty. PCH-PIC drives no vCPU line (everything goes through EIOINTC): {}.
    """
    if isinstance(dev, IpiDevice):
        return {vid: (1 << INT_IPI) if st.status else 0 for vid, st in dev.states.items()}
    if isinstance(dev, Eiointc):
        lines: dict[int, int] = {}
        for vid in dev.vm.vcpu_ids():
            mask = 0
            for ip, pending in enumerate(dev.sw_coreisr.get(vid, ())):
                if pending:
                    mask |= 1 << (INT_HWI0 + ip)
            lines[vid] = mask
        return lines
    return {}


class FuzzFailure(AssertionError):
    """An invariant broke or something other than KvmError escaped; says how to reproduce."""


@dataclass(slots=True)
class FuzzStats:
    """What a run did: steps, accesses per chip, outcomes, and how often lines were up."""

    steps: int = 0
    seconds: float = 0.0
    accesses: Counter[str] = field(default_factory=Counter)
    ops: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    #: steps after which some vCPU had an HWI / IPI / SWI0 line up (the fuzz is not vacuous).
    lines_up: Counter[str] = field(default_factory=Counter)

    def merge(self, other: FuzzStats) -> None:
        self.steps += other.steps
        self.seconds += other.seconds
        self.accesses.update(other.accesses)
        self.ops.update(other.ops)
        self.errors.update(other.errors)
        self.lines_up.update(other.lines_up)


def _window(space: str, addr: int, size: int, pch_bases: list[int]) -> str:
    """Which chip a guest access reaches (the model's own claim table is not consulted).

    IOCSR addresses are 32 bits, MMIO ones 64 (``kvm_emu_iocsr`` / ``kvm_emu_mmio_read``); every
    base PCH-PIC's CTRL_INIT was given keeps a window (``kvm_pch_pic_init`` never unregisters).
    """
    if space == "iocsr":
        addr &= U32_MAX
    end = addr + size
    if space == "iocsr":
        if addr >= IPI_BASE and end <= IPI_END:
            return "ipi"
        if (addr >= EIO_BASE and end <= EIO_END) or (addr >= VIRT_BASE and end <= VIRT_END):
            return "eiointc"
        return ""
    if any(b <= addr and end <= b + P.PCH_PIC_SIZE for b in pch_bases):
        return "pchpic"
    return ""


class ChipFuzzer:
    """One VM with all chips, and the random operations and invariant checks that drive it.

    Call ``setup()``, then ``step()`` or ``run()`` (``run_fuzzer`` does both).
    """

    def __init__(
        self,
        rng: random.Random,
        *,
        host: PluginHost | None = None,
        max_phyid: int = 256,
        n_vcpus: int = 6,
        max_vcpus: int = 10,
        history: int = 24,
    ) -> None:
        self.rng = rng
        self.host = host or load_plugins()
        self.vm = Vm(self.host, name=None, max_phyid=max_phyid, max_vcpus=max_vcpus)
        self.n_vcpus = n_vcpus
        self.max_vcpus = max_vcpus
        self.stats = FuzzStats()
        self.history: deque[tuple[str, tuple[Any, ...]]] = deque(maxlen=history)
        #: vcpu_id -> SWI0/SWI1 bits the guest-visible operations imply.
        self.swi: dict[int, int] = {}
        self.vcpu_list: list[Vcpu] = []
        self.pch_base: int | None = None
        self.ipi: Device
        self.eio: Eiointc
        self.pch: PchPic
        self._ops: list[Callable[[], None]] = []
        self._cum: list[float] = []

    # ------------------------------------------------------------------ set-up ------------------

    def setup(self) -> None:
        """vCPUs (vcpu_id != phyid, some unmapped), all chips, and a guest's boot-time routing."""
        rng, vm = self.rng, self.vm
        limit = vm.max_phyid
        ids = {0, vm.max_vcpu_id - 1}
        while len(ids) < self.n_vcpus:
            ids.add(rng.choice((rng.randrange(16), rng.randrange(vm.max_vcpu_id))))
        pool = [
            p
            for p in (0, 1, 2, 3, limit - 1, min(255, limit - 1), 1023, rng.randrange(limit))
            if p < limit
        ]
        rng.shuffle(pool)
        for vid in sorted(ids)[: self.n_vcpus]:
            vcpu = vm.create_vcpu(vid)
            self._track_new(vcpu)
            if rng.random() < 0.8:
                choices = [p for p in pool if p != vid and p not in vm.phyids]
                if choices:
                    vm.set_one_reg(vcpu, abi.CPUID, rng.choice(choices))
        self.ipi = vm.create_device(DEV_IPI)
        eio = vm.create_device(DEV_EIOINTC)
        pch = vm.create_device(DEV_PCHPIC)
        assert isinstance(eio, Eiointc) and isinstance(pch, PchPic)
        self.eio, self.pch = eio, pch
        vm.device_call(pch, "set_attr", P.GRP_CTRL, P.CTRL_INIT, rng.choice(_PCH_BASES))
        self.pch_base = pch.base
        vm.device_call(eio, "set_attr", E.GRP_CTRL, E.CTRL_INIT_NUM_CPU, rng.randrange(257))
        vm.device_call(eio, "set_attr", E.GRP_CTRL, E.CTRL_INIT_FEATURE, rng.choice((0, 0xF)))
        # What a booting guest does: enable irqs, route them, unmask PCH-PIC pins.
        v0 = self.vcpu_list[0]
        for word in range(0, E.REGISTERS[E.ENABLE], 8):
            vm.guest_write(
                "iocsr",
                v0,
                EIO_BASE + E.ENABLE + word,
                8,
                rng.choice((U64_MAX, U64_MAX, rng.getrandbits(64))),
            )
        for word in range(0, E.REGISTERS[E.COREMAP], 8):
            vm.guest_write("iocsr", v0, EIO_BASE + E.COREMAP + word, 8, self._coremap_word())
        vm.guest_write("iocsr", v0, EIO_BASE + E.IPMAP, 8, self._bytes_of((1, 2, 4, 8, 0)))
        if self.pch_base is not None:
            vm.guest_write(
                "mmio", v0, self.pch_base + P.MASK, 8, rng.getrandbits(64) & rng.getrandbits(64)
            )
            vm.guest_write(
                "mmio",
                v0,
                self.pch_base + P.EDGE,
                8,
                rng.getrandbits(64) & rng.getrandbits(64) & rng.getrandbits(64),
            )
        weights: list[tuple[Callable[[], None], float]] = [
            (self.op_iocsr_read, 8),
            (self.op_iocsr_write, 26),
            (self.op_mmio_read, 5),
            (self.op_mmio_write, 16),
            (self.op_attr_set, 9),
            (self.op_attr_get, 3),
            (self.op_irq_line, 10),
            (self.op_msi, 4),
            (self.op_pv_ipi, 20),
            (self.op_set_phyid, 2),
            (self.op_csr_xchg, 4),
            (self.op_create_vcpu, 0.4),
            (self.op_destroy_vcpu, 0.4),
            (self.op_pv_features, 0.05),
        ]
        total = 0.0
        for fn, w in weights:
            total += w
            self._ops.append(fn)
            self._cum.append(total)
        self.check()

    def _track_new(self, vcpu: Vcpu) -> None:
        self.vcpu_list.append(vcpu)
        self.swi[vcpu.vcpu_id] = 0

    # ------------------------------------------------------------------ value helpers -----------

    def _value(self) -> int:
        rng = self.rng
        r = rng.random()
        if r < 0.35:
            return rng.getrandbits(64)
        if r < 0.55:
            return 1 << rng.randrange(64)
        if r < 0.7:
            return rng.randrange(256)
        if r < 0.8:
            return rng.getrandbits(32)
        return rng.choice((0, U64_MAX, U32_MAX, 1 << 63, 0x8000_0000))

    def _bytes_of(self, choices: tuple[int, ...]) -> int:
        out = 0
        for i in range(8):
            out |= self.rng.choice(choices) << (8 * i)
        return out

    def _phyid_target(self) -> int:
        """A physical CPUID a sender names: mostly one that is set, sometimes anything."""
        rng = self.rng
        if self.vm.phyids and rng.random() < 0.8:
            return rng.choice(list(self.vm.phyids))
        return rng.choice((rng.randrange(1024), rng.randrange(4), self.vm.max_phyid))

    def _coremap_word(self) -> int:
        rng = self.rng
        choices = [1, 2, 4, 8, 0, 0x10, 0xFF, rng.randrange(256)]
        choices.append(self._phyid_target() & 0xFF)
        return self._bytes_of(tuple(choices))

    def _size(self) -> int:
        rng = self.rng
        return rng.choice((1, 2, 4, 8, 8, 4)) if rng.random() < 0.98 else rng.choice((0, 3, 16))

    def _vcpu(self) -> Vcpu:
        return self.rng.choice(self.vcpu_list)

    # ------------------------------------------------------------------ running -----------------

    def step(self) -> None:
        rng = self.rng
        x = rng.random() * self._cum[-1]
        for fn, c in zip(self._ops, self._cum, strict=True):
            if x < c:
                fn()
                break
        self.stats.steps += 1
        self.check()

    def run(self, steps: int) -> FuzzStats:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.stats.seconds += time.perf_counter() - t0
        return self.stats

    def fail(self, why: str) -> FuzzFailure:
        ops = "\n".join(f"  {kind}{args!r}" for kind, args in self.history)
        return FuzzFailure(
            f"after {self.stats.steps} steps: {why}\nlast operations (oldest first):\n{ops}"
        )

    def _call(
        self, kind: str, args: tuple[Any, ...], fn: Callable[..., Any], *call_args: Any
    ) -> tuple[Any, KvmError | None]:
        """Run one model call; only KvmError other than EIO may come out of it."""
        self.history.append((kind, args))
        self.stats.ops[kind] += 1
        try:
            result = fn(*call_args)
        except KvmError as err:
            if err.name == "EIO":
                raise self.fail(f"{kind}: a chip raised (EIO): {err}") from err
            self.stats.errors[err.name] += 1
            return None, err
        except Exception as exc:
            raise self.fail(f"{kind}: {type(exc).__name__} escaped the model: {exc}") from exc
        return result, None

    def _expect(
        self, kind: str, err: KvmError | None, ok: bool | None, name: str | None = None
    ) -> None:
        """``ok`` True: must succeed; False: must fail (with ``name`` if given); None: either."""
        if ok is True and err is not None:
            raise self.fail(f"{kind} should have succeeded but failed: {err}")
        if ok is False:
            if err is None:
                raise self.fail(f"{kind} should have been refused ({name or 'any error'})")
            if name is not None and err.name != name:
                raise self.fail(f"{kind} should have failed with {name}, not {err}")

    # ------------------------------------------------------------------ guest accesses ----------

    def _ipi_offset(self) -> int:
        rng = self.rng
        if rng.random() < 0.85:
            return rng.choice(
                (
                    *_IPI_ATTR_WIDTH,
                    I.IPI_SET,
                    I.IPI_CLEAR,
                    abi.IPI_BUF + 4,
                    I.IPI_SEND,
                    I.IPI_SEND,
                    I.MAIL_SEND,
                    I.MAIL_SEND,
                    I.ANY_SEND,
                    I.ANY_SEND,
                )
            )
        return rng.randrange(I.IOCSR_IPI_SIZE)

    def _ipi_data(self, off: int) -> int:
        rng = self.rng
        if off in (I.IPI_SEND, I.MAIL_SEND, I.ANY_SEND):
            low = rng.getrandbits(16) if rng.random() < 0.2 else 0
            if off == I.IPI_SEND:
                low = rng.randrange(32) | (low & ~abi.IPI_SEND_VECTOR_MASK & abi.IPI_SEND_ADDR_MASK)
            elif off == I.MAIL_SEND:
                low = rng.randrange(8) << abi.IPI_SEND_MAILBOX_SHIFT
            else:
                low = rng.choice(
                    (
                        IPI_BASE + I.IPI_SET,
                        IPI_BASE + I.IPI_SET,
                        IPI_BASE + I.IPI_CLEAR,
                        IPI_BASE + abi.IPI_EN,
                        IPI_BASE + abi.IPI_BUF,
                        IPI_BASE + abi.IPI_BUF_END - 4,
                        IPI_BASE,
                        EIO_BASE + E.ENABLE,
                        EIO_BASE + E.COREISR,
                        EIO_BASE + E.COREMAP + rng.randrange(E.REGISTERS[E.COREMAP]),
                        rng.getrandbits(16),
                    )
                )
            keep = rng.choice((0, 0, rng.randrange(16)))
            payload = rng.getrandbits(32) if rng.random() < 0.7 else rng.choice((0, U32_MAX))
            return abi.ipi_send(self._phyid_target() & abi.IPI_SEND_CPU_MASK, low, payload, keep)
        if off == I.IPI_SET:
            return rng.choice((1 << rng.randrange(32), rng.getrandbits(32), 0, self._value()))
        if off == I.IPI_CLEAR:
            return rng.choice((U32_MAX, 1 << rng.randrange(32), rng.getrandbits(32), U64_MAX))
        return self._value()

    def _eio_offset(self) -> int:
        rng = self.rng
        if rng.random() < 0.9:
            start = rng.choice(
                (
                    E.NODETYPE,
                    E.IPMAP,
                    E.ENABLE,
                    E.ENABLE,
                    E.BOUNCE,
                    E.ISR,
                    E.COREISR,
                    E.COREISR,
                    E.COREMAP,
                    E.COREMAP,
                    E.COREMAP,
                )
            )
            return start + rng.randrange(E.REGISTERS[start])
        return rng.randrange(E.EIOINTC_SIZE)

    def _eio_data(self, off: int) -> int:
        rng = self.rng
        if E.COREMAP <= off < E.COREMAP + E.REGISTERS[E.COREMAP]:
            return self._coremap_word()
        if E.IPMAP <= off < E.IPMAP + E.REGISTERS[E.IPMAP]:
            return self._bytes_of((1, 2, 4, 8, 0, 3, rng.randrange(256)))
        if (
            E.ENABLE <= off < E.ENABLE + E.REGISTERS[E.ENABLE]
            or E.COREISR <= off < E.COREISR + E.REGISTERS[E.COREISR]
        ):
            return rng.choice((U64_MAX, 0, rng.getrandbits(64), 1 << rng.randrange(64)))
        return self._value()

    def _iocsr_target(self) -> tuple[int, int, int]:
        """(address, size, value) of an IOCSR access, biased to the IPI and EIOINTC windows."""
        rng = self.rng
        size = self._size()
        r = rng.random()
        if r < 0.45:
            off = self._ipi_offset()
            addr, value = IPI_BASE + off, self._ipi_data(off)
        elif r < 0.86:
            off = self._eio_offset()
            addr, value = EIO_BASE + off, self._eio_data(off)
        elif r < 0.94:
            off = rng.choice(
                (E.VIRT_FEATURES, E.VIRT_CONFIG, E.VIRT_CONFIG, rng.randrange(E.EIOINTC_VIRT_SIZE))
            )
            addr = VIRT_BASE + off
            value = rng.choice((0, rng.randrange(16), rng.randrange(16), self._value()))
        else:
            addr = rng.choice(
                (
                    rng.getrandbits(32),
                    rng.getrandbits(64),
                    IPI_END - 4,
                    EIO_END - 4,
                    VIRT_END - 4,
                    EIO_BASE - 4,
                )
            )
            value = self._value()
        if size in (2, 4, 8) and rng.random() < 0.9:
            addr &= ~(size - 1)
        return addr, size, value

    def _mmio_target(self) -> tuple[int, int, int]:
        rng = self.rng
        size = self._size()
        base = self.pch_base
        if base is not None and rng.random() < 0.9:
            if rng.random() < 0.85:
                off = rng.choice(
                    (
                        P.INT_ID,
                        P.MASK,
                        P.MASK,
                        P.HTMSI_EN,
                        P.EDGE,
                        P.CLEAR,
                        P.CLEAR,
                        P.AUTO_CTRL0,
                        P.AUTO_CTRL1,
                        P.INT_IRR,
                        P.INT_ISR,
                        P.POLARITY,
                        P.ROUTE_ENTRY + rng.randrange(64),
                        P.HTMSI_VEC + rng.randrange(64),
                    )
                )
            else:
                off = rng.randrange(P.PCH_PIC_SIZE)
            word = off & ~7
            if word == P.MASK:
                value = rng.choice(
                    (
                        0,
                        U64_MAX,
                        rng.getrandbits(64),
                        1 << rng.randrange(64),
                        rng.getrandbits(64) & rng.getrandbits(64),
                    )
                )
            elif word == P.CLEAR:
                value = rng.choice((U64_MAX, rng.getrandbits(64), 1 << rng.randrange(64)))
            elif P.HTMSI_VEC <= word < P.HTMSI_VEC + 64:
                value = self._bytes_of((0, 1, 2, 5, 31, 32, 255, rng.randrange(256)))
            else:
                value = self._value()
            addr = base + off
        else:
            addr = rng.choice(
                (
                    rng.getrandbits(32),
                    rng.getrandbits(64),
                    (base or 0) - 4,
                    (base or 0) + P.PCH_PIC_SIZE - 4,
                )
            )
            value = self._value()
        if size in (2, 4, 8) and rng.random() < 0.9:
            addr &= ~(size - 1)
        return addr, size, value

    def _access(self, space: str, write: bool) -> None:
        addr, size, value = self._iocsr_target() if space == "iocsr" else self._mmio_target()
        vcpu = self._vcpu()
        valid = size in (1, 2, 4, 8)
        chip = _window(space, addr, size, [w.base for w in self.pch.windows]) if valid else ""
        if chip:
            self.stats.accesses[chip] += 1
        kind = f"{space}_{'write' if write else 'read'}"
        args = (vcpu.vcpu_id, hex(addr), size) + ((hex(value),) if write else ())
        if write:
            _, err = self._call(kind, args, self.vm.guest_write, space, vcpu, addr, size, value)
        else:
            result, err = self._call(kind, args, self.vm.guest_read, space, vcpu, addr, size)
            if err is None:
                top = result >> (8 * size - 1)
                if not 0 <= result <= U64_MAX or top not in (0, (1 << (65 - 8 * size)) - 1):
                    raise self.fail(f"{kind} returned {result:#x}, not a sign-extended load")
        if not valid:
            self._expect(kind, err, False, "EINVAL")
        elif chip:
            self._expect(kind, err, True)
        else:
            self._expect(kind, err, False, "ENXIO")

    def op_iocsr_read(self) -> None:
        self._access("iocsr", False)

    def op_iocsr_write(self) -> None:
        self._access("iocsr", True)

    def op_mmio_read(self) -> None:
        self._access("mmio", False)

    def op_mmio_write(self) -> None:
        self._access("mmio", True)

    # ------------------------------------------------------------------ device attrs ------------

    def _too_wide(self, width: int) -> int:
        rng = self.rng
        return rng.choice(
            (
                -1,
                -rng.randrange(1, 1 << 40),
                1 << (8 * width),
                (1 << (8 * width)) + rng.getrandbits(8 * width),
                1 << 64,
                1 << 200,
            )
        )

    def _fits(self, width: int) -> int:
        rng = self.rng
        return rng.choice(
            (0, (1 << (8 * width)) - 1, rng.getrandbits(8 * width), rng.randrange(256))
        )

    def _other_group(self, *known: int) -> int:
        """An attr group the chip does not have (its neighbours and random numbers)."""
        rng = self.rng
        while True:
            group = rng.choice(
                (
                    0,
                    1,
                    abi.CPUCFG_KVM_SIG,
                    abi.KVM_DEV_LOONGARCH_PCH_PIC_GRP_CTRL + 1,
                    abi.KVM_DEV_LOONGARCH_IPI_GRP_REGS,
                    abi.KVM_DEV_LOONGARCH_EXTIOI_GRP_CTRL,
                    self._value() | (1 << 30),
                    self._value(),
                )
            )
            if group not in known:
                return group

    def _ipi_attr(self, for_set: bool) -> tuple[int, int, int, bool]:
        """(group, attr, value, predicted ok) for the IPI."""
        rng = self.rng
        group = (
            I.KVM_DEV_LOONGARCH_IPI_GRP_REGS
            if rng.random() < 0.9
            else self._other_group(I.KVM_DEV_LOONGARCH_IPI_GRP_REGS)
        )
        # The attr's cpu field is 10 bits: a vcpu_id of 1024 or more cannot be named.
        vid = self._vcpu().vcpu_id if rng.random() < 0.85 else rng.randrange(1024)
        vid &= abi.IPI_ATTR_CPU_MASK
        off = rng.choice(tuple(_IPI_ATTR_WIDTH)) if rng.random() < 0.85 else rng.randrange(256)
        attr = (vid << 16) | off
        if rng.random() < 0.1:
            attr |= rng.getrandbits(38) << 26  # bits above the cpu field are ignored
        width = _IPI_ATTR_WIDTH.get(off, 8)
        value = self._fits(width) if rng.random() < 0.8 else self._too_wide(width)
        if for_set and group == I.KVM_DEV_LOONGARCH_IPI_GRP_REGS and off == I.IPI_STATUS:
            value = self._too_wide(width)  # STATUS carries INT_IPI: refused writes only
        ok = (
            group == I.KVM_DEV_LOONGARCH_IPI_GRP_REGS
            and vid in self.vm.vcpus
            and off in _IPI_ATTR_WIDTH
            and (not for_set or 0 <= value < 1 << (8 * width))
        )
        return group, attr, value, ok

    def _eio_attr(self, for_set: bool) -> tuple[int, int, int, bool | None]:
        rng = self.rng
        eio = self.eio
        r = rng.random()
        value = rng.choice((self._fits(4), self._fits(4), self._too_wide(4)))
        if r < 0.5:
            group = E.GRP_REGS
            cpu = rng.choice(
                (self._vcpu().vcpu_id, rng.randrange(max(eio.num_cpu, 1)), rng.getrandbits(16))
            )
            start = rng.choice(_EIO_ALLOWED + _EIO_ALLOWED + _EIO_FORBIDDEN)
            off = start + rng.randrange(E.REGISTERS[start])
            if rng.random() < 0.1:
                off = rng.choice((0, 0x100, 0x900, 0xFFFF, rng.getrandbits(16)))
            attr = (cpu << 16) | off | (rng.getrandbits(32) << 32 if rng.random() < 0.1 else 0)
            where = Eiointc._locate(off)
            if for_set and where not in _EIO_ALLOWED:
                value = self._too_wide(4)
            ok = (
                where is not None
                and (where != E.COREISR or cpu < eio.num_cpu)
                and (not for_set or 0 <= value <= U32_MAX)
            )
            return group, attr, value, ok
        if r < 0.7:
            group = E.GRP_SW_STATUS
            which = rng.choice(
                (
                    E.SW_STATUS_NUM_CPU,
                    E.SW_STATUS_FEATURE,
                    E.SW_STATUS_STATE,
                    E.SW_STATUS_ROUTE,
                    rng.getrandbits(16),
                )
            )
            irq = rng.choice((rng.randrange(256), rng.getrandbits(16)))
            attr = (irq << 16) | which
            if for_set:
                if which in (E.SW_STATUS_STATE, E.SW_STATUS_ROUTE):
                    value = self._too_wide(4)
                known = which in (E.SW_STATUS_NUM_CPU, E.SW_STATUS_FEATURE)
                return group, attr, value, known and 0 <= value <= U32_MAX
            known = which in (E.SW_STATUS_NUM_CPU, E.SW_STATUS_FEATURE, E.SW_STATUS_STATE) or (
                which == E.SW_STATUS_ROUTE and irq < 256
            )
            return group, attr, value, known
        if r < 0.9:
            group = E.GRP_CTRL
            attr = rng.choice((E.CTRL_INIT_NUM_CPU, E.CTRL_INIT_FEATURE, 2, 4, self._value()))
            if attr == E.CTRL_LOAD_FINISHED:
                attr = 2
            if attr == E.CTRL_INIT_NUM_CPU:
                value = rng.choice((rng.randrange(257), 256, 257, U32_MAX, self._too_wide(4)))
                ctrl_ok = 0 <= value <= 256
            elif attr == E.CTRL_INIT_FEATURE:
                value = rng.choice((0, 0xF, rng.randrange(16), self._too_wide(4)))
                ctrl_ok = 0 <= value <= U32_MAX
            else:
                ctrl_ok = True  # other CTRL attrs are accepted and ignored, whatever the value
            if not for_set:
                ctrl_ok = False  # CTRL cannot be read
            return group, attr, value, ctrl_ok
        group = self._other_group(E.GRP_REGS, E.GRP_SW_STATUS, E.GRP_CTRL)
        return group, self._value(), value, False

    def _pch_attr(self, for_set: bool) -> tuple[int, int, int, bool | None]:
        rng = self.rng
        r = rng.random()
        if r < 0.75:
            group = P.GRP_REGS
            choice = rng.random()
            if choice < 0.45:
                off = rng.choice(_PCH_ALLOWED_WORDS)
            elif choice < 0.75:
                off = rng.choice((P.ROUTE_ENTRY, P.HTMSI_VEC)) + rng.randrange(64)
            elif choice < 0.9:
                off = rng.choice(_PCH_FORBIDDEN)
            else:
                off = rng.choice(
                    (
                        P.INT_ID,
                        P.CLEAR,
                        P.MASK + 1,
                        P.PCH_PIC_SIZE,
                        0x140,
                        rng.getrandbits(12),
                        rng.getrandbits(32),
                    )
                )
            byte_reg = (
                P.ROUTE_ENTRY <= off < P.ROUTE_ENTRY + 64 or P.HTMSI_VEC <= off < P.HTMSI_VEC + 64
            )
            valid = off in P.WORD_REGS or byte_reg
            width = 1 if byte_reg else 8
            attr = off | (rng.getrandbits(32) << 32 if rng.random() < 0.1 else 0)
            value = self._fits(width) if rng.random() < 0.85 else self._too_wide(width)
            if for_set and off in _PCH_FORBIDDEN:
                value = self._too_wide(width)
            ok = valid and (not for_set or 0 <= value < 1 << (8 * width))
            return group, attr, value, ok
        if r < 0.9:
            group = P.GRP_CTRL
            attr = P.CTRL_INIT if rng.random() < 0.8 else rng.choice((1, self._value()))
            value = rng.choice((*_PCH_BASES, rng.getrandbits(64), self._too_wide(8)))
            if not for_set:
                return group, attr, value, None if attr == P.CTRL_INIT else False
            return group, attr, value, attr == P.CTRL_INIT and 0 <= value <= U64_MAX
        return self._other_group(P.GRP_REGS, P.GRP_CTRL), self._value(), self._value(), False

    def _attr_target(self, for_set: bool) -> tuple[str, Device, int, int, int, bool | None]:
        rng = self.rng
        chip = rng.choice(("ipi", "eiointc", "pchpic"))
        if chip == "ipi":
            return (chip, self.ipi, *self._ipi_attr(for_set))
        if chip == "eiointc":
            return (chip, self.eio, *self._eio_attr(for_set))
        return (chip, self.pch, *self._pch_attr(for_set))

    def op_attr_set(self) -> None:
        chip, dev, group, attr, value, ok = self._attr_target(True)
        self.stats.accesses[chip] += 1
        args = (chip, hex(group), hex(attr), hex(value))
        _, err = self._call(
            "attr_set", args, self.vm.device_call, dev, "set_attr", group, attr, value
        )
        self._expect("attr_set", err, ok)
        if err is None:
            if chip == "pchpic" and group == P.GRP_CTRL:
                self.pch_base = value
            elif group in (I.KVM_DEV_LOONGARCH_IPI_GRP_REGS, E.GRP_REGS, P.GRP_REGS):
                back, err = self._call(
                    "attr_get", args[:3], self.vm.device_call, dev, "get_attr", group, attr
                )
                if err is not None or back != value:
                    raise self.fail(f"attr {args} read back as {back!r} ({err})")

    def op_attr_get(self) -> None:
        chip, dev, group, attr, _value, ok = self._attr_target(False)
        self.stats.accesses[chip] += 1
        args = (chip, hex(group), hex(attr))
        result, err = self._call(
            "attr_get", args, self.vm.device_call, dev, "get_attr", group, attr
        )
        self._expect("attr_get", err, ok)
        if err is None and (type(result) is not int or not 0 <= result <= U64_MAX):
            raise self.fail(f"attr_get {args} returned {result!r}, not a u64")

    # ------------------------------------------------------------------ inputs ------------------

    def op_irq_line(self) -> None:
        rng = self.rng
        pin = rng.randrange(64) if rng.random() < 0.97 else rng.choice((64, 65, -1, 1 << 40))
        level = rng.choice((0, 1))
        self.stats.accesses["pchpic"] += 1
        _, err = self._call(
            "irq_line", (pin, level), self.vm.set_chip_input, DEV_PCHPIC, pin, level
        )
        self._expect("irq_line", err, 0 <= pin < 64, None if 0 <= pin < 64 else "EINVAL")

    def op_msi(self) -> None:
        rng = self.rng
        data = rng.randrange(256) if rng.random() < 0.95 else rng.choice((256, 1 << 32, -1))
        self.stats.accesses["eiointc"] += 1
        _, err = self._call("msi", (data,), self.vm.set_chip_input, DEV_EIOINTC, data, 1)
        self._expect("msi", err, 0 <= data < 256, None if 0 <= data < 256 else "EINVAL")

    # ------------------------------------------------------------------ PV IPI ------------------

    def op_pv_ipi(self) -> None:
        rng = self.rng
        vm = self.vm
        vcpu = self._vcpu()
        code = (
            KVM_HCALL_SERVICE
            if rng.random() < 0.93
            else rng.choice(
                (abi.KVM_HCALL_SWDBG, abi.KVM_HCALL_USER_SERVICE, 0, rng.getrandbits(15))
            )
        )
        a0 = KVM_HCALL_FUNC_IPI if rng.random() < 0.93 else rng.choice((0, 2, 3, -1, 1 << 32 | 1))
        r = rng.random()
        targets = [self._phyid_target() for _ in range(rng.randrange(1, 4))]
        if r < 0.6:
            base = max(0, min(targets) - rng.randrange(8))
        elif r < 0.75:
            base = rng.choice(
                (0, U32_MAX, U32_MAX - 62, (1 << 32) + rng.randrange(4), (1 << 31) - 1, 1 << 31)
            )
        else:
            base = rng.choice((rng.getrandbits(64), rng.getrandbits(32), -rng.randrange(100)))
        bitmap = 0
        for t in targets:
            off = (t - base) & U32_MAX
            if off < 128:
                bitmap |= 1 << off
        if rng.random() < 0.3:
            bitmap |= rng.getrandbits(128) & rng.getrandbits(128)
        a1, a2 = bitmap & U64_MAX, bitmap >> 64
        if rng.random() < 0.05:
            a1, a2 = rng.choice((-1, U64_MAX)), rng.choice((0, -1))
        args = [a0, a1, a2, base] + [self._value() for _ in range(rng.randrange(3))]
        if rng.random() < 0.03:
            args = args[: rng.randrange(4)]
        self.stats.accesses["pv_ipi"] += 1
        # The expected outcome, from SEMANTICS §7 alone.
        full = [x & U64_MAX for x in args] + [0] * (6 - len(args))
        sends = (
            code == KVM_HCALL_SERVICE
            and full[0] == KVM_HCALL_FUNC_IPI
            and vm.pv_features & KVM_FEATURE_IPI
        )
        expect = 0 if sends else -1
        steal = None
        if (
            code == KVM_HCALL_SERVICE
            and full[0] == abi.KVM_HCALL_FUNC_NOTIFY
            and vm.pv_features & abi.KVM_FEATURE_STEAL_TIME
        ):
            # kvm_save_notify: only a1 = BIT(KVM_FEATURE_STEAL_TIME), a2 well-formed, stores.
            if full[1] != abi.KVM_FEATURE_STEAL_TIME:
                expect = -1
            elif full[2] & ~(abi.KVM_STEAL_PHYS_MASK | abi.KVM_STEAL_PHYS_VALID):
                expect = -2
            else:
                expect, steal = 0, full[2]
        hit: set[int] = set()
        if sends:
            b = full[3] & U32_MAX
            for word, bm in enumerate((full[1], full[2])):
                for bit in range(64):
                    if bm >> bit & 1:
                        cpuid = (b + 64 * word + bit) & U32_MAX
                        owner = vm.phyids.get(cpuid) if cpuid < 1 << 31 else None
                        if owner is not None:
                            hit.add(owner.vcpu_id)
        result, err = self._call(
            "pv_ipi",
            (vcpu.vcpu_id, hex(code), [hex(a & U64_MAX) for a in args]),
            vm.hypercall,
            vcpu,
            code,
            args,
        )
        if err is not None or result != expect:
            raise self.fail(f"hypercall returned {result!r} ({err}), expected {expect}")
        if steal is not None and vcpu.steal_gpa != steal:
            raise self.fail(f"FUNC_NOTIFY stored {vcpu.steal_gpa:#x}, not {steal:#x}")
        for vid in hit:
            self.swi[vid] |= 1

    def op_pv_features(self) -> None:
        rng = self.rng
        value = rng.choice((KVM_FEATURE_IPI, KVM_FEATURE_IPI, 0b1110, 0, rng.getrandbits(32)))
        vcpu = self._vcpu()
        _, err = self._call(
            "pv_features",
            (hex(value),),
            self.vm.set_vcpu_attr,
            vcpu,
            KVM_LOONGARCH_VCPU_CPUCFG,
            CPUCFG_KVM_FEATURE,
            value,
        )
        if (
            err is None
            and self.vm.get_vcpu_attr(vcpu, KVM_LOONGARCH_VCPU_CPUCFG, CPUCFG_KVM_FEATURE) != value
        ):
            raise self.fail(f"PV features {value:#x} did not stick")

    # ------------------------------------------------------------------ phyids, vCPUs, SWI ------

    def op_set_phyid(self) -> None:
        rng = self.rng
        vm = self.vm
        vcpu = self._vcpu()
        limit = vm.max_phyid
        cur = vcpu.csrs[CSR_CPUID]
        taken = [p for p in vm.phyids if p != cur]
        free = [p for p in (0, 1, 2, 3, limit - 1, rng.randrange(limit)) if p not in vm.phyids]
        value = rng.choice(
            [cur, limit, limit + 1, U64_MAX, rng.getrandbits(64), *free, *free, *taken[:2]]
        )
        # kvm_set_cpuid, SEMANTICS §4.
        if value >= limit:
            expect: str | None = "EINVAL"
        elif cur < limit:
            expect = None if value == cur else "EINVAL"
        elif value in vm.phyids:
            expect = "EINVAL"
        else:
            expect = None
        _, err = self._call(
            "set_phyid", (vcpu.vcpu_id, value), vm.set_one_reg, vcpu, abi.CPUID, value
        )
        self._expect("set_phyid", err, expect is None, expect)
        now = vcpu.csrs[CSR_CPUID]
        if (err is None and now != value) or (err is not None and now != cur):
            raise self.fail(f"set_phyid {value} left CPUID at {now} (was {cur}; {err})")

    def op_csr_xchg(self) -> None:
        rng = self.rng
        vm = self.vm
        vcpu = self._vcpu()
        index = (
            CSR_ESTAT
            if rng.random() < 0.9
            else rng.choice(
                (rng.randrange(abi.CSR_MAX_NUMS), abi.CSR_MAX_NUMS, rng.getrandbits(16))
            )
        )
        mask = rng.choice((1, 2, 3, 3, U64_MAX, 0, self._value()))
        value = rng.choice((0, 0, 0, 1, 2, self._value()))
        before = vm.get_one_reg(vcpu, abi.ESTAT)
        old, err = self._call(
            "csr_xchg",
            (vcpu.vcpu_id, hex(index), hex(value), hex(mask)),
            vm.csr_xchg,
            vcpu,
            index,
            value,
            mask,
        )
        self._expect(
            "csr_xchg",
            err,
            index < abi.CSR_MAX_NUMS,
            None if index < abi.CSR_MAX_NUMS else "EINVAL",
        )
        if index == CSR_ESTAT and err is None:
            if old != before:
                raise self.fail(f"csr_xchg ESTAT returned {old:#x}, ESTAT was {before:#x}")
            w = mask & SWI_MASK
            vid = vcpu.vcpu_id
            self.swi[vid] = (self.swi[vid] & ~w) | (value & w)

    def op_create_vcpu(self) -> None:
        rng = self.rng
        vm = self.vm
        vid = rng.choice(
            (
                rng.randrange(vm.max_vcpu_id),
                rng.randrange(16),
                self._vcpu().vcpu_id,
                vm.max_vcpu_id,
                -1,
            )
        )
        if not 0 <= vid < vm.max_vcpu_id:
            expect: str | None = "EINVAL"
        elif vid in vm.vcpus:
            expect = "EEXIST"
        elif len(vm.vcpus) >= self.max_vcpus:
            expect = "EINVAL"
        else:
            expect = None
        vcpu, err = self._call("create_vcpu", (vid,), vm.create_vcpu, vid)
        self._expect("create_vcpu", err, expect is None, expect)
        if err is None:
            if vm.get_one_reg(vcpu, abi.CPUID) != vm.max_phyid or vcpu.lines:
                raise self.fail(f"new vCPU {vid} is not pristine")
            self._track_new(vcpu)

    def op_destroy_vcpu(self) -> None:
        if len(self.vcpu_list) <= 1:
            return
        vcpu = self._vcpu()
        _, err = self._call("destroy_vcpu", (vcpu.vcpu_id,), self.vm.destroy_vcpu, vcpu)
        self._expect("destroy_vcpu", err, True)
        self.vcpu_list.remove(vcpu)
        del self.swi[vcpu.vcpu_id]
        if vcpu.vcpu_id in self.vm.vcpus or vcpu.alive:
            raise self.fail(f"vCPU {vcpu.vcpu_id} survived its destroy")

    # ------------------------------------------------------------------ invariants --------------

    def check(self) -> None:
        vm = self.vm
        vcpus = vm.vcpus
        ipi_lines = implied_lines(self.ipi)
        eio_lines = implied_lines(self.eio)
        seen = 0
        for vid, bits in ipi_lines.items():
            if bits & ~IPI_BIT or (bits and vid not in vcpus):
                raise self.fail(f"IPI implies lines {bits:#x} for vCPU {vid}")
        for vid, bits in eio_lines.items():
            if bits & ~HWI_MASK or (bits and vid not in vcpus):
                raise self.fail(f"EIOINTC implies lines {bits:#x} for vCPU {vid}")
        if len(vcpus) != len(self.vcpu_list):
            raise self.fail(
                f"the VM has vCPUs {sorted(vcpus)}, expected "
                f"{sorted(v.vcpu_id for v in self.vcpu_list)}"
            )
        limit = vm.max_phyid
        mapped: dict[int, Vcpu] = {}
        for vcpu in self.vcpu_list:
            vid = vcpu.vcpu_id
            if vcpus.get(vid) is not vcpu:
                raise self.fail(f"vCPU {vid} is not the one the VM holds")
            lines = vcpu.lines
            want = eio_lines.get(vid, 0) | ipi_lines.get(vid, 0) | self.swi[vid]
            if lines != want:
                raise self.fail(
                    f"vCPU {vid} lines {lines:#06x} but chips/guest imply {want:#06x} "
                    f"(EIOINTC {eio_lines.get(vid, 0):#x}, IPI {ipi_lines.get(vid, 0):#x}, "
                    f"SWI {self.swi[vid]:#x})"
                )
            seen |= lines
            phyid = vcpu.csrs[CSR_CPUID]
            if phyid < limit:
                if phyid in mapped:
                    raise self.fail(
                        f"phyid {phyid} is held by vCPUs {mapped[phyid].vcpu_id} and {vid}"
                    )
                mapped[phyid] = vcpu
            elif phyid != limit:
                raise self.fail(f"vCPU {vid} has CPUID {phyid}, neither set nor the unset mark")
        phyids = vm.phyids
        if len(phyids) != len(mapped) or any(mapped.get(p) is not v for p, v in phyids.items()):
            shown = {p: v.vcpu_id for p, v in phyids.items()}
            raise self.fail(
                f"phyid map {shown} is not the vCPUs' CPUIDs "
                f"{ {p: v.vcpu_id for p, v in mapped.items()} }"
            )
        kept = vm.map_entries  # what vm.phyid_map answers without a rebuild
        if kept is not None and kept != sorted((p, v.vcpu_id) for p, v in phyids.items()):
            raise self.fail(f"the kept phyid map {kept} is not the map {sorted(phyids)}")
        lines_up = self.stats.lines_up
        if seen & HWI_MASK:
            lines_up["hwi"] += 1
        if seen & IPI_BIT:
            lines_up["ipi"] += 1
        if seen & 1:
            lines_up["swi0"] += 1


def run_fuzzer(fuzzer_factory: Callable[[], ChipFuzzer], steps: int) -> ChipFuzzer:
    """Build a fuzzer, set it up and run ``steps`` steps."""
    fuzzer = fuzzer_factory()
    fuzzer.setup()
    fuzzer.run(steps)
    return fuzzer


def fuzz_seed(
    seed: int, steps: int, *, host: PluginHost | None = None, max_phyid: int | None = None
) -> FuzzStats:
    """A reproducible run: everything (VM shape, ops) follows from ``seed``."""
    rng = random.Random(seed)
    limit = max_phyid if max_phyid is not None else rng.choice((256, 4096, 16, 65536))
    n = rng.randrange(3, 8)
    fuzzer = run_fuzzer(lambda: ChipFuzzer(rng, host=host, max_phyid=limit, n_vcpus=n), steps)
    return fuzzer.stats
