"""Trio lvz client: the kvm-ioctls object model (``Kvm`` → ``Vm`` → ``Vcpu`` / ``Device``), async.

One connection carries many calls at once. A single reader task owns the receiving half: it feeds
bytes to the sans-I/O ``ClientConnection`` and hands each response to the caller waiting on its
msgid, and each ``irq`` notification to the bounded queue of the VM it names. Callers share the
sending half through a ``StrictFIFOLock``, so requests go out whole and in call order.

Failure is never a hang: when the daemon goes away, sends bytes we cannot read, or reports a
``protocol_error``, the reader records why, wakes every waiting caller and event reader with a
``ConnectionLost`` naming the cause, and every later call fails the same way at once.

The reader never raises: ``open_kvm``'s nursery therefore only ever carries the caller's own
exception, which is re-raised as itself rather than wrapped in an ``ExceptionGroup``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

import trio

from lvz.protocol import snapshot
from lvz.protocol.abi import PROTOCOL_VERSION
from lvz.protocol.connection import NEED_DATA, ClientConnection
from lvz.protocol.endpoint import resolve_socket_path
from lvz.protocol.errors import KvmError, LocalProtocolError, RemoteProtocolError
from lvz.protocol.events import Notification, Response

from .sync import (
    DEFAULT_MAX_EVENTS,
    ConnectionLost,
    DaemonUnreachable,
    EventBuffer,
    EventsLost,
    HelloInfo,
    IrqEvent,
    PhyidMap,
    PluginInfo,
    RunResult,
    StreamItem,
    VmInfo,
    VmSummary,
    _int_field,
    local_error,
    lost_count,
    parse_hello,
    parse_irq,
    parse_phyid_map,
    parse_plugins,
    parse_run,
    parse_vm_info,
    parse_vm_list,
    protocol_failure,
)

__all__ = [
    "AsyncDevice",
    "AsyncKvm",
    "AsyncVcpu",
    "AsyncVm",
    "ConnectionLost",
    "DaemonUnreachable",
    "EventsLost",
    "IrqEvent",
    "KvmError",
    "RunResult",
    "open_kvm",
]

_RECV_SIZE: Final = 65536
#: How long a request may take to be written once its first byte is out (see ``_send``).
DEFAULT_WRITE_TIMEOUT: Final = 30.0


@dataclass(slots=True)
class _Pending:
    """One caller waiting for its response."""

    done: trio.Event = field(default_factory=trio.Event)
    response: Response | None = None


class _EventQueue:
    """An ``EventBuffer`` a trio task can wait on; closing it ends (or fails) its readers."""

    def __init__(self, vm: int, limit: int) -> None:
        self.buffer = EventBuffer(vm, limit)
        self._changed = trio.Event()
        self._order = itertools.count()
        self.closed = False
        self.failure: ConnectionError | None = None

    def put(self, item: StreamItem) -> None:
        if self.closed:
            return
        self.buffer.put(next(self._order), item)
        self._wake()

    def close(self, failure: ConnectionError | None = None) -> None:
        if not self.closed:
            self.closed = True
            self.failure = failure
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def get(self) -> StreamItem:
        while True:
            item = self.buffer.pop()
            if item is not None:
                return item
            if self.closed:
                if self.failure is not None:
                    raise ConnectionLost(str(self.failure))
                raise StopAsyncIteration
            await self._changed.wait()


class AsyncKvm:
    """A connection to the daemon, as an open ``/dev/kvm`` is to the kernel.

    Made by ``open_kvm``; every method may be called from many tasks at once.
    """

    def __init__(self, stream: trio.abc.Stream, *, max_events: int = DEFAULT_MAX_EVENTS,
                 write_timeout: float = DEFAULT_WRITE_TIMEOUT, path: str = "") -> None:
        self.path = path
        self._stream = stream
        self._conn = ClientConnection()
        self._send_lock = trio.StrictFIFOLock()
        self._outbox: list[bytes] = []
        self._pending: dict[int, _Pending] = {}
        self._queues: dict[int, _EventQueue] = {}
        self._max_events = max_events
        self._write_timeout = write_timeout
        self._failure: ConnectionError | None = None
        self.info = HelloInfo(protocol=PROTOCOL_VERSION, server="", api_version=0,
                              methods=(), device_types=())

    # --- plumbing -------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._failure is not None

    def _fail(self, exc: ConnectionError) -> None:
        """Record why the connection is over and wake everyone who waits on it."""
        if self._failure is not None:
            return
        self._failure = exc
        for pending in self._pending.values():
            pending.done.set()
        for queue in self._queues.values():
            queue.close(exc)

    def _lost(self) -> ConnectionLost:
        return ConnectionLost(str(self._failure))

    async def _reader(self) -> None:
        try:
            while self._failure is None:
                try:
                    data = await self._stream.receive_some(_RECV_SIZE)
                except (trio.BrokenResourceError, OSError) as exc:
                    self._fail(ConnectionLost(f"lost the lvz daemon: {exc}"))
                    return
                except trio.ClosedResourceError:
                    self._fail(ConnectionLost("this lvz connection was closed"))
                    return
                self._conn.receive_data(bytes(data))
                self._dispatch()
                if not data:
                    self._fail(ConnectionLost("the lvz daemon closed the connection"))
        except RemoteProtocolError as exc:
            self._fail(ConnectionLost(
                f"the lvz daemon sent bytes this client cannot read ({exc.name}: {exc.message})"))
        except Exception as exc:  # a bug here must fail the calls, not hang them
            self._fail(ConnectionLost(f"the lvz client's reader failed: {exc!r}"))
        finally:
            self._fail(ConnectionLost("this lvz connection was closed"))

    def _dispatch(self) -> None:
        while self._failure is None:
            event = self._conn.next_event()
            if event is NEED_DATA:
                return
            if isinstance(event, Response):
                pending = self._pending.get(event.msgid)
                if pending is not None:  # else its caller was cancelled: drop the answer
                    pending.response = event
                    pending.done.set()
            elif isinstance(event, Notification):
                self._notify(event)

    def _notify(self, note: Notification) -> None:
        if note.event == "irq":
            event = parse_irq(note.params)
            if event is not None:
                queue = self._queues.get(event.vm)
                if queue is not None:
                    queue.put(event)
        elif note.event == "events_lost":
            count = lost_count(note.params)
            target = note.params.get("vm")
            for vm, queue in self._queues.items():
                if target is None or target == vm:  # an older daemon did not say which VM
                    queue.put(EventsLost(vm=vm, count=count))
        elif note.event == "protocol_error":
            self._fail(protocol_failure(note.params))
        # other notifications: the protocol may grow new events; ignore what we do not know

    async def _send(self, data: bytes) -> None:
        """Queue one encoded request; whoever holds the send lock writes the whole queue.

        Pipelined callers started together thus share one ``send_all`` (and the daemon one
        receive) instead of one each: the first caller takes the lock, the others append
        and return, and the writer loops until the queue is empty. The queue holds only
        requests whose callers are waiting for answers, so it is bounded by them.
        """
        if self._failure is not None:
            raise self._lost()
        self._outbox.append(data)
        if self._send_lock.locked():
            return  # the current writer sends it, in order
        async with self._send_lock:
            while self._outbox:
                if self._failure is not None:
                    raise self._lost()
                batch = b"".join(self._outbox)
                self._outbox.clear()
                await self._write(batch)

    async def _write(self, data: bytes) -> None:
        # Once a request is started it must be finished: a half-written message would
        # corrupt the stream for every other caller. So the write is shielded from the
        # caller's cancellation, and bounded instead by a timeout that ends the connection.
        with trio.CancelScope(shield=True), trio.move_on_after(self._write_timeout) as scope:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._fail(ConnectionLost(f"lost the lvz daemon: {exc}"))
                raise self._lost() from None
        if scope.cancelled_caught:
            self._fail(ConnectionLost(
                f"the lvz daemon did not read a request for {self._write_timeout} s"))
            await trio.aclose_forcefully(self._stream)
            raise self._lost()

    async def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Send one request and wait for its answer; the escape hatch for any method."""
        if self._failure is not None:
            raise self._lost()
        try:
            msgid, data = self._conn.send_request(method, params)
        except LocalProtocolError as exc:
            raise local_error(exc) from None
        pending = self._pending[msgid] = _Pending()
        try:
            await self._send(data)
            await pending.done.wait()
        finally:
            del self._pending[msgid]  # also when cancelled: no entry outlives its caller
        response = pending.response
        if response is None:
            raise self._lost()
        if response.error is not None:
            raise response.error
        return response.result or {}

    def _queue(self, vm: int) -> _EventQueue:
        queue = self._queues.get(vm)
        if queue is None:
            queue = self._queues[vm] = _EventQueue(vm, self._max_events)
            if self._failure is not None:
                queue.close(self._failure)
        return queue

    def _forget(self, vm: int) -> None:
        queue = self._queues.pop(vm, None)
        if queue is not None:
            queue.close()

    # --- KVM system ioctls ----------------------------------------------------------------------

    async def hello(self) -> HelloInfo:
        self.info = parse_hello(await self.call("hello", {"protocol": PROTOCOL_VERSION}))
        return self.info

    async def get_api_version(self) -> int:
        result = await self.call("kvm.get_api_version", {})
        return _int_field(result, "version", "kvm.get_api_version")

    async def check_extension(self, cap: str) -> int:
        result = await self.call("kvm.check_extension", {"cap": cap})
        return _int_field(result, "value", "kvm.check_extension")

    async def create_vm(self, name: str | None = None, max_phyid: int | None = None) -> AsyncVm:
        params: dict[str, Any] = {}
        if name is not None:
            params["name"] = name
        if max_phyid is not None:
            params["max_phyid"] = max_phyid
        result = await self.call("kvm.create_vm", params)
        return AsyncVm(self, _int_field(result, "vm", "kvm.create_vm"), name)

    async def open_vm(self, name: str) -> AsyncVm:
        result = await self.call("kvm.open_vm", {"name": name})
        return AsyncVm(self, _int_field(result, "vm", "kvm.open_vm"), name)

    async def list_vms(self) -> list[VmSummary]:
        return parse_vm_list(await self.call("kvm.list_vms", {}))

    async def list_plugins(self) -> list[PluginInfo]:
        return parse_plugins(await self.call("kvm.list_plugins", {}))

    # --- snapshots (lvz.protocol.snapshot drives these) ----------------------------------------

    async def call_batch(self, batch: snapshot.Batch) -> snapshot.Results:
        """Pipeline a batch of requests; a refused one is its KvmError, not a raise."""
        results: snapshot.Results = [KvmError("EIO", "not answered")] * len(batch)

        async def one(i: int, method: str, params: dict[str, Any]) -> None:
            try:
                results[i] = await self.call(method, params)
            except KvmError as err:
                results[i] = err

        async with trio.open_nursery() as nursery:
            for i, (method, params) in enumerate(batch):
                nursery.start_soon(one, i, method, params)
        return results

    async def _drive(self, gen: Any) -> Any:
        try:
            batch = next(gen)
            while True:
                batch = gen.send(await self.call_batch(batch))
        except StopIteration as stop:
            return stop.value

    async def save_vm(self, vm: AsyncVm) -> dict[str, Any]:
        """The VM's whole state, read through the protocol with pipelined batches."""
        saved: dict[str, Any] = await self._drive(snapshot.save_vm(vm.handle))
        return saved

    async def restore_vm(self, saved: dict[str, Any], name: str | None = None) -> AsyncVm:
        """Create a VM from ``save_vm``'s result; on any failure no VM is left behind."""
        handle: int = await self._drive(snapshot.restore_vm(saved, name))
        return AsyncVm(self, handle, name if name is not None else saved["vm"]["name"])

    async def close_handle(self, handle: int) -> None:
        await self.call("close", {"handle": handle})

    async def aclose(self) -> None:
        """Hang up: pending calls fail with ``ConnectionLost``; the daemon drops our handles."""
        self._fail(ConnectionLost("this lvz connection was closed"))
        await trio.aclose_forcefully(self._stream)


