"""Trio lvz client: ``AsyncKvm`` → ``AsyncVmFd`` → ``AsyncVcpuFd`` / ``AsyncDeviceFd``.

A thin trio driver over the sans-I/O ``core.Session``; what each method sends lives in
``ops.py``. It is built for pipelining, with as few trio primitives per call as the job needs:

- A call encodes its request and writes it with one non-blocking ``send`` on the raw socket,
  then parks with ``wait_task_rescheduled``: no lock, no cancel scope, no ``Event``. Bytes the
  kernel did not take go to an outbox that a writer task finishes, so a cancelled caller can
  never leave half a message on the stream, and later calls queue behind it in order.
- One reader task feeds the session, which completes each call by rescheduling its task
  directly: one task switch per response, none for the reader in between.
- ``gather`` sends many calls in one write and parks once for all of them, so a harness needs
  no nursery per batch: ``await kvm.gather([ops.get_one_reg(v, abi.CPUID) for v in vcpus])``.

Failure is never a hang: when the daemon goes away, sends bytes we cannot read, or reports a
``protocol_error``, the session records why and wakes every waiting caller and event reader
with a ``ConnectionLost`` naming the cause; every later call fails the same way at once. The
reader and writer never raise, so ``open_kvm`` re-raises the caller's own exception as itself,
not wrapped in an ``ExceptionGroup``.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import trio

from lvz.protocol import snapshot
from lvz.protocol.endpoint import resolve_socket_path
from lvz.protocol.errors import KvmError

from . import core, ops
from .core import (
    ConnectionLost,
    DaemonUnreachable,
    EventsLost,
    HelloInfo,
    IrqEvent,
    PhyidMap,
    PluginInfo,
    RouteExplanation,
    RunResult,
    StreamItem,
    VmInfo,
    VmSummary,
)

__all__ = [
    "AsyncDevice",
    "AsyncDeviceFd",
    "AsyncKvm",
    "AsyncVcpu",
    "AsyncVcpuFd",
    "AsyncVm",
    "AsyncVmFd",
    "ConnectionLost",
    "DaemonUnreachable",
    "EventsLost",
    "IrqEvent",
    "KvmError",
    "RunResult",
    "open_kvm",
]

T = TypeVar("T")
#: How long the daemon may leave a started request unread before the connection is given up.
DEFAULT_WRITE_TIMEOUT: Final = 30.0


def _whole(result: dict[str, Any], method: str) -> dict[str, Any]:
    """``call``'s parse: the result as the daemon sent it."""
    return result


class _Waiter:
    """A task waiting for ``count`` responses; rescheduled once, when the last one is in.

    It is also what a cancelled wait calls back (``abort``): one object per call, where a
    closure per call cost a function and a cell.
    """

    __slots__ = ("count", "msgids", "parked", "session", "task")

    def __init__(self, session: core.Session, count: int) -> None:
        self.task = trio.lowlevel.current_task()
        self.session = session
        self.count = count
        self.parked = False
        #: The calls it waits for, by msgid: not the Pending entries, which refer to the
        #: waiter, so that no call leaves a reference cycle for the collector to find.
        self.msgids: Sequence[int] = ()

    def abort(self, _: object) -> trio.lowlevel.Abort:
        """Cancelled: no entry outlives its caller, and answers that come later are dropped."""
        self.parked = False
        pending = self.session.pending
        for msgid in self.msgids:
            pending.pop(msgid, None)
        return trio.lowlevel.Abort.SUCCEEDED


