"""Kernel-version profiles: which LoongArch KVM a VM behaves as (``kvm.create_vm`` ``profile``).

Data, not code paths: QEMU's machine-type compat tables are the model (``hw_compat_X_Y`` in
hw/core/machine.c). ``NEWEST`` is the behaviour of the newest kernel lvz describes, one value per
*key*; each profile lists only the rows in which it differs from the next-newer profile, and each
row cites the kernel change that brought the newer behaviour. A profile's behaviour is ``NEWEST``
with the rows of every profile from the newest down to itself applied in order, so "6.10" is
"6.11" plus one row, and a fix backported to an older profile is one row moved.

The daemon and the chips read a VM's resolved table by key (``VmApi.compat``); nothing in lvz
tests a version number. SEMANTICS.md "Kernel-version profiles" has a section per profile.

Keys:

* ``kernel_device_types``: the in-kernel irqchip types KVM_CREATE_DEVICE knows; the others
  answer ENODEV. Plugin types that are not kernel devices are offered in every profile.
* ``irqchip_ioctls``: KVM_IRQ_LINE and KVM_SIGNAL_MSI exist (CONFIG_HAVE_KVM_IRQCHIP / _MSI);
  without them both answer ENOTTY, as ``kvm_arch_vm_ioctl``'s -ENOIOCTLCMD reaches user space.
* ``pv_feature_mask``: the PV feature bits a VMM may set through CPUCFG_KVM_FEATURE; ``None``
  means the kernel has no PV feature control at all (the attr is ENXIO, PV IPI is not gated).
* ``steal_time``: FUNC_NOTIFY / the PVTIME vCPU attr. ``"gated"`` (6.12+: needs
  KVM_FEATURE_STEAL_TIME, an unknown a1 is INVALID_CODE), ``"ungated"`` (6.11: always on, an
  unknown a1 answers 0), ``None`` (6.10: no steal time).
* ``sign_extend_loads``: guest loads served by an in-kernel device are sign-extended from the
  access width (6.18); before, the device wrote ``len`` bytes into the register.
* ``negative_cpuid_check``: ``kvm_get_vcpu_by_cpuid`` refuses a negative CPUID (7.0); before,
  it indexed ``phys_map[cpuid]`` out of bounds.
* ``eiointc_empty_coremap_fix``: an empty EIOINTC coremap byte names CPU 0 (7.0); before,
  ``ffs(0) - 1`` = -1 was looked up as a CPUID.
* ``io_default_return_zero``: an access an in-kernel irqchip does not decode (unaligned, unknown
  offset, read-only register) reads 0 and ignores the write (7.0); before, the chip returned
  -EINVAL and KVM passed the access on to the VMM, as for an address nobody claims.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from .abi import (
    DEV_EIOINTC,
    DEV_IPI,
    DEV_PCHPIC,
    KVM_FEATURE_CRASH,
    KVM_FEATURE_IPI,
    KVM_FEATURE_PREEMPT,
    KVM_FEATURE_STEAL_TIME,
    KVM_FEATURE_USER_HCALL,
    KVM_FEATURE_VIRT_EXTIOI,
    PV_FEATURE_MASK,
)
from .errors import KvmError

__all__ = ["COMPAT", "DEFAULT", "NEWEST", "PROFILES", "SUMMARY", "Row", "resolve", "rows_of"]


@dataclass(frozen=True, slots=True)
class Row:
    """One difference: in this profile (and older, until a row says otherwise) ``key`` is
    ``value``; ``change`` is the kernel commit or release that brought the next-newer value."""

    key: str
    value: Any
    change: str


#: The newest kernel lvz describes (SEMANTICS.md "Decisions for lvz" 1).
NEWEST: Final[Mapping[str, Any]] = MappingProxyType(
    {
        "kernel_device_types": (DEV_IPI, DEV_EIOINTC, DEV_PCHPIC),
        "irqchip_ioctls": True,
        "pv_feature_mask": PV_FEATURE_MASK,
        "steal_time": "gated",
        "sign_extend_loads": True,
        "negative_cpuid_check": True,
        "eiointc_empty_coremap_fix": True,
        "io_default_return_zero": True,
    }
)

#: Profile names, newest first: the order rows are applied in.
PROFILES: Final = ("newest", "7.0", "6.18", "6.14", "6.13", "6.11", "6.10")
DEFAULT: Final = "newest"

#: One line per profile, for ``lvz profiles``.
SUMMARY: Final = MappingProxyType(
    {
        "newest": "the newest kernel lvz describes (the default): 7.0 plus the crash hypercall",
        "7.0": "7.0 (loongarch-kvm-6.20 and the 7.0-rc6 fixes)",
        "6.18": "before the 7.0 fixes: negative CPUIDs, empty coremap bytes, chip return values",
        "6.14": "before 6.18: loads from in-kernel devices are not sign-extended",
        "6.13": "in-kernel IPI, EIOINTC and PCH-PIC; no user hypercall feature yet",
        "6.11": "steal time (ungated); no in-kernel irqchips, no PV feature control",
        "6.10": "phyid map and PV IPI only",
    }
)

_MASK_70 = PV_FEATURE_MASK & ~KVM_FEATURE_CRASH
_MASK_618 = _MASK_70 & ~KVM_FEATURE_PREEMPT
_MASK_613 = KVM_FEATURE_IPI | KVM_FEATURE_STEAL_TIME | KVM_FEATURE_VIRT_EXTIOI
assert _MASK_618 & ~KVM_FEATURE_USER_HCALL == _MASK_613

#: profile -> the rows in which it differs from the next-newer profile.
COMPAT: Final = MappingProxyType(
    {
        "newest": (),
        "7.0": (
            Row(
                "pv_feature_mask",
                _MASK_70,
                "LoongArch: KVM: crash hypercall (KVM_HCALL_CRASH, KVM_FEATURE_CRASH): only in the "
                "LoongArch maintainer's tree (chenhuacai/linux exit.c @d2c6c602), not in 7.0",
            ),
        ),
        "6.18": (
            Row(
                "negative_cpuid_check",
                False,
                "2db06c15d8c7 LoongArch: KVM: Make kvm_get_vcpu_by_cpuid() more robust (7.0-rc6)",
            ),
            Row(
                "eiointc_empty_coremap_fix",
                False,
                "b97bd69eb0f6 LoongArch: KVM: Handle the case that EIOINTC's coremap is empty "
                "(7.0-rc6)",
            ),
            Row(
                "io_default_return_zero",
                False,
                "2faec60a4858 LoongArch: KVM: Set default return value in KVM IO bus ops (7.0)",
            ),
            Row(
                "pv_feature_mask",
                _MASK_618,
                "LoongArch: KVM: Add paravirt preempt feature in hypervisor side "
                "(loongarch-kvm-6.20 = 7.0)",
            ),
        ),
        "6.14": (
            Row(
                "sign_extend_loads",
                False,
                "80edf90831a2 / 44598fe77663 LoongArch: KVM: Add sign extension with kernel "
                "MMIO / IOCSR read emulation (6.18)",
            ),
        ),
        "6.13": (
            Row(
                "pv_feature_mask",
                _MASK_613,
                "2737dee1067c LoongArch: KVM: Add hypercall service support for usermode VMM "
                "(6.14)",
            ),
        ),
        "6.11": (
            Row(
                "kernel_device_types",
                (),
                "LoongArch: KVM: Add IPI / EIOINTC / PCHPIC device support (loongarch-kvm-6.13)",
            ),
            Row(
                "irqchip_ioctls",
                False,
                "LoongArch: KVM: Add irqfd support (6.13: selects HAVE_KVM_IRQCHIP, HAVE_KVM_MSI)",
            ),
            Row(
                "pv_feature_mask",
                None,
                "LoongArch: KVM: Enable paravirt feature control from VMM (6.12)",
            ),
            Row(
                "steal_time",
                "ungated",
                "same 6.12 commit: FUNC_NOTIFY and the PVTIME attr gated on KVM_FEATURE_STEAL_TIME",
            ),
        ),
        "6.10": (
            Row(
                "steal_time",
                None,
                "LoongArch: KVM: Add PV steal time support in host side (loongarch-kvm-6.11)",
            ),
        ),
    }
)


def resolve(name: str) -> Mapping[str, Any]:
    """The whole behaviour table of profile ``name``; EINVAL naming the profiles otherwise."""
    if name not in PROFILES:
        raise KvmError("EINVAL", f"no kernel profile {name!r} (profiles: {', '.join(PROFILES)})")
    table = dict(NEWEST)
    for profile in PROFILES:
        for row in COMPAT[profile]:
            table[row.key] = row.value
        if profile == name:
            break
    return MappingProxyType(table)


def rows_of(name: str) -> tuple[Row, ...]:
    """The rows that make ``name`` differ from the next-newer profile."""
    resolve(name)
    return COMPAT[name]
