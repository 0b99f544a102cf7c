"""The VM model: vCPUs, their registers and interrupt lines, the phyid map, and devices.

Plain objects, no sockets, no awaiting, no trio: usable from any script, fuzzer or benchmark.
The phyid map follows the seed (``kvm_set_cpuid`` / ``kvm_drop_cpuid`` /
``kvm_get_vcpu_by_cpuid``, SEMANTICS.md §4) with the VM's ``max_phyid`` in place of
KVM_MAX_PHYID (decision 4). The kernel's ``phyid_map_lock`` is the daemon's business: it holds
its per-VM ``trio.Lock`` around every request that sets or drops a phyid (server.py), across the
await points such a request may have; the model itself never waits. Lookups are lockless, as
in the kernel, because an entry changes only on a first set and on a drop.

Interrupt lines live where the kernel keeps them: SWI0/1, TI and IPI in ESTAT, HWI0-7 in GINTC
(shown as ESTAT bits 2-9). Every change of a line, whatever caused it, goes through
``_set_lines`` so that exactly one ``irq`` event with the next ``seq`` is emitted per change.

Every call into a chip is guarded (``host.PluginGuard``): anything it raises that is not a
``KvmError`` becomes EIO naming the plugin, a chip that runs past ``--plugin-timeout`` is
interrupted (ETIMEDOUT) and its device is marked broken: from then on it answers EIO until the
VM is destroyed, so no half-updated chip goes unnoticed.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from lvz.plugins.api import Device, IoHandler, Unhandled
from lvz.protocol import abi
from lvz.protocol.abi import (
    ACCESS_SIZES,
    CPUCFG2_FP,
    CPUCFG2_FPDP,
    CPUCFG2_FPSP,
    CPUCFG2_LASX,
    CPUCFG2_LLFTP,
    CPUCFG2_LSX,
    CPUCFG_KVM_FEATURE,
    CSR_CPUID,
    CSR_CRMD,
    CSR_CRMD_DA,
    CSR_ESTAT,
    CSR_GINTC,
    CSR_GINTC_HWIS,
    CSR_MAX_NUMS,
    CSR_TMID,
    ESTAT_HWI_SHIFT,
    EXCCODE_INT_NUM,
    GUEST_WRITABLE_ESTAT,
    INSN_HVCL,
    INT_HWI0,
    INT_HWI7,
    INT_IPI,
    INT_SWI0,
    INT_SWI1,
    INT_TI,
    KVM_HCALL_INVALID_CODE,
    KVM_HCALL_SWDBG,
    KVM_LOONGARCH_VCPU_CPUCFG,
    KVM_LOONGARCH_VCPU_PVTIME_CTRL,
    KVM_LOONGARCH_VCPU_PVTIME_GPA,
    KVM_STEAL_PHYS_MASK,
    KVM_STEAL_PHYS_VALID,
    PV_FEATURES_DEFAULT,
    U32_MAX,
    U64_MAX,
)
from lvz.protocol.errors import KvmError, Unclaimed
from lvz.protocol.profiles import DEFAULT as DEFAULT_PROFILE
from lvz.protocol.profiles import NEWEST
from lvz.protocol.profiles import resolve as resolve_profile

from .host import PluginGuard, PluginHost, plugin_failure

__all__ = ["ChipApi", "LineListener", "Vcpu", "Vm"]

#: Up to this many entries a CPUID set below the highest goes into the kept phyid map in place
#: (moving at most 32 KiB of it); past it the map is dropped and rebuilt at the next read.
KEEP_SORTED = 4096

#: ESTAT bits that are lines and live in ESTAT itself (SWI0, SWI1, TI, IPI).
_ESTAT_LINES = (1 << INT_SWI0) | (1 << INT_SWI1) | (1 << INT_TI) | (1 << INT_IPI)
_HWI_SHIFT = ESTAT_HWI_SHIFT
_HWIS = CSR_GINTC_HWIS

#: The device types that are kernel irqchips: a profile may predate them (ENODEV).
_KERNEL_TYPES = frozenset(NEWEST["kernel_device_types"])

#: (vm, vcpu_id, irq, level, seq) -> None; the daemon fans it out to subscribers and waiters.
LineListener = Callable[["Vm", int, int, int, int], None]


def _lines(estat: int, gintc: int) -> int:
    return (estat & _ESTAT_LINES) | ((gintc & _HWIS) << _HWI_SHIFT)


def _check_cpucfg(index: int, value: int) -> None:
    """``kvm_check_cpucfg``, less what depends on the host CPU (lvz has none to ask).

    Kept: every word is 32 bits (LoongArch manual 2.2.10.5), and CPUCFG2's architectural
    consistency rules. Not kept: the per-host feature masks (``_kvm_get_cpucfg_mask``).
    """
    if value > U32_MAX:
        raise KvmError("EINVAL", f"CPUCFG{index} is 32 bits wide; {value:#x} does not fit")
    if index != 2:
        return
    if not value & CPUCFG2_LLFTP:
        raise KvmError("EINVAL", "CPUCFG2 must set LLFTP: guests must have a constant timer")
    if value & CPUCFG2_FP and not (value & CPUCFG2_FPSP and value & CPUCFG2_FPDP):
        raise KvmError("EINVAL", "CPUCFG2: FP needs both FPSP and FPDP")
    if value & CPUCFG2_LSX and not value & CPUCFG2_FP:
        raise KvmError("EINVAL", "CPUCFG2: LSX architecturally implies FP")
    if value & CPUCFG2_LASX and not value & CPUCFG2_LSX:
        raise KvmError("EINVAL", "CPUCFG2: LASX architecturally implies LSX")


def _stable_counter() -> int:
    """The host's stable counter at 100 MHz, LoongArch's usual constant-frequency timer."""
    return time.monotonic_ns() // 10


class Vcpu:
    """One vCPU: a sparse CSR file (only written CSRs take memory), CPUCFG words, liveness,
    and the steal-time address (``vcpu->arch.st.guest_addr``)."""

    __slots__ = ("alive", "cpucfg", "csrs", "hypercalls", "raises", "steal_gpa", "vcpu_id", "vm")

    def __init__(self, vm: Vm, vcpu_id: int) -> None:
        self.vm = vm
        self.vcpu_id = vcpu_id
        self.alive = True
        # kvm_arch_vcpu_create: CRMD = DA, TMID = vcpu_id, CPUID = the unset marker, GINTC = 0.
        self.csrs: dict[int, int] = {
            CSR_CRMD: CSR_CRMD_DA,
            CSR_TMID: vcpu_id,
            CSR_CPUID: vm.max_phyid,
        }
        self.cpucfg: dict[int, int] | None = None
        # Counters for kvm.stats / lvz top: per-line raises (made on the first raise, so an
        # idle vCPU carries none) and hypercalls.
        self.raises: list[int] | None = None
        self.hypercalls = 0
        self.steal_gpa = 0

    @property
    def lines(self) -> int:
        c = self.csrs
        return _lines(c.get(CSR_ESTAT, 0), c.get(CSR_GINTC, 0))


class _Claim:
    __slots__ = ("base", "end", "handler", "owner")

    def __init__(self, base: int, size: int, handler: IoHandler, owner: str) -> None:
        self.base = base
        self.end = base + size
        self.handler = handler
        self.owner = owner


def _overrides(device: Device, hook: str) -> bool:
    """Does ``device`` do anything on ``hook``, or is it ``Device``'s empty default?"""
    return getattr(getattr(device, hook), "__func__", None) is not getattr(Device, hook)


