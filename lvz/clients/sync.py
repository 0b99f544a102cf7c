"""Blocking lvz client: the kvm-ioctls object model over a plain socket, for scripts and the CLI.

It speaks through the same sans-I/O ``ClientConnection`` as the trio client, one request at a
time: a call writes its request and reads until its own response arrives. Notifications that
arrive meanwhile (PROTOCOL.md §2 allows them between a request and its response) are parked in
bounded per-VM buffers; the overflow is counted and surfaced as one ``EventsLost`` item, so a
script that never reads its events costs bounded memory and still learns that it missed some.

The value types shared with ``lvz.clients.aio`` live here because this module needs only the
standard library: importing the blocking client must not pull in trio.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

from lvz.protocol import snapshot
from lvz.protocol.abi import PROTOCOL_VERSION
from lvz.protocol.connection import NEED_DATA, ClientConnection
from lvz.protocol.endpoint import resolve_socket_path
from lvz.protocol.errors import KvmError, LocalProtocolError, RemoteProtocolError
from lvz.protocol.events import Notification, Response

__all__ = [
    "DEFAULT_MAX_EVENTS",
    "ConnectionLost",
    "DaemonUnreachable",
    "Device",
    "EventsLost",
    "HelloInfo",
    "IrqEvent",
    "Kvm",
    "KvmError",
    "PhyidMap",
    "PluginInfo",
    "RunResult",
    "Vcpu",
    "Vm",
    "VmInfo",
    "VmSummary",
]

#: Events buffered per VM before further ones are counted as lost instead of kept.
DEFAULT_MAX_EVENTS: Final = 4096
_RECV_SIZE: Final = 65536


# --- errors -------------------------------------------------------------------------------------


class ConnectionLost(ConnectionError):
    """The connection to the daemon ended or broke; every call on it fails with this from now on.

    A ``ConnectionError`` rather than a ``KvmError``: nothing was answered, so there is no errno
    the emulated ioctl returned, and a caller must not mistake it for one.
    """


class DaemonUnreachable(ConnectionError):
    """No daemon accepts connections at the socket path (not started, wrong path, stale file)."""


# --- value types (shared with the trio client) --------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class IrqEvent:
    """One change of a vCPU's interrupt line; ``vm`` is the handle the subscription was made on.

    ``seq`` counts the VM's line changes from 1, so a gap between two events means lost events.
    """

    vm: int
    vcpu_id: int
    irq: int
    level: int
    seq: int


@dataclass(frozen=True, slots=True, kw_only=True)
class EventsLost:
    """Stands in the event stream where ``count`` events were dropped because a buffer was full.

    The daemon reports its drops per connection, not per VM, so a daemon-side loss is put in
    every subscribed VM's stream; ``vm`` is then the handle of the stream it was put in.
    """

    vm: int
    count: int


#: What an event stream yields.
StreamItem = IrqEvent | EventsLost


@dataclass(frozen=True, slots=True, kw_only=True)
class RunResult:
    """``vcpu.run``: ``exit_reason`` is ``"irq"`` (a line is up, see ``estat``) or ``"timeout"``."""

    exit_reason: str
    estat: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PhyidMap:
    """A VM's phyid map: ``entries`` are (phyid, vcpu_id) pairs sorted by phyid."""

    limit: int
    entries: tuple[tuple[int, int], ...]

    def by_phyid(self) -> dict[int, int]:
        return dict(self.entries)

    def by_vcpu(self) -> dict[int, int]:
        return {vcpu_id: phyid for phyid, vcpu_id in self.entries}


@dataclass(frozen=True, slots=True, kw_only=True)
class VmInfo:
    name: str | None
    max_phyid: int
    vcpus: tuple[int, ...]
    devices: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class VmSummary:
    """One row of ``kvm.list_vms``: counts only (``name`` is None for an unnamed VM)."""

    name: str | None
    vcpus: int
    devices: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PluginInfo:
    name: str
    version: str
    dist: str
    device_types: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class HelloInfo:
    """The daemon's answer to ``hello``: what it is and what it can do."""

    protocol: int
    server: str
    api_version: int
    methods: tuple[str, ...]
    device_types: tuple[str, ...]


# --- result decoding (shared with the trio client) ----------------------------------------------
# The daemon is trusted to follow PROTOCOL.md, but a result of the wrong shape must surface as a
# clear EPROTO rather than a KeyError deep inside a caller.


