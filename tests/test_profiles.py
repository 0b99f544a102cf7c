"""Kernel-version profiles: a VM created with ``profile=`` behaves as that kernel, one test per
difference in the table (lvz/protocol/profiles.py), each naming the kernel change it reverts.

The table itself is checked as data (inheritance, citations); every behaviour through a real
daemon over its socket; ``lvz profiles`` and ``lvz vm create --profile`` through the command.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from pathlib import Path

import pytest
import trio

from lvz.clients import AsyncKvm, AsyncVcpuFd, AsyncVm, Kvm, KvmError, abi, open_kvm
from lvz.clients.cli import main
from lvz.daemon.config import ServeConfig
from lvz.daemon.host import load_plugins
from lvz.daemon.server import Daemon, serve
from lvz.protocol import profiles

pytest_plugins = ["tests.daemon_fixtures"]

IPI, EIO, PCH = abi.DEV_IPI, abi.DEV_EIOINTC, abi.DEV_PCHPIC
CHIPS = (IPI, EIO, PCH)
PVTIME, GPA = abi.KVM_LOONGARCH_VCPU_PVTIME_CTRL, abi.KVM_LOONGARCH_VCPU_PVTIME_GPA
CPUCFG, FEATURE = abi.KVM_LOONGARCH_VCPU_CPUCFG, abi.CPUCFG_KVM_FEATURE
SERVICE = abi.KVM_HCALL_SERVICE
ST = abi.KVM_FEATURE_STEAL_TIME
PCH_BASE = 0x10000000
EIO_REGS = abi.KVM_DEV_LOONGARCH_EXTIOI_GRP_REGS
U64 = abi.U64_MAX


async def expect_errno(name: str, call: Awaitable[object]) -> KvmError:
    with pytest.raises(KvmError) as info:
        await call
    assert info.value.name == name, info.value
    return info.value


async def guest(
    kvm: AsyncKvm, profile: str, chips: tuple[str, ...] = (), phyids: dict[int, int] | None = None
) -> AsyncVm:
    vm = await kvm.create_vm(profile=profile)
    for vcpu_id, phyid in (phyids or {0: 0}).items():
        await (await vm.create_vcpu(vcpu_id)).set_one_reg(abi.CPUID, phyid)
    for chip in chips:
        dev = await vm.create_device(chip)
        if chip == PCH:
            await dev.set_attr(
                abi.KVM_DEV_LOONGARCH_PCH_PIC_GRP_CTRL,
                abi.KVM_DEV_LOONGARCH_PCH_PIC_CTRL_INIT,
                PCH_BASE,
            )
    return vm


# --- the table as data ----------------------------------------------------------------------------


def test_each_profile_is_the_next_newer_plus_its_own_rows() -> None:
    """QEMU compat-table inheritance: a profile's table is the next-newer one's, then its rows."""
    assert profiles.PROFILES[0] == profiles.DEFAULT == "newest"
    assert dict(profiles.resolve("newest")) == dict(profiles.NEWEST)
    for newer, older in zip(profiles.PROFILES, profiles.PROFILES[1:], strict=False):
        expect = dict(profiles.resolve(newer))
        for row in profiles.rows_of(older):
            expect[row.key] = row.value
        assert dict(profiles.resolve(older)) == expect, older


def test_every_row_changes_a_known_key_and_cites_the_kernel_change() -> None:
    for name in profiles.PROFILES:
        for row in profiles.rows_of(name):
            assert row.key in profiles.NEWEST, (name, row)
            assert "LoongArch" in row.change or "6.12" in row.change, (name, row)
            assert any(ch.isdigit() for ch in row.change), (name, row)  # a commit or release
        assert profiles.SUMMARY[name]


def test_an_unknown_profile_is_einval_naming_the_profiles() -> None:
    with pytest.raises(KvmError) as info:
        profiles.resolve("6.12")
    assert info.value.name == "EINVAL"
    assert "6.10" in info.value.message and "newest" in info.value.message


# --- choosing a profile --------------------------------------------------------------------------


async def test_create_vm_takes_a_profile_and_shows_it(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        old = await kvm.create_vm(name="old", profile="6.10")
        new = await kvm.create_vm()
        assert (await kvm.call("vm.info", {"vm": old.handle}))["profile"] == "6.10"
        assert (await kvm.call("vm.info", {"vm": new.handle}))["profile"] == "newest"
        listed = (await kvm.call("kvm.list_vms", {}))["vms"]
        assert sorted(v["profile"] for v in listed) == ["6.10", "newest"]
        before = len(listed)
        await expect_errno("EINVAL", kvm.create_vm(name="bad", profile="2.6"))
        assert len((await kvm.call("kvm.list_vms", {}))["vms"]) == before  # nothing created


async def test_hello_answers_as_the_profile(daemon: Daemon) -> None:
    """KVM_CREATE_DEVICE's device types: none of the irqchips before 6.13."""
    async with open_kvm(daemon.config.socket) as kvm:
        newest = await kvm.call("hello", {"protocol": 1})
        assert set(CHIPS) <= set(newest["device_types"])
        assert newest["profile"] == "newest" and newest["profiles"] == list(profiles.PROFILES)
        old = await kvm.call("hello", {"protocol": 1, "profile": "6.11"})
        assert not set(CHIPS) & set(old["device_types"])
        assert set(old["device_types"]) == set(newest["device_types"]) - set(CHIPS)
        await expect_errno("EINVAL", kvm.call("hello", {"protocol": 1, "profile": "x"}))