class _DeviceRecord:
    """A device, the plugin it came from, and which vCPU/phyid hooks it implements.

    A VM of 65,536 vCPUs calls every device's ``vcpu_created`` and ``phyid_set`` once per vCPU,
    each under a ``PluginGuard``; most chips keep no per-vCPU state and inherit the empty
    defaults, so those calls (and their guards) are skipped. A broken device still gets its
    guard, which refuses the request exactly as before.
    """

    __slots__ = (
        "broken",
        "device",
        "on_phyid_dropped",
        "on_phyid_set",
        "on_vcpu_created",
        "on_vcpu_destroyed",
        "plugin",
        "type_name",
    )

    def __init__(self, device: Device, type_name: str, plugin: str) -> None:
        self.device = device
        self.type_name = type_name
        self.plugin = plugin
        self.on_vcpu_created = _overrides(device, "vcpu_created")
        self.on_vcpu_destroyed = _overrides(device, "vcpu_destroyed")
        self.on_phyid_set = _overrides(device, "phyid_set")
        self.on_phyid_dropped = _overrides(device, "phyid_dropped")
        self.broken = ""  # why the device answers EIO until destroyed; "" while healthy


class VcpuBudget:
    """vCPUs of all VMs together (``--max-total-vcpus``): named VMs outlive their connections,
    so per-VM and per-connection limits alone let one client fill memory with VMs. A counter
    kept by create and free, so the check is O(1) whatever the daemon holds."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class Vm:
    """A VM: what KVM keeps per ``struct kvm`` that matters for identity and routing.

    Its chips never see it: they get ``chip_api``, a ``ChipApi`` facade (lvz.plugins.api's
    ``VmApi``), built over the methods in the "what chips use" section.
    """

    def __init__(
        self,
        host: PluginHost,
        *,
        name: str | None,
        max_phyid: int,
        max_vcpus: int | None = None,
        profile: str = DEFAULT_PROFILE,
        budget: VcpuBudget | None = None,
    ) -> None:
        self.host = host
        self.budget = budget
        self.name = name
        self.use_profile(profile)
        self._max_phyid = max_phyid
        self.max_vcpu_id = max(256, max_phyid)
        self.max_vcpus = self.max_vcpu_id if max_vcpus is None else min(max_vcpus, self.max_vcpu_id)
        self.vcpus: dict[int, Vcpu] = {}
        self.phyids: dict[int, Vcpu] = {}
        #: ``vm.phyid_map``'s entries, (phyid, vcpu_id) in phyid order, kept as CPUIDs are set
        #: and dropped, so that even a 65,536-vCPU VM's map is ready to encode rather than
        #: 10-20 ms to sort and build (mostly pointer-chasing through 65,536 vCPUs). A set above
        #: every phyid (VMMs number their CPUs in order) appends; one below goes in place while
        #: the map is small, but in a map of more than ``KEEP_SORTED`` entries moving the tail
        #: would make a big VM built in random order quadratic, so the map is dropped (None)
        #: and the next read rebuilds it. A drop (an unplug) takes its entry out: one memmove.
        self.map_entries: list[tuple[int, int]] | None = []
        #: Bumped by every phyid set or drop: a rebuild that waited knows when it is stale.
        self.map_generation = 0
        self.devices: dict[str, _DeviceRecord] = {}
        self._iocsr: list[_Claim] = []
        self._mmio: list[_Claim] = []
        self._pv_features = PV_FEATURES_DEFAULT
        self._pv_features_set = False
        self.time_offset = 0
        self.seq = 0
        self.alive = True
        self.listener: LineListener | None = None
        self._constructing = ""
        #: All its chips see of this VM.
        self.chip_api = ChipApi(self)
        # Counters for kvm.stats / lvz top, bumped where the event happens (lvz/daemon/stats.py).
        self.irq_lines = 0
        self.msis = 0
        self.events_lost = 0

    def use_profile(self, profile: str) -> None:
        """Behave as kernel ``profile`` (lvz.protocol.profiles); EINVAL for an unknown name.

        Meant for a VM nothing has happened to yet: ``kvm.create_vm`` sets it before the VM
        has a handle.
        """
        self.compat = resolve_profile(profile)
        self.profile = profile

    # ---------------------------------------------------------------- lifecycle ---------------

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU."""
        if not 0 <= vcpu_id < self.max_vcpu_id:
            raise KvmError(
                "EINVAL", f"vcpu_id {vcpu_id} is out of range (0..{self.max_vcpu_id - 1})"
            )
        if vcpu_id in self.vcpus:
            raise KvmError("EEXIST", f"vCPU {vcpu_id} already exists")
        if len(self.vcpus) >= self.max_vcpus:
            raise KvmError("EINVAL", f"the VM already has its maximum of {self.max_vcpus} vCPUs")
        budget = self.budget
        if budget is not None and budget.used >= budget.limit:
            raise KvmError(
                "ENOSPC",
                f"the daemon already hosts {budget.limit} vCPUs in all its VMs (--max-total-vcpus)",
            )
        vcpu = Vcpu(self, vcpu_id)
        self.vcpus[vcpu_id] = vcpu
        try:
            for rec in list(self.devices.values()):
                if rec.on_vcpu_created or rec.broken:
                    with PluginGuard(rec.plugin, rec):
                        rec.device.vcpu_created(vcpu_id)
        except KvmError:
            # A chip refused the new vCPU: undo, so a retry does not meet EEXIST.
            del self.vcpus[vcpu_id]
            vcpu.alive = False
            raise
        if budget is not None:
            budget.used += 1
        return vcpu

    def destroy_vcpu(self, vcpu: Vcpu) -> None:
        """Hot-unplug in ``kvm_arch_vcpu_destroy`` order: drop the phyid, then free the vCPU."""
        if not vcpu.alive:
            return
        vcpu.alive = False
        self._free_vcpu(vcpu)

    def _free_vcpu(self, vcpu: Vcpu) -> None:
        self._drop_cpuid(vcpu)
        if self.vcpus.pop(vcpu.vcpu_id, None) is not None and self.budget is not None:
            self.budget.used -= 1  # given back as its memory is, not when the VM dies
        errors: list[KvmError] = []
        for rec in list(self.devices.values()):
            if not (rec.on_vcpu_destroyed or rec.broken):
                continue
            try:
                with PluginGuard(rec.plugin, rec):
                    rec.device.vcpu_destroyed(vcpu.vcpu_id)
            except KvmError as err:
                errors.append(err)
        if errors:
            # The vCPU is gone whatever a chip thought of it; report the first complaint.
            raise errors[0]

    def destroy(self) -> None:
        """``kvm_arch_destroy_vm`` in one go (see ``begin_destroy``)."""
        for _ in self.begin_destroy():
            pass

    def begin_destroy(self, chunk: int = 1024) -> Iterator[int]:
        """``kvm_arch_destroy_vm``: every vCPU (dropping its phyid), then the devices.

        The VM and all its vCPUs are dead when this returns: nothing can create, set or reach
        them any more. The teardown itself (phyid drops, the chips' ``vcpu_destroyed``) is the
        returned iterator, which yields after every ``chunk`` vCPUs so that a daemon can let
        other clients run while a 65,536-vCPU VM goes; run it to the end.
        """
        if not self.alive:
            return iter(())
        self.alive = False
        self.map_entries = None  # nobody reads it again: no entry taken out one by one
        vcpus = list(self.vcpus.values())
        for vcpu in vcpus:
            vcpu.alive = False
        return self._tear_down(vcpus, chunk)

    def _tear_down(self, vcpus: list[Vcpu], chunk: int) -> Iterator[int]:
        for done, vcpu in enumerate(vcpus, 1):
            try:
                self._free_vcpu(vcpu)
            except KvmError:
                pass  # teardown goes on; the plugin failure was logged by the guard
            if done % chunk == 0:
                yield done
        self.devices.clear()
        self._iocsr.clear()
        self._mmio.clear()

    def create_device(self, type_name: str) -> Device:
        """KVM_CREATE_DEVICE: ENODEV for an unknown type, EINVAL for a second one."""
        entry = self.host.device_types.get(type_name)
        if entry is None:
            raise KvmError("ENODEV", f"no device type {type_name!r} is loaded")
        if self.kernel_lacks(type_name):
            raise KvmError(
                "ENODEV", f"kernel {self.profile} has no in-kernel {type_name} (added in 6.13)"
            )
        dtype, plugin = entry
        if type_name in self.devices:
            raise KvmError("EINVAL", f"the VM already has a {type_name}")
        self._constructing = type_name
        try:
            with PluginGuard(plugin):
                device = dtype.factory(self.chip_api)
                if not isinstance(device, Device):
                    raise TypeError(f"factory returned {type(device).__name__}, not a Device")
        except KvmError:
            self._iocsr = [c for c in self._iocsr if c.owner != type_name]
            self._mmio = [c for c in self._mmio if c.owner != type_name]
            raise
        finally:
            self._constructing = ""
        device.type_name = type_name
        self.devices[type_name] = _DeviceRecord(device, type_name, plugin)
        return device

    def kernel_lacks(self, type_name: str) -> bool:
        """A kernel irqchip type this VM's profile predates (KVM_CREATE_DEVICE: ENODEV)."""
        return type_name in _KERNEL_TYPES and type_name not in self.compat["kernel_device_types"]

    # ---------------------------------------------------------------- the phyid map -----------

    def set_cpuid(self, vcpu: Vcpu, val: int) -> None:
        """``kvm_set_cpuid``: set once, same value again is a no-op, never changed or shared."""
        limit = self._max_phyid
        if val >= limit:  # checked before taking the lock, as the kernel does
            raise KvmError("EINVAL", f"CPUID {val} is out of range (0..{limit - 1})")
        cur = vcpu.csrs[CSR_CPUID]
        if cur < limit and self.phyids.get(cur) is not None:
            if cur == val:
                return  # the same value again (VMMs re-put every register): a no-op
            raise KvmError(
                "EINVAL", f"vCPU {vcpu.vcpu_id} already has CPUID {cur}; a CPUID cannot change"
            )
        owner = self.phyids.get(val)
        if owner is not None:
            if owner is vcpu:
                return
            raise KvmError("EINVAL", f"CPUID {val} belongs to vCPU {owner.vcpu_id}")
        vcpu.csrs[CSR_CPUID] = val
        self.phyids[val] = vcpu
        self.map_generation += 1
        entries = self.map_entries
        if entries is not None:
            if not entries or entries[-1][0] < val:
                entries.append((val, vcpu.vcpu_id))
            elif len(entries) < KEEP_SORTED:
                entries.insert(bisect_left(entries, (val,)), (val, vcpu.vcpu_id))
            else:
                self.map_entries = None
        for rec in list(self.devices.values()):
            if rec.on_phyid_set or rec.broken:
                with PluginGuard(rec.plugin, rec):
                    rec.device.phyid_set(vcpu.vcpu_id, val)

    def cpuid_unchanged(self, vcpu: Vcpu, val: int) -> bool:
        """Would ``set_cpuid(vcpu, val)`` change nothing (the value it already holds)?

        The daemon asks before taking the VM's map lock: VMMs re-put every register, and the
        answer is what the locked path would give, since entries change only under the lock.
        """
        return vcpu.csrs[CSR_CPUID] == val and self.phyids.get(val) is vcpu

    def _drop_cpuid(self, vcpu: Vcpu) -> None:
        """``kvm_drop_cpuid``: the owner is not checked, as in the kernel."""
        cur = vcpu.csrs[CSR_CPUID]
        if cur >= self._max_phyid:
            return  # never set
        if self.phyids.pop(cur, None) is None:
            return
        self.map_generation += 1
        entries = self.map_entries
        if entries is not None:
            at = bisect_left(entries, (cur,))
            if at < len(entries) and entries[at][0] == cur:
                del entries[at]
            else:  # cannot be: the map had it. Keep nothing rather than something wrong
                self.map_entries = None
        vcpu.csrs[CSR_CPUID] = self._max_phyid
        for rec in list(self.devices.values()):
            if not (rec.on_phyid_dropped or rec.broken):
                continue
            try:
                with PluginGuard(rec.plugin, rec):
                    rec.device.phyid_dropped(vcpu.vcpu_id, cur)
            except KvmError:
                pass  # logged; the drop itself must happen whatever a chip says

    # ---------------------------------------------------------------- registers ---------------

    def get_one_reg(self, vcpu: Vcpu, reg_id: int) -> int:
        cls, index = abi.decode(reg_id)
        if cls is abi.RegClass.CSR:
            return self._get_csr(vcpu, index)
        if cls is abi.RegClass.CPUCFG:
            return vcpu.cpucfg.get(index, 0) if vcpu.cpucfg else 0
        if reg_id == abi.COUNTER:
            return (_stable_counter() + self.time_offset) & U64_MAX
        if reg_id == abi.DEBUG_INST:
            return INSN_HVCL | KVM_HCALL_SWDBG
        raise KvmError("EINVAL", f"KVM register {reg_id:#x} cannot be read")

    def reg_list(self, vcpu: Vcpu) -> list[int]:
        """KVM_GET_REG_LIST's answer: every register that holds state, in a restorable order.

        Only CSRs that were ever written take memory, so they are the ones listed; CPUCFG words
        likewise, and the board counter (whose offset only vCPU 0 can set).
        """
        ids = [abi.csr_id(i) for i in sorted(vcpu.csrs)]
        if vcpu.cpucfg:
            ids += [abi.cpucfg_id(i) for i in sorted(vcpu.cpucfg)]
        if vcpu.vcpu_id == 0:
            ids.append(abi.COUNTER)
        return ids

    def set_one_reg(self, vcpu: Vcpu, reg_id: int, value: int) -> None:
        cls, index = abi.decode(reg_id)
        if cls is abi.RegClass.CSR:
            self._set_csr(vcpu, index, value)
        elif cls is abi.RegClass.CPUCFG:
            _check_cpucfg(index, value)
            if vcpu.cpucfg is None:
                vcpu.cpucfg = {}
            vcpu.cpucfg[index] = value
        elif reg_id == abi.COUNTER:
            # The counter is board-wide: only vCPU 0 sets the offset, as in the kernel.
            if vcpu.vcpu_id == 0:
                self.time_offset = value - _stable_counter()
        elif reg_id == abi.VCPU_RESET:
            # Clears pending and injected interrupts and the steal-time address
            # (kvm_set_one_reg: st.guest_addr = 0); CPUID is deliberately left alone.
            self._set_lines(vcpu, 0, 0)
            vcpu.steal_gpa = 0
        else:
            raise KvmError("EINVAL", f"KVM register {reg_id:#x} cannot be written")

    def _get_csr(self, vcpu: Vcpu, index: int) -> int:
        c = vcpu.csrs
        if index == CSR_ESTAT:
            return c.get(CSR_ESTAT, 0) | ((c.get(CSR_GINTC, 0) & _HWIS) << _HWI_SHIFT)
        return c.get(index, 0)

    def _set_csr(self, vcpu: Vcpu, index: int, value: int) -> None:
        """``_kvm_setcsr``: CPUID through the map, ESTAT split and OR-ed, the rest raw."""
        c = vcpu.csrs
        if index == CSR_CPUID:
            self.set_cpuid(vcpu, value)
        elif index == CSR_ESTAT:
            self._set_lines(
                vcpu,
                c.get(CSR_ESTAT, 0) | (value & ~(_HWIS << _HWI_SHIFT)),
                c.get(CSR_GINTC, 0) | ((value >> _HWI_SHIFT) & _HWIS),
            )
        elif index == CSR_GINTC:
            self._set_lines(vcpu, c.get(CSR_ESTAT, 0), value)
        else:
            c[index] = value

    def csr_xchg(self, vcpu: Vcpu, index: int, value: int, mask: int) -> int:
        """A guest ``csrxchg``: only what the architecture lets a guest write changes."""
        if index >= CSR_MAX_NUMS:
            raise KvmError("EINVAL", f"CSR index {index:#x} is out of range (< {CSR_MAX_NUMS:#x})")
        old = self._get_csr(vcpu, index)
        if not mask or index in (CSR_CPUID, CSR_GINTC):
            return old  # CPUID is read-only to a guest; GINTC is the hypervisor's
        c = vcpu.csrs
        if index == CSR_ESTAT:
            w = mask & GUEST_WRITABLE_ESTAT
            estat = c.get(CSR_ESTAT, 0)
            self._set_lines(vcpu, (estat & ~w) | (value & w), c.get(CSR_GINTC, 0))
        else:
            c[index] = (old & ~mask) | (value & mask)
        return old

    # ---------------------------------------------------------------- interrupt lines ---------

    def _set_lines(self, vcpu: Vcpu, estat: int, gintc: int) -> None:
        c = vcpu.csrs
        old = _lines(c.get(CSR_ESTAT, 0), c.get(CSR_GINTC, 0))
        c[CSR_ESTAT] = estat
        c[CSR_GINTC] = gintc
        changed = old ^ _lines(estat, gintc)
        while changed:
            bit = changed & -changed
            changed ^= bit
            self.seq += 1
            irq = bit.bit_length() - 1
            if not old & bit:
                raises = vcpu.raises
                if raises is None:
                    raises = vcpu.raises = [0] * EXCCODE_INT_NUM
                raises[irq] += 1
            listener = self.listener
            if listener is not None:
                listener(self, vcpu.vcpu_id, irq, 0 if old & bit else 1, self.seq)

    def interrupt(self, vcpu: Vcpu, irq: int) -> None:
        """KVM_INTERRUPT: > 0 queues, < 0 dequeues; 0 and |irq| >= 15 are EINVAL (decision 2)."""
        if irq == 0 or abs(irq) >= EXCCODE_INT_NUM:
            raise KvmError("EINVAL", f"interrupt {irq} is not 1..14 or -1..-14")
        if irq > 0:
            self._queue(vcpu, irq)
        else:
            self._dequeue(vcpu, -irq)

    def _queue(self, vcpu: Vcpu, irq: int) -> None:
        c = vcpu.csrs
        if INT_HWI0 <= irq <= INT_HWI7:
            gintc = c.get(CSR_GINTC, 0)
            if not gintc & (1 << (irq - INT_HWI0)):
                self._set_lines(vcpu, c.get(CSR_ESTAT, 0), gintc | (1 << (irq - INT_HWI0)))
        elif (1 << irq) & _ESTAT_LINES:
            estat = c.get(CSR_ESTAT, 0)
            if not estat & (1 << irq):
                self._set_lines(vcpu, estat | (1 << irq), c.get(CSR_GINTC, 0))
        # PCOV, NMI and AVEC are consumed without a line (kvm_deliver_intr).

    def _dequeue(self, vcpu: Vcpu, irq: int) -> None:
        c = vcpu.csrs
        if INT_HWI0 <= irq <= INT_HWI7:
            gintc = c.get(CSR_GINTC, 0)
            if gintc & (1 << (irq - INT_HWI0)):
                self._set_lines(vcpu, c.get(CSR_ESTAT, 0), gintc & ~(1 << (irq - INT_HWI0)))
        elif (1 << irq) & _ESTAT_LINES:
            estat = c.get(CSR_ESTAT, 0)
            if estat & (1 << irq):
                self._set_lines(vcpu, estat & ~(1 << irq), c.get(CSR_GINTC, 0))

    # ---------------------------------------------------------------- vCPU attrs, hypercalls --

    def _pv_feature_mask(self, group: int, attr: int) -> int:
        """The PV features this kernel lets a VMM set; ENXIO where it has no such control."""
        mask: int | None = self.compat["pv_feature_mask"]
        if mask is None:
            raise KvmError(
                "ENXIO",
                f"no vCPU attribute group {group:#x} attr {attr:#x}: kernel "
                f"{self.profile} has no PV feature control (6.12)",
            )
        return mask

    def _check_pvtime(self, group: int, attr: int) -> None:
        """``kvm_loongarch_pvtime_has_attr``: steal time on (6.12+: the PV feature) and GPA."""
        mode = self.compat["steal_time"]
        if mode is None:
            raise KvmError(
                "ENXIO",
                f"no vCPU attribute group {group:#x}: kernel {self.profile} "
                f"has no steal time (6.11)",
            )
        if mode == "gated" and not self._pv_features & abi.KVM_FEATURE_STEAL_TIME:
            raise KvmError(
                "ENXIO", "steal time is not among the VM's PV features (KVM_FEATURE_STEAL_TIME)"
            )
        if attr != KVM_LOONGARCH_VCPU_PVTIME_GPA:
            raise KvmError("ENXIO", f"no PVTIME attribute {attr:#x}")

    def set_vcpu_attr(self, vcpu: Vcpu, group: int, attr: int, value: int) -> None:
        if group == KVM_LOONGARCH_VCPU_PVTIME_CTRL:
            self._check_pvtime(group, attr)
            if value & ~(KVM_STEAL_PHYS_MASK | KVM_STEAL_PHYS_VALID):
                raise KvmError(
                    "EINVAL",
                    f"steal-time address {value:#x} has bits outside "
                    f"KVM_STEAL_PHYS_MASK | KVM_STEAL_PHYS_VALID",
                )
            # The kernel also wants a VALID address inside a memslot; lvz has no guest memory,
            # so every well-formed address is accepted (SEMANTICS "Decisions for lvz").
            vcpu.steal_gpa = value
            return
        if group != KVM_LOONGARCH_VCPU_CPUCFG or attr != CPUCFG_KVM_FEATURE:
            raise KvmError("ENXIO", f"no vCPU attribute group {group:#x} attr {attr:#x}")
        mask = self._pv_feature_mask(group, attr)
        if value & ~mask:
            raise KvmError(
                "EINVAL",
                f"PV feature bits {value & ~mask:#x} are not supported "
                f"by kernel {self.profile} (mask {mask:#x})",
            )
        if self._pv_features_set and self._pv_features != value:
            raise KvmError(
                "EINVAL",
                f"every vCPU must set the same PV features; they are "
                f"already {self._pv_features:#x}",
            )
        self._pv_features = value
        self._pv_features_set = True

    def get_vcpu_attr(self, vcpu: Vcpu, group: int, attr: int) -> int:
        if group == KVM_LOONGARCH_VCPU_PVTIME_CTRL:
            self._check_pvtime(group, attr)
            return vcpu.steal_gpa
        if group != KVM_LOONGARCH_VCPU_CPUCFG or attr != CPUCFG_KVM_FEATURE:
            raise KvmError("ENXIO", f"no vCPU attribute group {group:#x} attr {attr:#x}")
        self._pv_feature_mask(group, attr)
        return self._pv_features

    def hypercall(self, vcpu: Vcpu, code: int, args: list[int]) -> int:
        """``hvcl code``: plugins decide (firstresult); nobody answering is INVALID_CODE."""
        vcpu.hypercalls += 1
        a = [x & U64_MAX for x in args] + [0] * (6 - len(args))
        result, plugin = self.host.call_first(
            "lvz_hypercall", vm=self.chip_api, vcpu_id=vcpu.vcpu_id, code=code, args=a
        )
        if result is None:
            return KVM_HCALL_INVALID_CODE
        if type(result) is not int:
            raise plugin_failure(plugin, TypeError(f"lvz_hypercall returned {result!r}"))
        result &= U64_MAX
        return result - (1 << 64) if result >> 63 else result

    # ---------------------------------------------------------------- guest I/O ---------------

    def _claim_guard(self, claim: _Claim) -> PluginGuard:
        rec = self.devices.get(claim.owner)
        return PluginGuard(rec.plugin, rec) if rec else PluginGuard(claim.owner)

    @staticmethod
    def _find(table: list[_Claim], addr: int, size: int) -> _Claim | None:
        for claim in table:
            if claim.base <= addr and addr + size <= claim.end:
                return claim
        return None

    def _route(self, space: str, addr: int, size: int) -> tuple[_Claim, int]:
        """The claim an access lands in and its offset there (the kernel's io bus lookup).

        IOCSR addresses are 32 bits (``kvm_emu_iocsr``: ``u32 addr``); MMIO addresses are the
        whole 64-bit guest-physical address (``kvm_emu_mmio_read``/``_write`` route
        ``vcpu->arch.badv``), so an access 4 GiB above a window misses it.
        """
        if size not in ACCESS_SIZES:
            raise KvmError("EINVAL", f"access size {size} is not 1, 2, 4 or 8")
        if space == "iocsr":
            addr &= U32_MAX
        claim = self._find(self._iocsr if space == "iocsr" else self._mmio, addr, size)
        if claim is None:
            raise Unclaimed(space, addr, size)
        return claim, addr - claim.base

    def _declined(self, space: str, addr: int, size: int, exc: Unhandled) -> Unclaimed:
        """A chip did not decode the access: before 7.0 it goes on as if nobody claimed it
        (the chip returns -EINVAL, so KVM exits to the VMM)."""
        err = Unclaimed(space, addr & U32_MAX if space == "iocsr" else addr, size)
        err.message += f" ({exc}; kernel {self.profile} passes it on to the VMM)"
        return err

    def guest_load(self, space: str, vcpu_id: int, addr: int, size: int) -> int:
        """The one guest-load path (protocol and chips alike): zero-extended to ``size``."""
        claim, offset = self._route(space, addr, size)
        with self._claim_guard(claim):
            try:
                raw = claim.handler.read(vcpu_id, offset, size)
            except Unhandled as exc:
                if not self.compat["io_default_return_zero"]:
                    raise self._declined(space, addr, size, exc) from None
                raw = 0  # 2faec60a4858: the chip returns 0 and the load reads 0
            if type(raw) is not int:
                raise TypeError(f"read returned {raw!r}, not an int")
        return raw & ((1 << (8 * size)) - 1)

    def guest_store(self, space: str, vcpu_id: int, addr: int, size: int, value: int) -> None:
        """The one guest-store path (protocol and chips alike)."""
        claim, offset = self._route(space, addr, size)
        with self._claim_guard(claim):
            try:
                claim.handler.write(vcpu_id, offset, size, value)
            except Unhandled as exc:
                if not self.compat["io_default_return_zero"]:
                    raise self._declined(space, addr, size, exc) from None

    def guest_read(self, space: str, vcpu: Vcpu, addr: int, size: int) -> int:
        """A guest load by ``vcpu``: ``guest_load``, sign-extended to 64 bits (decision 7).

        Profiles before 6.18 zero-extend: there the device wrote ``len`` bytes into the
        register and the bytes above kept their old value, which lvz, having no register
        file, shows as 0 (SEMANTICS "Kernel-version profiles", 6.14).
        """
        raw = self.guest_load(space, vcpu.vcpu_id, addr, size)
        bits = 8 * size
        if raw >> (bits - 1) and self.compat["sign_extend_loads"]:
            raw |= U64_MAX ^ ((1 << bits) - 1)
        return raw

    def guest_write(self, space: str, vcpu: Vcpu, addr: int, size: int, value: int) -> None:
        """A guest store by ``vcpu``."""
        self.guest_store(space, vcpu.vcpu_id, addr, size, value)

    def device_call(self, device: Device, method: str, *args: int) -> Any:
        """Call a device's attr / input method under its plugin's guard."""
        rec = self.devices.get(device.type_name)
        with PluginGuard(rec.plugin, rec) if rec else PluginGuard(device.type_name):
            return getattr(device, method)(*args)

    # ---------------------------------------------------------------- what chips use ---------

    @property
    def max_phyid(self) -> int:
        return self._max_phyid

    @property
    def pv_features(self) -> int:
        return self._pv_features

    def vcpu_by_phyid(self, phyid: int) -> int | None:
        """``kvm_get_vcpu_by_cpuid`` (newest: negative and >= limit find nobody, because only
        valid phyids are ever keys); the one lookup for the protocol and the chips alike.

        Before 7.0 a negative CPUID indexed ``phys_map[cpuid]`` out of bounds (fixed by
        2db06c15d8c7): undefined behaviour, so EINVAL (decision 2).
        """
        if phyid < 0 and not self.compat["negative_cpuid_check"]:
            raise KvmError(
                "EINVAL",
                f"kvm_get_vcpu_by_cpuid({phyid}): kernel {self.profile} "
                f"reads phys_map[{phyid}] out of bounds (undefined; "
                f"fixed by 2db06c15d8c7 in 7.0)",
            )
        vcpu = self.phyids.get(phyid)
        return None if vcpu is None else vcpu.vcpu_id

    def queue_irq(self, vcpu_id: int, irq: int) -> None:
        vcpu = self.vcpus.get(vcpu_id)
        if vcpu is not None and 0 <= irq < EXCCODE_INT_NUM:
            self._queue(vcpu, irq)

    def dequeue_irq(self, vcpu_id: int, irq: int) -> None:
        vcpu = self.vcpus.get(vcpu_id)
        if vcpu is not None and 0 <= irq < EXCCODE_INT_NUM:
            self._dequeue(vcpu, irq)

    def claim(self, space: str, base: int, size: int, handler: IoHandler) -> None:
        """Route ``space`` accesses in [base, base+size) to ``handler``; EEXIST on overlap."""
        table = self._iocsr if space == "iocsr" else self._mmio
        owner = (
            self._constructing
            or next((c.owner for c in table if c.handler is handler), "")
            or getattr(handler, "type_name", "")
        )
        rest = [c for c in table if c.handler is not handler]
        for c in rest:
            if base < c.end and c.base < base + size:
                raise KvmError(
                    "EEXIST",
                    f"{space.upper()} [{base:#x}, {base + size:#x}) overlaps {c.owner}'s range",
                )
        rest.append(_Claim(base, size, handler, owner))
        table[:] = rest

    def set_chip_input(self, device_type: str, line: int, level: int) -> None:
        rec = self.devices.get(device_type)
        if rec is None:
            raise KvmError("ENXIO", f"the VM has no {device_type}")
        with PluginGuard(rec.plugin, rec):
            rec.device.set_input(line, level)

    def set_steal_time(self, vcpu_id: int, gpa: int) -> None:
        vcpu = self.vcpus.get(vcpu_id)
        if vcpu is not None:
            vcpu.steal_gpa = gpa & U64_MAX


