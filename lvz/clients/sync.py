"""Blocking lvz client: the kvm-ioctls object model over a plain socket, for scripts and the CLI.

A thin driver over the sans-I/O ``core.Session``; what each method sends lives in ``ops.py``.
Many threads may pipeline on one connection: a call encodes its request, writes it under a
short send lock and parks. No lock is held across the round trip: whichever waiting thread
finds nobody reading becomes the reader, feeds the session and wakes each thread whose
response arrived (its own lock released, nothing broadcast); when its own call is done it
hands the reader role to the next parked thread. One thread alone simply reads its answer.

Notifications that arrive meanwhile (PROTOCOL.md §2 allows them between a request and its
response) are parked in bounded per-VM buffers; the overflow is counted and surfaced as one
``EventsLost`` item, so a script that never reads its events costs bounded memory and still
learns that it missed some. This module imports no trio.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

from lvz.protocol import snapshot
from lvz.protocol.endpoint import resolve_socket_path
from lvz.protocol.errors import KvmError

from . import ops
from .core import (
    DEFAULT_MAX_EVENTS,
    END,
    RECV_SIZE,
    Call,
    ConnectionLost,
    DaemonUnreachable,
    DeviceFdBase,
    EventsLost,
    HelloInfo,
    IrqEvent,
    Op,
    Pending,
    PhyidMap,
    PluginInfo,
    RouteExplanation,
    RunResult,
    Session,
    Stepper,
    StreamItem,
    UntrustedDaemon,
    VcpuFdBase,
    VmFdBase,
    VmInfo,
    VmSummary,
    WaitEvent,
    begin_connect,
    end_connect,
    parse_all,
)

__all__ = [
    "DEFAULT_MAX_EVENTS",
    "ConnectionLost",
    "DaemonUnreachable",
    "Device",
    "DeviceFd",
    "EventsLost",
    "HelloInfo",
    "IrqEvent",
    "Kvm",
    "KvmError",
    "PhyidMap",
    "PluginInfo",
    "RunResult",
    "UntrustedDaemon",
    "Vcpu",
    "VcpuFd",
    "Vm",
    "VmFd",
    "VmInfo",
    "VmSummary",
]

T = TypeVar("T")


_NO_LOCK: Any = None


class _Parker:
    """One parked thread: released by whoever completes its last call or hands it a turn."""

    __slots__ = ("count", "events", "lock")

    def __init__(self, events: bool = False) -> None:
        self.lock = _NO_LOCK  # made on first park: a lone thread never parks
        self.count = 0
        self.events = events

    def prepare(self) -> None:
        if self.lock is _NO_LOCK:
            self.lock = threading.Lock()
            self.lock.acquire()


class Kvm:
    """A connection to the daemon, as an open ``/dev/kvm`` is to the kernel; thread-safe."""

    def __init__(
        self, sock: socket.socket, *, max_events: int = DEFAULT_MAX_EVENTS, path: str = ""
    ) -> None:
        self.path = path
        self._sock = sock
        self._state = threading.Lock()  # guards the session and the fields below
        self._outbox: list[bytes] = []  # requests not yet written, in order
        self._sending = False  # a thread is writing the outbox
        self._reading = False
        self._parked: dict[_Parker, None] = {}
        self.session = Session(
            max_events=max_events, complete=self._complete, wake_events=self._wake_events
        )
        self.info = HelloInfo(protocol=0, server="", api_version=0, methods=(), device_types=())

    @classmethod
    def connect(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        max_events: int = DEFAULT_MAX_EVENTS,
        timeout: float | None = 10.0,
    ) -> Kvm:
        """Open the daemon's socket (``path`` > ``$LVZ_SOCKET`` > default), check who serves it
        (``UntrustedDaemon`` unless our uid or root) and say ``hello``.

        ``timeout`` bounds connecting and the greeting only: later calls may legitimately wait
        (``vcpu.run``), and the daemon going away ends them anyway.
        """
        where = os.fspath(resolve_socket_path(path))
        sock, _ = begin_connect(where, timeout)
        sock.settimeout(None)
        end_connect(sock, where)
        kvm = cls(sock, max_events=max_events, path=where)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            kvm.info = kvm._gather([ops.hello()], deadline)[0]
        except BaseException:
            kvm.close()
            raise
        return kvm

    # --- the driver: waking, sending, taking turns at reading ---------------------------------

    def _wake(self, parker: _Parker) -> None:
        if self._parked.pop(parker, 0) is None:
            parker.lock.release()

    def _complete(self, pending: Pending) -> None:
        parker: _Parker = pending.waiter  # type: ignore[assignment]
        parker.count -= 1
        if parker.count == 0:
            self._wake(parker)

    def _wake_events(self) -> None:
        for parker in [p for p in self._parked if p.events]:
            self._wake(parker)

    def _queue(self, data: bytes) -> bool:
        """Queue a request (state lock held); True if the caller is to write the queue now.

        The first thread to find nobody sending writes the whole queue, so threads that call
        at once share one ``sendall`` (and the daemon one receive) instead of taking turns at
        a lock, each with its own syscall.
        """
        if self._sending:
            self._outbox.append(data)
            return False
        self._sending = True
        return True

    def _send(self, data: bytes) -> None:
        """Write ``data``, then whatever others queued meanwhile (we hold the sending role)."""
        failed: OSError | None = None
        while True:
            try:
                self._sock.sendall(data)
            except OSError as exc:
                failed = exc
            with self._state:
                if not self._outbox or failed is not None:
                    self._sending = False
                    self._outbox.clear()
                    break
                data = b"".join(self._outbox)
                self._outbox.clear()
        if failed is None:
            return
        with self._state:
            if not self._reading:
                # The daemon says why it hangs up (a protocol_error) before it does; read it
                # without blocking so the failure names that reason, not a bare broken pipe.
                try:
                    while data := self._sock.recv(RECV_SIZE, socket.MSG_DONTWAIT):
                        self.session.receive(data)
                except OSError:
                    pass
            self.session.fail(ConnectionLost(f"lost the lvz daemon: {failed}"))
        raise self.session.lost()

    def _recv(self, deadline: float | None) -> bytes | None:
        """Bytes from the daemon (``b""``: it hung up), or None if ``deadline`` passed first."""
        if deadline is not None:
            ready, _, _ = select.select([self._sock], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
        return self._sock.recv(RECV_SIZE)

    def _wait(self, parker: _Parker, ready: Any, deadline: float | None) -> bool:
        """Park until ``ready()`` (checked under the state lock), reading when it is our turn.

        False if ``deadline`` passed first. The reader role is kept until our own wait is over,
        then passed to one parked thread, which takes it if it still waits.
        """
        state = self._state
        while True:
            with state:
                if ready() or self.session.failure is not None:
                    return True
                reader = not self._reading
                if reader:
                    self._reading = True
                else:
                    parker.prepare()
                    self._parked[parker] = None
            if not reader:
                if not self._park(parker, deadline):
                    return False
                continue
            try:
                while True:
                    error: OSError | None = None
                    try:
                        data = self._recv(deadline)
                    except OSError as exc:
                        data, error = b"", exc
                    with state:
                        if error is not None:
                            self.session.fail(ConnectionLost(f"lost the lvz daemon: {error}"))
                        elif data is not None:
                            self.session.receive(data)
                        if data is None or ready() or self.session.failure is not None:
                            self._pass_turn()
                            return data is not None
            except BaseException:
                with state:
                    self._pass_turn()
                raise

    def _pass_turn(self) -> None:
        """Give up reading (state lock held) and wake one parked thread to take over if needed."""
        self._reading = False
        if self._parked:
            self._wake(next(iter(self._parked)))

    def _park(self, parker: _Parker, deadline: float | None) -> bool:
        timeout = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if parker.lock.acquire(timeout=timeout):
            return True
        with self._state:
            if self._parked.pop(parker, 0) is None:
                return False
        parker.lock.acquire()  # woken just as the wait timed out: consume that release
        return True

    def _gather(self, calls: Sequence[Call[Any]], deadline: float | None = None) -> list[Any]:
        return parse_all(calls, self._batch([(c.method, c.params) for c in calls], deadline))

    def _batch(self, batch: snapshot.Batch, deadline: float | None = None) -> snapshot.Results:
        """Send every request at once, wait once; a refused one is its KvmError, in place."""
        parker = _Parker()
        with self._state:
            pendings, data = self.session.request_batch(batch, parker)
            parker.count = sum(1 for p in pendings if isinstance(p, Pending))
            send = bool(data) and self._queue(data)
        if send:
            self._send(data)
        if data and not self._wait(parker, lambda: parker.count == 0, deadline):
            with self._state:
                self.session.fail(
                    ConnectionLost(f"the lvz daemon at {self.path} did not answer in time")
                )
        return self.session.outcomes(pendings)

    def _next_event(self, vm: int | None, timeout: float | None) -> StreamItem | None:
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        parker = _Parker(events=True)
        while True:
            with self._state:
                item = self.session.pop_event(vm)
            if item is END:
                return None  # closed or never subscribed: nothing will ever come
            if item is not None:
                return item
            if not self._wait(parker, lambda: self.session.event_ready(vm), deadline):
                with self._state:
                    item = self.session.pop_event(vm)
                return None if item is END else item

    def run(self, op: Call[T]) -> T:
        """Run one call spec from ``ops`` (what every method below does)."""
        return op.parse(self.call(op.method, op.params), op.method)

    def drive(self, op: Op[T]) -> T:
        """Run a multi-step op from ``ops``: its calls, batches and event waits."""
        st = Stepper(op)
        while not st.done:
            step = st.step
            try:
                if isinstance(step, Call):
                    st.send(self.run(step))
                elif isinstance(step, WaitEvent):
                    left = None if step.deadline is None else step.deadline - time.monotonic()
                    st.send(self._next_event(step.vm, left))
                else:
                    st.send(self._batch(step))
            except KvmError as err:
                st.throw(err)
            except BaseException as exc:
                st.fail(exc)
                raise
        return st.result()

    # --- the public surface ---------------------------------------------------------------------

    def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Send one request and wait for its answer: the escape hatch for any method, and the
        one door every single call goes through (the CLI's ``-vv`` traces it)."""
        parker = _Parker()
        parker.count = 1
        with self._state:
            pending, data = self.session.request(method, params, parker)
            send = self._queue(data)
        if send:
            self._send(data)
        self._wait(parker, lambda: parker.count == 0, None)
        return self.session.outcome(pending)

    def gather(self, calls: Sequence[Call[Any]]) -> list[Any]:
        """Pipeline many ``ops`` calls: all sent at once, one wait; the first error is raised
        after every answer is in."""
        return self._gather(calls)

    def call_batch(self, batch: snapshot.Batch) -> snapshot.Results:
        """Pipeline a batch of requests; a refused one is its KvmError, not a raise."""
        return self._batch(batch)

    def next_event(self, timeout: float | None = None) -> StreamItem | None:
        """The oldest event of any subscribed VM, waiting up to ``timeout`` s; None if none came."""
        return self._next_event(None, timeout)

    def get_api_version(self) -> int:
        return self.run(ops.get_api_version())

    def check_extension(self, cap: str, profile: str | None = None) -> int:
        return self.run(ops.check_extension(cap, profile))

    def create_vm(
        self, name: str | None = None, max_phyid: int | None = None, profile: str | None = None
    ) -> VmFd:
        return VmFd(self, self.run(ops.create_vm(name, max_phyid, profile)), name)

    def open_vm(self, name: str) -> VmFd:
        return VmFd(self, self.run(ops.open_vm(name)), name)

    def list_vms(self) -> list[VmSummary]:
        return self.run(ops.list_vms())

    def list_plugins(self) -> list[PluginInfo]:
        return self.run(ops.list_plugins())

    def save_vm(self, vm: VmFd) -> dict[str, Any]:
        return self.drive(ops.save_vm(vm))

    def restore_vm(self, saved: dict[str, Any], name: str | None = None) -> VmFd:
        handle = self.drive(ops.restore_vm(saved, name))
        return VmFd(self, handle, name if name is not None else saved["vm"]["name"])

    def close_handle(self, handle: int) -> None:
        self.run(ops.close(handle))

    def close(self) -> None:
        """Hang up; the daemon closes every handle this connection held (PROTOCOL.md §3)."""
        with self._state:
            self.session.fail(ConnectionLost("this lvz connection was closed"))
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked reading
        except OSError:
            pass
        self._sock.close()

    @property
    def closed(self) -> bool:
        return self.session.failure is not None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Fd:
    """Closing a handle-backed object is ``close`` on the wire, like close(fd)."""

    kvm: Kvm
    handle: int

    def close(self) -> None:
        self.kvm.run(ops.close(self.handle))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:  # best effort: an error here must not hide the one that ended the block
            self.close()
        except (KvmError, ConnectionError):
            pass


