"""The IPI device as a state machine over FakeVm (SEMANTICS.md §8, §13 cases 21-26).

The standard VM gives every vCPU a phyid different from its vcpu_id (vcpu 0 = phyid 3, vcpu 1 =
phyid 0, vcpu 2 = phyid 1), so a send or an attr that confuses the two lands on the wrong vCPU.
"""

from __future__ import annotations

from typing import NamedTuple

import pluggy
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lvz.plugins import hookspecs, ipi
from lvz.plugins.api import DeviceType
from lvz.plugins.ipi import IpiDevice
from lvz.protocol import abi
from lvz.protocol.abi import DEV_IPI, INT_IPI, KVM_DEV_TYPE_LOONGARCH_IPI, U32_MAX, U64_MAX
from lvz.protocol.errors import KvmError
from tests.chipfake import FakeVm, implied_lines

GRP = abi.KVM_DEV_LOONGARCH_IPI_GRP_REGS
#: Absolute IOCSR addresses, as a guest uses them.
BASE = abi.IOCSR_IPI_BASE
STATUS, EN, SET, CLEAR = (
    BASE + abi.IPI_STATUS,
    BASE + abi.IPI_EN,
    BASE + abi.IPI_SET,
    BASE + abi.IPI_CLEAR,
)
BUF = BASE + abi.IPI_BUF
IPI_SEND, MAIL_SEND, ANY_SEND = BASE + abi.IPI_SEND, BASE + abi.MAIL_SEND, BASE + abi.ANY_SEND
#: The attr offsets of a vCPU's registers, in layout order.
REG_OFFSETS = tuple(abi.IPI_ATTR_REGS)
IPI_LINE = 1 << INT_IPI

PHYID_OF = {0: 3, 1: 0, 2: 1}


class Chip(NamedTuple):
    vm: FakeVm
    dev: IpiDevice


def make_chip(mapping: dict[int, int] | None = None, max_phyid: int = 256) -> Chip:
    vm = FakeVm(max_phyid)
    dev = IpiDevice(vm)
    vm.add_device(DEV_IPI, dev)
    for vcpu_id, phyid in (PHYID_OF if mapping is None else mapping).items():
        vm.add_vcpu(vcpu_id, phyid)
    return Chip(vm, dev)


@pytest.fixture
def chip() -> Chip:
    return make_chip()


def cpu(phyid: int) -> int:
    """The SEND registers' cpu field."""
    return abi.ipi_send(phyid)


def status(c: Chip, vcpu_id: int) -> int:
    return c.vm.guest_iocsr_read(vcpu_id, STATUS, 4)


attr = abi.ipi_attr


def snapshot(c: Chip) -> list[int]:
    """Every attr-visible register of every vCPU."""
    return [c.dev.get_attr(GRP, attr(v, o)) for v in c.vm.vcpu_ids() for o in REG_OFFSETS]


# --- registration -------------------------------------------------------------------------------


def test_device_type_hook() -> None:
    assert ipi.lvz_device_types() == [
        DeviceType(DEV_IPI, KVM_DEV_TYPE_LOONGARCH_IPI, IpiDevice, ipi.STATS)
    ]
    pm = pluggy.PluginManager("lvz")
    pm.add_hookspecs(hookspecs)
    pm.register(ipi)
    (types,) = pm.hook.lvz_device_types()
    assert [(t.name, t.kvm_type, t.factory) for t in types] == [(DEV_IPI, 12, IpiDevice)]


def test_claims_the_ipi_iocsr_window(chip: Chip) -> None:
    assert chip.vm.iocsr == [(abi.IOCSR_IPI_BASE, abi.IOCSR_IPI_SIZE, chip.dev)]


def test_vcpus_that_predate_the_device_have_state() -> None:
    vm = FakeVm()
    vm.add_vcpu(4, 9)
    dev = IpiDevice(vm)
    assert implied_lines(dev) == {4: 0}
    vm.add_device(DEV_IPI, dev)
    vm.guest_iocsr_write(0, IPI_SEND, 8, cpu(9) | 2)
    assert dev.get_attr(GRP, attr(4, 0)) == 0b100
    assert vm.events == [(4, INT_IPI, 1)]


