"""One handler per protocol method (PROTOCOL.md §4), ``m_<method with dots as underscores>``.

Each handler runs after the method table validated the parameters and the daemon resolved the
handle (``h``), so it does only the method's own checks, in the order the kernel makes them,
and calls the model. Handlers are synchronous: a request takes effect without yielding. They
live in a mixin of ``Daemon`` so that the connection machinery (server.py) and the meaning of
each method (here) can be read apart.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import lvz
from lvz.protocol import abi as C
from lvz.protocol.errors import KvmError
from lvz.protocol.methods import METHODS

from .config import ServeConfig
from .connection import Connection, Handle
from .host import PluginHost, plugin_failure
from .model import Vcpu, Vm


class Methods:
    """The handlers; ``Daemon`` supplies the state and lifetime helpers declared here."""

    host: PluginHost
    config: ServeConfig
    vms: list[Vm]
    named: dict[str, Vm]
    subscribers: dict[Vm, dict[Connection, list[Handle]]]
    device_type_names: list[str]
    _vm_id_next: int = 0

    def _new_handle(self, conn: Connection, kind: str, vm: Vm, obj: Any) -> int:
        raise NotImplementedError

    def _check_handle_room(self, conn: Connection) -> None:
        raise NotImplementedError

    def _release(self, conn: Connection, h: Handle) -> None:
        raise NotImplementedError

    def _destroy_vm(self, vm: Vm) -> None:
        raise NotImplementedError

    def _end_wait(self, vcpu: Vcpu, why: str, errno_name: str = "EBADF") -> None:
        raise NotImplementedError

    def _new_vm(self, name: str | None, max_phyid: int) -> Vm:
        raise NotImplementedError

    # ---------------------------------------------------------------- methods: kvm ------------

    def m_hello(self, conn: Connection, p: dict[str, Any], h: Handle | None) -> dict[str, Any]:
        if p["protocol"] != C.PROTOCOL_VERSION:
            raise KvmError("EPROTONOSUPPORT",
                           f"this daemon speaks protocol {C.PROTOCOL_VERSION}, not {p['protocol']}")
        return {"protocol": C.PROTOCOL_VERSION, "server": f"lvz {lvz.__version__}",
                "api_version": C.KVM_API_VERSION, "methods": sorted(METHODS),
                "device_types": self.device_type_names}

    def m_close(self, conn: Connection, p: dict[str, Any], h: Handle | None) -> dict[str, Any]:
        assert h is not None
        self._release(conn, h)
        return {}

    def m_kvm_get_api_version(self, conn: Connection, p: dict[str, Any],
                              h: Handle | None) -> dict[str, Any]:
        return {"version": C.KVM_API_VERSION}

    _CAPS: ClassVar[dict[str, int]] = {
        "one_reg": 1, "irqchip": 1, "max_vcpus": C.KVM_MAX_VCPUS,
        "max_vcpu_id": C.KVM_MAX_VCPUS, "enable_cap": 1, "readonly_mem": 1,
        "immediate_exit": 1, "ioeventfd": 1, "mp_state": 1, "set_guest_debug": 1,
        "nr_vcpus": os.cpu_count() or 1, "max_phyid": C.MAX_PHYID_LIMIT,
    }

    def m_kvm_check_extension(self, conn: Connection, p: dict[str, Any],
                              h: Handle | None) -> dict[str, Any]:
        return {"value": self._CAPS.get(p["cap"], 0)}

    def m_kvm_create_vm(self, conn: Connection, p: dict[str, Any],
                        h: Handle | None) -> dict[str, Any]:
        name = p.get("name")
        max_phyid = p.get("max_phyid", C.KVM_MAX_PHYID)
        if name is not None:
            if not name:
                raise KvmError("EINVAL", "kvm.create_vm: a VM name cannot be empty")
            if name in self.named:
                raise KvmError("EEXIST", f"kvm.create_vm: a VM named {name!r} exists")
        if not 1 <= max_phyid <= C.MAX_PHYID_LIMIT:
            raise KvmError("EINVAL", f"kvm.create_vm: max_phyid {max_phyid} is not in "
                                     f"1..{C.MAX_PHYID_LIMIT}")
        self._check_handle_room(conn)
        if len(self.vms) >= self.config.max_vms:
            raise KvmError("ENOSPC", f"kvm.create_vm: the daemon already hosts "
                                     f"{self.config.max_vms} VMs")
        vm = self._new_vm(name, max_phyid)
        return {"vm": self._new_handle(conn, "vm", vm, vm)}

    def m_kvm_open_vm(self, conn: Connection, p: dict[str, Any],
                      h: Handle | None) -> dict[str, Any]:
        vm = self.named.get(p["name"])
        if vm is None:
            raise KvmError("ENOENT", f"kvm.open_vm: no VM named {p['name']!r}")
        self._check_handle_room(conn)
        return {"vm": self._new_handle(conn, "vm", vm, vm)}

    def m_kvm_list_vms(self, conn: Connection, p: dict[str, Any],
                       h: Handle | None) -> dict[str, Any]:
        return {"vms": [{"name": vm.name, "vcpus": len(vm.vcpus), "devices": len(vm.devices),
                         "max_phyid": vm.max_phyid, "phyids": len(vm.phyids),
                         "id": self._vm_id(vm)}
                        for vm in self.vms]}

    def _vm_id(self, vm: Vm) -> int:
        """A daemon-wide VM number, never reused: the only name an unnamed VM has.

        Given out in creation order the first time anyone asks, kept beside the model rather
        than in it: it is a protocol matter (``kvm.list_vms`` / ``kvm.open_vm_id``).
        """
        ids: dict[Vm, int] = self.__dict__.setdefault("_vm_ids", {})
        if vm not in ids:
            for dead in [v for v in ids if not v.alive]:
                del ids[dead]
            for live in self.vms:
                if live not in ids:
                    self._vm_id_next += 1
                    ids[live] = self._vm_id_next
        return ids[vm]

    def m_kvm_open_vm_id(self, conn: Connection, p: dict[str, Any],
                         h: Handle | None) -> dict[str, Any]:
        vm = next((v for v in self.vms if v.alive and self._vm_id(v) == p["id"]), None)
        if vm is None:
            raise KvmError("ENOENT", f"kvm.open_vm_id: no VM with id {p['id']}")
        self._check_handle_room(conn)
        return {"vm": self._new_handle(conn, "vm", vm, vm)}

    def m_kvm_list_plugins(self, conn: Connection, p: dict[str, Any],
                           h: Handle | None) -> dict[str, Any]:
        types: dict[str, list[str]] = {}
        for name, (_dt, plugin) in self.host.device_types.items():
            types.setdefault(plugin, []).append(name)
        return {"plugins": [{"name": lp.name, "version": lp.version, "dist": lp.dist,
                             "device_types": sorted(types.get(lp.name, []))}
                            for lp in self.host.loaded]}

    # ---------------------------------------------------------------- methods: vm -------------

    def m_vm_destroy(self, conn: Connection, p: dict[str, Any], h: Handle | None) -> dict[str, Any]:
        assert h is not None
        self._destroy_vm(h.vm)
        return {}

    def m_vm_create_vcpu(self, conn: Connection, p: dict[str, Any],
                         h: Handle | None) -> dict[str, Any]:
        assert h is not None
        self._check_handle_room(conn)
        vcpu = h.vm.create_vcpu(p["vcpu_id"])
        return {"vcpu": self._new_handle(conn, "vcpu", h.vm, vcpu)}

    def m_vm_open_vcpu(self, conn: Connection, p: dict[str, Any],
                       h: Handle | None) -> dict[str, Any]:
        assert h is not None
        vcpu = h.vm.vcpus.get(p["vcpu_id"])
        if vcpu is None:
            raise KvmError("ENOENT", f"vm.open_vcpu: the VM has no vCPU {p['vcpu_id']}")
        self._check_handle_room(conn)
        return {"vcpu": self._new_handle(conn, "vcpu", h.vm, vcpu)}

    def m_vm_create_device(self, conn: Connection, p: dict[str, Any],
                           h: Handle | None) -> dict[str, Any]:
        assert h is not None
        self._check_handle_room(conn)
        device = h.vm.create_device(p["type"])
        return {"device": self._new_handle(conn, "device", h.vm, device)}

    def m_vm_open_device(self, conn: Connection, p: dict[str, Any],
                         h: Handle | None) -> dict[str, Any]:
        assert h is not None
        rec = h.vm.devices.get(p["type"])
        if rec is None:
            raise KvmError("ENOENT", f"vm.open_device: the VM has no {p['type']}")
        self._check_handle_room(conn)
        return {"device": self._new_handle(conn, "device", h.vm, rec.device)}

    def m_vm_info(self, conn: Connection, p: dict[str, Any], h: Handle | None) -> dict[str, Any]:
        assert h is not None
        vm = h.vm
        return {"name": vm.name, "max_phyid": vm.max_phyid, "vcpus": sorted(vm.vcpus),
                "devices": sorted(vm.devices), "seq": vm.seq}

    def m_vm_irq_line(self, conn: Connection, p: dict[str, Any],
                      h: Handle | None) -> dict[str, Any]:
        assert h is not None
        vm = h.vm
        missing = [t for t in (C.DEV_IPI, C.DEV_EIOINTC, C.DEV_PCHPIC) if t not in vm.devices]
        if missing:
            raise KvmError("ENXIO", f"vm.irq_line: the VM has no in-kernel irqchip "
                                    f"({', '.join(missing)} missing)")
        irq, level = p["irq"], p["level"]
        if not 0 <= irq < C.KVM_IRQCHIP_NUM_PINS:
            raise KvmError("EINVAL", f"vm.irq_line: irq {irq} is not a PCH-PIC pin (0..63)")
        if level not in (0, 1):
            raise KvmError("EINVAL", f"vm.irq_line: level {level} is not 0 or 1")
        vm.set_chip_input(C.DEV_PCHPIC, irq, level)
        return {}

    def m_vm_signal_msi(self, conn: Connection, p: dict[str, Any],
                        h: Handle | None) -> dict[str, Any]:
        assert h is not None
        vm = h.vm
        if C.DEV_EIOINTC not in vm.devices:
            raise KvmError("ENXIO", "vm.signal_msi: the VM has no loongarch-eiointc")
        if p["data"] >= C.EIOINTC_IRQS:
            raise KvmError("EINVAL", f"vm.signal_msi: data {p['data']} is not an EIOINTC irq "
                                     f"(0..255)")
        vm.set_chip_input(C.DEV_EIOINTC, p["data"], 1)
        return {}

    def m_vm_phyid_lookup(self, conn: Connection, p: dict[str, Any],
                          h: Handle | None) -> dict[str, Any]:
        assert h is not None
        return {"vcpu_id": h.vm.vcpu_by_phyid(p["phyid"])}

    def m_vm_phyid_map(self, conn: Connection, p: dict[str, Any],
                       h: Handle | None) -> dict[str, Any]:
        assert h is not None
        vm = h.vm
        return {"limit": vm.max_phyid,
                "entries": [[phyid, vm.phyids[phyid].vcpu_id] for phyid in sorted(vm.phyids)]}

    def m_vm_subscribe(self, conn: Connection, p: dict[str, Any],
                       h: Handle | None) -> dict[str, Any]:
        assert h is not None
        hs = self.subscribers.setdefault(h.vm, {}).setdefault(conn, [])
        if h not in hs:
            hs.append(h)
            hs.sort(key=lambda x: x.number)
        return {}

    # ---------------------------------------------------------------- methods: vcpu -----------

    def m_vcpu_destroy(self, conn: Connection, p: dict[str, Any],
                       h: Handle | None) -> dict[str, Any]:
        assert h is not None
        vcpu: Vcpu = h.obj  # type: ignore[assignment]
        try:
            h.vm.destroy_vcpu(vcpu)
        finally:
            self._end_wait(vcpu, "the vCPU was destroyed")
        return {}

    def m_vcpu_set_one_reg(self, conn: Connection, p: dict[str, Any],
                           h: Handle | None) -> dict[str, Any]:
        assert h is not None
        h.vm.set_one_reg(h.obj, p["id"], p["value"])  # type: ignore[arg-type]
        return {}

    def m_vcpu_get_one_reg(self, conn: Connection, p: dict[str, Any],
                           h: Handle | None) -> dict[str, Any]:
        assert h is not None
        return {"value": h.vm.get_one_reg(h.obj, p["id"])}  # type: ignore[arg-type]

    def m_vcpu_get_reg_list(self, conn: Connection, p: dict[str, Any],
                            h: Handle | None) -> dict[str, Any]:
        assert h is not None
        return {"ids": h.vm.reg_list(h.obj)}  # type: ignore[arg-type]

    def m_vcpu_interrupt(self, conn: Connection, p: dict[str, Any],
                         h: Handle | None) -> dict[str, Any]:
        assert h is not None
        h.vm.interrupt(h.obj, p["irq"])  # type: ignore[arg-type]
        return {}

    def m_vcpu_csr_xchg(self, conn: Connection, p: dict[str, Any],
                        h: Handle | None) -> dict[str, Any]:
        assert h is not None
        old = h.vm.csr_xchg(h.obj, p["csr"], p["value"], p["mask"])  # type: ignore[arg-type]
        return {"old": old}

    def m_vcpu_set_attr(self, conn: Connection, p: dict[str, Any],
                        h: Handle | None) -> dict[str, Any]:
        assert h is not None
        h.vm.set_vcpu_attr(p["group"], p["attr"], p["value"])
        return {}

    def m_vcpu_get_attr(self, conn: Connection, p: dict[str, Any],
                        h: Handle | None) -> dict[str, Any]:
        assert h is not None
        return {"value": h.vm.get_vcpu_attr(p["group"], p["attr"])}

    def m_vcpu_iocsr_read(self, conn: Connection, p: dict[str, Any],
                          h: Handle | None) -> dict[str, Any]:
        assert h is not None
        return {"value": h.vm.guest_read("iocsr", h.obj, p["addr"], p["size"])}  # type: ignore[arg-type]

    def m_vcpu_iocsr_write(self, conn: Connection, p: dict[str, Any],
                           h: Handle | None) -> dict[str, Any]:
        assert h is not None
        h.vm.guest_write("iocsr", h.obj, p["addr"], p["size"], p["value"])  # type: ignore[arg-type]
        return {}

    def m_vcpu_mmio_read(self, conn: Connection, p: dict[str, Any],
                         h: Handle | None) -> dict[str, Any]:
        assert h is not None
        return {"value": h.vm.guest_read("mmio", h.obj, p["addr"], p["size"])}  # type: ignore[arg-type]

    def m_vcpu_mmio_write(self, conn: Connection, p: dict[str, Any],
                          h: Handle | None) -> dict[str, Any]:
        assert h is not None
        h.vm.guest_write("mmio", h.obj, p["addr"], p["size"], p["value"])  # type: ignore[arg-type]
        return {}

    def m_vcpu_kick(self, conn: Connection, p: dict[str, Any],
                    h: Handle | None) -> dict[str, Any]:
        """End a waiting ``vcpu.run`` on this vCPU (from any connection) with EINTR.

        KVM_RUN returns -EINTR when a signal reaches the vCPU thread; this is that signal, so
        a client that gives up on a run (a timeout of its own) frees the vCPU at once instead
        of leaving it EBUSY until the daemon-side timeout. With no run waiting it does nothing.
        """
        assert h is not None
        self._end_wait(h.obj, "vcpu.run: kicked (vcpu.kick)", "EINTR")  # type: ignore[arg-type]
        return {}

    def m_vcpu_hypercall(self, conn: Connection, p: dict[str, Any],
                         h: Handle | None) -> dict[str, Any]:
        assert h is not None
        return {"a0": h.vm.hypercall(h.obj, p["code"], p.get("args", []))}  # type: ignore[arg-type]

    # ---------------------------------------------------------------- methods: device ---------

    def m_device_set_attr(self, conn: Connection, p: dict[str, Any],
                          h: Handle | None) -> dict[str, Any]:
        assert h is not None
        h.vm.device_call(h.obj, "set_attr", p["group"], p["attr"], p["value"])  # type: ignore[arg-type]
        return {}

    def m_device_get_attr(self, conn: Connection, p: dict[str, Any],
                          h: Handle | None) -> dict[str, Any]:
        assert h is not None
        value = h.vm.device_call(h.obj, "get_attr", p["group"], p["attr"])  # type: ignore[arg-type]
        if type(value) is not int or not 0 <= value <= C.U64_MAX:
            rec = h.vm.devices.get(h.obj.type_name)  # type: ignore[union-attr]
            raise plugin_failure(rec.plugin if rec else "?",
                                 TypeError(f"get_attr returned {value!r}, not a u64"))
        return {"value": value}

    def m_device_save_state(self, conn: Connection, p: dict[str, Any],
                            h: Handle | None) -> dict[str, Any]:
        """The chip's declared state (``Device.save_state``), checked before it leaves."""
        assert h is not None
        state = h.vm.device_call(h.obj, "save_state")  # type: ignore[arg-type]
        try:
            attrs = [[g, a, v] for g, a, v in state]
            if not all(type(x) is int and 0 <= x <= C.U64_MAX for e in attrs for x in e):
                raise TypeError("an entry is not three u64")
        except (TypeError, ValueError) as exc:
            rec = h.vm.devices.get(h.obj.type_name)  # type: ignore[union-attr]
            raise plugin_failure(rec.plugin if rec else "?",
                                 TypeError(f"save_state returned {state!r:.80}: {exc}")) from exc
        return {"attrs": attrs}
