"""The sans-I/O client core: everything both lvz clients do, except waiting and moving bytes.

One ``Session`` per connection holds what a client must remember: the calls waiting for their
responses (by msgid), the per-VM event buffers and the order of their events, and why the
connection failed, if it did. It parses incoming bytes (through the protocol's
``ClientConnection``), completes calls, routes ``irq`` / ``events_lost`` notifications and turns a
``protocol_error``, bad bytes or end of stream into one failure that every waiter then sees.

The drivers (``sync.py`` for threads and sockets, ``trio_client.py`` for trio) only move
bytes and park callers: a ``Pending`` carries an opaque ``waiter`` the driver chose (a thread
parker, a trio task), and the session calls back ``complete`` / ``wake_events`` so the driver
can wake exactly the right one, with no extra primitive per call.

What each API method sends and how its result is parsed lives once, in ``ops.py``; this module
also holds the value types both façades return and the result parsers. It imports only the
standard library and ``lvz.protocol``: the blocking client must not pay for trio.

Why a sans-I/O core rather than one client generated from the other (``unasync``): the two
drivers differ in exactly the places that matter for speed (a trio reader that completes calls
directly, threads that take turns reading), which a mechanical rewrite cannot express, and a
core keeps every protocol decision testable without a socket.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, Generic, TypeVar

from lvz.protocol import abi
from lvz.protocol.connection import NEED_DATA, ClientConnection
from lvz.protocol.errors import KvmError, LocalProtocolError, RemoteProtocolError
from lvz.protocol.events import Notification, Response

T = TypeVar("T")

#: Events buffered per VM before further ones are counted as lost instead of kept.
DEFAULT_MAX_EVENTS: Final = 4096
RECV_SIZE: Final = 65536

#: Interrupt line names by ESTAT bit (PROTOCOL.md §6), as the kernel's INT_* constants name them.
LINE_NAMES: Final[dict[int, str]] = abi.LINE_NAMES
LINES_BY_NAME: Final[dict[str, int]] = {name: irq for irq, name in LINE_NAMES.items()}


# --- errors -------------------------------------------------------------------------------------


class ConnectionLost(ConnectionError):
    """The connection to the daemon ended or broke; every call on it fails with this from now on.

    A ``ConnectionError`` rather than a ``KvmError``: nothing was answered, so there is no errno
    the emulated ioctl returned, and a caller must not mistake it for one.
    """


class DaemonUnreachable(ConnectionError):
    """No daemon accepts connections at the socket path (not started, wrong path, stale file)."""


class UntrustedDaemon(ConnectionError):
    """The socket is served by another user: talking to it could hand an impostor our VMs.

    A ``ConnectionError`` so the CLI reports it as lvz failing (exit 125), like an unreachable
    daemon; ``uid`` is the peer's, from SO_PEERCRED.
    """

    def __init__(self, message: str, uid: int) -> None:
        super().__init__(message)
        self.uid = uid


def begin_connect(where: str, timeout: float | None) -> tuple[socket.socket, bool]:
    """A socket connecting to ``where``; True if the connect is still in progress (only with
    ``timeout=0``, a non-blocking socket, when the daemon's accept backlog is full)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(where)
    except BlockingIOError:
        return sock, True
    except OSError as exc:
        sock.close()
        failure = DaemonUnreachable(
            f"cannot reach the lvz daemon at {where}: {exc.strerror or exc}"
        )
        failure.errno = exc.errno  # the CLI tells a stale socket (ECONNREFUSED) apart
        raise failure from None
    return sock, False


def end_connect(sock: socket.socket, where: str) -> None:
    """Finish a connect (its error, if it failed in progress) and vet the peer; closes on error."""
    try:
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise DaemonUnreachable(f"cannot reach the lvz daemon at {where}: {os.strerror(err)}")
        check_peer(sock, where)
    except BaseException:
        sock.close()
        raise


def check_peer(sock: socket.socket, path: str) -> None:
    """Refuse a daemon that is neither us nor root, before a single byte is sent to it.

    The socket's directory may have been prepared by another local user (issue 8): the peer's
    credentials, which the kernel vouches for, are the only thing an impostor cannot fake.
    """
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    if uid not in (0, os.getuid()):
        raise UntrustedDaemon(
            f"refusing the lvz daemon at {path}: its socket is served by uid {uid} (pid {pid}),"
            f" not by uid {os.getuid()} or root",
            uid,
        )


# --- value types --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class IrqEvent:
    """One change of a vCPU's interrupt line; ``vm`` is the handle the subscription was made on.

    ``seq`` counts the VM's line changes from 1, so a gap between two events means lost events.
    ``phyid`` is the vCPU's physical CPU id at that moment (None: unset, or an older daemon).
    """

    vm: int
    vcpu_id: int
    irq: int
    level: int
    seq: int
    phyid: int | None = None

    @property
    def line(self) -> str:
        return LINE_NAMES.get(self.irq, str(self.irq))


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
class IoExit:
    """``kvm_run.mmio`` / ``kvm_run.iocsr_io``: a guest access no in-kernel device claims.

    ``data`` is the stored value (the source register cut to ``len`` bytes) for a write; for a
    read the VMM answers with ``run(..., data=value)``.
    """

    phys_addr: int
    len: int
    is_write: bool
    data: int


@dataclass(frozen=True, slots=True, kw_only=True)
class HypercallExit:
    """``kvm_run.hypercall``: ``hvcl nr`` with ``args`` = a0..a5; the guest's a0 becomes the
    ``ret`` the VMM passes to the next ``run`` (``KVM_HCALL_INVALID_CODE`` if it passes none)."""

    nr: int
    args: tuple[int, ...]
    ret: int
    flags: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SystemEvent:
    """``kvm_run.system_event``: ``type`` is ``abi.KVM_SYSTEM_EVENT_CRASH`` for a guest crash."""

    type: int
    ndata: int
    data: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class RunResult:
    """``vcpu.run``: ``exit_reason`` is ``"irq"`` (a line is up, see ``estat``), ``"timeout"``,
    or an exit to the VMM with its ``kvm_run`` member set: ``"mmio"`` (``mmio``), ``"iocsr"``
    (``iocsr_io``), ``"hypercall"`` (``hypercall``) or ``"system_event"`` (``system_event``).
    The next ``run`` on the vCPU completes an exit (docs/vmm-loop.md)."""

    exit_reason: str
    estat: int
    mmio: IoExit | None = None
    iocsr_io: IoExit | None = None
    hypercall: HypercallExit | None = None
    system_event: SystemEvent | None = None


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


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteHop:
    """One hop of an explained route: the chip, the step, what it looked at and what it found.

    ``value`` is the bit's value when ``bit`` is set, else the register's (or, with no
    register, the number the step is about: a phyid, a vcpu_id).
    """

    chip: str
    step: str
    note: str
    register: str | None = None
    bit: int | None = None
    value: int | None = None

    @property
    def where(self) -> str:
        """``MASK bit 5 = 1``, ``COREMAP[12] = 0x5``, or "" for a hop with no register."""
        if self.register is None:
            return ""
        if self.bit is not None:
            return f"{self.register} bit {self.bit} = {self.value}"
        return self.register if self.value is None else f"{self.register} = {self.value:#x}"

    def __str__(self) -> str:
        where = self.where
        return f"{_short(self.chip)} {self.step}: {self.note}" + (f" [{where}]" if where else "")


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteVerdict:
    """Why a route stopped or was redirected: a stable ``reason`` word and what decided it."""

    chip: str
    reason: str
    message: str
    register: str | None = None
    bit: int | None = None
    value: int | None = None

    def __str__(self) -> str:
        where = RouteHop(
            chip=self.chip, step="", note="", register=self.register, bit=self.bit, value=self.value
        ).where
        return f"{self.reason} ({_short(self.chip)}{', ' + where if where else ''}): {self.message}"


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteDelivery:
    """The vCPU line an explained route ends on; ``changed`` is False when it is already there."""

    vcpu_id: int
    phyid: int | None
    line: int
    line_name: str
    level: int
    changed: bool

    def __str__(self) -> str:
        held = f"phyid {self.phyid}" if self.phyid is not None else "no phyid"
        verb = "raises" if self.level else "lowers"
        tail = "" if self.changed else " (no change: it already is)"
        return f"{verb} {self.line_name} of vCPU {self.vcpu_id} ({held}){tail}"


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteExplanation:
    """``vm.explain_route``: each hop an interrupt takes, and where it ends.

    Exactly one of ``delivered`` and ``stopped`` is set; ``redirected`` says why a delivery
    reached another vCPU than the registers literally name (an ignored CONFIG write, a coremap
    byte naming a phyid nobody held, a route resolved before the phyid moved).
    """

    source: str
    level: int
    hops: tuple[RouteHop, ...]
    delivered: RouteDelivery | None
    stopped: RouteVerdict | None
    redirected: RouteVerdict | None

    @property
    def vcpu_id(self) -> int | None:
        return None if self.delivered is None else self.delivered.vcpu_id

    def __str__(self) -> str:
        lines = [f"{self.source}{' (lowered)' if not self.level else ''}:"]
        width = max((len(f"{_short(h.chip)} {h.step}") for h in self.hops), default=0)
        for i, h in enumerate(self.hops, 1):
            where = h.where
            lines.append(
                f"  {i:2}. {f'{_short(h.chip)} {h.step}':<{width}}  {h.note}"
                + (f"  [{where}]" if where else "")
            )
        if self.delivered is not None:
            lines.append(f"  => delivered: {self.delivered}")
        if self.stopped is not None:
            lines.append(f"  => stopped: {self.stopped}")
        if self.redirected is not None:
            lines.append(f"  => redirected: {self.redirected}")
        return "\n".join(lines)


def _short(chip: str) -> str:
    return chip.removeprefix("loongarch-")


def describe_source(source: dict[str, Any]) -> str:
    """``{pin: 5}`` → "PCH-PIC pin 5", as a person says it."""
    ((kind, arg),) = source.items()
    if kind == "pin":
        return f"PCH-PIC pin {arg}"
    if kind == "msi":
        return f"MSI address {arg['address']:#x} data {arg['data']}"
    return f"EIOINTC irq {arg}"


# --- text from the daemon, for a terminal ----------------------------------------------------
# VM and plugin names come from other clients. The daemon escapes them in its log; a table on
# an operator's terminal must too, or a name holding a newline forges a row and one holding
# ESC sequences clears the screen or retitles the window.
_CONTROLS: Final = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))} | {
    0x0A: "\\n",
    0x0D: "\\r",
    0x09: "\\t",
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}


