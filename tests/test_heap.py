"""``lvz serve`` keeps the collector's full collections off its long-lived heap (heap.py).

The survivors of each full collection are frozen, so a big VM is walked about once in its life
instead of at every quarter of growth; a VM teardown thaws them, so the cycles a destroyed VM
leaves are still collected. In-process daemons (these tests') leave the collector alone unless
a test installs it.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from lvz.daemon import heap

from .conftest import Connect


@pytest.fixture
def frozen_heap() -> Iterator[None]:
    assert not heap.installed(), "only lvz serve installs it"
    heap.install()
    try:
        yield
    finally:
        heap.uninstall()
    assert gc.get_freeze_count() == 0


def test_a_full_collection_freezes_what_survived_it(frozen_heap: None) -> None:
    survivors = [[i] for i in range(1000)]
    gc.collect()
    assert gc.get_freeze_count() >= len(survivors)
    heap.thaw()
    assert gc.get_freeze_count() == 0


def test_without_it_the_collector_is_the_interpreters() -> None:
    gc.collect()
    assert gc.get_freeze_count() == 0


async def test_a_vm_teardown_thaws_the_heap(frozen_heap: None, connect: Connect) -> None:
    """A destroyed VM's cycles must reach a full collection again, or they would leak."""
    wire = await connect()
    vm = (await wire.result("kvm.create_vm", {"name": "frozen"}))["vm"]
    await wire.result("vm.create_vcpu", {"vm": vm, "vcpu_id": 0})
    gc.collect()
    assert gc.get_freeze_count() > 0
    await wire.result("vm.destroy", {"vm": vm})
    assert gc.get_freeze_count() == 0
