"""The lvz daemon: a trio server that hosts VMs and answers the wire protocol on a Unix socket.

All server-side I/O and awaiting lives here; the VM model (``model.py``) and the chips are
plain objects this module calls. One connection = one reader task (decode, dispatch, collect
replies) plus one event pump; both write through ``Connection.flush`` under a StrictFIFOLock,
so there is one writer per stream at a time and bytes never interleave.

Ordering: requests of a connection run in arrival order and nothing inside a request awaits,
except taking the VM's map lock (free in practice; nothing awaits while holding it) and
``vcpu.run``, which waits in a task of its own so later requests are not held back. Line changes
are queued to subscribers at the moment they happen, so an event caused by a request is always
in the connection's outgoing buffer before that request's response.

Bounds: a connection's outgoing buffer is flushed whenever it passes ``FLUSH_BYTES`` mid-batch
and the reader does not read again until it has been written (a client that does not read stops
being read); queued ``irq`` events per subscriber are capped at ``max_events`` and the excess is
dropped and reported with one ``events_lost`` notification per VM carrying the count.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket as _socket
import stat
import struct
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import msgpack
import trio
import trio.lowlevel

import lvz
from lvz.plugins.api import Device
from lvz.protocol import constants as C
from lvz.protocol import regs, snapshot
from lvz.protocol.connection import NEED_DATA, ServerConnection
from lvz.protocol.errors import KvmError, ProtocolError, RemoteProtocolError
from lvz.protocol.events import BadRequest, Malformed, Request
from lvz.protocol.methods import HANDLE_PARAM, METHODS, validate

from .config import ServeConfig
from .host import PluginHost, PluginLoadError, load_plugins, plugin_failure
from .model import Vcpu, Vm

log = logging.getLogger("lvz.daemon")

RECEIVE_BYTES = 65536
STATE_SUFFIX = ".lvzvm"
FLUSH_BYTES = 256 * 1024

_packb = msgpack.Packer(use_bin_type=True).pack


class Handle:
    """An fd-like reference from one connection to a VM, vCPU or device."""

    __slots__ = ("kind", "life", "number", "obj", "vm")

    def __init__(self, number: int, kind: str, vm: Vm, obj: Vm | Vcpu | Device) -> None:
        self.number = number
        self.kind = kind
        self.vm = vm
        self.obj = obj
        # What decides whether the handle still works: its vCPU (destroyed with the VM too)
        # or its VM. Kept as one attribute because every request checks it.
        self.life: Vm | Vcpu = obj if isinstance(obj, Vcpu) else vm

    @property
    def alive(self) -> bool:
        return self.life.alive


class RunWait:
    """A pending ``vcpu.run``. Whatever ends it — a line going up, the timeout, a destroy, a
    close, shutdown — answers it synchronously through ``Daemon._finish_run``, so the answer
    sits in the connection's buffer in the order things happened; ``event`` then only lets
    the waiting task go."""

    __slots__ = ("conn", "event", "handle", "msgid", "vcpu")

    def __init__(self, conn: Connection, handle: Handle, vcpu: Vcpu, msgid: int) -> None:
        self.conn = conn
        self.handle = handle
        self.vcpu = vcpu
        self.msgid = msgid
        self.event = trio.Event()


class Connection:
    """Per-connection state: protocol core, handles, outgoing buffer, subscriptions."""

    def __init__(self, stream: trio.SocketStream | None, config: ServeConfig,
                 number: int) -> None:
        self.stream = stream
        self.number = number
        self.proto = ServerConnection(config.max_message)
        self.handles: dict[int, Handle] = {}
        self.next_handle = 1
        self.max_handles = config.max_handles
        self.max_events = config.max_events
        self.out: list[bytes] = []
        self.out_bytes = 0
        self.queued_events = 0
        self.events_lost: dict[int, int] = {}
        self.send_lock = trio.StrictFIFOLock()
        self.wakeup = trio.lowlevel.ParkingLot()
        self.closed = False
        self.nursery: trio.Nursery | None = None

    def put(self, data: bytes) -> None:
        self.out.append(data)
        self.out_bytes += len(data)

    def put_event(self, data: bytes, vm_handle: int) -> None:
        """Queue a notification without ever blocking the VM that caused it.

        Past ``max_events`` unsent events the subscriber is not keeping up: the event is
        dropped and counted per VM, and each count goes out as one ``events_lost``
        notification ``{"vm": h, "count": n}`` as soon as the connection drains; the ``seq``
        gap of that VM's next event agrees with it.
        """
        if self.closed:
            return
        if self.queued_events >= self.max_events:
            self.events_lost[vm_handle] = self.events_lost.get(vm_handle, 0) + 1
            self.wakeup.unpark_all()
            return
        self._report_lost()
        self.queued_events += 1
        self.put(data)
        self.wakeup.unpark_all()

    def _report_lost(self) -> None:
        if self.events_lost:
            for vm_handle, count in self.events_lost.items():
                self.put(_packb([2, "events_lost", {"vm": vm_handle, "count": count}]))
            self.events_lost.clear()

    async def flush(self) -> None:
        if not self.out and not self.events_lost:
            return
        # Uncontended (the usual case) the lock is taken without a scheduler pass: the
        # sequential request/response loop pays for exactly one send, as the floor does.
        try:
            self.send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self.send_lock.acquire()
        try:
            self._report_lost()
            if not self.out:
                return
            data = b"".join(self.out) if len(self.out) > 1 else self.out[0]
            self.out.clear()
            self.out_bytes = 0
            self.queued_events = 0
            assert self.stream is not None, "a local connection has nothing to flush to"
            await self.stream.send_all(data)
        finally:
            self.send_lock.release()

    async def pump(self) -> None:
        """Write events that arrive while the reader is idle (waiting for the next request)."""
        while True:
            while not self.out and not self.events_lost:
                await self.wakeup.park()
            await self.flush()


class Daemon:
    """The service: VMs by name and by handle, connections, and the request dispatch table."""

    def __init__(self, host: PluginHost, config: ServeConfig) -> None:
        self.host = host
        self.config = config
        self.vms: list[Vm] = []
        self.named: dict[str, Vm] = {}
        self.refs: dict[Vm, int] = {}
        self.subscribers: dict[Vm, dict[Connection, list[Handle]]] = {}
        self.running: dict[Vcpu, RunWait] = {}
        self.connections: set[Connection] = set()
        self.conn_counter = 0
        self.shutting_down = False
        # Every method of the table has an ``m_<name>`` here, except vcpu.run (it waits).
        self.handlers: dict[str, Callable[[Connection, dict[str, Any], Handle | None],
                                          dict[str, Any]]] = {
            name: getattr(self, "m_" + name.replace(".", "_"))
            for name in METHODS if name != "vcpu.run"
        }
        self.device_type_names = sorted(host.device_types)

    # ---------------------------------------------------------------- connection loop ---------

    async def handle_stream(self, stream: trio.SocketStream) -> None:
        self.conn_counter += 1
        conn = Connection(stream, self.config, self.conn_counter)
        if not self._peer_allowed(stream, conn):
            await _goodbye(stream, conn.proto.send_protocol_error(ProtocolError(
                "EPERM", "this daemon serves only its own user (SO_PEERCRED)")))
            return
        self.connections.add(conn)
        log.info("connection %d opened", conn.number)
        try:
            async with trio.open_nursery() as nursery:
                conn.nursery = nursery
                nursery.start_soon(conn.pump)
                try:
                    await self._read_loop(conn)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()
        finally:
            conn.closed = True
            self.connections.discard(conn)
            self._drop_connection(conn)
            await trio.aclose_forcefully(stream)
            log.info("connection %d closed", conn.number)

    def _peer_allowed(self, stream: trio.SocketStream, conn: Connection) -> bool:
        try:
            creds = stream.socket.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED,
                                             struct.calcsize("3i"))
        except OSError:
            return True  # not a Unix socket (tests over other transports)
        _pid, uid, _gid = struct.unpack("3i", creds)
        me = os.getuid()
        if uid in (me, 0):
            return True
        log.warning("connection %d refused: peer uid %d is not %d", conn.number, uid, me)
        return False

    async def _read_loop(self, conn: Connection) -> None:
        proto = conn.proto
        stream = conn.stream
        assert stream is not None
        while True:
            data = await stream.receive_some(RECEIVE_BYTES)
            proto.receive_data(data)
            while True:
                try:
                    event = proto.next_event()
                except RemoteProtocolError as exc:
                    log.info("connection %d: protocol error: %s", conn.number, exc.message)
                    async with conn.send_lock:
                        conn.put(proto.send_protocol_error(exc))
                        data = b"".join(conn.out)
                        conn.out.clear()
                        await _goodbye(stream, data)
                    return
                if event is NEED_DATA:
                    break
                if type(event) is Request:
                    self._dispatch(conn, event)
                elif type(event) is BadRequest:
                    conn.put(proto.send_error(event.msgid, event.error))
                elif type(event) is Malformed:
                    conn.put(proto.send_protocol_error(event.error))
                if conn.out_bytes >= FLUSH_BYTES:
                    await conn.flush()
            if conn.out:
                await conn.flush()
            if not data:
                return

    def _execute(self, conn: Connection, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Resolve the handle and run the handler: every check after the method table's.

        Synchronous on purpose: a request takes effect without yielding, so requests of one
        connection apply in order and nothing else runs in between; the phyid map lock is
        taken inside the model, exactly where the kernel takes its spinlock.
        """
        hp = HANDLE_PARAM.get(method)
        handle = None if hp is None else self._resolve(conn, params[hp[0]], hp[1], method)
        return self.handlers[method](conn, params, handle)

    def _dispatch(self, conn: Connection, req: Request) -> None:
        method = req.method
        params = req.params
        try:
            if method == "vcpu.run":
                handle = self._resolve(conn, params["vcpu"], "vcpu", method)
                self._start_run(conn, req.msgid, handle, params)
                return
            hp = HANDLE_PARAM.get(method)
            target = None if hp is None else self._resolve(conn, params[hp[0]], hp[1], method)
            result = self.handlers[method](conn, params, target)
            try:
                data = conn.proto.send_result(req.msgid, result)
            except (TypeError, ValueError, OverflowError) as exc:
                raise KvmError("EIO", f"{method}: result cannot be encoded: {exc}") from exc
            conn.out.append(data)
            conn.out_bytes += len(data)
        except KvmError as err:
            conn.put(conn.proto.send_error(req.msgid, err))
        except Exception as exc:  # a bug of ours must fail one request, not the daemon
            log.exception("internal error in %s", method)
            conn.put(conn.proto.send_error(req.msgid, KvmError(
                "EIO", f"{method}: internal error in lvz: {type(exc).__name__}: {exc}")))

    def call_local(self, conn: Connection, batch: snapshot.Batch) -> snapshot.Results:
        """Run requests from inside the daemon (``--state-dir``) with every check a socket
        request gets: the method table, the handles, the model's own rules."""
        results: snapshot.Results = []
        for method, params in batch:
            try:
                results.append(self._execute(conn, method, validate(method, dict(params))))
            except KvmError as err:
                results.append(err)
        return results

    def load_state(self, directory: Path) -> None:
        """Recreate the named VMs a previous daemon saved in ``directory``."""
        conn = Connection(None, self.config, 0)
        for path in sorted(directory.glob("*" + STATE_SUFFIX)):
            try:
                saved = snapshot.decode(path.read_bytes())
                vm = snapshot.drive(snapshot.restore_vm(saved),
                                    lambda b: self.call_local(conn, b))
                self.call_local(conn, [("close", {"handle": vm})])
                log.info("restored VM %s from %s", saved["vm"]["name"], path)
            except (KvmError, OSError) as exc:
                log.error("could not restore %s: %s (file left in place)", path, exc)

    def save_state(self, directory: Path) -> None:
        """Write every named VM to ``directory`` atomically; drop files of VMs now gone."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        conn = Connection(None, self.config, 0)
        keep = set()
        for name in sorted(self.named):
            target = directory / (urllib.parse.quote(name, safe="") + STATE_SUFFIX)
            keep.add(target)  # on failure an older copy beats none
            try:
                [opened] = self.call_local(conn, [("kvm.open_vm", {"name": name})])
                if isinstance(opened, KvmError):
                    raise opened
                saved = snapshot.drive(snapshot.save_vm(opened["vm"]),
                                       lambda b: self.call_local(conn, b))
                self.call_local(conn, [("close", {"handle": opened["vm"]})])
                tmp = target.with_name(target.name + ".tmp")
                tmp.write_bytes(snapshot.encode(saved))
                tmp.replace(target)
                log.info("saved VM %s to %s", name, target)
            except (KvmError, OSError) as exc:
                log.error("could not save VM %s: %s", name, exc)
        for stale in directory.glob("*" + STATE_SUFFIX):
            if stale not in keep:
                stale.unlink()  # destroyed since the last save: it must not come back

    def _resolve(self, conn: Connection, number: int, kind: str, method: str) -> Handle:
        h = conn.handles.get(number)
        if h is None or not h.life.alive:
            raise KvmError("EBADF", f"{method}: handle {number} is not open")
        if kind and h.kind != kind:
            raise KvmError("ENOTTY", f"{method}: handle {number} is a {h.kind}, not a {kind}")
        return h

    # ---------------------------------------------------------------- handles, lifetimes ------

    def _new_handle(self, conn: Connection, kind: str, vm: Vm, obj: Vm | Vcpu | Device) -> int:
        number = conn.next_handle
        conn.next_handle += 1
        conn.handles[number] = Handle(number, kind, vm, obj)
        self.refs[vm] = self.refs.get(vm, 0) + 1
        return number

    def _check_handle_room(self, conn: Connection) -> None:
        if len(conn.handles) >= conn.max_handles:
            raise KvmError("EMFILE", f"this connection already holds {conn.max_handles} handles")

    def _release(self, conn: Connection, h: Handle) -> None:
        """Drop one handle: end its run wait and subscription, destroy an orphaned unnamed VM."""
        conn.handles.pop(h.number, None)
        if h.kind == "vcpu":
            wait = self.running.get(h.obj)  # type: ignore[arg-type]
            if wait is not None and wait.handle is h:
                self._finish_run(wait, KvmError("EBADF", "vcpu.run: the vCPU handle was closed"))
        subs = self.subscribers.get(h.vm)
        if subs is not None and conn in subs:
            hs = subs[conn]
            if h in hs:
                hs.remove(h)
                if not hs:
                    del subs[conn]
        vm = h.vm
        n = self.refs.get(vm, 0) - 1
        if n > 0:
            self.refs[vm] = n
            return
        self.refs.pop(vm, None)
        if vm.alive and vm.name is None:
            self._destroy_vm(vm)

    def _drop_connection(self, conn: Connection) -> None:
        for h in list(conn.handles.values()):
            if h.vm.alive:
                self._release(conn, h)
            else:
                conn.handles.pop(h.number, None)
        conn.handles.clear()
        for subs in self.subscribers.values():
            subs.pop(conn, None)

    def _destroy_vm(self, vm: Vm) -> None:
        """Tear a VM down and release everything that waited on it."""
        vcpus = list(vm.vcpus.values())
        vm.destroy()
        for vcpu in vcpus:
            self._end_wait(vcpu, "the VM was destroyed")
        if vm.name is not None and self.named.get(vm.name) is vm:
            del self.named[vm.name]
        if vm in self.vms:
            self.vms.remove(vm)
        self.subscribers.pop(vm, None)
        self.refs.pop(vm, None)
        log.info("VM %s destroyed", vm.name or hex(id(vm)))

    def _end_wait(self, vcpu: Vcpu, why: str) -> None:
        wait = self.running.get(vcpu)
        if wait is not None:
            self._finish_run(wait, KvmError("EBADF", f"vcpu.run: {why}"))

    # ---------------------------------------------------------------- events ------------------

    def _on_line(self, vm: Vm, vcpu_id: int, irq: int, level: int, seq: int) -> None:
        if level:
            vcpu = vm.vcpus.get(vcpu_id)
            if vcpu is not None:
                wait = self.running.get(vcpu)
                if wait is not None:
                    self._finish_run(wait, None, "irq")
        subs = self.subscribers.get(vm)
        if subs:
            for conn, hs in subs.items():
                h = hs[0].number
                conn.put_event(_packb([2, "irq", {"vm": h, "vcpu_id": vcpu_id, "irq": irq,
                                                  "level": level, "seq": seq}]), h)

    # ---------------------------------------------------------------- vcpu.run ----------------

    def _start_run(self, conn: Connection, msgid: int, h: Handle,
                   params: dict[str, Any]) -> None:
        vcpu: Vcpu = h.obj  # type: ignore[assignment]
        if vcpu in self.running:
            raise KvmError("EBUSY", f"vcpu.run: vCPU {vcpu.vcpu_id} is already running")
        if self.shutting_down:
            raise KvmError("EBADF", "vcpu.run: the daemon is shutting down")
        lines = vcpu.lines
        if lines:
            conn.put(conn.proto.send_result(msgid, {"exit_reason": "irq",
                                                    "estat": h.vm.get_one_reg(vcpu, regs.ESTAT)}))
            return
        wait = RunWait(conn, h, vcpu, msgid)
        self.running[vcpu] = wait
        assert conn.nursery is not None
        conn.nursery.start_soon(self._run_wait, wait, float(params["timeout"]))

    def _finish_run(self, wait: RunWait, error: KvmError | None, reason: str = "") -> None:
        if self.running.get(wait.vcpu) is not wait:
            return  # already answered
        del self.running[wait.vcpu]
        conn = wait.conn
        if error is not None:
            conn.put(conn.proto.send_error(wait.msgid, error))
        else:
            estat = wait.handle.vm.get_one_reg(wait.vcpu, regs.ESTAT)
            conn.put(conn.proto.send_result(wait.msgid, {"exit_reason": reason,
                                                         "estat": estat}))
        conn.wakeup.unpark_all()  # the pump writes it if no request is being answered
        wait.event.set()

    async def _run_wait(self, wait: RunWait, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await wait.event.wait()
        self._finish_run(wait, None, "timeout")  # a no-op if something else answered it
        try:
            await wait.conn.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

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

    _CAPS: ClassVar[dict[str, int]] = {"one_reg": 1, "irqchip": 1, "max_vcpus": C.KVM_MAX_VCPUS,
             "max_vcpu_id": C.KVM_MAX_VCPUS, "enable_cap": 1, "readonly_mem": 1,
             "immediate_exit": 1, "ioeventfd": 1, "mp_state": 1, "set_guest_debug": 1,
             "nr_vcpus": os.cpu_count() or 1, "max_phyid": C.MAX_PHYID_LIMIT}

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
        vm = Vm(self.host, name=name, max_phyid=max_phyid, max_vcpus=self.config.max_vcpus)
        vm.listener = self._on_line
        self.vms.append(vm)
        if name is not None:
            self.named[name] = vm
        log.info("VM %s created (max_phyid %d)", name or hex(id(vm)), max_phyid)
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
                         "max_phyid": vm.max_phyid, "phyids": len(vm.phyids)}
                        for vm in self.vms]}

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
        vcpu = h.vm.phyids.get(p["phyid"])
        return {"vcpu_id": None if vcpu is None else vcpu.vcpu_id}

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

    # ---------------------------------------------------------------- shutdown ----------------

    async def shutdown(self) -> None:
        """Release waiters with a clear error and flush every connection, within the grace time."""
        self.shutting_down = True
        for wait in list(self.running.values()):
            self._finish_run(wait, KvmError("EBADF", "vcpu.run: the daemon is shutting down"))
        if self.config.state_dir is not None:
            self.save_state(self.config.state_dir)
        with trio.move_on_after(self.config.grace) as scope:
            scope.shield = True
            for conn in list(self.connections):
                try:
                    await conn.flush()
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                    pass


async def _goodbye(stream: trio.SocketStream, last_words: bytes) -> None:
    """Send ``last_words``, then close so the peer can read them.

    Closing a Unix socket with unread input makes the peer's next read fail with ECONNRESET,
    losing the notification that says why; so shut our side, discard what the peer still
    sends (bounded in time and bytes), and only then close.
    """
    with trio.move_on_after(0.5):
        try:
            await stream.send_all(last_words)
            await stream.send_eof()
            drained = 0
            while drained < (1 << 22) and (chunk := await stream.receive_some(65536)):
                drained += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    await trio.aclose_forcefully(stream)


# -------------------------------------------------------------------- the socket -------------

class SocketInUse(Exception):
    """Another daemon is alive on the socket path."""


def prepare_socket_path(path: Path) -> None:
    """Create the 0700 directory; replace a stale socket; refuse a live daemon or a non-socket."""
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True)
    if path.is_symlink() or path.exists():
        st = path.lstat()
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
        probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody answers: a stale socket from a daemon that died
        else:
            raise SocketInUse(f"another lvz daemon is already serving {path}")
        finally:
            probe.close()


async def open_listener(path: Path) -> trio.SocketListener:
    prepare_socket_path(path)
    sock = trio.socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is born 0600: no window where others can connect
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(512)
    return trio.SocketListener(sock)


def notify_ready() -> None:
    """sd_notify READY=1 when a supervisor asked for it (NOTIFY_SOCKET)."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    addr = "\0" + target[1:] if target.startswith("@") else target
    with _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM) as s:
        try:
            s.connect(addr)
            s.sendall(b"READY=1")
        except OSError as exc:
            log.warning("could not notify %s: %s", target, exc)