class AsyncKvm:
    """A connection to the daemon, as an open ``/dev/kvm`` is to the kernel.

    Made by ``open_kvm``; every method may be called from many tasks at once.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_events: int = core.DEFAULT_MAX_EVENTS,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
        path: str = "",
    ) -> None:
        self.path = path
        self._sock = sock
        self._outbox: deque[bytes] = deque()  # bytes the kernel did not take yet, in order
        self._writer: trio.lowlevel.Task | None = None  # the writer task, while it idles
        self._write_timeout = write_timeout
        self._events = trio.lowlevel.ParkingLot()
        self.session = core.Session(
            max_events=max_events, complete=self._complete, wake_events=self._events.unpark_all
        )
        self.info = HelloInfo(protocol=0, server="", api_version=0, methods=(), device_types=())

    @property
    def closed(self) -> bool:
        return self.session.failure is not None

    # --- the driver -----------------------------------------------------------------------------

    @staticmethod
    def _complete(pending: core.Pending) -> None:
        waiter: _Waiter = pending.waiter  # type: ignore[assignment]
        waiter.count -= 1
        if waiter.count == 0 and waiter.parked:
            waiter.parked = False
            trio.lowlevel.reschedule(waiter.task)

    def _send(self, data: bytes, mine: int = 1) -> None:
        """Write now when this call is alone in flight; else queue it for the writer task.

        Alone (``mine`` requests of one caller are all that is pending), one ``send`` right
        away is the cheapest round trip. With other calls in flight, more are usually about to
        be made in the same scheduler batch: the writer task then sends them all with one
        syscall, which is what lets 64 tasks on one connection keep up.
        """
        if not self._outbox and len(self.session.pending) <= mine:
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self.session.fail(ConnectionLost(f"lost the lvz daemon: {exc}"))
                raise self.session.lost() from None
            if sent == len(data):
                return
            data = data[sent:]
        self._outbox.append(data)
        if self._writer is not None:
            trio.lowlevel.reschedule(self._writer)
            self._writer = None

    @staticmethod
    async def _park(waiter: _Waiter, msgids: Sequence[int]) -> None:
        if waiter.count == 0:  # failed while sending: nothing to wait for
            await trio.lowlevel.checkpoint()
            return
        waiter.msgids = msgids
        waiter.parked = True
        await trio.lowlevel.wait_task_rescheduled(waiter.abort)

    async def _write_loop(self) -> None:
        sock, outbox = self._sock, self._outbox
        while self.session.failure is None:
            if not outbox:
                self._writer = trio.lowlevel.current_task()

                def abort(_: Any) -> trio.lowlevel.Abort:
                    self._writer = None
                    return trio.lowlevel.Abort.SUCCEEDED

                await trio.lowlevel.wait_task_rescheduled(abort)
                continue
            if len(outbox) > 1:
                joined = b"".join(outbox)
                outbox.clear()
                outbox.append(joined)
            # One scope per batch, not per call: the daemon must read within bounds.
            with trio.move_on_after(self._write_timeout) as scope:
                while outbox:
                    try:
                        sent = sock.send(outbox[0])
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(sock)
                        continue
                    except OSError as exc:
                        self.session.fail(ConnectionLost(f"lost the lvz daemon: {exc}"))
                        return
                    if sent == len(outbox[0]):
                        outbox.popleft()
                    else:
                        outbox[0] = outbox[0][sent:]
            if scope.cancelled_caught:
                self.session.fail(
                    ConnectionLost(
                        f"the lvz daemon did not read a request for {self._write_timeout} s"
                    )
                )

    async def _read_loop(self) -> None:
        sock, session = self._sock, self.session
        try:
            while session.failure is None:
                try:
                    data = sock.recv(core.RECV_SIZE)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    continue
                session.receive(data)
        except (OSError, trio.ClosedResourceError) as exc:
            session.fail(ConnectionLost(f"lost the lvz daemon: {exc}"))
        except Exception as exc:  # a bug here must fail the calls, not hang them
            session.fail(ConnectionLost(f"the lvz client's reader failed: {exc!r}"))

    async def _batch(self, batch: snapshot.Batch) -> snapshot.Results:
        waiter = _Waiter(self.session, 0)
        pendings, data = self.session.request_batch(batch, waiter)
        waiter.count = sum(1 for p in pendings if isinstance(p, core.Pending))
        if data:
            self._send(data, waiter.count)
        await self._park(waiter, [p.msgid for p in pendings if isinstance(p, core.Pending)])
        return self.session.outcomes(pendings)

    async def _next_event(self, vm: int | None) -> StreamItem | None:
        while True:
            item = self.session.pop_event(vm)
            if item is core.END:
                return None
            if item is not None:
                return item
            await self._events.park()

    async def run(self, op: core.Call[T]) -> T:
        """Run one call spec from ``ops`` (what every method below does).

        Every single call comes through here (``call`` too), so it is one coroutine frame:
        each frame more is paid on every suspend and every resume.
        """
        session = self.session
        waiter = _Waiter(session, 1)
        pending, data = session.request(op.method, op.params, waiter)
        self._send(data)
        if waiter.count:  # (0: the connection failed while sending, nothing to wait for)
            waiter.msgids = (pending.msgid,)
            waiter.parked = True
            await trio.lowlevel.wait_task_rescheduled(waiter.abort)
        else:
            await trio.lowlevel.checkpoint()
        return op.parse(session.outcome(pending), op.method)

    async def drive(self, op: core.Op[T]) -> T:
        """Run a multi-step op from ``ops``: its calls, pipelined batches and event waits."""
        st = core.Stepper(op)
        while not st.done:
            step = st.step
            try:
                if isinstance(step, core.Call):
                    st.send(await self.run(step))
                elif isinstance(step, core.WaitEvent):
                    left = math.inf if step.deadline is None else step.deadline - time.monotonic()
                    left = max(0.0, left)
                    item = None
                    with trio.move_on_after(left):
                        item = await self._next_event(step.vm)
                    st.send(item)
                else:
                    st.send(await self._batch(step))
            except KvmError as err:
                st.throw(err)
            except BaseException as exc:
                st.fail(exc)
                raise
        return st.result()

    # --- the public surface ---------------------------------------------------------------------

    async def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Send one request and wait for its answer: the escape hatch for any method."""
        return await self.run(core.Call(method, params, _whole))

    async def gather(self, calls: Sequence[core.Call[Any]]) -> list[Any]:
        """Pipeline many ``ops`` calls from this one task: one write, one wait, no nursery.

        Results come in the calls' order; the first refusal is raised once every answer is in.
        """
        return core.parse_all(calls, await self._batch([(c.method, c.params) for c in calls]))

    async def call_batch(self, batch: snapshot.Batch) -> snapshot.Results:
        """Pipeline a batch of requests; a refused one is its KvmError, not a raise."""
        return await self._batch(batch)

    async def hello(self) -> HelloInfo:
        self.info = await self.run(ops.hello())
        return self.info

    async def get_api_version(self) -> int:
        return await self.run(ops.get_api_version())

    async def check_extension(self, cap: str, profile: str | None = None) -> int:
        return await self.run(ops.check_extension(cap, profile))

    async def create_vm(
        self, name: str | None = None, max_phyid: int | None = None, profile: str | None = None
    ) -> AsyncVmFd:
        return AsyncVmFd(self, await self.run(ops.create_vm(name, max_phyid, profile)), name)

    async def open_vm(self, name: str) -> AsyncVmFd:
        return AsyncVmFd(self, await self.run(ops.open_vm(name)), name)

    async def list_vms(self) -> list[VmSummary]:
        return await self.run(ops.list_vms())

    async def list_plugins(self) -> list[PluginInfo]:
        return await self.run(ops.list_plugins())

    async def save_vm(self, vm: AsyncVmFd) -> dict[str, Any]:
        return await self.drive(ops.save_vm(vm))

    async def restore_vm(self, saved: dict[str, Any], name: str | None = None) -> AsyncVmFd:
        handle = await self.drive(ops.restore_vm(saved, name))
        return AsyncVmFd(self, handle, name if name is not None else saved["vm"]["name"])

    async def close_handle(self, handle: int) -> None:
        await self.run(ops.close(handle))

    async def aclose(self) -> None:
        """Hang up: pending calls fail with ``ConnectionLost``; the daemon drops our handles."""
        self.session.fail(ConnectionLost("this lvz connection was closed"))
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()
        await trio.lowlevel.checkpoint()