def _field(result: dict[str, Any], key: str, method: str) -> Any:
    try:
        return result[key]
    except KeyError:
        raise KvmError("EPROTO", f"{method}: the daemon's result has no {key!r}") from None


def _int_field(result: dict[str, Any], key: str, method: str) -> int:
    value = _field(result, key, method)
    if type(value) is not int:
        raise KvmError("EPROTO", f"{method}: {key!r} is not an integer: {value!r:.80}")
    return value


def parse_hello(result: dict[str, Any]) -> HelloInfo:
    return HelloInfo(
        protocol=_int_field(result, "protocol", "hello"),
        server=str(result.get("server", "")),
        api_version=_int_field(result, "api_version", "hello"),
        methods=tuple(str(m) for m in result.get("methods", ())),
        device_types=tuple(str(t) for t in result.get("device_types", ())),
    )


def parse_phyid_map(result: dict[str, Any]) -> PhyidMap:
    entries = _field(result, "entries", "vm.phyid_map")
    try:
        pairs = tuple((int(phyid), int(vcpu_id)) for phyid, vcpu_id in entries)
    except (TypeError, ValueError):
        raise KvmError("EPROTO", "vm.phyid_map: entries are not [phyid, vcpu_id] pairs") from None
    return PhyidMap(limit=_int_field(result, "limit", "vm.phyid_map"), entries=pairs)


def parse_vm_info(result: dict[str, Any]) -> VmInfo:
    name = result.get("name")
    return VmInfo(
        name=name if isinstance(name, str) else None,
        max_phyid=_int_field(result, "max_phyid", "vm.info"),
        vcpus=tuple(int(v) for v in _field(result, "vcpus", "vm.info")),
        devices=tuple(str(d) for d in _field(result, "devices", "vm.info")),
    )


def parse_vm_list(result: dict[str, Any]) -> list[VmSummary]:
    rows = []
    for vm in _field(result, "vms", "kvm.list_vms"):
        name = vm.get("name")
        rows.append(VmSummary(name=name if isinstance(name, str) else None,
                              vcpus=int(vm.get("vcpus", 0)), devices=int(vm.get("devices", 0))))
    return rows


def parse_plugins(result: dict[str, Any]) -> list[PluginInfo]:
    return [
        PluginInfo(name=str(p.get("name", "")), version=str(p.get("version", "")),
                   dist=str(p.get("dist", "")),
                   device_types=tuple(str(t) for t in p.get("device_types", ())))
        for p in _field(result, "plugins", "kvm.list_plugins")
    ]


def parse_run(result: dict[str, Any]) -> RunResult:
    return RunResult(exit_reason=str(_field(result, "exit_reason", "vcpu.run")),
                     estat=_int_field(result, "estat", "vcpu.run"))


def parse_irq(params: dict[str, Any]) -> IrqEvent | None:
    """An ``irq`` notification as a typed event; None when its shape is not the documented one."""
    try:
        return IrqEvent(vm=int(params["vm"]), vcpu_id=int(params["vcpu_id"]),
                        irq=int(params["irq"]), level=int(params["level"]),
                        seq=int(params["seq"]))
    except (KeyError, TypeError, ValueError):
        return None


def lost_count(params: dict[str, Any]) -> int:
    count = params.get("count", 1)
    return count if type(count) is int and count > 0 else 1


def protocol_failure(params: dict[str, Any]) -> ConnectionLost:
    """The daemon's ``protocol_error`` notification: it gave up on our byte stream."""
    err = KvmError.from_wire(params)
    return ConnectionLost(f"the daemon reported a protocol error ({err.name}: {err.message})")


def local_error(exc: LocalProtocolError) -> KvmError:
    """A request we cannot even encode fails as the kernel fails a bad argument: EINVAL."""
    return KvmError(exc.name, exc.message)


class EventBuffer:
    """A bounded FIFO of one VM's events that counts what it had to drop.

    Dropped events are not silently forgotten: the next read after a drop yields one
    ``EventsLost`` with the count, in the place where the events went missing.
    """

    def __init__(self, vm: int, limit: int) -> None:
        self.vm = vm
        self.limit = max(1, limit)
        self._items: deque[tuple[int, StreamItem]] = deque()
        self._lost = 0

    def __len__(self) -> int:
        return len(self._items) + (1 if self._lost else 0)

    def put(self, order: int, item: StreamItem) -> None:
        if isinstance(item, EventsLost):
            self._lost += item.count
            return
        if len(self._items) >= self.limit:
            self._lost += 1
            return
        if self._lost:
            self._items.append((order, EventsLost(vm=self.vm, count=self._lost)))
            self._lost = 0
        self._items.append((order, item))

    def head_order(self) -> int | None:
        if self._items:
            return self._items[0][0]
        return -1 if self._lost else None

    def pop(self) -> StreamItem | None:
        if self._items:
            return self._items.popleft()[1]
        if self._lost:
            lost, self._lost = self._lost, 0
            return EventsLost(vm=self.vm, count=lost)
        return None