@asynccontextmanager
async def open_kvm(
    path: str | os.PathLike[str] | None = None, *, max_events: int = DEFAULT_MAX_EVENTS,
    write_timeout: float = DEFAULT_WRITE_TIMEOUT,
) -> AsyncIterator[AsyncKvm]:
    """Connect to the daemon (``path`` > ``$LVZ_SOCKET`` > default) and say ``hello``.

    The connection lives for the ``async with`` block; its reader task runs in a nursery of its
    own, so the caller needs none.
    """
    where = resolve_socket_path(path)
    try:
        stream = await trio.open_unix_socket(os.fspath(where))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise DaemonUnreachable(f"cannot reach the lvz daemon at {where}: {reason}") from None
    kvm = AsyncKvm(stream, max_events=max_events, write_timeout=write_timeout,
                   path=os.fspath(where))
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(kvm._reader)
        try:
            await kvm.hello()
            yield kvm
        except BaseException as exc:
            # Re-raised below, outside the nursery, so callers see their own exception and
            # not an ExceptionGroup (the reader task never raises, see the module docstring).
            body_error = exc
        finally:
            with trio.CancelScope(shield=True):
                await kvm.aclose()
            nursery.cancel_scope.cancel()
    if body_error is not None:
        try:
            raise body_error
        finally:
            body_error = None  # break the frame <-> traceback cycle