def test_destroyed_vcpu_is_forgotten_and_a_reused_id_starts_clean(chip: Chip) -> None:
    chip.vm.guest_iocsr_write(1, BUF, 8, 0x1234)
    chip.vm.guest_iocsr_write(1, SET, 4, 1)
    chip.dev.vcpu_destroyed(1)
    assert 1 not in implied_lines(chip.dev)
    chip.dev.vcpu_created(1)
    assert implied_lines(chip.dev)[1] == 0
    assert chip.vm.guest_iocsr_read(1, BUF, 8) == 0
    assert status(chip, 1) == 0


# --- §13 case 21: IPI_SEND, the line, CLEAR, EN --------------------------------------------------


def test_ipi_send_raises_once_and_clear_to_zero_lowers(chip: Chip) -> None:
    vm = chip.vm
    vm.guest_iocsr_write(0, IPI_SEND, 4, cpu(0) | 3)  # phyid 0 is vcpu 1
    assert vm.events == [(1, INT_IPI, 1)]
    assert status(chip, 1) == 1 << 3
    assert status(chip, 0) == 0

    vm.guest_iocsr_write(2, IPI_SEND, 4, cpu(0) | 5)  # a second vector while status != 0
    assert vm.events == [(1, INT_IPI, 1)]
    assert status(chip, 1) == (1 << 3) | (1 << 5)

    vm.guest_iocsr_write(1, CLEAR, 4, 1 << 3)  # status stays non-zero: line stays up
    assert vm.events == [(1, INT_IPI, 1)]
    assert vm.line(1, INT_IPI) == 1

    vm.guest_iocsr_write(1, CLEAR, 4, 1 << 5)
    assert vm.events == [(1, INT_IPI, 1), (1, INT_IPI, 0)]
    assert status(chip, 1) == 0

    vm.guest_iocsr_write(2, IPI_SEND, 8, cpu(0) | 31)  # after a clear it raises again
    assert vm.events[-1] == (1, INT_IPI, 1)
    assert status(chip, 1) == 1 << 31


