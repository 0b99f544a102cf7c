"""Conformance of the phyid (physical CPUID) map, through the trio client and a real daemon.

SEMANTICS.md §13 cases 1-13 (§3 ONE_REG, §4 set/drop/lookup, §5 lifecycle), plus the selftest
pattern of §5, each checked over a real Unix socket against the daemon's own map: ONE_REG
CPUID/TMID readback, ``vm.phyid_lookup``, ``vm.phyid_map`` and errno names. Tests are named
``test_case_NN_...`` after the §13 case they check. Register ids are spelled from the spec
(PROTOCOL.md §6), not taken from the implementation.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable

import pytest
import trio

from lvz.clients import AsyncKvm, AsyncVcpu, AsyncVm, KvmError, open_kvm
from lvz.daemon.server import Daemon

# ONE_REG ids (SEMANTICS §3, PROTOCOL §6).
KVM_REG_LOONGARCH = 0x9000000000000000
SIZE_U64 = 0x0030000000000000
SIZE_U32 = 0x0020000000000000
CLASS_GPR = 0x00000
CLASS_CSR = 0x10000
CLASS_KVM = 0x20000
CPUID = 0x9030000000010100
TMID = 0x9030000000010200
ESTAT = 0x9030000000010028
VCPU_RESET = 0x9030000000020002
INT_TI = 11

OUT_OF_RANGE = [256, 257, 511, 0x1FF, 2**31, 2**32, 2**64 - 1]


def csr_id(index: int, size: int = SIZE_U64) -> int:
    return KVM_REG_LOONGARCH | size | CLASS_CSR | (index << 3)


async def make_vm(
    kvm: AsyncKvm, phyids: dict[int, int | None], *, max_phyid: int | None = None
) -> tuple[AsyncVm, dict[int, AsyncVcpu]]:
    """A VM with one vCPU per key (vcpu_id); a non-None value is set as its CPUID."""
    vm = await kvm.create_vm(max_phyid=max_phyid)
    vcpus: dict[int, AsyncVcpu] = {}
    for vcpu_id, phyid in phyids.items():
        vcpus[vcpu_id] = await vm.create_vcpu(vcpu_id)
        if phyid is not None:
            await vcpus[vcpu_id].set_one_reg(CPUID, phyid)
    return vm, vcpus


async def entries(vm: AsyncVm) -> tuple[tuple[int, int], ...]:
    return (await vm.phyid_map()).entries


async def expect_errno(name: str, call: Awaitable[object]) -> KvmError:
    """Await ``call`` (a coroutine) and insist it fails with errno ``name``."""
    with pytest.raises(KvmError) as info:
        await call
    assert info.value.name == name, info.value
    return info.value


async def lookups(vm: AsyncVm, phyids: Iterable[int]) -> dict[int, int | None]:
    return {p: await vm.phyid_lookup(p) for p in phyids}


# --- case 1 --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("max_phyid", "marker"), [(None, 256), (4096, 4096)])
async def test_case_01_fresh_vcpu_reads_unset_marker_and_tmid(
    daemon: Daemon, max_phyid: int | None, marker: int
) -> None:
    ids = [0, 5, 200, 255] if max_phyid is None else [0, 5, 255, 300, 4095]
    async with open_kvm(daemon.config.socket) as kvm:
        vm, vcpus = await make_vm(kvm, dict.fromkeys(ids), max_phyid=max_phyid)
        for vcpu_id, vcpu in vcpus.items():
            assert await vcpu.get_one_reg(CPUID) == marker
            assert await vcpu.get_one_reg(TMID) == vcpu_id
        pmap = await vm.phyid_map()
        assert pmap.limit == marker
        assert pmap.entries == ()
        assert await vm.phyid_lookup(0) is None


# --- case 2 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, 77, 128, 254, 255])
async def test_case_02_set_reads_back_and_lookup_finds_vcpu(daemon: Daemon, value: int) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        vm, vcpus = await make_vm(kvm, {9: None})
        await vcpus[9].set_one_reg(CPUID, value)
        assert await vcpus[9].get_one_reg(CPUID) == value
        assert await vm.phyid_lookup(value) == 9
        assert await entries(vm) == ((value, 9),)
        assert await vcpus[9].get_one_reg(TMID) == 9  # CPUID and TMID are separate registers


async def test_case_02_set_with_raised_limit(daemon: Daemon) -> None:
    """Decision 4: "256" in §4 means the VM's limit; with 4096, 4095 is the top valid phyid."""
    async with open_kvm(daemon.config.socket) as kvm:
        vm, vcpus = await make_vm(kvm, {0: 256, 1: 4095}, max_phyid=4096)
        assert await vcpus[0].get_one_reg(CPUID) == 256
        assert await vcpus[1].get_one_reg(CPUID) == 4095
        assert await lookups(vm, [256, 4095]) == {256: 0, 4095: 1}
        v2 = await vm.create_vcpu(2)
        await expect_errno("EINVAL", v2.set_one_reg(CPUID, 4096))
        assert await v2.get_one_reg(CPUID) == 4096
        assert await entries(vm) == ((256, 0), (4095, 1))