@asynccontextmanager
async def open_kvm(
    path: str | os.PathLike[str] | None = None,
    *,
    max_events: int = core.DEFAULT_MAX_EVENTS,
    write_timeout: float = DEFAULT_WRITE_TIMEOUT,
) -> AsyncIterator[AsyncKvm]:
    """Connect to the daemon (``path`` > ``$LVZ_SOCKET`` > default), check who serves it
    (``UntrustedDaemon`` unless our uid or root) and say ``hello``.

    The connection lives for the ``async with`` block; its reader and writer tasks run in a
    nursery of their own, so the caller needs none.
    """
    where = os.fspath(resolve_socket_path(path))
    sock, in_progress = core.begin_connect(where, 0.0)
    if in_progress:  # a full accept backlog: wait as a blocking connect would
        try:
            await trio.lowlevel.wait_writable(sock)
        except BaseException:
            sock.close()
            raise
    core.end_connect(sock, where)
    kvm = AsyncKvm(sock, max_events=max_events, write_timeout=write_timeout, path=where)
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kvm._read_loop)
            nursery.start_soon(kvm._write_loop)
            try:
                await kvm.hello()
                yield kvm
            except BaseException as exc:
                # Re-raised below, outside the nursery, so callers see their own exception and
                # not an ExceptionGroup (the reader and writer never raise).
                body_error = exc
            finally:
                kvm.session.fail(ConnectionLost("this lvz connection was closed"))
                nursery.cancel_scope.cancel()
    finally:
        sock.close()
    if body_error is not None:
        try:
            raise body_error
        finally:
            body_error = None  # break the frame <-> traceback cycle