# --- the blocking client ------------------------------------------------------------------------


class Kvm:
    """A connection to the daemon, as an open ``/dev/kvm`` is to the kernel.

    Not meant to be shared by threads making calls at once, but it is safe if they do: calls
    are serialised by a lock, so each one still sends one request and reads its own answer.
    """

    def __init__(self, sock: socket.socket, *, max_events: int = DEFAULT_MAX_EVENTS,
                 path: str = "") -> None:
        self.path = path
        self._sock = sock
        self._conn = ClientConnection()
        self._lock = threading.RLock()
        self._max_events = max_events
        self._buffers: dict[int, EventBuffer] = {}
        self._order = itertools.count()
        self._failure: ConnectionError | None = None
        self._closed = False
        self.info = HelloInfo(protocol=PROTOCOL_VERSION, server="", api_version=0,
                              methods=(), device_types=())

    @classmethod
    def connect(cls, path: str | os.PathLike[str] | None = None, *,
                max_events: int = DEFAULT_MAX_EVENTS, timeout: float | None = 10.0) -> Kvm:
        """Open the daemon's socket (``path`` > ``$LVZ_SOCKET`` > default) and say ``hello``.

        ``timeout`` bounds connecting and the greeting only: later calls may legitimately wait
        (``vcpu.run``), and the daemon going away ends them anyway.
        """
        where = resolve_socket_path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(os.fspath(where))
        except OSError as exc:
            sock.close()
            reason = exc.strerror or str(exc)
            raise DaemonUnreachable(f"cannot reach the lvz daemon at {where}: {reason}") from None
        kvm = cls(sock, max_events=max_events, path=os.fspath(where))
        try:
            kvm.info = parse_hello(kvm.call("hello", {"protocol": PROTOCOL_VERSION}))
        except BaseException:
            kvm.close()
            raise
        sock.settimeout(None)
        return kvm

    # --- plumbing -------------------------------------------------------------------------------

    def _fail(self, exc: ConnectionError) -> ConnectionError:
        if self._failure is None:
            self._failure = exc
            try:
                self._sock.close()
            except OSError:
                pass
        return self._failure

    def _last_words(self) -> None:
        """After a failed write, read what the daemon said before it hung up.

        A daemon that closes a connection first sends a ``protocol_error`` saying why; if our
        write fails before we read it, that reason is still in the socket buffer. Reading it
        (without blocking) makes the failure name it rather than a bare broken pipe.
        """
        try:
            self._sock.setblocking(False)
            while data := self._sock.recv(_RECV_SIZE):
                self._conn.receive_data(data)
        except OSError:
            pass
        try:
            self._drain(None)  # a protocol_error among them fails the connection with it
        except (ConnectionError, RemoteProtocolError):
            pass

    def _check_open(self) -> None:
        if self._failure is not None:
            raise ConnectionLost(str(self._failure))
        if self._closed:
            raise ConnectionLost("this lvz connection was closed")

    def _handle_notification(self, note: Notification) -> None:
        if note.event == "irq":
            event = parse_irq(note.params)
            if event is not None and event.vm in self._buffers:
                self._buffers[event.vm].put(next(self._order), event)
        elif note.event == "events_lost":
            count = lost_count(note.params)
            target = note.params.get("vm")
            for vm, buf in self._buffers.items():
                if target is None or target == vm:  # an older daemon did not say which VM
                    buf.put(next(self._order), EventsLost(vm=vm, count=count))
        elif note.event == "protocol_error":
            raise self._fail(protocol_failure(note.params))
        # unknown notifications: PROTOCOL.md lets the daemon add events; ignore them

    def _read_some(self, deadline: float | None) -> bool:
        """Read and dispatch what the socket has; False when ``deadline`` passed first."""
        if deadline is not None:
            # 0 makes the socket non-blocking: what has already arrived is still read.
            self._sock.settimeout(max(0.0, deadline - time.monotonic()))
        try:
            data = self._sock.recv(_RECV_SIZE)
        except (TimeoutError, BlockingIOError):
            if deadline is None:  # only the greeting runs under a socket timeout
                raise self._fail(ConnectionLost(
                    f"the lvz daemon at {self.path} did not answer in time")) from None
            return False
        except OSError as exc:
            raise self._fail(ConnectionLost(f"lost the lvz daemon: {exc}")) from None
        finally:
            if deadline is not None and self._failure is None:
                self._sock.settimeout(None)
        self._conn.receive_data(data)
        if not data:
            self._drain(None)
            raise self._fail(ConnectionLost("the lvz daemon closed the connection"))
        return True

    def _drain(self, msgid: int | None) -> Response | None:
        """Dispatch every buffered message; return the response to ``msgid`` if it came."""
        found = None
        while True:
            try:
                event = self._conn.next_event()
            except RemoteProtocolError as exc:
                raise self._fail(ConnectionLost(
                    f"the lvz daemon sent bytes this client cannot read ({exc.name}: "
                    f"{exc.message})")) from None
            if event is NEED_DATA:
                return found
            if isinstance(event, Notification):
                self._handle_notification(event)
            elif isinstance(event, Response) and event.msgid == msgid:
                found = event
            # a response to nobody (cannot happen one-at-a-time) is dropped

    def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Send one request and wait for its answer; the escape hatch for any method."""
        with self._lock:
            self._check_open()
            try:
                msgid, data = self._conn.send_request(method, params)
            except LocalProtocolError as exc:
                raise local_error(exc) from None
            try:
                self._sock.sendall(data)
            except OSError as exc:
                self._last_words()
                raise self._fail(ConnectionLost(f"lost the lvz daemon: {exc}")) from None
            while True:
                response = self._drain(msgid)
                if response is not None:
                    break
                self._read_some(None)
            if response.error is not None:
                raise response.error
            return response.result or {}

    # --- events -------------------------------------------------------------------------------

    def _buffer(self, vm: int) -> EventBuffer:
        buf = self._buffers.get(vm)
        if buf is None:
            buf = self._buffers[vm] = EventBuffer(vm, self._max_events)
        return buf

    def _forget(self, vm: int) -> None:
        self._buffers.pop(vm, None)

    def _next_event(self, vm: int | None, timeout: float | None) -> StreamItem | None:
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with self._lock:
            while True:
                item = self._pop(vm)
                if item is not None:
                    return item
                if self._failure is not None or self._closed:
                    self._check_open()
                if vm is not None and vm not in self._buffers:
                    return None  # closed or never subscribed: nothing will ever come
                if not self._read_some(deadline):
                    self._drain(None)
                    item = self._pop(vm)
                    return item
                self._drain(None)

    def _pop(self, vm: int | None) -> StreamItem | None:
        if vm is not None:
            buf = self._buffers.get(vm)
            return buf.pop() if buf is not None else None
        best: EventBuffer | None = None
        best_order = 0
        for buf in self._buffers.values():
            order = buf.head_order()
            if order is not None and (best is None or order < best_order):
                best, best_order = buf, order
        return best.pop() if best is not None else None

    def next_event(self, timeout: float | None = None) -> StreamItem | None:
        """The oldest event of any subscribed VM, waiting up to ``timeout`` s; None if none came."""
        return self._next_event(None, timeout)

    # --- KVM system ioctls ----------------------------------------------------------------------

    def get_api_version(self) -> int:
        return _int_field(self.call("kvm.get_api_version", {}), "version", "kvm.get_api_version")

    def check_extension(self, cap: str) -> int:
        return _int_field(self.call("kvm.check_extension", {"cap": cap}), "value",
                          "kvm.check_extension")

    def create_vm(self, name: str | None = None, max_phyid: int | None = None) -> Vm:
        params: dict[str, Any] = {}
        if name is not None:
            params["name"] = name
        if max_phyid is not None:
            params["max_phyid"] = max_phyid
        result = self.call("kvm.create_vm", params)
        return Vm(self, _int_field(result, "vm", "kvm.create_vm"), name)

    def open_vm(self, name: str) -> Vm:
        return Vm(self, _int_field(self.call("kvm.open_vm", {"name": name}), "vm",
                                   "kvm.open_vm"), name)

    def list_vms(self) -> list[VmSummary]:
        return parse_vm_list(self.call("kvm.list_vms", {}))

    def list_plugins(self) -> list[PluginInfo]:
        return parse_plugins(self.call("kvm.list_plugins", {}))

    # --- snapshots (lvz.protocol.snapshot drives these) ----------------------------------------

    def call_batch(self, batch: snapshot.Batch) -> snapshot.Results:
        """Answer a batch of requests in order; a refused one is its KvmError, not a raise."""
        results: snapshot.Results = []
        for method, params in batch:
            try:
                results.append(self.call(method, params))
            except KvmError as err:
                results.append(err)
        return results

    def save_vm(self, vm: Vm) -> dict[str, Any]:
        """The VM's whole state, read through the protocol (``lvz snapshot``)."""
        return snapshot.drive(snapshot.save_vm(vm.handle), self.call_batch)

    def restore_vm(self, saved: dict[str, Any], name: str | None = None) -> Vm:
        """Create a VM from ``save_vm``'s result; on any failure no VM is left behind."""
        handle = snapshot.drive(snapshot.restore_vm(saved, name), self.call_batch)
        return Vm(self, handle, name if name is not None else saved["vm"]["name"])

    def close_handle(self, handle: int) -> None:
        self.call("close", {"handle": handle})

    def close(self) -> None:
        """Hang up; the daemon closes every handle this connection held (PROTOCOL.md §3)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._sock.close()
            except OSError:
                pass

    @property
    def closed(self) -> bool:
        return self._closed or self._failure is not None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class _Handle:
    """Shared by the handle-backed objects: closing is ``close`` on the wire, like close(fd)."""

    _kind = ""

    def __init__(self, kvm: Kvm, handle: int) -> None:
        self.kvm = kvm
        self.handle = handle

    def close(self) -> None:
        self.kvm.call("close", {"handle": self.handle})

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # Best effort: the handle may already be gone (destroyed, or the connection lost), and
        # an error here must not hide the one that ended the block.
        try:
            self.close()
        except (KvmError, ConnectionError):
            pass

    def _call(self, method: str, **params: Any) -> dict[str, Any]:
        params[self._kind] = self.handle
        return self.kvm.call(method, params)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} handle={self.handle}>"


class Vm(_Handle):
    """A VM handle (KVM's VM fd)."""

    _kind = "vm"

    def __init__(self, kvm: Kvm, handle: int, name: str | None = None) -> None:
        super().__init__(kvm, handle)
        self.name = name
        self._gone = False  # closed or destroyed through this object: no more events

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        result = self._call("vm.create_vcpu", vcpu_id=vcpu_id)
        return Vcpu(self.kvm, _int_field(result, "vcpu", "vm.create_vcpu"), vcpu_id)

    def open_vcpu(self, vcpu_id: int) -> Vcpu:
        result = self._call("vm.open_vcpu", vcpu_id=vcpu_id)
        return Vcpu(self.kvm, _int_field(result, "vcpu", "vm.open_vcpu"), vcpu_id)

    def create_device(self, type: str) -> Device:
        result = self._call("vm.create_device", type=type)
        return Device(self.kvm, _int_field(result, "device", "vm.create_device"), type)

    def open_device(self, type: str) -> Device:
        result = self._call("vm.open_device", type=type)
        return Device(self.kvm, _int_field(result, "device", "vm.open_device"), type)

    def destroy(self) -> None:
        self._call("vm.destroy")
        self._gone = True
        self.kvm._forget(self.handle)

    def close(self) -> None:
        self._gone = True
        self.kvm._forget(self.handle)
        super().close()

    def phyid_lookup(self, phyid: int) -> int | None:
        value = self._call("vm.phyid_lookup", phyid=phyid).get("vcpu_id")
        return value if type(value) is int else None

    def phyid_map(self) -> PhyidMap:
        return parse_phyid_map(self._call("vm.phyid_map"))

    def info(self) -> VmInfo:
        return parse_vm_info(self._call("vm.info"))

    def irq_line(self, irq: int, level: int | bool) -> None:
        self._call("vm.irq_line", irq=irq, level=int(level))

    def signal_msi(self, address: int, data: int) -> None:
        self._call("vm.signal_msi", address=address, data=data)

    def subscribe(self) -> None:
        """Start buffering this VM's ``irq`` events (read them with ``events``)."""
        buf_existed = self.handle in self.kvm._buffers
        self.kvm._buffer(self.handle)  # before the request: its own events precede its answer
        try:
            self._call("vm.subscribe")
        except BaseException:
            if not buf_existed:
                self.kvm._forget(self.handle)
            raise

    def next_event(self, timeout: float | None = None) -> StreamItem | None:
        """This VM's next event, waiting up to ``timeout`` s (None = forever); None if none came."""
        if self.handle not in self.kvm._buffers and not self._gone:
            self.subscribe()
        return self.kvm._next_event(self.handle, timeout)

    def events(self, timeout: float | None = 0.0) -> Iterator[StreamItem]:
        """This VM's events until none arrives within ``timeout`` s of the previous one.

        ``timeout=0`` yields only what has already arrived, which after a call returns includes
        every event that call caused (the daemon sends them before the response).
        """
        if self.handle not in self.kvm._buffers and not self._gone:
            self.subscribe()
        while True:
            item = self.kvm._next_event(self.handle, timeout)
            if item is None:
                return
            yield item


class Vcpu(_Handle):
    """A vCPU handle (KVM's vCPU fd); ``vcpu_id`` is the id it was created with."""

    _kind = "vcpu"

    def __init__(self, kvm: Kvm, handle: int, vcpu_id: int) -> None:
        super().__init__(kvm, handle)
        self.vcpu_id = vcpu_id

    def __repr__(self) -> str:
        return f"<Vcpu handle={self.handle} vcpu_id={self.vcpu_id}>"

    def destroy(self) -> None:
        self._call("vcpu.destroy")

    def set_one_reg(self, reg_id: int, value: int) -> None:
        self._call("vcpu.set_one_reg", id=reg_id, value=value)

    def get_one_reg(self, reg_id: int) -> int:
        return _int_field(self._call("vcpu.get_one_reg", id=reg_id), "value", "vcpu.get_one_reg")

    def interrupt(self, irq: int) -> None:
        self._call("vcpu.interrupt", irq=irq)

    def csr_xchg(self, csr: int, value: int, mask: int) -> int:
        return _int_field(self._call("vcpu.csr_xchg", csr=csr, value=value, mask=mask), "old",
                          "vcpu.csr_xchg")

    def set_attr(self, group: int, attr: int, value: int) -> None:
        self._call("vcpu.set_attr", group=group, attr=attr, value=value)

    def get_attr(self, group: int, attr: int) -> int:
        return _int_field(self._call("vcpu.get_attr", group=group, attr=attr), "value",
                          "vcpu.get_attr")

    def iocsr_read(self, addr: int, size: int) -> int:
        return _int_field(self._call("vcpu.iocsr_read", addr=addr, size=size), "value",
                          "vcpu.iocsr_read")

    def iocsr_write(self, addr: int, size: int, value: int) -> None:
        self._call("vcpu.iocsr_write", addr=addr, size=size, value=value)

    def mmio_read(self, addr: int, size: int) -> int:
        return _int_field(self._call("vcpu.mmio_read", addr=addr, size=size), "value",
                          "vcpu.mmio_read")

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        self._call("vcpu.mmio_write", addr=addr, size=size, value=value)

    def hypercall(self, code: int, *args: int) -> int:
        """``hvcl code`` with a0..a5 = ``args``; returns the guest's a0 afterwards (signed)."""
        return _int_field(self._call("vcpu.hypercall", code=code, args=list(args)), "a0",
                          "vcpu.hypercall")

    def run(self, timeout: float) -> RunResult:
        """Idle until an interrupt line is up or ``timeout`` seconds pass (blocks this thread)."""
        return parse_run(self._call("vcpu.run", timeout=timeout))

    def kick(self) -> None:
        """End a ``run`` waiting on this vCPU (from any connection) with EINTR."""
        self._call("vcpu.kick")


class Device(_Handle):
    """A device handle (KVM's device fd) of an irqchip ``type``."""

    _kind = "device"

    def __init__(self, kvm: Kvm, handle: int, type: str) -> None:
        super().__init__(kvm, handle)
        self.type = type

    def __repr__(self) -> str:
        return f"<Device handle={self.handle} type={self.type!r}>"

    def set_attr(self, group: int, attr: int, value: int) -> None:
        self._call("device.set_attr", group=group, attr=attr, value=value)

    def get_attr(self, group: int, attr: int) -> int:
        return _int_field(self._call("device.get_attr", group=group, attr=attr), "value",
                          "device.get_attr")