@pytest.mark.parametrize(
    ("profile", "irqchip", "pv"),
    [
        ("6.10", 0, 0),
        ("6.11", 0, 0),
        ("6.13", 1, abi.KVM_FEATURE_IPI | ST | abi.KVM_FEATURE_VIRT_EXTIOI),
        (
            "6.14",
            1,
            abi.KVM_FEATURE_IPI | ST | abi.KVM_FEATURE_VIRT_EXTIOI | abi.KVM_FEATURE_USER_HCALL,
        ),
        ("6.18", 1, abi.PV_FEATURE_MASK & ~abi.KVM_FEATURE_PREEMPT & ~abi.KVM_FEATURE_CRASH),
        ("7.0", 1, abi.PV_FEATURE_MASK & ~abi.KVM_FEATURE_CRASH),
        ("newest", 1, abi.PV_FEATURE_MASK),
    ],
)
async def test_check_extension_answers_as_the_profile(
    daemon: Daemon, profile: str, irqchip: int, pv: int
) -> None:
    """KVM_CAP_IRQCHIP / KVM_CAP_SIGNAL_MSI from 6.13 (HAVE_KVM_IRQCHIP, HAVE_KVM_MSI); the PV
    feature mask grew in 6.12 (control), 6.14 (USER_HCALL), 7.0 (PREEMPT) and the maintainer's
    tree (CRASH)."""
    async with open_kvm(daemon.config.socket) as kvm:
        assert await kvm.check_extension("irqchip", profile) == irqchip
        assert await kvm.check_extension("signal_msi", profile) == irqchip
        assert await kvm.check_extension("pv_features", profile) == pv
        assert await kvm.check_extension("one_reg", profile) == 1


def test_the_blocking_client_takes_a_profile(lvz_socket: Path) -> None:
    with Kvm.connect(lvz_socket) as kvm:
        assert kvm.check_extension("irqchip", "6.10") == 0
        assert kvm.check_extension("irqchip") == 1
        with kvm.create_vm(profile="6.10") as vm:
            assert kvm.call("vm.info", {"vm": vm.handle})["profile"] == "6.10"
            with pytest.raises(KvmError) as info:
                vm.create_device(IPI)
            assert info.value.name == "ENODEV"


# --- 6.10 / 6.11: no in-kernel irqchips (6.13) --------------------------------------------------


@pytest.mark.parametrize("profile", ["6.10", "6.11"])
async def test_before_6_13_the_irqchips_do_not_exist(daemon: Daemon, profile: str) -> None:
    """KVM_CREATE_DEVICE: -ENODEV for a type nobody registered (IPI/EIOINTC/PCHPIC came with
    loongarch-kvm-6.13); KVM_IRQ_LINE and KVM_SIGNAL_MSI are not compiled in (ENOTTY)."""
    async with open_kvm(daemon.config.socket) as kvm:
        vm = await guest(kvm, profile)
        for chip in CHIPS:
            err = await expect_errno("ENODEV", vm.create_device(chip))
            assert "6.13" in err.message
        await expect_errno("ENOTTY", vm.irq_line(0, 1))
        await expect_errno("ENOTTY", vm.signal_msi(0, 1))
        # The chips' addresses are nobody's: with no VMM running the vCPU, ENXIO (with one, an
        # exit: test_what_an_older_kernel_leaves_to_the_vmm_exits_to_it).
        v0 = await vm.open_vcpu(0)
        await expect_errno("ENXIO", v0.iocsr_read(abi.IOCSR_IPI_BASE, 4))
        await expect_errno("ENXIO", v0.mmio_read(PCH_BASE, 8))
    # The same calls on 6.13 work.
    async with open_kvm(daemon.config.socket) as kvm:
        vm = await guest(kvm, "6.13", CHIPS)
        await vm.irq_line(0, 1)
        await vm.signal_msi(0, 1)


