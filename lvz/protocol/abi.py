"""The LoongArch KVM ABI lvz speaks, as public constants: the one place a number is spelled.

Users import it as ``from lvz.clients import abi`` (a VMM's test suite) and chips as
``from lvz.protocol import abi``; it is the same module. Everything a client, a chip, the
snapshot code, the CLI, the bench or a test needs is here, named as in the kernel's uapi headers
(``arch/loongarch/include/uapi/asm/kvm.h``, ``asm/kvm_ipi.h``, ``kvm_eiointc.h``,
``kvm_pch_pic.h``, ``asm/kvm_para.h``) with the prefixes shortened where the chip is obvious.

Two kinds of numbers live here and their names say which:

* **numbers** — an index, an offset, an irq or a line number (``CSR_CPUID``, ``IPI_SEND``,
  ``INT_IPI``): use them as they are.
* **masks** — a value to OR into a word (``KVM_FEATURE_IPI``, ``EIOINTC_HAS_CPU_ENCODE``,
  ``CPUCFG2_LLFTP``): already shifted. Where the kernel defines a bit *number* (its
  ``KVM_FEATURE_IPI`` is 1 and it writes ``BIT(KVM_FEATURE_IPI)``), lvz's constant is the mask
  ``1 << 1``, so ``features & KVM_FEATURE_IPI`` is always right.

Register ids decode as ``kvm_get_reg``/``kvm_set_reg`` do: the size field first, then the class
(``id & KVM_REG_LOONGARCH_MASK``), then the index; the bits the kernel ignores are ignored here.
"""

from __future__ import annotations

from enum import IntEnum

from .errors import KvmError

# --- the protocol and KVM's limits (SEMANTICS.md §1, §4) ----------------------------------------

PROTOCOL_VERSION = 1
KVM_API_VERSION = 12

#: Default phyid limit, also the "unset" marker of a fresh vCPU (KVM_MAX_PHYID).
KVM_MAX_PHYID = 256
#: The largest ``max_phyid`` a VM may ask for (an lvz extension, decision 4).
MAX_PHYID_LIMIT = 65536
KVM_MAX_VCPUS = 256
KVM_MAX_CPUCFG_REGS = 21
CSR_MAX_NUMS = 0x800

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
I64_MIN = -(1 << 63)

# --- CSRs (indices) and their bits (SEMANTICS.md §3) --------------------------------------------

CSR_CRMD = 0x0
CSR_ESTAT = 0x5
CSR_CPUID = 0x20
CSR_KS0 = 0x30
CSR_TMID = 0x40
CSR_GINTC = 0x52
#: CRMD.DA (mask): direct address translation, set at vCPU creation.
CSR_CRMD_DA = 1 << 3
#: GINTC.HWIS (mask): the eight HWI lines KVM injects; ESTAT shows them at bits 2..9.
CSR_GINTC_HWIS = 0xFF
#: ESTAT bit of HWI0 (a number): GINTC.HWIS is shown in ESTAT shifted by this much.
ESTAT_HWI_SHIFT = 2

# CPUCFG2 bits (masks) that ``kvm_check_cpucfg`` checks.
CPUCFG2_FP = 1 << 0
CPUCFG2_FPSP = 1 << 1
CPUCFG2_FPDP = 1 << 2
CPUCFG2_LSX = 1 << 6
CPUCFG2_LASX = 1 << 7
CPUCFG2_LLFTP = 1 << 14

# --- interrupt lines (numbers: ESTAT bit positions, the irq of KVM_INTERRUPT) ------------------

INT_SWI0 = 0
INT_SWI1 = 1
INT_HWI0 = 2
INT_HWI7 = 9
INT_PCOV = 10
INT_TI = 11
INT_IPI = 12
INT_NMI = 13
INT_AVEC = 14
EXCCODE_INT_NUM = 15
#: HWI lines, INT_HWI0..INT_HWI7 (the LOONGSON_IP_NUM of EIOINTC).
HWI_LINES = 8

#: Line number -> its name, for every line an ``irq`` event can carry.
LINE_NAMES = {INT_SWI0: "SWI0", INT_SWI1: "SWI1", INT_TI: "TI", INT_IPI: "IPI"} | {
    INT_HWI0 + n: f"HWI{n}" for n in range(HWI_LINES)
}

#: ESTAT bits that are interrupt lines (mask, PROTOCOL.md §6): SWI0/1, HWI0-7, TI, IPI.
LINE_MASK = 0x3FF | (1 << INT_TI) | (1 << INT_IPI)
#: Lines a guest may lower itself with csrxchg on ESTAT (mask: SWI0, SWI1).
GUEST_WRITABLE_ESTAT = (1 << INT_SWI0) | (1 << INT_SWI1)

