"""Bytes per idle vCPU, measured on the VM model itself with tracemalloc.

Run in a helper process (``python -m bench.memory N...``) so nothing the benchmark or the
daemon holds blurs the count. For each N it builds a VM the way the daemon does (a
``load_plugins()`` host, the three irqchips), then creates N vCPUs and gives each its CPUID, and
counts the Python heap that grew: the model's cost per vCPU, without allocator slack. The RSS
figures taken on a live daemon (see scenarios) include that slack and the handles.

Prints one JSON object: {"N": [bytes per vCPU, one per repetition], ...}.
"""

from __future__ import annotations

import gc
import json
import sys
import tracemalloc

from lvz.daemon.host import load_plugins
from lvz.daemon.model import Vm
from lvz.protocol.abi import DEV_EIOINTC, DEV_IPI, DEV_PCHPIC

CHIPS = (DEV_IPI, DEV_EIOINTC, DEV_PCHPIC)


def measure(n: int, reps: int) -> list[float]:
    host = load_plugins()
    out: list[float] = []
    for _ in range(reps):
        vm = Vm(host, name=None, max_phyid=max(256, n))
        for chip in CHIPS:
            vm.create_device(chip)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            vm.set_cpuid(vm.create_vcpu(i), i)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        out.append((after - before) / n)
        vm.destroy()
        del vm
        gc.collect()
    return out


def main(sizes: list[int], reps: int) -> dict[str, list[float]]:
    return {str(n): measure(n, reps) for n in sizes}


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]] or [256, 4096]
    print(json.dumps(main(args, 5)))