class _AsyncFd:
    """Closing a handle-backed object is ``close`` on the wire, like close(fd)."""

    kvm: AsyncKvm
    handle: int

    async def close(self) -> None:
        await self.kvm.run(ops.close(self.handle))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The handle may be gone already (destroyed, or the connection lost): that must not
        # hide the exception that ended the block.
        with contextlib.suppress(KvmError, ConnectionError):
            await self.close()


class AsyncVmFd(core.VmFdBase[AsyncKvm], _AsyncFd):
    """A VM handle (KVM's VM fd), as ``VmFd`` but awaited."""

    async def create_vcpu(self, vcpu_id: int) -> AsyncVcpuFd:
        return AsyncVcpuFd(self.kvm, await self.kvm.run(ops.create_vcpu(self, vcpu_id)), vcpu_id)

    async def open_vcpu(self, vcpu_id: int) -> AsyncVcpuFd:
        return AsyncVcpuFd(self.kvm, await self.kvm.run(ops.open_vcpu(self, vcpu_id)), vcpu_id)

    async def create_device(self, type: str) -> AsyncDeviceFd:
        return AsyncDeviceFd(self.kvm, await self.kvm.run(ops.create_device(self, type)), type)

    async def open_device(self, type: str) -> AsyncDeviceFd:
        return AsyncDeviceFd(self.kvm, await self.kvm.run(ops.open_device(self, type)), type)

    async def destroy(self) -> None:
        await self.kvm.run(ops.destroy_vm(self))
        self._gone = True
        self.kvm.session.forget(self.handle)

    async def close(self) -> None:
        self._gone = True
        self.kvm.session.forget(self.handle)
        await super().close()

    async def phyid_lookup(self, phyid: int) -> int | None:
        return await self.kvm.run(ops.phyid_lookup(self, phyid))

    async def phyid_map(self) -> PhyidMap:
        return await self.kvm.run(ops.phyid_map(self))

    async def info(self) -> VmInfo:
        return await self.kvm.run(ops.vm_info(self))

    async def irq_line(self, irq: int, level: int | bool) -> None:
        await self.kvm.run(ops.irq_line(self, irq, level))

    async def signal_msi(self, address: int, data: int) -> None:
        await self.kvm.run(ops.signal_msi(self, address, data))

    async def explain_route(
        self,
        pin: int | None = None,
        *,
        msi: tuple[int, int] | None = None,
        eiointc_irq: int | None = None,
        level: int | bool = 1,
    ) -> RouteExplanation:
        """See ``ops.explain_route``: the hops an interrupt takes now, and where it ends."""
        return await self.kvm.run(
            ops.explain_route(self, pin, msi=msi, eiointc_irq=eiointc_irq, level=level)
        )

    async def subscribe(self) -> None:
        """Start queueing this VM's ``irq`` events; read them with ``events()``."""
        existed = self.kvm.session.open_stream(self.handle)  # events may precede the answer
        try:
            await self.kvm.run(ops.subscribe(self))
        except BaseException:
            if not existed:
                self.kvm.session.forget(self.handle)
            raise

    async def next_event(self) -> StreamItem:
        """The next event (subscribing first if needed); StopAsyncIteration once closed."""
        if self._gone:
            raise StopAsyncIteration
        if self.handle not in self.kvm.session.buffers:
            await self.subscribe()
        item = await self.kvm._next_event(self.handle)
        if item is None:
            raise StopAsyncIteration
        return item

    def events(self) -> _EventStream:
        """This VM's ``IrqEvent``s (and ``EventsLost`` markers) in order, until it is closed.

        Subscribes on first use if ``subscribe()`` was not called; call it first to be sure no
        event between now and the first iteration is missed.
        """
        return _EventStream(self)

    async def wait_for_line(
        self,
        vcpu_id: int,
        irq: int | str,
        level: int = 1,
        timeout: float | None = None,  # noqa: ASYNC109 - as the sync one
    ) -> IrqEvent | None:
        """See ``ops.wait_for_line``: subscribes first if needed; TimeoutError when it is late."""
        if self.handle not in self.kvm.session.buffers and not self._gone:
            await self.subscribe()
        return await self.kvm.drive(ops.wait_for_line(self, vcpu_id, irq, level, timeout))


class _EventStream:
    """``async for`` over a VM's events.

    A plain iterator object rather than an async generator: a consumer that ``break``s out
    leaves nothing suspended for the garbage collector to finalise outside trio.
    """

    def __init__(self, vm: AsyncVmFd) -> None:
        self._vm = vm

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> StreamItem:
        return await self._vm.next_event()


