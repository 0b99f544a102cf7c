"""The paravirt IPI hypercall, ``hvcl 0x100`` with a0 = KVM_HCALL_FUNC_IPI (SEMANTICS.md §7).

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

Not modelled: KVM_HCALL_FUNC_NOTIFY (steal-time registration) needs guest memory, which lvz does
not have, so it answers KVM_HCALL_INVALID_CODE like any other unknown function. Hypercall codes
other than KVM_HCALL_SERVICE are left to the daemon (None), which answers -1.
"""

from __future__ import annotations

from lvz.plugins.api import VmApi
from lvz.plugins.hookspecs import hookimpl
from lvz.protocol.abi import (
    INT_SWI0,
    KVM_FEATURE_IPI,
    KVM_HCALL_FUNC_IPI,
    KVM_HCALL_INVALID_CODE,
    KVM_HCALL_SERVICE,
    KVM_HCALL_SUCCESS,
    U32_MAX,
    U64_MAX,
)

__all__ = ["lvz_hypercall", "send_pv_ipi"]

_NEGATIVE_CPUID = 1 << 31


def send_pv_ipi(vm: VmApi, a1: int, a2: int, a3: int) -> None:
    """Queue INT_SWI0 on every vCPU the bitmap names.

    Walks only the set bits (``w & -w``): a guest sending to 128 CPUs makes 128 lookups, not a
    scan, which is what keeps large fan-outs cheap.
    """
    base = a3 & U32_MAX
    for word in (a1 & U64_MAX, a2 & U64_MAX):
        while word:
            low = word & -word
            word ^= low
            cpuid = (base + low.bit_length() - 1) & U32_MAX
            if cpuid >= _NEGATIVE_CPUID:
                continue
            target = vm.vcpu_by_phyid(cpuid)
            if target is not None:
                vm.queue_irq(target, INT_SWI0)
        base = (base + 64) & U32_MAX


@hookimpl
def lvz_hypercall(vm: VmApi, vcpu_id: int, code: int, args: list[int]) -> int | None:
    """Answer KVM_HCALL_SERVICE for every caller alike.

    ``vcpu_id`` is unused on purpose: the kernel addresses PV IPI targets by CPUID only, so the
    caller is just another bit in the bitmap (self-IPI works). The feature word is read per call
    because the VMM may set it after the VM is created.
    """
    if code != KVM_HCALL_SERVICE:
        return None
    if args[0] != KVM_HCALL_FUNC_IPI or not vm.pv_features & KVM_FEATURE_IPI:
        return KVM_HCALL_INVALID_CODE
    send_pv_ipi(vm, args[1], args[2], args[3])
    return KVM_HCALL_SUCCESS