# --- hypercalls (asm/kvm_para.h, SEMANTICS.md §7) ----------------------------------------------

KVM_HCALL_SERVICE = 0x100
KVM_HCALL_SWDBG = 0x101
KVM_HCALL_USER_SERVICE = 0x102
#: The crash hypercall: only in the LoongArch maintainer's tree (chenhuacai/linux), not upstream
#: as of 7.0; lvz models it (SEMANTICS.md decision 8).
KVM_HCALL_CRASH = 0x103
KVM_HCALL_FUNC_IPI = 1
KVM_HCALL_FUNC_NOTIFY = 2
KVM_HCALL_SUCCESS = 0
KVM_HCALL_INVALID_CODE = -1
KVM_HCALL_INVALID_PARAMETER = -2
#: The ``hvcl 0`` instruction word; KVM_REG_LOONGARCH_DEBUG_INST reads it | KVM_HCALL_SWDBG.
INSN_HVCL = 0x002B8000

# --- PV features: vCPU attr group KVM_LOONGARCH_VCPU_CPUCFG, attr CPUCFG_KVM_FEATURE -----------

KVM_LOONGARCH_VCPU_CPUCFG = 0
CPUCFG_KVM_SIG = 0x40000000
CPUCFG_KVM_FEATURE = 0x40000004
# Masks (the kernel's BIT(KVM_FEATURE_*)).
KVM_FEATURE_IPI = 1 << 1
KVM_FEATURE_STEAL_TIME = 1 << 2
KVM_FEATURE_PREEMPT = 1 << 3
#: Maintainer tree only, like KVM_HCALL_CRASH.
KVM_FEATURE_CRASH = 1 << 4
KVM_FEATURE_VIRT_EXTIOI = 1 << 24
KVM_FEATURE_USER_HCALL = 1 << 25
#: Every PV feature lvz accepts.
PV_FEATURE_MASK = (
    KVM_FEATURE_IPI
    | KVM_FEATURE_STEAL_TIME
    | KVM_FEATURE_PREEMPT
    | KVM_FEATURE_VIRT_EXTIOI
    | KVM_FEATURE_USER_HCALL
    | KVM_FEATURE_CRASH
)
#: What a VM offers until the VMM sets the word.
PV_FEATURES_DEFAULT = KVM_FEATURE_IPI

# --- steal time: vCPU attr group KVM_LOONGARCH_VCPU_PVTIME_CTRL, hypercall FUNC_NOTIFY ----------

KVM_LOONGARCH_VCPU_PVTIME_CTRL = 1
KVM_LOONGARCH_VCPU_PVTIME_GPA = 0
#: Bit 0 of a steal-time address: steal time is on.
KVM_STEAL_PHYS_VALID = 1 << 0
#: GENMASK_ULL(63, 6): the 64-byte-aligned guest-physical address of the steal-time record.
KVM_STEAL_PHYS_MASK = ((1 << 64) - 1) ^ ((1 << 6) - 1)

# --- ONE_REG register ids (SEMANTICS.md §3) -----------------------------------------------------

KVM_REG_LOONGARCH = 0x9000000000000000
KVM_REG_SIZE_SHIFT = 52
KVM_REG_SIZE_MASK = 0x00F0000000000000
KVM_REG_SIZE_U64 = 0x0030000000000000
KVM_REG_LOONGARCH_MASK = KVM_REG_LOONGARCH | 0x70000
#: The index field of a CSR or CPUCFG id (the index sits above 3 low bits).
KVM_REG_INDEX_MASK = 0x7FFF
KVM_REG_INDEX_SHIFT = 3


class RegClass(IntEnum):
    """``KVM_REG_LOONGARCH_*`` register classes (the bits ``KVM_REG_LOONGARCH_MASK`` keeps)."""

    GPR = KVM_REG_LOONGARCH | 0x00000
    CSR = KVM_REG_LOONGARCH | 0x10000
    KVM = KVM_REG_LOONGARCH | 0x20000
    FPSIMD = KVM_REG_LOONGARCH | 0x30000
    CPUCFG = KVM_REG_LOONGARCH | 0x40000
    LBT = KVM_REG_LOONGARCH | 0x50000


def csr_id(index: int) -> int:
    """``KVM_IOC_CSRID(index)``."""
    return KVM_REG_LOONGARCH | RegClass.CSR | KVM_REG_SIZE_U64 | (index << KVM_REG_INDEX_SHIFT)


