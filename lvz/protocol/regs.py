"""KVM ONE_REG register ids for LoongArch (SEMANTICS.md §3), encode and decode.

Decoding follows ``kvm_get_reg``/``kvm_set_reg`` exactly: the size field is checked first, then
the class (``id & KVM_REG_LOONGARCH_MASK``), then the index; the bits the kernel ignores are
ignored here too.
"""

from __future__ import annotations

from enum import IntEnum

from .constants import CSR_CPUID, CSR_ESTAT, CSR_MAX_NUMS, CSR_TMID, KVM_MAX_CPUCFG_REGS
from .errors import KvmError

KVM_REG_LOONGARCH = 0x9000000000000000
KVM_REG_SIZE_SHIFT = 52
KVM_REG_SIZE_MASK = 0x00F0000000000000
KVM_REG_SIZE_U64 = 0x0030000000000000
KVM_REG_LOONGARCH_MASK = KVM_REG_LOONGARCH | 0x70000


class RegClass(IntEnum):
    GPR = KVM_REG_LOONGARCH | 0x00000
    CSR = KVM_REG_LOONGARCH | 0x10000
    KVM = KVM_REG_LOONGARCH | 0x20000
    FPSIMD = KVM_REG_LOONGARCH | 0x30000
    CPUCFG = KVM_REG_LOONGARCH | 0x40000
    LBT = KVM_REG_LOONGARCH | 0x50000


def csr_id(index: int) -> int:
    """``KVM_IOC_CSRID(index)``."""
    return KVM_REG_LOONGARCH | RegClass.CSR | KVM_REG_SIZE_U64 | (index << 3)


def cpucfg_id(index: int) -> int:
    """``KVM_IOC_CPUCFG(index)``."""
    return KVM_REG_LOONGARCH | RegClass.CPUCFG | KVM_REG_SIZE_U64 | (index << 3)


CPUID = csr_id(CSR_CPUID)
TMID = csr_id(CSR_TMID)
ESTAT = csr_id(CSR_ESTAT)
COUNTER = KVM_REG_LOONGARCH | RegClass.KVM | KVM_REG_SIZE_U64 | 1
VCPU_RESET = KVM_REG_LOONGARCH | RegClass.KVM | KVM_REG_SIZE_U64 | 2
DEBUG_INST = KVM_REG_LOONGARCH | RegClass.KVM | KVM_REG_SIZE_U64 | 3


_DECODED: dict[int, tuple[RegClass, int]] = {}
_DECODED_MAX = 8192  # ids in use are few; the bound keeps a client cycling ids from growing it


def decode(reg_id: int) -> tuple[RegClass, int]:
    """Split a register id into (class, index), or raise EINVAL as the kernel would.

    For the KVM class the "index" is the whole id, because the kernel switches on it.
    Valid ids are remembered: decoding sits on the ONE_REG hot path, and IntEnum arithmetic
    made it a tenth of a request's cost.
    """
    hit = _DECODED.get(reg_id)
    if hit is not None:
        return hit
    result = _decode(reg_id)
    if len(_DECODED) < _DECODED_MAX:
        _DECODED[reg_id] = result
    return result


def _decode(reg_id: int) -> tuple[RegClass, int]:
    if reg_id & KVM_REG_SIZE_MASK != KVM_REG_SIZE_U64:
        size = 1 << ((reg_id & KVM_REG_SIZE_MASK) >> KVM_REG_SIZE_SHIFT)
        raise KvmError("EINVAL", f"register {reg_id:#x} is {size} bytes wide; only U64 exists")
    cls = reg_id & KVM_REG_LOONGARCH_MASK
    if cls == RegClass.CSR:
        index = (reg_id & 0x7FFF) >> 3
        if index >= CSR_MAX_NUMS:
            raise KvmError("EINVAL", f"CSR index {index:#x} is out of range (< 0x800)")
        return RegClass.CSR, index
    if cls == RegClass.CPUCFG:
        index = (reg_id & 0x7FFF) >> 3
        if index >= KVM_MAX_CPUCFG_REGS:
            raise KvmError("EINVAL", f"CPUCFG index {index} is out of range (0..20)")
        return RegClass.CPUCFG, index
    if cls == RegClass.KVM:
        return RegClass.KVM, reg_id
    raise KvmError("EINVAL", f"register {reg_id:#x} is of no class this VM offers")