class ChipApi:
    """The ``VmApi`` a VM's chips and hypercall handlers receive: the VM, narrowed.

    A chip sees a phyid lookup, vCPU ids, line queue/dequeue, range claims, another chip's
    input, the PV feature word and IOCSR accesses as another vCPU, and nothing else of the
    ``Vm`` (no registers, no map mutation, no devices, no host). One per VM, made with it.
    """

    __slots__ = ("_vm",)

    def __init__(self, vm: Vm) -> None:
        self._vm = vm

    @property
    def max_phyid(self) -> int:
        return self._vm.max_phyid

    @property
    def pv_features(self) -> int:
        return self._vm.pv_features

    def compat(self, key: str) -> Any:
        return self._vm.compat.get(key)

    def set_steal_time(self, vcpu_id: int, gpa: int) -> None:
        self._vm.set_steal_time(vcpu_id, gpa)

    def vcpu_by_phyid(self, phyid: int) -> int | None:
        return self._vm.vcpu_by_phyid(phyid)

    def vcpu_exists(self, vcpu_id: int) -> bool:
        return vcpu_id in self._vm.vcpus

    def vcpu_ids(self) -> list[int]:
        return sorted(self._vm.vcpus)

    def queue_irq(self, vcpu_id: int, irq: int) -> None:
        self._vm.queue_irq(vcpu_id, irq)

    def dequeue_irq(self, vcpu_id: int, irq: int) -> None:
        self._vm.dequeue_irq(vcpu_id, irq)

    def claim_iocsr(self, base: int, size: int, handler: IoHandler) -> None:
        self._vm.claim("iocsr", base, size, handler)

    def claim_mmio(self, base: int, size: int, handler: IoHandler) -> None:
        self._vm.claim("mmio", base, size, handler)

    def set_chip_input(self, device_type: str, line: int, level: int) -> None:
        self._vm.set_chip_input(device_type, line, level)

    def iocsr_read(self, vcpu_id: int, addr: int, size: int) -> int:
        return self._vm.guest_load("iocsr", vcpu_id, addr, size)

    def iocsr_write(self, vcpu_id: int, addr: int, size: int, value: int) -> None:
        self._vm.guest_store("iocsr", vcpu_id, addr, size, value)