def printable(text: str) -> str:
    """``text`` with every control character written as a backslash escape."""
    return text.translate(_CONTROLS)


# --- result parsing -----------------------------------------------------------------------------
# The daemon is trusted to follow PROTOCOL.md, but a result of the wrong shape must surface as a
# clear EPROTO rather than a KeyError deep inside a caller.


def field(result: dict[str, Any], key: str, method: str) -> Any:
    try:
        return result[key]
    except KeyError:
        raise KvmError("EPROTO", f"{method}: the daemon's result has no {key!r}") from None


def int_field(result: dict[str, Any], key: str, method: str) -> int:
    value = field(result, key, method)
    if type(value) is not int:
        raise KvmError("EPROTO", f"{method}: {key!r} is not an integer: {value!r:.80}")
    return value


def parse_irq(params: dict[str, Any]) -> IrqEvent | None:
    """An ``irq`` notification as a typed event; None when its shape is not the documented one."""
    try:
        phyid = params.get("phyid")
        return IrqEvent(
            vm=int(params["vm"]),
            vcpu_id=int(params["vcpu_id"]),
            irq=int(params["irq"]),
            level=int(params["level"]),
            seq=int(params["seq"]),
            phyid=phyid if type(phyid) is int else None,
        )
    except (KeyError, TypeError, ValueError):
        return None