def cpucfg_id(index: int) -> int:
    """``KVM_IOC_CPUCFG(index)``."""
    return KVM_REG_LOONGARCH | RegClass.CPUCFG | KVM_REG_SIZE_U64 | (index << KVM_REG_INDEX_SHIFT)


#: The register ids a VMM uses most.
CPUID = csr_id(CSR_CPUID)
TMID = csr_id(CSR_TMID)
ESTAT = csr_id(CSR_ESTAT)
GINTC = csr_id(CSR_GINTC)
#: KVM_REG_LOONGARCH_COUNTER, _VCPU_RESET and _DEBUG_INST (class KVM).
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
    index = (reg_id & KVM_REG_INDEX_MASK) >> KVM_REG_INDEX_SHIFT
    if cls == RegClass.CSR:
        if index >= CSR_MAX_NUMS:
            raise KvmError("EINVAL", f"CSR index {index:#x} is out of range (< {CSR_MAX_NUMS:#x})")
        return RegClass.CSR, index
    if cls == RegClass.CPUCFG:
        if index >= KVM_MAX_CPUCFG_REGS:
            raise KvmError(
                "EINVAL", f"CPUCFG index {index} is out of range (0..{KVM_MAX_CPUCFG_REGS - 1})"
            )
        return RegClass.CPUCFG, index
    if cls == RegClass.KVM:
        return RegClass.KVM, reg_id
    raise KvmError("EINVAL", f"register {reg_id:#x} is of no class this VM offers")


# --- device types (KVM_DEV_TYPE_*) and the irqchip pins -----------------------------------------

DEV_IPI = "loongarch-ipi"
DEV_EIOINTC = "loongarch-eiointc"
DEV_PCHPIC = "loongarch-pchpic"
KVM_DEV_TYPE_LOONGARCH_IPI = 12
KVM_DEV_TYPE_LOONGARCH_EIOINTC = 13
KVM_DEV_TYPE_LOONGARCH_PCHPIC = 14
#: PCH-PIC pins, the ``irq`` of ``vm.irq_line``.
KVM_IRQCHIP_NUM_PINS = 64
#: EIOINTC irqs, also the MSI data range of ``vm.signal_msi``.
EIOINTC_IRQS = 256

# --- IPI (asm/kvm_ipi.h, SEMANTICS.md §8): IOCSR window and offsets relative to its base --------

IOCSR_IPI_BASE = 0x1000
IOCSR_IPI_SIZE = 0x160
IPI_STATUS = 0x00
IPI_EN = 0x04
IPI_SET = 0x08
IPI_CLEAR = 0x0C
#: Four u64 mailboxes, IPI_BUF..IPI_BUF_END - 1.
IPI_BUF = 0x20
IPI_BUF_END = 0x40
IPI_SEND = 0x40
MAIL_SEND = 0x48
ANY_SEND = 0x158
# The fields of a SEND word: target phyid (a 10-bit number at bit 16), vector (IPI_SEND),
# mailbox word (MAIL_SEND, bits 2..4), IOCSR address (ANY_SEND), bytes to keep (bits 27..30).
IPI_SEND_CPU_SHIFT = 16
IPI_SEND_CPU_MASK = 0x3FF
IPI_SEND_VECTOR_MASK = 0x1F
IPI_SEND_MAILBOX_SHIFT = 2
IPI_SEND_MAILBOX_MASK = 0x7
IPI_SEND_ADDR_MASK = 0xFFFF
IPI_SEND_KEEP_SHIFT = 27
IPI_SEND_KEEP_MASK = 0xF
#: Device attr group; attr = (vcpu_id << 16) | register offset (see ``ipi_attr``).
KVM_DEV_LOONGARCH_IPI_GRP_REGS = 0x40000001
IPI_ATTR_CPU_SHIFT = 16
IPI_ATTR_CPU_MASK = 0x3FF
IPI_ATTR_REG_MASK = 0xFF
#: Register offset -> width in bytes, the registers the IPI attrs copy (a vCPU's state).
IPI_ATTR_REGS = {
    IPI_STATUS: 4,
    IPI_EN: 4,
    IPI_SET: 4,
    IPI_CLEAR: 4,
    IPI_BUF: 8,
    IPI_BUF + 8: 8,
    IPI_BUF + 16: 8,
    IPI_BUF + 24: 8,
}


def ipi_attr(vcpu_id: int, offset: int) -> int:
    """The IPI REGS attr of register ``offset`` of vCPU ``vcpu_id`` (``kvm_ipi_regs_access``)."""
    return (vcpu_id << IPI_ATTR_CPU_SHIFT) | offset