async def serve(config: ServeConfig, host: PluginHost | None = None, *,
                task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled or signalled; ``task_status.started`` once the socket accepts."""
    if host is None:
        host = load_plugins()
    daemon = Daemon(host, config)
    if config.state_dir is not None:
        daemon.load_state(config.state_dir)
    path = config.socket
    listener = await open_listener(path)
    log.info("serving on %s (plugins: %s)", path, ", ".join(p.name for p in host.loaded))
    try:
        async with trio.open_nursery() as handlers:
            accepting = trio.CancelScope()

            async def accept_loop() -> None:
                with accepting:
                    await trio.serve_listeners(daemon.handle_stream, [listener],
                                               handler_nursery=handlers)

            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                handlers.start_soon(accept_loop)
                notify_ready()
                task_status.started(daemon)
                async for signum in signals:
                    log.info("signal %s: shutting down", signal.Signals(signum).name)
                    break
            # Stop accepting first, then let in-flight work finish within the grace time;
            # only then cancel the connections (hypercorn's graceful shutdown).
            accepting.cancel()
            _unlink(path)
            await daemon.shutdown()
            handlers.cancel_scope.cancel()
    finally:
        _unlink(path)
        await trio.aclose_forcefully(listener)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def run(config: ServeConfig, verbose: int = 0) -> int:
    """``lvz serve``: run in the foreground until SIGINT/SIGTERM; returns the exit code."""
    logging.basicConfig(
        level=logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG,
        format="lvz[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:  # many clients each hold a socket; take what the hard limit allows
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass
    try:
        host = load_plugins()
    except PluginLoadError as exc:
        log.error("%s", exc)
        print(f"lvz serve: {exc}", flush=True, file=sys.stderr)
        return 125
    try:
        trio.run(serve, config, host)
    except SocketInUse as exc:
        print(f"lvz serve: {exc}", flush=True, file=sys.stderr)
        return 125
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, "")
        print(f"lvz serve: cannot serve on {config.socket}: {name} {exc.strerror or exc}",
              flush=True, file=sys.stderr)
        return 125
    return 0