def line_names(estat: int) -> tuple[str, ...]:
    """The names of the interrupt lines raised in an ESTAT value, lowest bit first."""
    return tuple(name for irq, name in sorted(LINE_NAMES.items()) if estat >> irq & 1)


def line_number(line: int | str) -> int:
    """A line given as its ESTAT bit or its name (``"IPI"``, ``"hwi3"``), checked."""
    irq = LINES_BY_NAME.get(line.upper(), -1) if isinstance(line, str) else line
    if irq < 0 or not abi.LINE_MASK >> irq & 1:
        raise KvmError(
            "EINVAL", f"{line!r} is not an interrupt line (one of {', '.join(LINE_NAMES.values())})"
        )
    return irq


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


# --- call specs ---------------------------------------------------------------------------------


def _no_result(result: dict[str, Any], method: str) -> None:
    return None


@dataclass(slots=True)
class Call(Generic[T]):
    """One request and how to read its answer: what every API method is, minus the waiting.

    ``ops.py`` builds one per method; a driver sends ``method``/``params``, waits in its own
    way, and returns ``parse(result, method)``. Being plain values, many can be pipelined in
    one go (``kvm.gather``). A value nobody changes once made, but not a frozen dataclass:
    its ``__init__`` would cost three ``object.__setattr__`` calls (0.2 µs) on every call.
    """

    method: str
    params: dict[str, Any]
    parse: Callable[[dict[str, Any], str], T]