class _AsyncHandle:
    _kind = ""

    def __init__(self, kvm: AsyncKvm, handle: int) -> None:
        self.kvm = kvm
        self.handle = handle

    async def close(self) -> None:
        await self.kvm.call("close", {"handle": self.handle})

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        # Best effort: the handle may be gone already (destroyed, or the connection lost) and
        # that must not hide the exception that ended the block.
        try:
            await self.close()
        except (KvmError, ConnectionError):
            pass

    async def _call(self, method: str, **params: Any) -> dict[str, Any]:
        params[self._kind] = self.handle
        return await self.kvm.call(method, params)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} handle={self.handle}>"


class AsyncVm(_AsyncHandle):
    """A VM handle (KVM's VM fd)."""

    _kind = "vm"

    def __init__(self, kvm: AsyncKvm, handle: int, name: str | None = None) -> None:
        super().__init__(kvm, handle)
        self.name = name
        self._gone = False  # closed or destroyed through this object: its stream has ended

    async def create_vcpu(self, vcpu_id: int) -> AsyncVcpu:
        result = await self._call("vm.create_vcpu", vcpu_id=vcpu_id)
        return AsyncVcpu(self.kvm, _int_field(result, "vcpu", "vm.create_vcpu"), vcpu_id)

    async def open_vcpu(self, vcpu_id: int) -> AsyncVcpu:
        result = await self._call("vm.open_vcpu", vcpu_id=vcpu_id)
        return AsyncVcpu(self.kvm, _int_field(result, "vcpu", "vm.open_vcpu"), vcpu_id)

    async def create_device(self, type: str) -> AsyncDevice:
        result = await self._call("vm.create_device", type=type)
        return AsyncDevice(self.kvm, _int_field(result, "device", "vm.create_device"), type)

    async def open_device(self, type: str) -> AsyncDevice:
        result = await self._call("vm.open_device", type=type)
        return AsyncDevice(self.kvm, _int_field(result, "device", "vm.open_device"), type)

    async def destroy(self) -> None:
        await self._call("vm.destroy")
        self._gone = True
        self.kvm._forget(self.handle)

    async def close(self) -> None:
        self._gone = True
        self.kvm._forget(self.handle)
        await super().close()

    async def phyid_lookup(self, phyid: int) -> int | None:
        value = (await self._call("vm.phyid_lookup", phyid=phyid)).get("vcpu_id")
        return value if type(value) is int else None

    async def phyid_map(self) -> PhyidMap:
        return parse_phyid_map(await self._call("vm.phyid_map"))

    async def info(self) -> VmInfo:
        return parse_vm_info(await self._call("vm.info"))

    async def irq_line(self, irq: int, level: int | bool) -> None:
        await self._call("vm.irq_line", irq=irq, level=int(level))

    async def signal_msi(self, address: int, data: int) -> None:
        await self._call("vm.signal_msi", address=address, data=data)

    async def subscribe(self) -> None:
        """Start queueing this VM's ``irq`` events; read them with ``events()``."""
        existed = self.handle in self.kvm._queues
        self.kvm._queue(self.handle)  # before the request: events may precede its answer
        try:
            await self._call("vm.subscribe")
        except BaseException:
            if not existed:
                self.kvm._forget(self.handle)
            raise

    async def next_event(self) -> StreamItem:
        """The next event (subscribing first if needed); StopAsyncIteration once closed."""
        if self._gone:
            raise StopAsyncIteration
        if self.handle not in self.kvm._queues:
            await self.subscribe()
        return await self.kvm._queue(self.handle).get()

    def events(self) -> _EventStream:
        """This VM's ``IrqEvent``s (and ``EventsLost`` markers) in order, until it is closed.

        Subscribes on first use if ``subscribe()`` was not called; call it first to be sure no
        event between now and the first iteration is missed.
        """
        return _EventStream(self)