@pytest.mark.parametrize("profile", ["6.10", "6.11"])
async def test_before_6_12_pv_features_cannot_be_controlled(daemon: Daemon, profile: str) -> None:
    """ "Enable paravirt feature control from VMM" (6.12) added CPUCFG_KVM_FEATURE and the gate
    in kvm_handle_service: before, the attr is absent and PV IPI always works."""
    async with open_kvm(daemon.config.socket) as kvm:
        vm = await guest(kvm, profile, phyids={0: 0, 1: 1})
        v0, v1 = await vm.open_vcpu(0), await vm.open_vcpu(1)
        await expect_errno("ENXIO", v0.set_attr(CPUCFG, FEATURE, abi.KVM_FEATURE_IPI))
        await expect_errno("ENXIO", v0.get_attr(CPUCFG, FEATURE))
        assert await v0.hypercall(SERVICE, abi.KVM_HCALL_FUNC_IPI, 0b10, 0, 0) == 0
        assert await v1.get_one_reg(abi.csr_id(abi.CSR_ESTAT)) & 1 << abi.INT_SWI0
        # And a snapshot of such a VM still works: no PV feature word to save.
        copy = await kvm.restore_vm(await kvm.save_vm(vm))
        assert await (await copy.open_vcpu(1)).get_one_reg(abi.CPUID) == 1


async def test_6_10_has_no_steal_time(daemon: Daemon) -> None:
    """ "Add PV steal time support in host side" came in 6.11: FUNC_NOTIFY is an unknown
    function (INVALID_CODE) and the PVTIME attr group does not exist."""
    async with open_kvm(daemon.config.socket) as kvm:
        v0 = await (await guest(kvm, "6.10")).open_vcpu(0)
        assert await v0.hypercall(SERVICE, abi.KVM_HCALL_FUNC_NOTIFY, ST, 0x41) == -1
        await expect_errno("ENXIO", v0.get_attr(PVTIME, GPA))


async def test_6_11_steal_time_is_ungated_and_lenient(daemon: Daemon) -> None:
    """6.11's kvm_save_notify: no feature gate (6.12 added it), and an unknown a1 falls out of
    the switch to ``return 0``."""
    async with open_kvm(daemon.config.socket) as kvm:
        v0 = await (await guest(kvm, "6.11")).open_vcpu(0)
        assert await v0.hypercall(SERVICE, abi.KVM_HCALL_FUNC_NOTIFY, ST, 0x41) == 0
        assert await v0.get_attr(PVTIME, GPA) == 0x41
        assert await v0.hypercall(SERVICE, abi.KVM_HCALL_FUNC_NOTIFY, 1, 0x81) == 0
        assert await v0.get_attr(PVTIME, GPA) == 0x41  # answered 0, stored nothing
        assert await v0.hypercall(SERVICE, abi.KVM_HCALL_FUNC_NOTIFY, ST, 0x42) == -2


# --- 6.13: no user hypercall feature (6.14) -------------------------------------------------------


async def test_6_13_refuses_the_user_hcall_feature(daemon: Daemon) -> None:
    """2737dee1067c (6.14) added KVM_FEATURE_USER_HCALL to LOONGARCH_PV_FEAT_MASK."""
    async with open_kvm(daemon.config.socket) as kvm:
        v0 = await (await guest(kvm, "6.13")).open_vcpu(0)
        await expect_errno("EINVAL", v0.set_attr(CPUCFG, FEATURE, abi.KVM_FEATURE_USER_HCALL))
        v0 = await (await guest(kvm, "6.14")).open_vcpu(0)
        await v0.set_attr(CPUCFG, FEATURE, abi.KVM_FEATURE_USER_HCALL)