@dataclass(frozen=True, slots=True)
class WaitEvent:
    """A step of a multi-step op: the next item of VM ``vm``'s stream, or None by ``deadline``.

    ``deadline`` is on ``time.monotonic``'s clock; None waits for ever.
    """

    vm: int
    deadline: float | None


#: What a multi-step op yields: one call, a batch answered in order (the snapshot driver's
#: shape, errors in place), or a wait for an event.
Step = Call[Any] | WaitEvent | list[tuple[str, dict[str, Any]]]
Op = Generator[Step, Any, T]


class End(Enum):
    """``Session.pop_event``'s answer for a stream that is closed (not subscribed, or gone)."""

    END = "end"


END: Final = End.END


# --- handle objects: what both façades' VmFd / VcpuFd / DeviceFd hold -------------------------

K = TypeVar("K")


class FdBase(Generic[K]):
    """A daemon handle on connection ``kvm``, as a KVM fd is on an open ``/dev/kvm``."""

    def __init__(self, kvm: K, handle: int) -> None:
        self.kvm = kvm
        self.handle = handle

    def _detail(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} handle={self.handle}{self._detail()}>"


class VmFdBase(FdBase[K]):
    """``name`` is the one it was created or opened by (None: unnamed)."""

    def __init__(self, kvm: K, handle: int, name: str | None = None) -> None:
        super().__init__(kvm, handle)
        self.name = name
        self._gone = False  # closed or destroyed through this object: its stream has ended


class VcpuFdBase(FdBase[K]):
    """``vcpu_id`` is the id the vCPU was created with."""

    def __init__(self, kvm: K, handle: int, vcpu_id: int) -> None:
        super().__init__(kvm, handle)
        self.vcpu_id = vcpu_id

    def _detail(self) -> str:
        return f" vcpu_id={self.vcpu_id}"


class DeviceFdBase(FdBase[K]):
    """``type`` is the irqchip's device type."""

    def __init__(self, kvm: K, handle: int, type: str) -> None:
        super().__init__(kvm, handle)
        self.type = type

    def _detail(self) -> str:
        return f" type={self.type!r}"


# --- the session --------------------------------------------------------------------------------


class Pending:
    """One request waiting for its response; ``waiter`` is whatever its driver wakes."""

    __slots__ = ("msgid", "response", "waiter")

    def __init__(self, msgid: int, waiter: object) -> None:
        self.msgid = msgid
        self.waiter = waiter
        self.response: Response | None = None