def ipi_send(phyid: int, low: int = 0, payload: int = 0, keep: int = 0) -> int:
    """A SEND word: target ``phyid``, ``low`` bits (vector, mailbox<<2 or address), ``keep``
    mask of bytes (bits 27..30) and the 32-bit ``payload`` in the upper half (MAIL/ANY_SEND)."""
    return (payload << 32) | (keep << IPI_SEND_KEEP_SHIFT) | (phyid << IPI_SEND_CPU_SHIFT) | low


# --- EIOINTC (kvm_eiointc.h, SEMANTICS.md §9): two IOCSR windows --------------------------------

EIOINTC_BASE = 0x1400
EIOINTC_SIZE = 0x900
EIOINTC_VIRT_BASE = 0x40000000
EIOINTC_VIRT_SIZE = 0x1000
# Offsets relative to EIOINTC_BASE.
EIOINTC_NODETYPE = 0x0A0
EIOINTC_IPMAP = 0x0C0
EIOINTC_ENABLE = 0x200
EIOINTC_BOUNCE = 0x280
EIOINTC_ISR = 0x300
EIOINTC_COREISR = 0x400
EIOINTC_COREMAP = 0x800
#: Register start -> size in bytes. ISR is here for the attrs; the guest cannot see it.
EIOINTC_REGISTERS = {
    EIOINTC_NODETYPE: 0x20,
    EIOINTC_IPMAP: 0x08,
    EIOINTC_ENABLE: 0x20,
    EIOINTC_BOUNCE: 0x20,
    EIOINTC_ISR: 0x20,
    EIOINTC_COREISR: 0x20,
    EIOINTC_COREMAP: 0x100,
}
# Offsets relative to EIOINTC_VIRT_BASE.
EIOINTC_VIRT_FEATURES = 0x0
EIOINTC_VIRT_CONFIG = 0x4
# FEATURES / INIT_FEATURE bits (masks; the kernel's BIT(EIOINTC_HAS_*)).
EIOINTC_HAS_VIRT_EXTENSION = 1 << 0
EIOINTC_HAS_ENABLE_OPTION = 1 << 1
EIOINTC_HAS_INT_ENCODE = 1 << 2
EIOINTC_HAS_CPU_ENCODE = 1 << 3
EIOINTC_VIRT_FEATURE_MASK = (
    EIOINTC_HAS_VIRT_EXTENSION
    | EIOINTC_HAS_ENABLE_OPTION
    | EIOINTC_HAS_INT_ENCODE
    | EIOINTC_HAS_CPU_ENCODE
)
# CONFIG / SW_STATUS STATE bits (masks; the kernel's BIT(EIOINTC_ENABLE*)).
EIOINTC_STATUS_ENABLE = 1 << 1
EIOINTC_STATUS_INT_ENCODE = 1 << 2
EIOINTC_STATUS_CPU_ENCODE = 1 << 3
#: Most vCPUs EIOINTC routes to (INIT_NUM_CPU's limit).
EIOINTC_ROUTE_MAX_VCPUS = 256
# Device attr groups and attrs.
KVM_DEV_LOONGARCH_EXTIOI_GRP_REGS = 0x40000002
KVM_DEV_LOONGARCH_EXTIOI_GRP_SW_STATUS = 0x40000003
KVM_DEV_LOONGARCH_EXTIOI_GRP_CTRL = 0x40000004
KVM_DEV_LOONGARCH_EXTIOI_SW_STATUS_NUM_CPU = 0
KVM_DEV_LOONGARCH_EXTIOI_SW_STATUS_FEATURE = 1
KVM_DEV_LOONGARCH_EXTIOI_SW_STATUS_STATE = 2
#: lvz extension: SW_STATUS attr ``eiointc_route_attr(irq)`` is sw_coremap[irq], the vcpu_id an
#: irq is delivered to (the kernel keeps it private; snapshots need it, plugins/eiointc.py).
EIOINTC_SW_STATUS_ROUTE = 0x100
KVM_DEV_LOONGARCH_EXTIOI_CTRL_INIT_NUM_CPU = 0
KVM_DEV_LOONGARCH_EXTIOI_CTRL_INIT_FEATURE = 1
KVM_DEV_LOONGARCH_EXTIOI_CTRL_LOAD_FINISHED = 3
#: REGS attr = (cpu << 16) | offset; the cpu field matters for COREISR only.
EIOINTC_ATTR_CPU_SHIFT = 16
EIOINTC_ATTR_OFFSET_MASK = 0xFFFF