# --- 6.14: in-kernel device loads not sign-extended (6.18) --------------------------------------


@pytest.mark.parametrize(("profile", "extend"), [("6.14", False), ("6.18", True)])
async def test_loads_from_in_kernel_devices_sign_extend_from_6_18(
    daemon: Daemon, profile: str, extend: bool
) -> None:
    """80edf90831a2 / 44598fe77663 (6.18) route in-kernel MMIO / IOCSR reads through
    kvm_complete_mmio_read / kvm_complete_iocsr_read, which sign-extend; before, the device
    wrote ``len`` bytes into the register (lvz shows the bytes above as 0)."""
    async with open_kvm(daemon.config.socket) as kvm:
        v0 = await (await guest(kvm, profile, CHIPS)).open_vcpu(0)
        buf = abi.IOCSR_IPI_BASE + abi.IPI_BUF
        await v0.iocsr_write(buf, 1, 0x80)
        assert await v0.iocsr_read(buf, 1) == (U64 ^ 0x7F if extend else 0x80)
        mask = await v0.mmio_read(PCH_BASE + abi.PCH_PIC_MASK, 4)
        assert mask == (U64 if extend else 0xFFFF_FFFF)


# --- 6.18: before the 7.0 fixes ----------------------------------------------------------------


async def test_negative_cpuid_lookup_is_undefined_before_7_0(daemon: Daemon) -> None:
    """2db06c15d8c7 (7.0-rc6) added ``if (cpuid < 0) return NULL`` to kvm_get_vcpu_by_cpuid;
    before, phys_map[cpuid] was read out of bounds: lvz answers EINVAL (decision 2)."""
    async with open_kvm(daemon.config.socket) as kvm:
        old = await guest(kvm, "6.18", phyids={0: 0, 1: 1})
        new = await guest(kvm, "7.0", phyids={0: 0, 1: 1})
        err = await expect_errno("EINVAL", old.phyid_lookup(-1))
        assert "2db06c15d8c7" in err.message
        assert await new.phyid_lookup(-1) is None
        # PV IPI from base a3 = 0xFFFFFFFF: bit 0 is CPUID 0xFFFFFFFF, -1 as an int; bit 2
        # wraps to CPUID 1. 7.0 skips the first and sends the second; 6.18 refuses the call
        # before sending anything.
        for vm, ok in ((new, True), (old, False)):
            v0, v1 = await vm.open_vcpu(0), await vm.open_vcpu(1)
            call = v0.hypercall(SERVICE, abi.KVM_HCALL_FUNC_IPI, 0b101, 0, 0xFFFF_FFFF)
            if ok:
                assert await call == 0
            else:
                await expect_errno("EINVAL", call)
            swi0 = await v1.get_one_reg(abi.csr_id(abi.CSR_ESTAT)) & 1 << abi.INT_SWI0
            assert bool(swi0) is ok


async def test_empty_eiointc_coremap_byte_before_7_0(daemon: Daemon) -> None:
    """b97bd69eb0f6 (7.0-rc6): an empty coremap byte names CPU 0; before, ffs(0) - 1 = -1 was
    looked up as a CPUID (out of bounds: EINVAL in lvz)."""
    coremap = abi.EIOINTC_BASE + abi.EIOINTC_COREMAP
    async with open_kvm(daemon.config.socket) as kvm:
        for profile in ("7.0", "6.18"):
            vm = await guest(kvm, profile, CHIPS, phyids={0: 3, 1: 0})
            v0 = await vm.open_vcpu(0)
            call = v0.iocsr_write(coremap, 1, 0)  # irq 0's byte: empty
            if profile == "7.0":
                await call
                await v0.iocsr_write(abi.EIOINTC_BASE + abi.EIOINTC_ENABLE, 1, 1)
                await vm.signal_msi(0, 0)  # irq 0 now goes to CPUID 0 = vCPU 1
                v1 = await vm.open_vcpu(1)
                assert await v1.get_one_reg(abi.csr_id(abi.CSR_ESTAT)) & 1 << abi.INT_HWI0
            else:
                err = await expect_errno("EINVAL", call)
                assert "2db06c15d8c7" in err.message