class Session:
    """One connection's client state, fed bytes and asked for requests; never blocks.

    ``complete(pending)`` is called once per request whose response arrived or that the
    connection's failure ended; ``wake_events()`` whenever an event stream may have something
    new to say (an event, a closed stream, a failure). Both run synchronously inside
    ``receive`` / ``fail`` / ``forget``, under whatever lock the driver holds.
    """

    def __init__(
        self,
        *,
        max_events: int,
        complete: Callable[[Pending], None],
        wake_events: Callable[[], object],
    ) -> None:
        self.conn = ClientConnection()
        self.pending: dict[int, Pending] = {}
        self.buffers: dict[int, EventBuffer] = {}
        self.failure: ConnectionError | None = None
        self.max_events = max_events
        self._complete = complete
        self._wake_events = wake_events
        self._order = itertools.count()

    # --- requests and responses -----------------------------------------------------------------

    def lost(self) -> ConnectionLost:
        return ConnectionLost(str(self.failure))

    def request(self, method: str, params: dict[str, Any], waiter: object) -> tuple[Pending, bytes]:
        """Encode a request and register its waiter, before a byte of it is written."""
        if self.failure is not None:
            raise self.lost()
        try:
            msgid, data = self.conn.send_request(method, params)
        except LocalProtocolError as exc:
            # A request we cannot even encode fails as the kernel fails a bad argument.
            raise KvmError(exc.name, exc.message) from None
        pending = self.pending[msgid] = Pending(msgid, waiter)
        return pending, data

    def outcome(self, pending: Pending) -> dict[str, Any]:
        """A completed call's result; raises its ``KvmError``, or ``ConnectionLost``."""
        response = pending.response
        if response is None:
            raise self.lost()
        if response.error is not None:
            raise response.error
        return response.result or {}

    def request_batch(
        self,
        batch: list[tuple[str, dict[str, Any]]],
        waiter: object,
    ) -> tuple[list[Pending | KvmError], bytes]:
        """Encode many requests for one waiter; one that cannot be encoded is its error."""
        pendings: list[Pending | KvmError] = []
        chunks = []
        for method, params in batch:
            try:
                pending, data = self.request(method, params, waiter)
            except KvmError as err:
                pendings.append(err)
                continue
            pendings.append(pending)
            chunks.append(data)
        return pendings, b"".join(chunks)

    def outcomes(self, pendings: list[Pending | KvmError]) -> list[dict[str, Any] | KvmError]:
        """Completed calls' results in order, a refused one as its error; raises if lost."""
        results: list[dict[str, Any] | KvmError] = []
        for p in pendings:
            if isinstance(p, KvmError):
                results.append(p)
                continue
            try:
                results.append(self.outcome(p))
            except KvmError as err:
                results.append(err)
        return results

    def receive(self, data: bytes) -> None:
        """Feed bytes from the daemon (``b""`` at end of stream) and act on every message."""
        self.conn.receive_data(data)
        while self.failure is None:
            try:
                event = self.conn.next_event()
            except RemoteProtocolError as exc:
                self.fail(
                    ConnectionLost(
                        f"the lvz daemon sent bytes this client cannot read ({exc.name}: "
                        f"{exc.message})"
                    )
                )
                return
            if event is NEED_DATA:
                break
            if isinstance(event, Response):
                pending = self.pending.pop(event.msgid, None)
                if pending is not None:  # else its caller gave up: drop the answer
                    pending.response = event
                    self._complete(pending)
            elif isinstance(event, Notification):
                self._notify(event)
        if not data:
            self.fail(ConnectionLost("the lvz daemon closed the connection"))

    def fail(self, exc: ConnectionError) -> None:
        """Record why the connection is over (the first reason wins) and wake every waiter."""
        if self.failure is not None:
            return
        self.failure = exc
        pending, self.pending = self.pending, {}
        for p in pending.values():
            self._complete(p)
        self._wake_events()

    def _notify(self, note: Notification) -> None:
        params = note.params
        if note.event == "irq":
            event = parse_irq(params)
            if event is not None and event.vm in self.buffers:
                self.buffers[event.vm].put(next(self._order), event)
                self._wake_events()
        elif note.event == "events_lost":
            count = params.get("count", 1)
            count = count if type(count) is int and count > 0 else 1
            target = params.get("vm")
            for vm, buf in self.buffers.items():
                if target is None or target == vm:  # an older daemon did not say which VM
                    buf.put(next(self._order), EventsLost(vm=vm, count=count))
            self._wake_events()
        elif note.event == "protocol_error":
            err = KvmError.from_wire(params)
            self.fail(
                ConnectionLost(f"the daemon reported a protocol error ({err.name}: {err.message})")
            )
        # other notifications: the protocol may grow new events; ignore what we do not know

    # --- event streams --------------------------------------------------------------------------

    def open_stream(self, vm: int) -> bool:
        """Start buffering VM ``vm``'s events; True if it already was (see ``subscribing``)."""
        if vm in self.buffers:
            return True
        self.buffers[vm] = EventBuffer(vm, self.max_events)
        return False

    def forget(self, vm: int) -> None:
        """End VM ``vm``'s stream (closed or destroyed): its readers see it end."""
        if self.buffers.pop(vm, None) is not None:
            self._wake_events()

    def pop_event(self, vm: int | None) -> StreamItem | End | None:
        """The next item of VM ``vm``'s stream (None: of any VM, oldest first), ``END`` when the
        stream is closed, None when a reader should wait; raises once drained after a failure."""
        if vm is not None:
            buf = self.buffers.get(vm)
            item = buf.pop() if buf is not None else None
        else:
            best: EventBuffer | None = None
            best_order = 0
            for b in self.buffers.values():
                order = b.head_order()
                if order is not None and (best is None or order < best_order):
                    best, best_order = b, order
            item = best.pop() if best is not None else None
        if item is not None:
            return item
        if self.failure is not None:
            raise self.lost()
        if vm is not None and vm not in self.buffers:
            return END
        return None

    def event_ready(self, vm: int | None) -> bool:
        """Whether ``pop_event(vm)`` would answer without waiting."""
        if self.failure is not None:
            return True
        if vm is None:
            return any(self.buffers.values())
        buf = self.buffers.get(vm)
        return buf is None or len(buf) > 0