class CallSpyVm(FakeVm):
    """Records every queue/dequeue call, including the ones FakeVm folds away as no change."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int, int]] = []

    def queue_irq(self, vcpu_id: int, irq: int) -> None:
        self.calls.append(("queue", vcpu_id, irq))
        super().queue_irq(vcpu_id, irq)

    def dequeue_irq(self, vcpu_id: int, irq: int) -> None:
        self.calls.append(("dequeue", vcpu_id, irq))
        super().dequeue_irq(vcpu_id, irq)


def test_only_the_first_vector_calls_queue_irq() -> None:
    vm = CallSpyVm()
    vm.add_device(DEV_IPI, IpiDevice(vm))
    vm.add_vcpu(0, 3)
    vm.add_vcpu(1, 0)
    for vector in (3, 5, 3, 0):
        vm.guest_iocsr_write(0, IPI_SEND, 4, cpu(0) | vector)
    vm.guest_iocsr_write(1, SET, 4, 1 << 9)
    vm.guest_iocsr_write(1, CLEAR, 4, 1 << 3)  # not yet 0: no dequeue
    assert vm.calls == [("queue", 1, INT_IPI)]
    vm.guest_iocsr_write(1, CLEAR, 4, U32_MAX)
    assert vm.calls == [("queue", 1, INT_IPI), ("dequeue", 1, INT_IPI)]


def test_vector_is_the_low_five_bits(chip: Chip) -> None:
    chip.vm.guest_iocsr_write(0, IPI_SEND, 8, cpu(3) | 0xE4)  # 0xE4 & 0x1f = 4
    assert status(chip, 0) == 1 << 4


def test_clear_acts_on_the_accessing_vcpu_only(chip: Chip) -> None:
    vm = chip.vm
    vm.guest_iocsr_write(0, IPI_SEND, 4, cpu(0) | 1)
    vm.guest_iocsr_write(0, IPI_SEND, 4, cpu(1) | 1)
    vm.guest_iocsr_write(2, CLEAR, 4, U32_MAX)
    assert vm.line(1, INT_IPI) == 1
    assert vm.line(2, INT_IPI) == 0
    assert status(chip, 1) == 2


def test_clear_lowers_even_when_status_was_already_zero(chip: Chip) -> None:
    # A raw attr copy can leave the line up with STATUS 0; the next CLEAR still lowers it.
    chip.vm.queue_irq(0, INT_IPI)
    chip.vm.guest_iocsr_write(0, CLEAR, 4, 0)
    assert chip.vm.line(0, INT_IPI) == 0


def test_clear_uses_the_low_32_bits(chip: Chip) -> None:
    chip.vm.guest_iocsr_write(0, SET, 4, 0b11)
    chip.vm.guest_iocsr_write(0, CLEAR, 4, 1 << 32 | 1)
    assert status(chip, 0) == 0b10
    assert chip.vm.line(0, INT_IPI) == 1


def test_clear_reaches_every_status_bit(chip: Chip) -> None:
    chip.vm.guest_iocsr_write(0, SET, 4, 0x8001_0000)
    chip.vm.guest_iocsr_write(0, CLEAR, 4, 0x0001_0000)
    assert status(chip, 0) == 0x8000_0000
    chip.vm.guest_iocsr_write(0, CLEAR, 4, 0xFFFF_FFFF_8000_0000)
    assert status(chip, 0) == 0
    assert chip.vm.line(0, INT_IPI) == 0


def test_en_is_stored_but_never_gates_delivery(chip: Chip) -> None:
    vm = chip.vm
    assert vm.guest_iocsr_read(1, EN, 4) == 0
    vm.guest_iocsr_write(0, IPI_SEND, 4, cpu(0) | 2)  # EN is 0 on the target
    assert vm.line(1, INT_IPI) == 1
    vm.guest_iocsr_write(1, EN, 4, 0xABCD_1234_5678)  # stored as u32, no line change
    assert vm.guest_iocsr_read(1, EN, 4) == 0x1234_5678
    assert chip.dev.get_attr(GRP, attr(1, abi.IPI_EN)) == 0x1234_5678
    assert vm.events == [(1, INT_IPI, 1)]


def test_set_is_a_self_ipi(chip: Chip) -> None:
    vm = chip.vm
    vm.guest_iocsr_write(2, SET, 4, 0)
    assert vm.events == []
    vm.guest_iocsr_write(2, SET, 4, 1 << 32)  # only the low 32 bits count
    assert vm.events == []
    assert status(chip, 2) == 0
    vm.guest_iocsr_write(2, SET, 4, 0x81)
    vm.guest_iocsr_write(2, SET, 4, 0x2)
    assert vm.events == [(2, INT_IPI, 1)]
    assert status(chip, 2) == 0x83


def test_set_and_clear_read_zero_and_status_ignores_stores(chip: Chip) -> None:
    vm = chip.vm
    vm.guest_iocsr_write(0, SET, 4, 0xF0)
    assert vm.guest_iocsr_read(0, SET, 4) == 0
    assert vm.guest_iocsr_read(0, CLEAR, 4) == 0
    vm.guest_iocsr_write(0, STATUS, 4, 0)
    vm.guest_iocsr_write(0, STATUS, 4, 0xFFFF)
    assert status(chip, 0) == 0xF0
    assert vm.events == [(0, INT_IPI, 1)]


def test_status_reads_at_each_width(chip: Chip) -> None:
    chip.vm.guest_iocsr_write(0, SET, 4, 0x8000_0181)
    chip.vm.guest_iocsr_write(0, EN, 4, 0xFFFF_FFFF)
    assert chip.vm.guest_iocsr_read(0, STATUS, 1) == 0x81
    assert chip.vm.guest_iocsr_read(0, STATUS, 2) == 0x0181
    assert chip.vm.guest_iocsr_read(0, STATUS, 4) == 0x8000_0181
    # As the kernel: an 8-byte STATUS load is STATUS alone, EN does not show in the upper half.
    assert chip.vm.guest_iocsr_read(0, STATUS, 8) == 0x8000_0181


# --- §13 case 22: unknown targets and the 10-bit field --------------------------------------------


@pytest.mark.parametrize("phyid", [2, 4, 255, 256, 300, 0x3FF])
def test_send_to_an_unheld_phyid_does_nothing(chip: Chip, phyid: int) -> None:
    before = snapshot(chip)
    for reg in (IPI_SEND, MAIL_SEND, ANY_SEND):
        chip.vm.guest_iocsr_write(0, reg, 8, 0xFFFF_FFFF_0000_0000 | cpu(phyid) | 0x08)
    assert chip.vm.events == []
    assert snapshot(chip) == before


@pytest.mark.parametrize("phyid", [300, 700, 1023])
def test_cpu_field_is_ten_bits_wide(phyid: int) -> None:
    # A VM whose phyid limit exceeds 1024 holds both phyid and phyid + 1024; the field reaches
    # only the first. phyid 300 is SEMANTICS' case; 700 and 1023 need all ten bits.
    c = make_chip({0: phyid, 1: phyid + 1024, 2: 0}, max_phyid=4096)
    c.vm.guest_iocsr_write(2, IPI_SEND, 8, ((phyid + 1024) << 16) | 1)  # bit 26 falls off
    assert c.vm.events == [(0, INT_IPI, 1)]
    c.vm.guest_iocsr_write(2, IPI_SEND, 8, (0xFFFF_FC00 << 32) | cpu(phyid) | 2)  # upper half
    assert status(c, 0) == 0b110
    assert status(c, 1) == 0
    c.vm.guest_iocsr_write(2, MAIL_SEND, 8, 0x55 << 32 | cpu(phyid))
    assert c.vm.guest_iocsr_read(0, BUF, 4) == 0x55


# --- §13 case 23: MAIL_SEND ---------------------------------------------------------------------


@pytest.mark.parametrize("mailbox", range(8))
def test_mail_send_writes_mailbox_n_of_the_target(chip: Chip, mailbox: int) -> None:
    payload = 0xC0DE_0000 | mailbox
    chip.vm.guest_iocsr_write(0, MAIL_SEND, 8, payload << 32 | cpu(1) | mailbox << 2)
    words = [chip.vm.guest_iocsr_read(2, BUF + 4 * i, 4) for i in range(8)]
    assert words == [payload if i == mailbox else 0 for i in range(8)]
    assert all(chip.vm.guest_iocsr_read(0, BUF + 4 * i, 4) == 0 for i in range(8))
    assert chip.vm.events == []  # a mail is not an interrupt


def test_mail_send_byte_mask_keeps_old_bytes(chip: Chip) -> None:
    vm = chip.vm
    vm.guest_iocsr_write(1, BUF + 8, 4, 0xAABB_CCDD)  # vcpu 1's mailbox 2
    keep_bytes_0_and_2 = (1 << 27) | (1 << 29)
    vm.guest_iocsr_write(2, MAIL_SEND, 8, 0x1122_3344 << 32 | keep_bytes_0_and_2 | cpu(0) | 2 << 2)
    assert vm.guest_iocsr_read(1, BUF + 8, 4) == 0x11BB_33DD
    keep_all = 0xF << 27
    vm.guest_iocsr_write(2, MAIL_SEND, 8, 0x5566_7788 << 32 | keep_all | cpu(0) | 2 << 2)
    assert vm.guest_iocsr_read(1, BUF + 8, 4) == 0x11BB_33DD
    keep_byte_3 = 1 << 30
    vm.guest_iocsr_write(2, MAIL_SEND, 8, 0x5566_7788 << 32 | keep_byte_3 | cpu(0) | 2 << 2)
    assert vm.guest_iocsr_read(1, BUF + 8, 4) == 0x1166_7788
    assert vm.guest_iocsr_read(1, BUF + 4, 4) == 0  # neighbours untouched
    assert vm.guest_iocsr_read(1, BUF + 12, 4) == 0


def test_mail_send_payload_comes_from_the_upper_half_of_a_4_byte_store(chip: Chip) -> None:
    gpr = 0xCAFE_BABE << 32 | cpu(3) | 1 << 2
    chip.vm.guest_iocsr_write(1, MAIL_SEND, 4, gpr)
    assert chip.vm.guest_iocsr_read(0, BUF + 4, 4) == 0xCAFE_BABE


# --- §13 case 24: ANY_SEND ----------------------------------------------------------------------


def test_any_send_to_ipi_set_is_an_ipi(chip: Chip) -> None:
    vm = chip.vm
    vm.guest_iocsr_write(0, ANY_SEND, 8, (1 << 7) << 32 | cpu(1) | SET)
    assert vm.events == [(2, INT_IPI, 1)]
    assert status(chip, 2) == 1 << 7
    assert status(chip, 0) == 0


def test_any_send_is_dispatched_as_the_target(chip: Chip) -> None:
    vm = chip.vm
    vm.guest_iocsr_write(0, ANY_SEND, 8, 0xDEAD_BEEF << 32 | cpu(0) | (BUF + 0x10))
    assert vm.guest_iocsr_read(1, BUF + 0x10, 4) == 0xDEAD_BEEF
    assert vm.guest_iocsr_read(0, BUF + 0x10, 4) == 0


def test_any_send_byte_mask_reads_the_old_word_as_the_target(chip: Chip) -> None:
    vm = chip.vm
    vm.guest_iocsr_write(2, BUF + 4, 4, 0x0102_0304)
    keep_byte_1 = 1 << 28
    vm.guest_iocsr_write(0, ANY_SEND, 4, 0xA0B0_C0D0 << 32 | keep_byte_1 | cpu(1) | (BUF + 4))
    assert vm.guest_iocsr_read(2, BUF + 4, 4) == 0xA0B0_03D0


def test_any_send_can_chain_into_ipi_send(chip: Chip) -> None:
    chip.vm.guest_iocsr_write(0, ANY_SEND, 8, (cpu(1) | 9) << 32 | cpu(0) | IPI_SEND)
    assert chip.vm.events == [(2, INT_IPI, 1)]
    assert status(chip, 2) == 1 << 9


class Recorder:
    """A foreign IOCSR device that records what reaches it."""

    def __init__(self, old: int) -> None:
        self.old = old
        self.reads: list[tuple[int, int, int]] = []
        self.writes: list[tuple[int, int, int, int]] = []

    def read(self, vcpu_id: int, offset: int, size: int) -> int:
        self.reads.append((vcpu_id, offset, size))
        return self.old

    def write(self, vcpu_id: int, offset: int, size: int, value: int) -> None:
        self.writes.append((vcpu_id, offset, size, value))


def test_any_send_reaches_other_devices_with_a_4_byte_store(chip: Chip) -> None:
    rec = Recorder(old=0x1122_3344)
    chip.vm.claim_iocsr(0x1800, 0x100, rec)
    chip.vm.guest_iocsr_write(0, ANY_SEND, 8, 0xAAAA_AAAA << 32 | cpu(3) | 0x1810)
    assert rec.reads == []  # nothing kept: no read
    assert rec.writes == [(0, 0x10, 4, 0xAAAA_AAAA)]
    chip.vm.guest_iocsr_write(1, ANY_SEND, 8, 0xAAAA_AAAA << 32 | 0x3 << 27 | cpu(1) | 0x1820)
    assert rec.reads == [(2, 0x20, 4)]
    assert rec.writes[-1] == (2, 0x20, 4, 0xAAAA_3344)


class SpyVm(FakeVm):
    def __init__(self) -> None:
        super().__init__()
        self.stores: list[tuple[int, int, int, int]] = []

    def iocsr_write(self, vcpu_id: int, addr: int, size: int, value: int) -> None:
        self.stores.append((vcpu_id, addr, size, value))
        super().iocsr_write(vcpu_id, addr, size, value)


def test_any_send_to_an_unclaimed_address_is_ignored() -> None:
    vm = SpyVm()
    dev = IpiDevice(vm)
    vm.add_device(DEV_IPI, dev)
    vm.add_vcpu(0, 0)
    before = [dev.get_attr(GRP, attr(0, o)) for o in REG_OFFSETS]
    # No bytes kept: the store is attempted and lost.
    vm.guest_iocsr_write(0, ANY_SEND, 8, 0x1234 << 32 | cpu(0) | 0x2000)
    assert vm.stores == [(0, 0x2000, 4, 0x1234)]
    # Bytes kept: the read of the old word fails, so the send stops before any store.
    vm.guest_iocsr_write(0, ANY_SEND, 8, 0x1234 << 32 | 1 << 27 | cpu(0) | 0x2000)
    assert vm.stores == [(0, 0x2000, 4, 0x1234)]
    assert vm.events == []
    assert [dev.get_attr(GRP, attr(0, o)) for o in REG_OFFSETS] == before


# --- §13 case 25: device attrs ------------------------------------------------------------------


def test_attrs_address_vcpu_id_not_phyid(chip: Chip) -> None:
    chip.dev.set_attr(GRP, attr(1, abi.IPI_EN), 0x77)  # vcpu 1 holds phyid 0
    assert chip.vm.guest_iocsr_read(1, EN, 4) == 0x77
    assert chip.vm.guest_iocsr_read(2, EN, 4) == 0  # vcpu 2 holds phyid 1
    assert chip.vm.guest_iocsr_read(0, EN, 4) == 0
    with pytest.raises(KvmError) as e:
        chip.dev.get_attr(GRP, attr(3, abi.IPI_STATUS))  # phyid 3 is held, vcpu_id 3 does not exist
    assert e.value.name == "EINVAL"
    assert e.value.errno == 22


def test_status_attr_is_a_raw_copy_without_line_change(chip: Chip) -> None:
    chip.dev.set_attr(GRP, attr(2, abi.IPI_STATUS), 0x10)
    assert status(chip, 2) == 0x10
    assert chip.vm.events == []
    assert implied_lines(chip.dev)[2] == IPI_LINE  # deliberately out of step with the line
    assert chip.vm.line(2, INT_IPI) == 0
    chip.vm.guest_iocsr_write(0, IPI_SEND, 4, cpu(1) | 0)  # status was non-zero: no raise
    assert chip.vm.events == []
    chip.dev.set_attr(GRP, attr(2, abi.IPI_STATUS), 0)
    assert chip.dev.get_attr(GRP, attr(2, abi.IPI_STATUS)) == 0


def test_set_and_clear_attrs_are_storage_only(chip: Chip) -> None:
    chip.dev.set_attr(GRP, attr(0, abi.IPI_SET), 0xFFFF_FFFF)
    chip.dev.set_attr(GRP, attr(0, abi.IPI_CLEAR), 0x1234)
    assert chip.dev.get_attr(GRP, attr(0, abi.IPI_SET)) == 0xFFFF_FFFF
    assert chip.dev.get_attr(GRP, attr(0, abi.IPI_CLEAR)) == 0x1234
    assert status(chip, 0) == 0
    assert chip.vm.guest_iocsr_read(0, SET, 4) == 0
    assert chip.vm.events == []


@pytest.mark.parametrize("index", range(4))
def test_buf_attrs_are_the_8_byte_mailboxes(chip: Chip, index: int) -> None:
    off = 0x20 + 8 * index
    chip.dev.set_attr(GRP, attr(1, off), 0x1122_3344_5566_7788)
    assert chip.dev.get_attr(GRP, attr(1, off)) == 0x1122_3344_5566_7788
    assert chip.vm.guest_iocsr_read(1, BASE + off, 8) == 0x1122_3344_5566_7788
    assert chip.vm.guest_iocsr_read(1, BASE + off + 4, 4) == 0x1122_3344
    assert chip.vm.guest_iocsr_read(1, BASE + off + 1, 1) == 0x77
    others = [chip.dev.get_attr(GRP, attr(1, abi.IPI_BUF + 8 * i)) for i in range(4) if i != index]
    assert others == [0, 0, 0]
    chip.vm.guest_iocsr_write(1, BASE + off + 6, 2, 0xFFFF_0000_0000_ABCD)
    assert chip.dev.get_attr(GRP, attr(1, off)) == 0xABCD_3344_5566_7788
    chip.dev.set_attr(GRP, attr(1, off), U64_MAX)
    assert chip.dev.get_attr(GRP, attr(1, off)) == U64_MAX


def test_attr_register_is_the_low_byte(chip: Chip) -> None:
    # kvm_ipi_regs_access decodes attr & 0xff; bits 8..15 do not choose a register.
    chip.dev.set_attr(GRP, attr(0, 0x104), 5)
    assert chip.dev.get_attr(GRP, attr(0, abi.IPI_EN)) == 5


@pytest.mark.parametrize("off", [0x01, 0x02, 0x10, 0x1C, 0x24, 0x3C, 0x40, 0x48, 0x58, 0xFF])
def test_attr_bad_offset_is_einval(chip: Chip, off: int) -> None:
    before = snapshot(chip)
    with pytest.raises(KvmError) as e:
        chip.dev.set_attr(GRP, attr(0, off), 1)
    assert e.value.name == "EINVAL"
    with pytest.raises(KvmError) as e:
        chip.dev.get_attr(GRP, attr(0, off))
    assert e.value.name == "EINVAL"
    assert snapshot(chip) == before


@pytest.mark.parametrize("vcpu_id", [3, 255, 0x3FF])
def test_attr_missing_vcpu_is_einval(chip: Chip, vcpu_id: int) -> None:
    with pytest.raises(KvmError) as e:
        chip.dev.set_attr(GRP, attr(vcpu_id, abi.IPI_EN), 1)
    assert e.value.name == "EINVAL"
    with pytest.raises(KvmError) as e:
        chip.dev.get_attr(GRP, attr(vcpu_id, abi.IPI_EN))
    assert e.value.name == "EINVAL"


@pytest.mark.parametrize(
    ("off", "value"),
    [
        (0x00, 1 << 32),
        (0x04, U32_MAX + 1),
        (0x08, U64_MAX),
        (0x0C, -1),
        (0x20, 1 << 64),
        (0x38, -1),
    ],
)
def test_attr_value_wider_than_the_register_is_einval(chip: Chip, off: int, value: int) -> None:
    before = snapshot(chip)
    with pytest.raises(KvmError) as e:
        chip.dev.set_attr(GRP, attr(0, off), value)
    assert e.value.name == "EINVAL"
    assert snapshot(chip) == before


def test_attr_widest_values_fit(chip: Chip) -> None:
    chip.dev.set_attr(GRP, attr(0, abi.IPI_EN), U32_MAX)
    chip.dev.set_attr(GRP, attr(0, abi.IPI_BUF + 24), U64_MAX)
    assert chip.dev.get_attr(GRP, attr(0, abi.IPI_EN)) == U32_MAX
    assert chip.dev.get_attr(GRP, attr(0, abi.IPI_BUF + 24)) == U64_MAX


@pytest.mark.parametrize(
    "group",
    [
        0,
        1,
        abi.CPUCFG_KVM_SIG,
        abi.KVM_DEV_LOONGARCH_EXTIOI_GRP_REGS,
        abi.KVM_DEV_LOONGARCH_EXTIOI_GRP_SW_STATUS,
    ],
)
def test_other_attr_groups_are_einval(chip: Chip, group: int) -> None:
    with pytest.raises(KvmError) as e:
        chip.dev.set_attr(group, attr(0, 0), 1)
    assert e.value.name == "EINVAL"
    with pytest.raises(KvmError) as e:
        chip.dev.get_attr(group, attr(0, 0))
    assert e.value.name == "EINVAL"
    assert status(chip, 0) == 0


# --- §13 case 26: unaligned and unknown offsets ---------------------------------------------------


def primed(c: Chip) -> None:
    """Put something non-zero in every register of vcpu 0 so a wrong read shows."""
    c.vm.guest_iocsr_write(0, SET, 4, 0xFFFF_FFFF)
    c.vm.guest_iocsr_write(0, EN, 4, 0xFFFF_FFFF)
    for i in range(4):
        c.vm.guest_iocsr_write(0, BUF + 8 * i, 8, U64_MAX)


@pytest.mark.parametrize(
    ("addr", "size"),
    [
        (STATUS + 1, 2), (STATUS + 2, 4), (EN, 8), (STATUS + 1, 1), (STATUS + 3, 1),
        (0x100C, 8), (BUF + 1, 2), (BUF + 2, 4), (BUF + 4, 8), (BUF + 0x1C, 8),
        (0x1010, 4), (0x101C, 4), (0x1040, 8), (0x1048, 4), (0x1050, 8), (0x1100, 4),
        (ANY_SEND, 8), (0x115C, 4),
    ],
)  # fmt: skip
def test_unaligned_or_unknown_reads_give_zero(chip: Chip, addr: int, size: int) -> None:
    primed(chip)
    assert chip.vm.guest_iocsr_read(0, addr, size) == 0


@pytest.mark.parametrize(
    ("addr", "size"),
    [
        (SET + 2, 2), (EN, 8), (0x100C, 8), (BUF + 1, 2), (BUF + 2, 4), (BUF + 4, 8),
        (IPI_SEND + 2, 2), (IPI_SEND + 4, 4), (MAIL_SEND + 4, 4), (ANY_SEND + 4, 4),
        (0x1010, 4), (0x1018, 8), (0x1050, 8), (0x1100, 4), (0x115C, 4), (STATUS + 1, 1),
    ],
)  # fmt: skip
def test_unaligned_or_unknown_writes_are_ignored(chip: Chip, addr: int, size: int) -> None:
    chip.vm.guest_iocsr_write(0, SET, 4, 1)
    before = snapshot(chip)
    events = list(chip.vm.events)
    chip.vm.guest_iocsr_write(0, addr, size, 0xFFFF_FFFF_FFFF_FFFF)
    assert snapshot(chip) == before
    assert chip.vm.events == events


def test_send_registers_read_zero(chip: Chip) -> None:
    primed(chip)
    for reg in (IPI_SEND, MAIL_SEND, ANY_SEND):
        assert chip.vm.guest_iocsr_read(0, reg, 4) == 0


# --- properties ---------------------------------------------------------------------------------


@given(
    stores=st.lists(
        st.tuples(st.integers(0, 0x1F), st.sampled_from([1, 2, 4, 8]), st.integers(0, U64_MAX)),
        max_size=30,
    ),
    probe=st.tuples(st.integers(0, 0x1F), st.sampled_from([1, 2, 4, 8])),
)
def test_mailbox_bytes_match_a_bytearray_model(
    stores: list[tuple[int, int, int]], probe: tuple[int, int]
) -> None:
    c = make_chip()
    model = bytearray(32)
    for off, size, value in stores:
        c.vm.guest_iocsr_write(0, BUF + off, size, value)
        if off % size == 0:
            model[off : off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
    off, size = probe
    expected = int.from_bytes(model[off : off + size], "little") if off % size == 0 else 0
    assert c.vm.guest_iocsr_read(0, BUF + off, size) == expected
    assert c.dev.get_attr(GRP, attr(0, abi.IPI_BUF)) == int.from_bytes(model[:8], "little")


phyids = st.sampled_from([3, 0, 1, 2, 256, 0x3FF])
guest_ops = st.one_of(
    st.tuples(st.just(IPI_SEND), phyids, st.integers(0, 0x1F)),
    st.tuples(st.just(ANY_SEND), phyids, st.integers(0, U32_MAX)),
    st.tuples(st.just(SET), st.integers(0, 2), st.integers(0, U32_MAX)),
    st.tuples(st.just(CLEAR), st.integers(0, 2), st.integers(0, U64_MAX)),
)


@given(ops=st.lists(guest_ops, max_size=40), sender=st.integers(0, 2))
def test_lines_agree_with_implied_lines_under_guest_traffic(
    ops: list[tuple[int, int, int]], sender: int
) -> None:
    c = make_chip()
    for reg, who, bits in ops:
        if reg == IPI_SEND:
            c.vm.guest_iocsr_write(sender, IPI_SEND, 8, cpu(who) | bits)
        elif reg == ANY_SEND:  # aimed at the target's SET or CLEAR
            target_reg = CLEAR if bits & 1 else SET
            c.vm.guest_iocsr_write(sender, ANY_SEND, 8, bits << 32 | cpu(who) | target_reg)
        else:
            c.vm.guest_iocsr_write(who, reg, 4, bits)
        implied = implied_lines(c.dev)
        assert implied == {v: c.vm.lines[v] & IPI_LINE for v in c.vm.vcpu_ids()}
        assert all(
            (c.dev.get_attr(GRP, attr(v, 0)) != 0) == bool(implied[v]) for v in c.vm.vcpu_ids()
        )


@given(value=st.integers(0, U64_MAX), off=st.sampled_from([0, 4, 8, 0xC, 0x20, 0x28, 0x30, 0x38]))
def test_reads_are_zero_extended(value: int, off: int) -> None:
    c = make_chip()
    width = 8 if off >= 0x20 else 4
    c.dev.set_attr(GRP, attr(0, off), value & ((1 << (8 * width)) - 1))
    for size in (1, 2, 4, 8):
        got = c.vm.guest_iocsr_read(0, BASE + off, size)
        assert 0 <= got < 1 << (8 * size)