@pytest.mark.parametrize("profile", ["6.18", "6.13"])
async def test_undecoded_chip_accesses_leave_the_kernel_before_7_0(
    daemon: Daemon, profile: str
) -> None:
    """2faec60a4858 (7.0) made the irqchips' IO bus ops return 0; before, an unaligned access,
    an unknown offset or a read-only register returned -EINVAL, and KVM passed the access on
    to the VMM as if nobody claimed it (ENXIO with no VMM running the vCPU, else an exit)."""
    ipi = abi.IOCSR_IPI_BASE
    eio = abi.EIOINTC_BASE
    async with open_kvm(daemon.config.socket) as kvm:
        old = await (await guest(kvm, profile, CHIPS)).open_vcpu(0)
        new = await (await guest(kvm, "7.0", CHIPS)).open_vcpu(0)
        accesses: list[tuple[str, int, int, int | None]] = [
            ("iocsr", ipi + abi.IPI_EN + 1, 2, None),  # unaligned
            ("iocsr", ipi + 0x100, 4, None),  # no register
            ("iocsr", ipi + abi.IPI_STATUS, 4, 1),  # read-only
            ("iocsr", eio + abi.EIOINTC_ISR, 4, None),  # attr-only register
            ("iocsr", eio + abi.EIOINTC_ENABLE + 1, 2, 1),  # unaligned
            ("mmio", PCH_BASE + 0x8, 8, None),  # between registers
            ("mmio", PCH_BASE + abi.PCH_PIC_MASK + 2, 4, 0),  # unaligned
        ]

        def access(
            v: AsyncVcpuFd, space: str, addr: int, size: int, value: int | None
        ) -> Awaitable[object]:
            if value is None:
                return (v.iocsr_read if space == "iocsr" else v.mmio_read)(addr, size)
            return (v.iocsr_write if space == "iocsr" else v.mmio_write)(addr, size, value)

        for space, addr, size, value in accesses:
            await expect_errno("ENXIO", access(old, space, addr, size, value))
            await access(new, space, addr, size, value)  # 7.0: read 0 / store dropped
        assert await new.iocsr_read(ipi + 0x100, 4) == 0


async def test_7_0_accepts_the_preempt_feature_and_6_18_does_not(daemon: Daemon) -> None:
    """ "Add paravirt preempt feature in hypervisor side" (7.0) added KVM_FEATURE_PREEMPT."""
    async with open_kvm(daemon.config.socket) as kvm:
        v0 = await (await guest(kvm, "6.18")).open_vcpu(0)
        await expect_errno("EINVAL", v0.set_attr(CPUCFG, FEATURE, abi.KVM_FEATURE_PREEMPT))
        v0 = await (await guest(kvm, "7.0")).open_vcpu(0)
        await v0.set_attr(CPUCFG, FEATURE, abi.KVM_FEATURE_PREEMPT)


async def test_the_crash_hypercall_is_newer_than_7_0(daemon: Daemon) -> None:
    """KVM_HCALL_CRASH / KVM_FEATURE_CRASH exist only in the maintainer's tree (chenhuacai/linux
    exit.c), so a 7.0 VM cannot enable the feature and ``hvcl 0x103`` is INVALID_CODE."""
    async with open_kvm(daemon.config.socket) as kvm:
        v0 = await (await guest(kvm, "7.0")).open_vcpu(0)
        await expect_errno("EINVAL", v0.set_attr(CPUCFG, FEATURE, abi.KVM_FEATURE_CRASH))
        assert await v0.hypercall(abi.KVM_HCALL_CRASH) == abi.KVM_HCALL_INVALID_CODE
        v0 = await (await guest(kvm, "newest")).open_vcpu(0)
        await v0.set_attr(CPUCFG, FEATURE, abi.KVM_FEATURE_CRASH)


async def test_a_snapshot_keeps_the_profile(daemon: Daemon) -> None:
    async with open_kvm(daemon.config.socket) as kvm:
        vm = await guest(kvm, "6.14", CHIPS)
        saved = await kvm.save_vm(vm)
        assert saved["vm"]["profile"] == "6.14"
        copy = await kvm.restore_vm(saved)
        assert (await kvm.call("vm.info", {"vm": copy.handle}))["profile"] == "6.14"


# --- the command ------------------------------------------------------------------------------