def eiointc_attr(offset: int, cpu: int = 0) -> int:
    """The EIOINTC REGS attr of the 4 bytes at ``offset`` (of ``cpu``'s COREISR)."""
    return (cpu << EIOINTC_ATTR_CPU_SHIFT) | offset


def eiointc_route_attr(irq: int) -> int:
    """The SW_STATUS attr of ``irq``'s live route (lvz extension)."""
    return (irq << EIOINTC_ATTR_CPU_SHIFT) | EIOINTC_SW_STATUS_ROUTE


# --- PCH-PIC (kvm_pch_pic.h, SEMANTICS.md §10): an MMIO window placed by CTRL_INIT --------------

PCH_PIC_SIZE = 0x3E8
# Offsets relative to the window's base.
PCH_PIC_INT_ID = 0x000
PCH_PIC_MASK = 0x020
PCH_PIC_HTMSI_EN = 0x040
PCH_PIC_EDGE = 0x060
PCH_PIC_CLEAR = 0x080
PCH_PIC_AUTO_CTRL0 = 0x0C0
PCH_PIC_AUTO_CTRL1 = 0x0E0
#: u8 per pin.
PCH_PIC_ROUTE_ENTRY = 0x100
#: u8 per pin: the EIOINTC irq a pin drives.
PCH_PIC_HTMSI_VEC = 0x200
PCH_PIC_INT_IRR = 0x380
PCH_PIC_INT_ISR = 0x3A0
PCH_PIC_POLARITY = 0x3E0
#: The 8-byte registers device attrs (and most guest accesses) reach by offset.
PCH_PIC_WORD_REGS = (
    PCH_PIC_MASK,
    PCH_PIC_HTMSI_EN,
    PCH_PIC_EDGE,
    PCH_PIC_AUTO_CTRL0,
    PCH_PIC_AUTO_CTRL1,
    PCH_PIC_INT_IRR,
    PCH_PIC_INT_ISR,
    PCH_PIC_POLARITY,
)
#: Pins the ID register advertises and the defaults cover.
PCH_PIC_IRQ_NUM = 32
PCH_PIC_INT_ID_VAL = 0x7
PCH_PIC_INT_ID_VER = 0x1
KVM_DEV_LOONGARCH_PCH_PIC_GRP_REGS = 0x40000005
KVM_DEV_LOONGARCH_PCH_PIC_GRP_CTRL = 0x40000006
KVM_DEV_LOONGARCH_PCH_PIC_CTRL_INIT = 0
#: Where QEMU's LoongArch ``virt`` board puts the PCH-PIC (VIRT_PCH_REG_BASE): the usual
#: CTRL_INIT value, not something KVM imposes.
VIRT_PCH_PIC_BASE = 0x10000000
#: QEMU ``virt``'s MSI doorbell address (VIRT_PCH_MSI_ADDR_LOW), the usual ``signal_msi`` address.
VIRT_PCH_MSI_ADDR = 0x2FF00000

# --- access sizes -------------------------------------------------------------------------------

#: The widths of a guest IOCSR / MMIO access, in bytes.
ACCESS_SIZES = (1, 2, 4, 8)

# --- exits to the VMM (include/uapi/linux/kvm.h; protocol-additions.md "Exits") ----------------

#: ``kvm_run.exit_reason`` numbers of the exits lvz delivers through ``vcpu.run``. On the wire
#: the reason is a name (``EXIT_NAMES``); the numbers are for VMM code ported from C.
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_MMIO = 6
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_LOONGARCH_IOCSR = 38
#: ``vcpu.run``'s ``exit_reason`` name -> the KVM number.
EXIT_NAMES = {
    "hypercall": KVM_EXIT_HYPERCALL,
    "mmio": KVM_EXIT_MMIO,
    "system_event": KVM_EXIT_SYSTEM_EVENT,
    "iocsr": KVM_EXIT_LOONGARCH_IOCSR,
}
#: ``kvm_run.system_event.type``.
KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_SYSTEM_EVENT_WAKEUP = 4
KVM_SYSTEM_EVENT_SUSPEND = 5
#: Addresses no in-kernel device claims, so a guest access there exits to the VMM: QEMU
#: ``virt``'s 16550 UART (VIRT_UART_BASE; THR/RBR at +0, LSR at +5) and the IOCSR features
#: register (LOONGARCH_IOCSR_FEATURES), both emulated in user space by a VMM.
VIRT_UART_BASE = 0x1FE001E0
UART_THR = 0
UART_LSR = 5
#: LSR bits THRE | TEMT: the transmitter is empty, the guest may write THR.
UART_LSR_TX_EMPTY = 0x60
LOONGARCH_IOCSR_FEATURES = 0x8
