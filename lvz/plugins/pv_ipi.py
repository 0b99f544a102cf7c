"""The paravirt service hypercall, ``hvcl 0x100``: PV IPI (a0 = KVM_HCALL_FUNC_IPI, SEMANTICS.md
§7) and steal-time registration (a0 = KVM_HCALL_FUNC_NOTIFY).

Follows the newest upstream ``kvm_handle_service`` and ``kvm_send_pv_ipi`` in
arch/loongarch/kvm/exit.c:

* The call is honoured only while the VM's PV features include KVM_FEATURE_IPI; otherwise it is
  KVM_HCALL_INVALID_CODE and nothing is sent (6.10 had no such gate and always sent).
* a1 and a2 form a 128-bit bitmap relative to the base CPUID ``min`` = (u32) a3: bit k of a1 is
  ``min + k`` and bit k of a2 is ``min + 64 + k``, with unsigned 32-bit wraparound. The sum is then
  passed to ``kvm_get_vcpu_by_cpuid(int)``, so a sum of 2^31 or more is a negative CPUID and finds
  nobody, like any unmapped or out-of-range CPUID: such bits are skipped and the call still
  succeeds.
* Each target gets INT_SWI0; the host never lowers it (the guest clears ESTAT.SWI0 itself).
* FUNC_NOTIFY is steal-time registration (``kvm_save_notify``): with KVM_FEATURE_STEAL_TIME,
  a1 = BIT(KVM_FEATURE_STEAL_TIME) stores a2 as the caller's steal-time address and answers 0
  (a2 with bits outside KVM_STEAL_PHYS_MASK | KVM_STEAL_PHYS_VALID: INVALID_PARAMETER); any
  other a1 is INVALID_CODE. lvz has no guest memory, so nothing is ever written there: the
  address is state, read back through the PVTIME vCPU attr and kept in snapshots.

Kernel profiles (``vm.compat``): before 6.12 there is no PV feature control, so neither
function is gated; 6.11's ``kvm_save_notify`` answers 0 for an unknown a1; 6.10 has no steal
time (FUNC_NOTIFY is an unknown function, INVALID_CODE); before 7.0 a bitmap bit whose CPUID is
negative as an int reads out of bounds in the kernel, and the VM's lookup refuses it (EINVAL,
nothing sent). Hypercall codes other than KVM_HCALL_SERVICE are left to the daemon (None), which
answers -1.
"""

from __future__ import annotations

from lvz.plugins.api import VmApi
from lvz.plugins.hookspecs import hookimpl
from lvz.protocol.abi import (
    INT_SWI0,
    KVM_FEATURE_IPI,
    KVM_FEATURE_STEAL_TIME,
    KVM_HCALL_FUNC_IPI,
    KVM_HCALL_FUNC_NOTIFY,
    KVM_HCALL_INVALID_CODE,
    KVM_HCALL_INVALID_PARAMETER,
    KVM_HCALL_SERVICE,
    KVM_HCALL_SUCCESS,
    KVM_STEAL_PHYS_MASK,
    KVM_STEAL_PHYS_VALID,
    U32_MAX,
    U64_MAX,
)

__all__ = ["lvz_hypercall", "save_notify", "send_pv_ipi"]

_NEGATIVE_CPUID = 1 << 31


def send_pv_ipi(vm: VmApi, a1: int, a2: int, a3: int) -> None:
    """Queue INT_SWI0 on every vCPU the bitmap names.

    Walks only the set bits (``w & -w``): a guest sending to 128 CPUs makes 128 lookups, not a
    scan, which is what keeps large fan-outs cheap. Every lookup is made before any IPI is
    queued, so a lookup the VM refuses (a negative CPUID before 7.0) sends nothing.
    """
    base = a3 & U32_MAX
    targets: list[int] = []
    for word in (a1 & U64_MAX, a2 & U64_MAX):
        while word:
            low = word & -word
            word ^= low
            cpuid = (base + low.bit_length() - 1) & U32_MAX
            if cpuid >= _NEGATIVE_CPUID:
                # kvm_get_vcpu_by_cpuid takes an int: 2^31 and up are negative there, and find
                # nobody since 7.0 (so lvz skips the lookup); older kernels looked them up.
                if vm.compat("negative_cpuid_check"):
                    continue
                cpuid -= 1 << 32
            target = vm.vcpu_by_phyid(cpuid)
            if target is not None:
                targets.append(target)
        base = (base + 64) & U32_MAX
    for target in targets:
        vm.queue_irq(target, INT_SWI0)


def save_notify(vm: VmApi, vcpu_id: int, a1: int, a2: int) -> int:
    """``kvm_save_notify``: register the caller's steal-time address."""
    if a1 & U64_MAX != KVM_FEATURE_STEAL_TIME:
        # 6.11 fell out of its switch and answered 0; 6.12 made it INVALID_CODE.
        return KVM_HCALL_SUCCESS if vm.compat("steal_time") == "ungated" else KVM_HCALL_INVALID_CODE
    data = a2 & U64_MAX
    if data & ~(KVM_STEAL_PHYS_MASK | KVM_STEAL_PHYS_VALID):
        return KVM_HCALL_INVALID_PARAMETER
    vm.set_steal_time(vcpu_id, data)
    return KVM_HCALL_SUCCESS


def _gated(vm: VmApi, feature: int) -> bool:
    """Whether the VM's PV features lack ``feature`` on a kernel that gates on them (6.12+)."""
    return vm.compat("pv_feature_mask") is not None and not vm.pv_features & feature


@hookimpl
def lvz_hypercall(vm: VmApi, vcpu_id: int, code: int, args: list[int]) -> int | None:
    """Answer KVM_HCALL_SERVICE (``kvm_handle_service``).

    The PV IPI ignores ``vcpu_id`` on purpose: the kernel addresses its targets by CPUID only,
    so the caller is just another bit in the bitmap (self-IPI works). FUNC_NOTIFY stores the
    caller's own steal-time address. The feature word is read per call because the VMM may set
    it after the VM is created.
    """
    if code != KVM_HCALL_SERVICE:
        return None
    func = args[0]
    if func == KVM_HCALL_FUNC_IPI:
        if _gated(vm, KVM_FEATURE_IPI):
            return KVM_HCALL_INVALID_CODE
        send_pv_ipi(vm, args[1], args[2], args[3])
        return KVM_HCALL_SUCCESS
    if func == KVM_HCALL_FUNC_NOTIFY:
        if vm.compat("steal_time") is None or _gated(vm, KVM_FEATURE_STEAL_TIME):
            return KVM_HCALL_INVALID_CODE
        return save_notify(vm, vcpu_id, args[1], args[2])
    return KVM_HCALL_INVALID_CODE