# --- case 3 --------------------------------------------------------------------------------------


async def test_case_03_same_value_again_is_a_repeatable_no_op(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        vm, vcpus = await make_vm(kvm, {0: 7, 1: 8})
        before = await entries(vm)
        for _ in range(5):
            await vcpus[0].set_one_reg(CPUID, 7)  # must not raise
            assert await vcpus[0].get_one_reg(CPUID) == 7
            assert await entries(vm) == before == ((7, 0), (8, 1))
            assert await vm.phyid_lookup(7) == 0


# --- case 4 --------------------------------------------------------------------------------------


async def test_case_04_changing_a_set_cpuid_is_einval_and_keeps_the_old_one(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        vm, vcpus = await make_vm(kvm, {0: 10, 1: 20, 2: None})
        await expect_errno("EINVAL", vcpus[0].set_one_reg(CPUID, 11))  # free value
        await expect_errno("EINVAL", vcpus[0].set_one_reg(CPUID, 20))  # taken value
        await expect_errno("EINVAL", vcpus[0].set_one_reg(CPUID, 0))
        assert await vcpus[0].get_one_reg(CPUID) == 10
        assert await lookups(vm, [10, 11, 20, 0]) == {10: 0, 11: None, 20: 1, 0: None}
        assert await entries(vm) == ((10, 0), (20, 1))
        # The refused value really stayed free: another vCPU can take it.
        await vcpus[2].set_one_reg(CPUID, 11)
        assert await vm.phyid_lookup(11) == 2


# --- case 5 --------------------------------------------------------------------------------------


async def test_case_05_second_vcpu_asking_for_a_taken_cpuid_is_einval(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        vm, vcpus = await make_vm(kvm, {0: 42, 1: None})
        await expect_errno("EINVAL", vcpus[1].set_one_reg(CPUID, 42))
        assert await vcpus[1].get_one_reg(CPUID) == 256
        assert await vm.phyid_lookup(42) == 0
        assert await entries(vm) == ((42, 0),)
        # The loser is still unset, so it may take a free value afterwards.
        await vcpus[1].set_one_reg(CPUID, 43)
        assert await entries(vm) == ((42, 0), (43, 1))


# --- case 6 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", OUT_OF_RANGE, ids=hex)
async def test_case_06_out_of_range_cpuid_is_einval_set_or_unset(
    daemon: Daemon, value: int
) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        vm, vcpus = await make_vm(kvm, {0: None, 1: 3})
        await expect_errno("EINVAL", vcpus[0].set_one_reg(CPUID, value))
        await expect_errno("EINVAL", vcpus[1].set_one_reg(CPUID, value))
        assert await vcpus[0].get_one_reg(CPUID) == 256
        assert await vcpus[1].get_one_reg(CPUID) == 3
        assert await entries(vm) == ((3, 1),)
        # "no way to unset": writing the marker back did not free 3
        assert await vm.phyid_lookup(3) == 1


# --- case 7 --------------------------------------------------------------------------------------


async def test_case_07_cpuid_is_independent_of_vcpu_id(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        layout: dict[int, int | None] = {3: 0, 0: 255, 17: 1, 99: 2, 254: 3, 128: None}
        vm, vcpus = await make_vm(kvm, layout)
        assert await entries(vm) == ((0, 3), (1, 17), (2, 99), (3, 254), (255, 0))
        assert await lookups(vm, [0, 255, 1, 2, 3, 128]) == {
            0: 3,
            255: 0,
            1: 17,
            2: 99,
            3: 254,
            128: None,
        }
        for vcpu_id, vcpu in vcpus.items():
            assert await vcpu.get_one_reg(TMID) == vcpu_id
            assert await vcpu.get_one_reg(CPUID) == (
                layout[vcpu_id] if layout[vcpu_id] is not None else 256
            )


# --- case 8 --------------------------------------------------------------------------------------


async def test_case_08_each_vm_has_its_own_map(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        vm_a, _ = await make_vm(kvm, {0: 0, 1: 1})
        vm_b, vcpus_b = await make_vm(kvm, {5: 0, 6: None})
        assert await vm_a.phyid_lookup(0) == 0
        assert await vm_b.phyid_lookup(0) == 5
        assert await vm_b.phyid_lookup(1) is None
        await vcpus_b[6].set_one_reg(CPUID, 1)  # 1 is taken in A, free in B
        assert await entries(vm_a) == ((0, 0), (1, 1))
        assert await entries(vm_b) == ((0, 5), (1, 6))
        await vm_a.destroy()
        assert await entries(vm_b) == ((0, 5), (1, 6))


# --- case 9 --------------------------------------------------------------------------------------


async def test_case_09_lookup_unset_out_of_range_and_negative_is_none(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        vm, _ = await make_vm(kvm, {0: 0, 1: 255})
        probes = [5, 254, 256, 257, 511, 4096, 2**31, -1, -2, -256, -(2**31)]
        assert await lookups(vm, probes) == dict.fromkeys(probes)
        assert await lookups(vm, [0, 255]) == {0: 0, 255: 1}

        big, _ = await make_vm(kvm, {0: 4095}, max_phyid=4096)
        assert await lookups(big, [300, 4096, 4097, -1, 4095]) == {
            300: None,
            4096: None,
            4097: None,
            -1: None,
            4095: 0,
        }


# --- case 10 -------------------------------------------------------------------------------------


async def test_case_10_vcpu_destroy_clears_the_entry_and_the_phyid_can_be_reused(
    daemon: Daemon,
) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        vm, vcpus = await make_vm(kvm, {0: 0, 1: 9, 2: None})
        await vcpus[1].destroy()
        assert await vm.phyid_lookup(9) is None
        assert await entries(vm) == ((0, 0),)
        # The dropped vCPU is gone: its handle answers EBADF (its CSR is no longer readable).
        await expect_errno("EBADF", vcpus[1].get_one_reg(CPUID))
        await expect_errno("EBADF", vcpus[1].set_one_reg(CPUID, 9))
        # Another vCPU takes the freed phyid.
        await vcpus[2].set_one_reg(CPUID, 9)
        assert await vm.phyid_lookup(9) == 2
        # A vCPU re-created with the old vcpu_id is a fresh one: unset, and 9 is not its own.
        again = await vm.create_vcpu(1)
        assert await again.get_one_reg(CPUID) == 256
        await expect_errno("EINVAL", again.set_one_reg(CPUID, 9))
        await again.set_one_reg(CPUID, 10)
        assert await entries(vm) == ((0, 0), (9, 2), (10, 1))


async def test_case_10_vm_destroy_drops_every_entry(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm, open_kvm(daemon.config.socket) as other:
        vm = await kvm.create_vm(name="doomed")
        v0 = await vm.create_vcpu(0)
        await v0.set_one_reg(CPUID, 0)
        seen_elsewhere = await other.open_vm("doomed")
        assert await seen_elsewhere.phyid_lookup(0) == 0
        await vm.destroy()
        await expect_errno("EBADF", vm.phyid_lookup(0))
        await expect_errno("EBADF", seen_elsewhere.phyid_lookup(0))
        await expect_errno("EBADF", v0.get_one_reg(CPUID))
        assert [s.name for s in await kvm.list_vms()] == []
        # A new VM, even under the same name, starts with an empty map.
        fresh = await kvm.create_vm(name="doomed")
        assert await entries(fresh) == ()
        w0 = await fresh.create_vcpu(0)
        assert await w0.get_one_reg(CPUID) == 256
        await w0.set_one_reg(CPUID, 0)
        assert await fresh.phyid_lookup(0) == 0
        await fresh.destroy()


# --- case 11 -------------------------------------------------------------------------------------


async def test_case_11_destroying_a_vcpu_that_never_set_a_cpuid_leaves_the_map(
    daemon: Daemon,
) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        vm, vcpus = await make_vm(kvm, {0: 0, 1: 1, 2: None, 3: None})
        before = await entries(vm)
        await vcpus[2].destroy()
        assert await entries(vm) == before == ((0, 0), (1, 1))
        # A vCPU whose set failed (the value belonged to vCPU 0) is still unset: destroying it
        # must not drop vCPU 0's entry (drop looks at the vCPU's own CSR, which is the marker).
        await expect_errno("EINVAL", vcpus[3].set_one_reg(CPUID, 0))
        await vcpus[3].destroy()
        assert await entries(vm) == before
        assert await lookups(vm, [0, 1]) == {0: 0, 1: 1}


# --- case 12 -------------------------------------------------------------------------------------


BAD_IDS = {
    "cpuid-size-u32": csr_id(0x20, SIZE_U32),
    "cpuid-size-u8": csr_id(0x20, 0),
    "cpuid-size-u128": csr_id(0x20, 0x0040000000000000),
    "csr-0x800": csr_id(0x800),
    "csr-0xfff": csr_id(0xFFF),
    "class-gpr": KVM_REG_LOONGARCH | SIZE_U64 | CLASS_GPR | (4 << 3),
    "class-6": KVM_REG_LOONGARCH | SIZE_U64 | 0x60000,
    "class-7": KVM_REG_LOONGARCH | SIZE_U64 | 0x70000 | (0x20 << 3),
    "kvm-unknown": KVM_REG_LOONGARCH | SIZE_U64 | CLASS_KVM | 4,
}


@pytest.mark.parametrize("reg_id", list(BAD_IDS.values()), ids=list(BAD_IDS))
async def test_case_12_other_one_reg_errors_are_einval(daemon: Daemon, reg_id: int) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        vm, vcpus = await make_vm(kvm, {0: None})
        await expect_errno("EINVAL", vcpus[0].set_one_reg(reg_id, 5))
        await expect_errno("EINVAL", vcpus[0].get_one_reg(reg_id))
        # Nothing was set through the malformed id.
        assert await vcpus[0].get_one_reg(CPUID) == 256
        assert await entries(vm) == ()


async def test_case_12_ignored_id_bits_still_reach_cpuid(daemon: Daemon) -> None:
    """§3: bits 0..2 of the id are not checked, so CPUID | 7 is still CSR 0x20."""
    async with open_kvm(daemon.config.socket) as kvm:
        vm, vcpus = await make_vm(kvm, {0: None})
        await vcpus[0].set_one_reg(CPUID | 7, 12)
        assert await vcpus[0].get_one_reg(CPUID) == 12
        assert await vm.phyid_lookup(12) == 0


# --- case 13 -------------------------------------------------------------------------------------


async def test_case_13_vcpu_reset_leaves_cpuid(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        vm, vcpus = await make_vm(kvm, {0: 77, 1: None})
        for vcpu in vcpus.values():
            await vcpu.interrupt(INT_TI)
            assert await vcpu.get_one_reg(ESTAT) == 1 << INT_TI
            await vcpu.set_one_reg(VCPU_RESET, 0)
            assert await vcpu.get_one_reg(ESTAT) == 0  # the reset did happen
        assert await vcpus[0].get_one_reg(CPUID) == 77
        assert await vcpus[1].get_one_reg(CPUID) == 256
        assert await vm.phyid_lookup(77) == 0
        assert await entries(vm) == ((77, 0),)
        # Still owned: changing it is still refused, the same value still accepted.
        await expect_errno("EINVAL", vcpus[0].set_one_reg(CPUID, 78))
        await vcpus[0].set_one_reg(CPUID, 77)


# --- selftest pattern (§5) -----------------------------------------------------------------------


async def test_selftest_pattern_cpuid_equals_tmid_equals_vcpu_id(daemon: Daemon) -> None:
    """tools/testing/selftests/kvm loongarch_vcpu_setup: CPUID = TMID = vcpu_id, all 256."""
    async with open_kvm(daemon.config.socket) as kvm:
        vm = await kvm.create_vm()
        vcpus: list[AsyncVcpu] = []

        async def setup(vcpu_id: int) -> None:
            vcpu = await vm.create_vcpu(vcpu_id)
            await vcpu.set_one_reg(CPUID, vcpu_id)
            await vcpu.set_one_reg(TMID, vcpu_id)
            vcpus.append(vcpu)

        async with trio.open_nursery() as nursery:  # pipelined, as a VMM's threads would be
            for vcpu_id in range(256):
                nursery.start_soon(setup, vcpu_id)
        assert await entries(vm) == tuple((i, i) for i in range(256))
        for vcpu in vcpus:
            assert await vcpu.get_one_reg(CPUID) == vcpu.vcpu_id
            assert await vcpu.get_one_reg(TMID) == vcpu.vcpu_id
        assert await lookups(vm, [0, 128, 255, 256]) == {0: 0, 128: 128, 255: 255, 256: None}