def test_lvz_profiles_lists_every_profile_with_its_rows(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    for name in profiles.PROFILES:
        assert name in out
    assert "kernel_device_types=[]" in out
    assert main(["profiles", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(profiles.PROFILES)
    by_name = {r["name"]: r for r in rows}
    assert by_name["newest"]["changes"] == []
    assert {c["key"] for c in by_name["6.18"]["changes"]} >= {
        "negative_cpuid_check",
        "io_default_return_zero",
    }


def test_lvz_vm_create_with_a_profile(
    lvz_socket: Path, vm_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = ["--socket", str(lvz_socket)]
    assert main(["vm", "create", vm_name, "--profile", "6.10", *sock]) == 0
    try:
        capsys.readouterr()
        assert main(["vm", "info", vm_name, "--format", "json", *sock]) == 0
        assert json.loads(capsys.readouterr().out)["profile"] == "6.10"
    finally:
        main(["vm", "destroy", vm_name, *sock])
    assert main(["vm", "create", vm_name, "--profile", "5.0", *sock]) == 2  # usage


# --- with a VMM: what the older kernels leave to it exits ---------------------------------------


@pytest.mark.parametrize(
    ("profile", "chips", "addr"),
    [
        ("6.10", (), abi.IOCSR_IPI_BASE + abi.IPI_STATUS),  # no in-kernel IPI before 6.13
        ("6.18", CHIPS, abi.IOCSR_IPI_BASE + 0x100),  # undecoded: -EINVAL before 7.0
    ],
)
async def test_what_an_older_kernel_leaves_to_the_vmm_exits_to_it(
    lvz_socket: Path, vm_name: str, profile: str, chips: tuple[str, ...], addr: int
) -> None:
    """A VMM's user-space irqchip fallback, end to end: the guest's IOCSR load leaves KVM_RUN
    as KVM_EXIT_LOONGARCH_IOCSR (kvm_emu_iocsr) and the VMM's data completes it
    (kvm_complete_iocsr_read, sign-extended)."""
    async with open_kvm(lvz_socket) as vmm_kvm, open_kvm(lvz_socket) as guest_kvm:
        vm = await vmm_kvm.create_vm(name=vm_name, profile=profile)
        try:
            vmm = await vm.create_vcpu(0)
            for chip in chips:
                await vm.create_device(chip)
            guest = await (await guest_kvm.open_vm(vm_name)).open_vcpu(0)
            loaded: list[int] = []
            async with trio.open_nursery() as nursery:

                async def load() -> None:
                    loaded.append(await guest.iocsr_read(addr, 4, timeout=10))

                nursery.start_soon(load)
                with trio.fail_after(10):
                    exit = await vmm.run(10)
                assert exit.exit_reason == "iocsr" and exit.iocsr_io is not None
                assert (exit.iocsr_io.phys_addr, exit.iocsr_io.len) == (addr, 4)
                await vmm.run(0, data=0x8000_0001)
            assert loaded == [0xFFFF_FFFF_8000_0001]
        finally:
            await vm.destroy()


async def test_a_state_dir_restart_keeps_the_profile_and_steal_time(sock_dir: Path) -> None:
    """The journal replays kvm.create_vm's profile and FUNC_NOTIFY (vcpu.hypercall); its
    snapshots carry both. So a restart brings back a 6.18 VM, still 6.18, with its address."""
    state = sock_dir / "state"
    for restart in range(3):
        config = ServeConfig(socket=sock_dir / f"s{restart}.sock", state_dir=state)
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, config, load_plugins())
            async with open_kvm(config.socket) as kvm:
                if restart == 0:
                    vm = await kvm.create_vm(name="old", profile="6.18")
                    v0 = await vm.create_vcpu(0)
                    await v0.set_attr(CPUCFG, FEATURE, abi.KVM_FEATURE_IPI | ST)
                    assert (
                        await v0.hypercall(SERVICE, abi.KVM_HCALL_FUNC_NOTIFY, ST, 0x1_0000_0041)
                        == 0
                    )
                else:
                    vm = await kvm.open_vm("old")
                    v0 = await vm.open_vcpu(0)
                    assert (await kvm.call("vm.info", {"vm": vm.handle}))["profile"] == "6.18"
                    assert await v0.get_attr(PVTIME, GPA) == 0x1_0000_0041
                    await expect_errno("EINVAL", vm.phyid_lookup(-1))  # still 6.18
            nursery.cancel_scope.cancel()