class _EventStream:
    """``async for`` over a VM's events.

    A plain iterator object rather than an async generator: a consumer that ``break``s out
    leaves nothing suspended for the garbage collector to finalise outside trio.
    """

    def __init__(self, vm: AsyncVm) -> None:
        self._vm = vm

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> StreamItem:
        return await self._vm.next_event()


class AsyncVcpu(_AsyncHandle):
    """A vCPU handle (KVM's vCPU fd); ``vcpu_id`` is the id it was created with."""

    _kind = "vcpu"

    def __init__(self, kvm: AsyncKvm, handle: int, vcpu_id: int) -> None:
        super().__init__(kvm, handle)
        self.vcpu_id = vcpu_id

    def __repr__(self) -> str:
        return f"<AsyncVcpu handle={self.handle} vcpu_id={self.vcpu_id}>"

    async def destroy(self) -> None:
        await self._call("vcpu.destroy")

    async def set_one_reg(self, reg_id: int, value: int) -> None:
        await self._call("vcpu.set_one_reg", id=reg_id, value=value)

    async def get_one_reg(self, reg_id: int) -> int:
        result = await self._call("vcpu.get_one_reg", id=reg_id)
        return _int_field(result, "value", "vcpu.get_one_reg")

    async def interrupt(self, irq: int) -> None:
        await self._call("vcpu.interrupt", irq=irq)

    async def csr_xchg(self, csr: int, value: int, mask: int) -> int:
        result = await self._call("vcpu.csr_xchg", csr=csr, value=value, mask=mask)
        return _int_field(result, "old", "vcpu.csr_xchg")

    async def set_attr(self, group: int, attr: int, value: int) -> None:
        await self._call("vcpu.set_attr", group=group, attr=attr, value=value)

    async def get_attr(self, group: int, attr: int) -> int:
        result = await self._call("vcpu.get_attr", group=group, attr=attr)
        return _int_field(result, "value", "vcpu.get_attr")

    async def iocsr_read(self, addr: int, size: int) -> int:
        result = await self._call("vcpu.iocsr_read", addr=addr, size=size)
        return _int_field(result, "value", "vcpu.iocsr_read")

    async def iocsr_write(self, addr: int, size: int, value: int) -> None:
        await self._call("vcpu.iocsr_write", addr=addr, size=size, value=value)

    async def mmio_read(self, addr: int, size: int) -> int:
        result = await self._call("vcpu.mmio_read", addr=addr, size=size)
        return _int_field(result, "value", "vcpu.mmio_read")

    async def mmio_write(self, addr: int, size: int, value: int) -> None:
        await self._call("vcpu.mmio_write", addr=addr, size=size, value=value)

    async def hypercall(self, code: int, *args: int) -> int:
        """``hvcl code`` with a0..a5 = ``args``; returns the guest's a0 afterwards (signed)."""
        result = await self._call("vcpu.hypercall", code=code, args=list(args))
        return _int_field(result, "a0", "vcpu.hypercall")

    async def run(self, timeout: float) -> RunResult:  # noqa: ASYNC109 - the daemon's wait
        """Idle until an interrupt line is up or ``timeout`` s pass; other calls keep flowing.

        ``timeout`` is the emulated vCPU's idle limit, enforced by the daemon (it answers
        ``"timeout"``); wrap the call in ``trio.fail_after`` to bound the wait on this side.
        If this call is cancelled, the daemon's run is kicked (``vcpu.kick``) so the vCPU is
        free for the next ``run`` at once instead of EBUSY until the daemon-side timeout.
        """
        try:
            return parse_run(await self._call("vcpu.run", timeout=timeout))
        except trio.Cancelled:
            with trio.CancelScope(shield=True), trio.move_on_after(self.kvm._write_timeout):
                try:
                    await self._call("vcpu.kick")
                except (KvmError, ConnectionError):
                    pass  # gone already: nothing left to free
            raise

    async def kick(self) -> None:
        """End a ``run`` waiting on this vCPU (from any connection) with EINTR."""
        await self._call("vcpu.kick")


class AsyncDevice(_AsyncHandle):
    """A device handle (KVM's device fd) of an irqchip ``type``."""

    _kind = "device"

    def __init__(self, kvm: AsyncKvm, handle: int, type: str) -> None:
        super().__init__(kvm, handle)
        self.type = type

    def __repr__(self) -> str:
        return f"<AsyncDevice handle={self.handle} type={self.type!r}>"

    async def set_attr(self, group: int, attr: int, value: int) -> None:
        await self._call("device.set_attr", group=group, attr=attr, value=value)

    async def get_attr(self, group: int, attr: int) -> int:
        result = await self._call("device.get_attr", group=group, attr=attr)
        return _int_field(result, "value", "device.get_attr")