class AsyncVcpuFd(core.VcpuFdBase[AsyncKvm], _AsyncFd):
    """A vCPU handle (KVM's vCPU fd), as ``VcpuFd`` but awaited."""

    async def destroy(self) -> None:
        await self.kvm.run(ops.destroy_vcpu(self))

    async def set_one_reg(self, reg_id: int, value: int) -> None:
        await self.kvm.run(ops.set_one_reg(self, reg_id, value))

    async def get_one_reg(self, reg_id: int) -> int:
        return await self.kvm.run(ops.get_one_reg(self, reg_id))

    async def lines(self) -> tuple[str, ...]:
        return await self.kvm.run(ops.lines(self))

    async def interrupt(self, irq: int) -> None:
        await self.kvm.run(ops.interrupt(self, irq))

    async def csr_xchg(self, csr: int, value: int, mask: int) -> int:
        return await self.kvm.run(ops.csr_xchg(self, csr, value, mask))

    async def set_attr(self, group: int, attr: int, value: int) -> None:
        await self.kvm.run(ops.vcpu_set_attr(self, group, attr, value))

    async def get_attr(self, group: int, attr: int) -> int:
        return await self.kvm.run(ops.vcpu_get_attr(self, group, attr))

    # A guest access no in-kernel device claims, a user hypercall and a crash exit to the VMM:
    # the call returns once a VMM completed it through ``run`` (on this connection too: calls
    # do not hold each other back). ``timeout``: how long to wait for a VMM (docs/vmm-loop.md).

    async def iocsr_read(self, addr: int, size: int, *, timeout: float | None = None) -> int:  # noqa: ASYNC109
        return await self.kvm.run(ops.iocsr_read(self, addr, size, timeout))

    async def iocsr_write(
        self,
        addr: int,
        size: int,
        value: int,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> None:
        await self.kvm.run(ops.iocsr_write(self, addr, size, value, timeout))

    async def mmio_read(self, addr: int, size: int, *, timeout: float | None = None) -> int:  # noqa: ASYNC109
        return await self.kvm.run(ops.mmio_read(self, addr, size, timeout))

    async def mmio_write(
        self,
        addr: int,
        size: int,
        value: int,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> None:
        await self.kvm.run(ops.mmio_write(self, addr, size, value, timeout))

    async def hypercall(self, code: int, *args: int, timeout: float | None = None) -> int:  # noqa: ASYNC109
        return await self.kvm.run(ops.hypercall(self, code, *args, timeout=timeout))

    async def run(
        self,
        timeout: float,  # noqa: ASYNC109
        *,
        data: int | None = None,
        ret: int | None = None,
    ) -> RunResult:
        """KVM_RUN: complete the exit the last ``run`` returned (``data`` answers a read,
        ``ret`` a hypercall), then return the next exit, else idle until an interrupt line is
        up or ``timeout`` s pass; other calls keep flowing.

        ``timeout`` is the emulated vCPU's idle limit, enforced by the daemon (it answers
        ``"timeout"``); wrap the call in ``trio.fail_after`` to bound the wait on this side.
        If this call is cancelled, the daemon's run is kicked (``vcpu.kick``) so the vCPU is
        free for the next ``run`` at once instead of EBUSY until the daemon-side timeout.
        """
        try:
            return await self.kvm.run(ops.run(self, timeout, data, ret))
        except trio.Cancelled:
            with trio.CancelScope(shield=True), trio.move_on_after(self.kvm._write_timeout):
                try:
                    await self.kvm.run(ops.kick(self))
                except (KvmError, ConnectionError):
                    pass  # gone already: nothing left to free
            raise

    async def kick(self) -> None:
        await self.kvm.run(ops.kick(self))


class AsyncDeviceFd(core.DeviceFdBase[AsyncKvm], _AsyncFd):
    """A device handle (KVM's device fd), as ``DeviceFd`` but awaited."""

    async def set_attr(self, group: int, attr: int, value: int) -> None:
        await self.kvm.run(ops.device_set_attr(self, group, attr, value))

    async def get_attr(self, group: int, attr: int) -> int:
        return await self.kvm.run(ops.device_get_attr(self, group, attr))


#: The names before the kvm-ioctls rename, kept for one release.
AsyncVm = AsyncVmFd
AsyncVcpu = AsyncVcpuFd
AsyncDevice = AsyncDeviceFd
