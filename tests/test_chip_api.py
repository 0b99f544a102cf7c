"""The ChipApi facade over the real model: one guest-access path for the protocol and the chips."""

from __future__ import annotations

import pytest

from lvz.daemon.host import load_plugins
from lvz.daemon.model import Vm
from lvz.protocol import abi
from lvz.protocol.errors import KvmError

EN = abi.IOCSR_IPI_BASE + abi.IPI_EN


@pytest.fixture
def vm() -> Vm:
    vm = Vm(load_plugins(), name=None, max_phyid=abi.KVM_MAX_PHYID)
    vm.create_vcpu(0)
    vm.create_device(abi.DEV_IPI)
    return vm


def test_a_chip_load_is_the_guest_load_without_sign_extension(vm: Vm) -> None:
    api, vcpu = vm.chip_api, vm.vcpus[0]
    api.iocsr_write(0, EN, 4, 0x8000_0001)
    assert api.iocsr_read(0, EN, 4) == 0x8000_0001
    assert vm.guest_read("iocsr", vcpu, EN, 4) == abi.U64_MAX ^ 0x7FFF_FFFE  # sign-extended
    vm.guest_write("iocsr", vcpu, EN, 4, 5)
    assert api.iocsr_read(0, EN, 4) == 5


@pytest.mark.parametrize(
    ("addr", "size", "errno"),
    [
        (abi.IOCSR_IPI_BASE + abi.IOCSR_IPI_SIZE, 4, "ENXIO"),  # nothing claims it
        (EN, 3, "EINVAL"),  # not an access width
    ],
)
def test_chip_accesses_fail_as_a_guest_access_does(
    vm: Vm, addr: int, size: int, errno: str
) -> None:
    for call in (
        lambda: vm.chip_api.iocsr_read(0, addr, size),
        lambda: vm.chip_api.iocsr_write(0, addr, size, 1),
        lambda: vm.guest_read("iocsr", vm.vcpus[0], addr, size),
    ):
        with pytest.raises(KvmError) as exc:
            call()
        assert exc.value.name == errno


def test_the_facade_offers_the_vm_api_and_nothing_else(vm: Vm) -> None:
    api = vm.chip_api
    assert (api.max_phyid, api.pv_features) == (abi.KVM_MAX_PHYID, abi.PV_FEATURES_DEFAULT)
    assert api.vcpu_ids() == [0] and api.vcpu_exists(0) and not api.vcpu_exists(1)
    assert api.vcpu_by_phyid(0) is None  # no CPUID set yet
    api.queue_irq(0, abi.INT_TI)
    assert vm.vcpus[0].lines == 1 << abi.INT_TI
    api.dequeue_irq(0, abi.INT_TI)
    assert vm.vcpus[0].lines == 0
    with pytest.raises(KvmError) as exc:
        api.set_chip_input(abi.DEV_EIOINTC, 0, 1)
    assert exc.value.name == "ENXIO"
    with pytest.raises(AttributeError):
        api.vcpus  # type: ignore[attr-defined]  # noqa: B018