class VmFd(VmFdBase["Kvm"], _Fd):
    """A VM handle (KVM's VM fd); see ``ops`` for what each method does."""

    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        return VcpuFd(self.kvm, self.kvm.run(ops.create_vcpu(self, vcpu_id)), vcpu_id)

    def open_vcpu(self, vcpu_id: int) -> VcpuFd:
        return VcpuFd(self.kvm, self.kvm.run(ops.open_vcpu(self, vcpu_id)), vcpu_id)

    def create_device(self, type: str) -> DeviceFd:
        return DeviceFd(self.kvm, self.kvm.run(ops.create_device(self, type)), type)

    def open_device(self, type: str) -> DeviceFd:
        return DeviceFd(self.kvm, self.kvm.run(ops.open_device(self, type)), type)

    def destroy(self) -> None:
        self.kvm.run(ops.destroy_vm(self))
        self._gone = True
        with self.kvm._state:
            self.kvm.session.forget(self.handle)

    def close(self) -> None:
        self._gone = True
        with self.kvm._state:
            self.kvm.session.forget(self.handle)
        super().close()

    def phyid_lookup(self, phyid: int) -> int | None:
        return self.kvm.run(ops.phyid_lookup(self, phyid))

    def phyid_map(self) -> PhyidMap:
        return self.kvm.run(ops.phyid_map(self))

    def info(self) -> VmInfo:
        return self.kvm.run(ops.vm_info(self))

    def irq_line(self, irq: int, level: int | bool) -> None:
        self.kvm.run(ops.irq_line(self, irq, level))

    def signal_msi(self, address: int, data: int) -> None:
        self.kvm.run(ops.signal_msi(self, address, data))

    def explain_route(
        self,
        pin: int | None = None,
        *,
        msi: tuple[int, int] | None = None,
        eiointc_irq: int | None = None,
        level: int | bool = 1,
    ) -> RouteExplanation:
        """See ``ops.explain_route``: the hops an interrupt takes now, and where it ends."""
        return self.kvm.run(
            ops.explain_route(self, pin, msi=msi, eiointc_irq=eiointc_irq, level=level)
        )

    def subscribe(self) -> None:
        """Start buffering this VM's ``irq`` events (read them with ``events``)."""
        with self.kvm._state:  # before the request: its own events precede its answer
            existed = self.kvm.session.open_stream(self.handle)
        try:
            self.kvm.run(ops.subscribe(self))
        except BaseException:
            if not existed:
                with self.kvm._state:
                    self.kvm.session.forget(self.handle)
            raise

    def _stream(self) -> None:
        if self.handle not in self.kvm.session.buffers and not self._gone:
            self.subscribe()

    def next_event(self, timeout: float | None = None) -> StreamItem | None:
        """This VM's next event, waiting up to ``timeout`` s (None = forever); None if none came."""
        self._stream()
        return self.kvm._next_event(self.handle, timeout)

    def events(self, timeout: float | None = 0.0) -> Iterator[StreamItem]:
        """This VM's events until none arrives within ``timeout`` s of the previous one.

        ``timeout=0`` yields only what has already arrived, which after a call returns includes
        every event that call caused (the daemon sends them before the response).
        """
        self._stream()
        while (item := self.kvm._next_event(self.handle, timeout)) is not None:
            yield item

    def wait_for_line(
        self, vcpu_id: int, irq: int | str, level: int = 1, timeout: float | None = None
    ) -> IrqEvent | None:
        """See ``ops.wait_for_line``: subscribes first if needed; TimeoutError when it is late."""
        self._stream()
        return self.kvm.drive(ops.wait_for_line(self, vcpu_id, irq, level, timeout))