def parse_all(calls: Sequence[Call[Any]], results: list[dict[str, Any] | KvmError]) -> list[Any]:
    """``gather``'s answer: each call's parsed result, or the first refusal raised."""
    for r in results:
        if isinstance(r, KvmError):
            raise r
    return [c.parse(r, c.method) for c, r in zip(calls, results, strict=True)]  # type: ignore[arg-type]


class Stepper(Generic[T]):
    """Runs a multi-step ``Op`` for a driver: the driver answers ``step`` until ``done``."""

    def __init__(self, op: Op[T]) -> None:
        self._op = op
        self.done = False
        self.value: T | None = None
        self.step: Step = WaitEvent(-1, None)
        self.send(None)

    def send(self, reply: object) -> None:
        try:
            self.step = self._op.send(reply)
        except StopIteration as stop:
            self.done, self.value = True, stop.value

    def throw(self, exc: KvmError) -> None:
        try:
            self.step = self._op.throw(exc)
        except StopIteration as stop:
            self.done, self.value = True, stop.value

    def fail(self, exc: BaseException) -> None:
        """The connection failed (or the caller was interrupted) mid-op: throw ``exc`` in so
        the op sees it, then close it. An op answers such a failure with no further step
        (lvz.protocol.snapshot: what it opened dies with the connection)."""
        try:
            self._op.throw(exc)
        except BaseException:
            pass  # exc itself, or what the op made of it: the caller re-raises exc
        self._op.close()

    def result(self) -> T:
        return self.value  # type: ignore[return-value]  # T may itself include None
