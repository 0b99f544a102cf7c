"""Per-connection state: handles (like fds), the outgoing buffer, and pending vcpu.run calls.

Only the server task of a connection and the event fan-out touch a Connection; it does no I/O
except through ``flush``, which holds the send lock so there is one writer at a time.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import ClassVar

import trio
import trio.lowlevel

from lvz.plugins.api import Device
from lvz.protocol.connection import ServerConnection

from .config import ServeConfig
from .model import Vcpu, Vm


class Handle:
    """An fd-like reference from one connection to a VM, vCPU or device.

    One subclass per kind, so that resolving a handle by kind (server.py) hands a handler the
    typed object it works on: a vCPU method gets a ``VcpuHandle`` whose ``vcpu`` is a ``Vcpu``.
    """

    __slots__ = ("life", "number", "vm")
    kind: ClassVar[str] = ""

    def __init__(self, number: int, vm: Vm, life: Vm | Vcpu) -> None:
        self.number = number
        self.vm = vm
        # What decides whether the handle still works: its vCPU (destroyed with the VM too)
        # or its VM. Kept as one attribute because every request checks it.
        self.life = life


class VmHandle(Handle):
    __slots__ = ()
    kind: ClassVar[str] = "vm"

    def __init__(self, number: int, vm: Vm) -> None:
        super().__init__(number, vm, vm)


class VcpuHandle(Handle):
    __slots__ = ("vcpu",)
    kind: ClassVar[str] = "vcpu"

    def __init__(self, number: int, vcpu: Vcpu) -> None:
        super().__init__(number, vcpu.vm, vcpu)
        self.vcpu = vcpu


class DeviceHandle(Handle):
    __slots__ = ("device",)
    kind: ClassVar[str] = "device"

    def __init__(self, number: int, vm: Vm, device: Device) -> None:
        super().__init__(number, vm, vm)
        self.device = device


class Subscription:
    """One connection's subscription to one VM: the handles it subscribed through.

    Subscribing again is a no-op and events carry the lowest subscribed handle still open
    (PROTOCOL.md §5); a heap with lazy deletion keeps both O(log n) however many handles a
    client subscribes or closes, so no pipeline of them can stall the daemon.
    """

    __slots__ = ("carrier", "heap", "numbers")

    def __init__(self) -> None:
        self.numbers: set[int] = set()
        self.heap: list[int] = []
        self.carrier = 0  # the handle number events carry

    def add(self, number: int) -> None:
        if number not in self.numbers:
            self.numbers.add(number)
            heapq.heappush(self.heap, number)
            self.carrier = self.heap[0]

    def discard(self, number: int) -> bool:
        """Drop a handle; True when none is left (the subscription has ended)."""
        self.numbers.discard(number)
        heap = self.heap
        while heap and heap[0] not in self.numbers:
            heapq.heappop(heap)
        self.carrier = heap[0] if heap else 0
        return not self.numbers


class RunWait:
    """A pending ``vcpu.run``. Whatever ends it — a line going up, the timeout, a destroy, a
    close, shutdown — answers it synchronously through ``Daemon._finish_run``, so the answer
    sits in the connection's buffer in the order things happened; ``event`` then only lets
    the waiting task go."""

    __slots__ = ("conn", "event", "handle", "msgid", "vcpu")

    def __init__(self, conn: Connection, handle: VcpuHandle, vcpu: Vcpu, msgid: int) -> None:
        self.conn = conn
        self.handle = handle
        self.vcpu = vcpu
        self.msgid = msgid
        self.event = trio.Event()


class Connection:
    """Per-connection state: protocol core, handles, outgoing buffer, subscriptions."""

    def __init__(self, stream: trio.SocketStream | None, config: ServeConfig, number: int) -> None:
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
        #: One writer per stream: a flush (or a goodbye) holds the turn across its send_all.
        #: A flag and a FIFO of waiters rather than a trio.StrictFIFOLock, whose uncontended
        #: acquire and release were a visible share of a sequential request's cost.
        self.writing = False
        self.writers = trio.lowlevel.ParkingLot()
        self.wakeup: trio.lowlevel.ParkingLot | None = None  # made with the pump
        self.closed = False
        self.nursery: trio.Nursery | None = None
        #: ``Daemon.deaths`` when this connection last swept its handles of dead objects.
        self.swept_at = -1
        #: Called before anything is sent (``--state-dir``: the journal is written first).
        self.before_send: Callable[[], None] | None = None

    def put(self, data: bytes) -> None:
        self.out.append(data)
        self.out_bytes += len(data)

    def put_event(self, data: bytes, vm_handle: int) -> bool:
        """Queue a notification without ever blocking the VM that caused it.

        Past ``max_events`` unsent events the subscriber is not keeping up: the event is
        dropped and counted per VM, and each count goes out as one ``events_lost``
        notification ``{"vm": h, "count": n}`` as soon as the connection drains; the ``seq``
        gap of that VM's next event agrees with it. Returns False when the event was dropped.
        """
        if self.closed:
            return True
        if self.queued_events >= self.max_events:
            self.events_lost[vm_handle] = self.events_lost.get(vm_handle, 0) + 1
            self.wake()
            return False
        self._report_lost()
        self.queued_events += 1
        self.put(data)
        self.wake()
        return True

    def _report_lost(self) -> None:
        if self.events_lost:
            for vm_handle, count in self.events_lost.items():
                self.put(
                    self.proto.send_notification("events_lost", {"vm": vm_handle, "count": count})
                )
            self.events_lost.clear()

    async def take_turn(self) -> None:
        """Become the stream's one writer; wait (first come, first served) if another is.

        Uncontended (the usual case) this is a flag, taken without a scheduler pass: the
        sequential request/response loop pays for exactly one send, as the floor does.
        """
        if self.writing:
            await self.writers.park()  # end_turn hands the turn over: writing stays True
        else:
            self.writing = True

    def end_turn(self) -> None:
        if self.writers:
            self.writers.unpark()
        else:
            self.writing = False

    async def flush(self) -> None:
        if not self.out and not self.events_lost:
            return
        await self.take_turn()
        try:
            self._report_lost()
            if not self.out:
                return
            if self.before_send is not None:
                self.before_send()
            data = b"".join(self.out) if len(self.out) > 1 else self.out[0]
            self.out.clear()
            self.out_bytes = 0
            self.queued_events = 0
            assert self.stream is not None, "a local connection has nothing to flush to"
            await self.stream.send_all(data)
        finally:
            self.end_turn()

    def wake(self) -> None:
        """Have what is queued written even if the reader is waiting for a request.

        The pump task starts with the first such write (an event, a late answer): most
        connections never need one, and a task per connection would cost every burst of
        connects and closes a scheduler step and a cancellation each (fairness, issue 8).
        """
        if self.wakeup is not None:
            self.wakeup.unpark_all()
        elif self.nursery is not None and not self.closed:
            self.wakeup = trio.lowlevel.ParkingLot()
            try:
                self.nursery.start_soon(self.pump)
            except RuntimeError:  # the nursery is closing: so is the connection
                pass

    async def pump(self) -> None:
        """Write events that arrive while the reader is idle (waiting for the next request)."""
        wakeup = self.wakeup
        assert wakeup is not None, "started by wake()"
        while True:
            while not self.out and not self.events_lost:
                await wakeup.park()
            await self.flush()