class VcpuFd(VcpuFdBase["Kvm"], _Fd):
    """A vCPU handle (KVM's vCPU fd)."""

    def destroy(self) -> None:
        self.kvm.run(ops.destroy_vcpu(self))

    def set_one_reg(self, reg_id: int, value: int) -> None:
        self.kvm.run(ops.set_one_reg(self, reg_id, value))

    def get_one_reg(self, reg_id: int) -> int:
        return self.kvm.run(ops.get_one_reg(self, reg_id))

    def lines(self) -> tuple[str, ...]:
        return self.kvm.run(ops.lines(self))

    def interrupt(self, irq: int) -> None:
        self.kvm.run(ops.interrupt(self, irq))

    def csr_xchg(self, csr: int, value: int, mask: int) -> int:
        return self.kvm.run(ops.csr_xchg(self, csr, value, mask))

    def set_attr(self, group: int, attr: int, value: int) -> None:
        self.kvm.run(ops.vcpu_set_attr(self, group, attr, value))

    def get_attr(self, group: int, attr: int) -> int:
        return self.kvm.run(ops.vcpu_get_attr(self, group, attr))

    # A guest access no in-kernel device claims, a user hypercall and a crash exit to the VMM:
    # the call returns once a VMM completed it through ``run`` on another connection (or
    # thread). ``timeout``: how long to wait for a VMM (docs/vmm-loop.md).

    def iocsr_read(self, addr: int, size: int, *, timeout: float | None = None) -> int:
        return self.kvm.run(ops.iocsr_read(self, addr, size, timeout))

    def iocsr_write(
        self, addr: int, size: int, value: int, *, timeout: float | None = None
    ) -> None:
        self.kvm.run(ops.iocsr_write(self, addr, size, value, timeout))

    def mmio_read(self, addr: int, size: int, *, timeout: float | None = None) -> int:
        return self.kvm.run(ops.mmio_read(self, addr, size, timeout))

    def mmio_write(self, addr: int, size: int, value: int, *, timeout: float | None = None) -> None:
        self.kvm.run(ops.mmio_write(self, addr, size, value, timeout))

    def hypercall(self, code: int, *args: int, timeout: float | None = None) -> int:
        return self.kvm.run(ops.hypercall(self, code, *args, timeout=timeout))

    def run(self, timeout: float, *, data: int | None = None, ret: int | None = None) -> RunResult:
        """KVM_RUN: complete the exit the last ``run`` returned (``data`` answers a read,
        ``ret`` a hypercall), then return the next exit, else idle until an interrupt line is
        up or ``timeout`` seconds pass (blocks this thread)."""
        return self.kvm.run(ops.run(self, timeout, data, ret))

    def kick(self) -> None:
        self.kvm.run(ops.kick(self))


class DeviceFd(DeviceFdBase["Kvm"], _Fd):
    """A device handle (KVM's device fd) of an irqchip ``type``."""

    def set_attr(self, group: int, attr: int, value: int) -> None:
        self.kvm.run(ops.device_set_attr(self, group, attr, value))

    def get_attr(self, group: int, attr: int) -> int:
        return self.kvm.run(ops.device_get_attr(self, group, attr))


#: The names before the kvm-ioctls rename (``VmFd`` …), kept for one release.
Vm = VmFd
Vcpu = VcpuFd
Device = DeviceFd
