"""The lvz daemon: a trio server that hosts VMs and answers the wire protocol on a Unix socket.

All server-side awaiting lives here (with ``listener.py`` for the socket itself); the VM model
(``model.py``), the method handlers (``handlers.py``) and the chips are synchronous code this
module calls. One connection = one reader task (decode, dispatch, collect replies) plus one
event pump; both write through ``Connection.flush``, taking turns (``take_turn``), so there is one
writer per stream at a time and bytes never interleave.

Ordering: requests of a connection run in arrival order, one at a time. Almost every request
is synchronous and takes effect whole without yielding; the few that await (``vm.destroy``,
which yields between chunks of vCPUs, and a phyid-map write that finds its VM's map lock
taken) hold back only their own connection's later requests. ``vcpu.run`` waits in a task of
its own, so later requests are not held back. Line changes are queued to subscribers the
moment they happen, so an event caused by a request is always in the connection's buffer
before that request's response.

Bounds: a connection's outgoing buffer is flushed whenever it passes ``FLUSH_BYTES`` mid-batch
and the reader does not read again until it has been written (a client that does not read stops
being read). It is also flushed every ``FLUSH_ANSWERS`` messages: a client pipelining 64
requests then gets the first half of its answers while the daemon works on the second, so on
two cores client and daemon overlap instead of taking turns (+70% for 64 in flight); not with
``--fsync always``, where each such send would cost a disk sync. Queued ``irq`` events per
subscriber are capped at ``max_events`` and the excess is dropped and reported with one
``events_lost`` notification per VM carrying the count.

Fairness: a connection's reader yields to the others whenever it has run for ``SLICE``
seconds without a break (a pipeline of expensive requests cannot hold the event loop), and
long teardowns yield between chunks.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket as _socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import trio
import trio.lowlevel

from lvz.protocol import abi, snapshot
from lvz.protocol.connection import NEED_DATA
from lvz.protocol.errors import KvmError, ProtocolError, RemoteProtocolError
from lvz.protocol.events import BadRequest, Malformed, Request
from lvz.protocol.schema import HANDLE_PARAM, METHODS, validate

from . import handlers, heap, systemd
from .config import RESERVED_FDS, ServeConfig
from .exits import Detached, Exits
from .handlers import MaybeLater, Params, Result
from .host import WATCHDOG, PluginHost, PluginLoadError, PluginTimeout, load_plugins
from .listener import (
    SocketInUse,
    Throttled,
    accept_forever,
    goodbye,
    notify_ready,
    open_listener,
    unlink_socket,
)
from .model import Vcpu, VcpuBudget, Vm
from .peer import (
    Connection,
    DeviceHandle,
    Handle,
    RunWait,
    Subscription,
    VcpuHandle,
    VmHandle,
)
from .recorder import Recorder, RecordingFailed
from .safedir import UnsafeDir
from .state import StateDir
from .stats import StatsSchema
from .trace import traced

log = logging.getLogger("lvz.daemon")

#: Small reads: a waiting reader's last chunk stays alive, so 1,000 quiet connections cost
#: 1,000 chunks; the decoder has already copied what it needs.
RECEIVE_BYTES = 16384
FLUSH_BYTES = 256 * 1024
#: Messages (answers, events) buffered mid-batch before they are sent: see the module doc.
#: Measured with 64 requests in flight: 8 → 418k req/s, 16 → 505k, 24 → 530k, 32 → 546k, one
#: send per batch → 316k. A batch smaller than this is still answered with one send. Not with
#: ``--fsync always``, where a send that carries a change costs a disk sync first: 64 changing
#: writes in flight went 146k → 113k req/s on this machine's virtual disk, and a real disk's
#: sync is slower still (with the default everysec, chunks gain: 233k → 343k).
FLUSH_ANSWERS = 32
#: Methods that give a VM its name: with --state-dir, its file is written whole.
_NAMING = frozenset({"kvm.create_vm", "vm.set_name"})
#: SIGHUP too: a closed terminal or a supervisor's stop must save, not lose, the named VMs.
SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: Seconds a connection's reader may run before it lets other tasks in (fairness).
SLICE = 0.02
#: vCPUs torn down between two yields when a VM is destroyed.
DESTROY_CHUNK = 1024

H = TypeVar("H", bound=Handle)
#: A request, its handle resolved: a result now, or a coroutine that will produce one.
Call = Callable[[Connection, Params], MaybeLater]


def _first_reason(group: BaseExceptionGroup[BaseException]) -> str:
    exc = group.exceptions[0]
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


#: A connection whose tasks fail with these had its peer go away: info, not a bug of ours.
PEER_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError)


def _connection_failed(
    number: int,
    group: BaseExceptionGroup[BaseException],
) -> BaseExceptionGroup[BaseException] | None:
    """Log why a connection's tasks failed; return what must propagate (cancellation).

    ``except* PEER_GONE`` then ``except* Exception``, spelled out with ``split`` because
    mypyc (the compiled build) cannot compile ``except*``.
    """
    gone, rest = group.split(PEER_GONE)
    if gone is not None:
        log.info("connection %d: the peer went away (%s)", number, _first_reason(gone))
    if rest is not None:
        bugs, rest = rest.split(Exception)
        if bugs is not None:
            log.error(
                "connection %d ended by an internal error", number, exc_info=bugs.exceptions[0]
            )
    return rest


class Daemon:
    """The service: VMs by name and by handle, connections, and the request dispatch table."""

    def __init__(self, host: PluginHost, config: ServeConfig) -> None:
        self.host = host
        self.config = config
        self.vms: list[Vm] = []
        self.named: dict[str, Vm] = {}
        self.refs: dict[Vm, int] = {}
        #: Per VM, the kernel's ``phyid_map_lock``: held around every phyid set or drop,
        #: across the await points of the request doing it (a teardown; a durable write).
        self.map_locks: dict[Vm, trio.Lock] = {}
        self.subscribers: dict[Vm, dict[Connection, Subscription]] = {}
        self.running: dict[Vcpu, RunWait] = {}
        #: Guest calls that exit to the VMM, per vCPU (exits.py).
        self.exits = Exits(self)
        self.connections: set[Connection] = set()
        self.conn_counter = 0
        self.peak_connections = 0  # kvm.stats
        self.started = time.monotonic()
        self.shutting_down = False
        self.max_connections = config.max_connections or default_max_connections()
        self.partial_held = 0  # bytes of unfinished messages, all connections (the budget)
        self.refusal_log = Throttled()
        self.recorder: Recorder | None = None  # lvz serve --record
        #: ``lvz serve -vv``: decided once here, so an untraced daemon's requests never ask.
        self.traced = log.isEnabledFor(logging.DEBUG)
        self.state: StateDir | None = None  # lvz serve --state-dir
        #: Counts VM and vCPU deaths: a connection at its handle limit sweeps its handles of
        #: dead objects only if something died since its last sweep, so refusals are O(1).
        self.deaths = 0
        #: Where teardowns of orphaned VMs run once ``serve`` is up; inline before that.
        self.nursery: trio.Nursery | None = None
        #: Daemon-wide VM numbers, in creation order, never reused (``kvm.list_vms``,
        #: ``kvm.open_vm_id``): the only name an unnamed VM has. A protocol matter, so here.
        self.vm_ids: dict[Vm, int] = {}
        self.vm_by_id: dict[int, Vm] = {}
        self.last_vm_id = 0
        self.device_type_names = sorted(host.device_types)
        self.stats_schema = StatsSchema(host)
        self.vcpu_budget = VcpuBudget(config.max_total_vcpus)  # --max-total-vcpus
        self.calls = self._routes()

    def _routes(self) -> dict[str, Call]:
        """handlers.py's tables, each handler wrapped with the resolution of its handle."""
        calls: dict[str, Call] = {}
        for name, on_kvm in handlers.KVM.items():
            calls[name] = self._no_handle(on_kvm)
        for name, on_any in handlers.ANY.items():
            calls[name] = self._on_handle(name, Handle, on_any)
        for name, on_vm in handlers.VM.items():
            calls[name] = self._on_handle(name, VmHandle, on_vm)
        for name, on_vcpu in handlers.VCPU.items():
            writes = handlers.WRITES_MAP.get(name)
            calls[name] = (
                self._on_handle(name, VcpuHandle, on_vcpu)
                if writes is None
                else self._writing_map(name, on_vcpu, writes)
            )
        for name, on_device in handlers.DEVICE.items():
            calls[name] = self._on_handle(name, DeviceHandle, on_device)
        missing = set(METHODS) - set(calls) - {"vcpu.run"}
        if missing:
            raise RuntimeError(f"methods without a handler: {sorted(missing)}")
        return calls

    def _no_handle(self, fn: Callable[[Daemon, Connection, Params], Result]) -> Call:
        def call(conn: Connection, p: Params) -> Result:
            return fn(self, conn, p)

        return call

    def _on_handle(
        self, method: str, kind: type[H], fn: Callable[[Daemon, Connection, Params, H], MaybeLater]
    ) -> Call:
        param, table_kind = HANDLE_PARAM[method]  # the method table names the parameter
        if table_kind != kind.kind:
            raise RuntimeError(
                f"{method} takes a {table_kind or 'any'} handle, "
                f"but its handler is in the {kind.kind or 'any'} table"
            )
        resolve = self._resolve

        def call(conn: Connection, p: Params) -> MaybeLater:
            return fn(self, conn, p, resolve(conn, p[param], kind, method))

        return call

    def _writing_map(
        self,
        method: str,
        fn: Callable[[Daemon, Connection, Params, VcpuHandle], MaybeLater],
        writes: Callable[[Params, VcpuHandle], bool],
    ) -> Call:
        """A vCPU method that may set or drop a phyid: under the VM's map lock when it does.

        When the lock is free (always, unless a teardown or a durable write of the same VM is
        in progress) the synchronous handler runs at once: holding a lock across code that
        never awaits excludes nobody. Otherwise the request waits for it in a coroutine, and
        resolves its handle again once it holds it: the vCPU may be gone.
        """
        if HANDLE_PARAM[method] != ("vcpu", "vcpu"):
            raise RuntimeError(f"{method} is not a vCPU method")
        resolve = self._resolve

        async def wait_for_lock(conn: Connection, p: Params, lock: trio.Lock) -> Result:
            async with lock:
                result = fn(self, conn, p, resolve(conn, p["vcpu"], VcpuHandle, method))
                assert isinstance(result, dict), "a map writer neither waits nor exits"
                return result

        def call(conn: Connection, p: Params) -> MaybeLater:
            h = resolve(conn, p["vcpu"], VcpuHandle, method)
            if not writes(p, h):
                return fn(self, conn, p, h)
            lock = self.map_locks[h.vm]
            if lock.locked():
                return wait_for_lock(conn, p, lock)
            # Free: run now. The handler never awaits, so nothing can run while it does and
            # taking the lock would change nothing anyone can see; it only cost time (a
            # 65,536-vCPU VM sets 65,536 CPUIDs).
            return fn(self, conn, p, h)

        return call

    # ---------------------------------------------------------------- connection loop ---------

    async def handle_stream(self, stream: trio.SocketStream) -> None:
        self.conn_counter += 1
        if self.recorder is not None:
            stream = self.recorder.wrap(stream, self.conn_counter)
        if self.traced:
            stream = traced(stream, self.conn_counter, self.config.max_message)
        conn = Connection(stream, self.config, self.conn_counter)
        if self.state is not None:
            conn.before_send = self.state.flush  # no answer leaves before its change is written
        if not self._peer_allowed(stream, conn):
            await goodbye(
                stream,
                conn.proto.send_protocol_error(
                    ProtocolError("EPERM", "this daemon serves only its own user (SO_PEERCRED)")
                ),
            )
            return
        if len(self.connections) >= self.max_connections:
            self.refusal_log(
                logging.WARNING,
                "connection refused: %d connections open (--max-connections)",
                len(self.connections),
            )
            await goodbye(
                stream,
                conn.proto.send_protocol_error(
                    ProtocolError(
                        "EMFILE",
                        f"the daemon already serves {self.max_connections} connections "
                        "(--max-connections)",
                    )
                ),
            )
            return
        self.connections.add(conn)
        self.peak_connections = max(self.peak_connections, len(self.connections))
        log.info("connection %d opened", conn.number)
        try:
            # The one place a connection's tasks (reader, event pump, vcpu.run waits) run,
            # so the one place their failures stop: whatever any of them raises ends this
            # connection alone. Only cancellation (shutdown) goes on up.
            try:
                async with trio.open_nursery() as nursery:
                    conn.nursery = nursery  # the pump starts here when needed (Connection.wake)
                    await self._read_loop(conn)
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                rest = _connection_failed(conn.number, group)
                if rest is not None:
                    raise rest from None  # cancellation (shutdown) goes on up
        finally:
            conn.closed = True
            self.connections.discard(conn)
            self._drop_connection(conn)
            if self.recorder is None:  # a plain SocketStream
                stream.socket.close()  # no schedule point: a close storm is one step each
            else:
                await trio.aclose_forcefully(stream)
            log.info("connection %d closed", conn.number)

    def _peer_allowed(self, stream: trio.SocketStream, conn: Connection) -> bool:
        try:
            creds = stream.socket.getsockopt(
                _socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize("3i")
            )
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
        held = 0  # this connection's part of self.partial_held
        # Messages per mid-batch send; with --fsync always no count, only FLUSH_BYTES.
        state = self.state
        chunk = FLUSH_ANSWERS if state is None or state.fsync != "always" else sys.maxsize
        timed = -1  # stream offset of the unfinished message on the slowloris clock
        deadline = 0.0
        try:
            while True:
                if timed < 0:
                    data = await stream.receive_some(RECEIVE_BYTES)
                else:
                    data = b""  # (what a timeout leaves: it returns below, unread)
                    with trio.move_on_at(deadline) as scope:
                        data = await stream.receive_some(RECEIVE_BYTES)
                    if scope.cancelled_caught:
                        self.partial_held -= held  # given back now, not after the goodbye
                        held = 0
                        await self._close_with(
                            conn,
                            ProtocolError(
                                "ETIMEDOUT",
                                "a message stayed unfinished for more than "
                                f"{self.config.message_timeout:g} s (--message-timeout)",
                            ),
                        )
                        return
                slice_end = time.perf_counter() + SLICE
                proto.receive_data(data)
                while True:
                    try:
                        event = proto.next_event()
                    except RemoteProtocolError as exc:
                        await self._close_with(conn, exc)
                        return
                    if event is NEED_DATA:
                        break
                    if type(event) is Request:
                        pending = self._dispatch(conn, event)
                        if pending is not None:
                            await pending
                        if time.perf_counter() >= slice_end:
                            await trio.lowlevel.checkpoint()  # others' turn (fairness)
                            slice_end = time.perf_counter() + SLICE
                    elif type(event) is BadRequest:
                        conn.put(proto.send_error(event.msgid, event.error))
                    elif type(event) is Malformed:
                        conn.put(proto.send_protocol_error(event.error))
                    if len(conn.out) >= chunk or conn.out_bytes >= FLUSH_BYTES:
                        await conn.flush()
                now_held = proto.held
                if now_held != held:
                    self.partial_held += now_held - held
                    grew = now_held > held
                    held = now_held
                    if grew and self.partial_held > self.config.partial_budget:
                        self.partial_held -= held  # others may use it during the goodbye
                        held = 0
                        await self._close_with(
                            conn,
                            ProtocolError(
                                "ENOMEM",
                                "the daemon's budget for partially received messages "
                                f"({self.config.partial_budget} bytes, --partial-budget) is used "
                                "up",
                            ),
                        )
                        return
                at = proto.unfinished
                if at != timed:
                    timed = at
                    deadline = trio.current_time() + self.config.message_timeout
                if not data:
                    if conn.out:
                        await conn.flush()
                    return
                del data  # not kept alive while waiting for the next one (RECEIVE_BYTES)
                if conn.out:
                    await conn.flush()
        finally:
            self.partial_held -= held

    async def _close_with(self, conn: Connection, error: ProtocolError) -> None:
        """Answer what is buffered, then a ``protocol_error`` naming why, and hang up."""
        log.info("connection %d: protocol error: %s %s", conn.number, error.name, error.message)
        conn.proto.discard_input()
        assert conn.stream is not None
        await conn.take_turn()
        try:
            if self.state is not None:  # the buffered answers' changes go first
                self.state.flush()
            conn.put(conn.proto.send_protocol_error(error))
            data = b"".join(conn.out)
            conn.out.clear()
            await goodbye(conn.stream, data)
        finally:
            conn.end_turn()

    def _dispatch(self, conn: Connection, req: Request) -> Coroutine[Any, Any, None] | None:
        """Answer one request; a coroutine to await when its handler has to wait.

        Every check after the method table's happens here or in the handler: the handle is
        resolved by kind first (EBADF, ENOTTY), then the handler runs its own checks.
        """
        method = req.method
        params = req.params
        try:
            if method == "vcpu.run":
                handle = self._resolve(conn, params["vcpu"], VcpuHandle, method)
                self._start_run(conn, req.msgid, handle, params)
                return None
            try:
                result = self.calls[method](conn, params)
            except KvmError as err:
                if self.state is not None:
                    self.state.applied(conn, method, params, err)
                raise
            if not isinstance(result, dict):
                if isinstance(result, Detached):  # a guest call that exited: answered later
                    result.start(req.msgid)  # (an exit changes no VM state: not journaled)
                    return None
                return self._answer_later(conn, req.msgid, method, params, result)
            state = self.state
            if state is not None:
                if method in _NAMING:
                    self._journal(conn, method, params, result)
                else:
                    state.applied(conn, method, params, None)
            self._answer(conn, req.msgid, method, result)
        except KvmError as err:
            conn.put(conn.proto.send_error(req.msgid, err))
        except Exception as exc:  # a bug of ours must fail one request, not the daemon
            self._internal_error(conn, req.msgid, method, exc)
        except PluginTimeout as exc:
            self._escaped_timeout(conn, req.msgid, method, exc)
        return None

    async def _answer_later(
        self,
        conn: Connection,
        msgid: int,
        method: str,
        params: Params,
        pending: Coroutine[Any, Any, Result],
    ) -> None:
        try:
            try:
                result = await pending
            except KvmError as err:
                if self.state is not None:
                    self.state.applied(conn, method, params, err)
                raise
            if self.state is not None:  # no await between the change and this: one step
                self._journal(conn, method, params, result)
            self._answer(conn, msgid, method, result)
        except KvmError as err:
            conn.put(conn.proto.send_error(msgid, err))
        except Exception as exc:
            self._internal_error(conn, msgid, method, exc)
        except PluginTimeout as exc:
            self._escaped_timeout(conn, msgid, method, exc)

    @staticmethod
    def _answer(conn: Connection, msgid: int, method: str, result: Result) -> None:
        try:
            data = conn.proto.send_result(msgid, result)
        except (TypeError, ValueError, OverflowError) as exc:
            raise KvmError("EIO", f"{method}: result cannot be encoded: {exc}") from exc
        conn.put(data)

    @staticmethod
    def _escaped_timeout(conn: Connection, msgid: int, method: str, exc: PluginTimeout) -> None:
        """The watchdog fired in the instant a plugin call was returning, outside its guard."""
        plugin = WATCHDOG.plugin
        WATCHDOG.reset()
        conn.put(
            conn.proto.send_error(
                msgid, KvmError("ETIMEDOUT", f"{method}: irqchip plugin {plugin!r} {exc}")
            )
        )

    @staticmethod
    def _internal_error(conn: Connection, msgid: int, method: str, exc: Exception) -> None:
        log.exception("internal error in %s", method, exc_info=exc)
        conn.put(
            conn.proto.send_error(
                msgid,
                KvmError("EIO", f"{method}: internal error in lvz: {type(exc).__name__}: {exc}"),
            )
        )

    def _execute(self, conn: Connection, method: str, params: Params) -> Result:
        """Run one request synchronously (``call_local``): only methods that never wait here."""
        result = self.calls[method](conn, params)
        if not isinstance(result, dict):
            if not isinstance(result, Detached):
                result.close()
            raise KvmError("EINVAL", f"{method} cannot run inside the daemon")
        return result

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

    def _journal(self, conn: Connection, method: str, params: Params, result: Result) -> None:
        """Tell the state dir what a request changed (``--state-dir``; socket requests only:
        what the daemon does itself, such as loading the state dir, is not a change)."""
        assert self.state is not None
        if method in _NAMING:
            vm = conn.handles[result["vm"] if method == "kvm.create_vm" else params["vm"]].vm
            if vm.name is not None:
                self.state.named(vm)
        else:
            self.state.applied(conn, method, params, None)

    def local_connection(self) -> Connection:
        """A connection with no socket, for requests the daemon makes itself (state dir)."""
        return Connection(None, self.config, 0)

    def drop_local(self, conn: Connection) -> None:
        """End a ``local_connection``: its handles close, so an unnamed VM it held dies."""
        self._drop_connection(conn)

    def _resolve(self, conn: Connection, number: int, kind: type[H], method: str) -> H:
        """The open handle ``number`` of ``kind``: EBADF if not open, else ENOTTY if another."""
        h = conn.handles.get(number)
        if h is None or not h.life.alive:
            if h is not None and method == "close":
                # Its object is gone, so close answers EBADF (PROTOCOL.md §3), but the slot
                # is freed: a harness that creates and destroys vCPUs must not run out.
                self.release(conn, h)
            raise KvmError("EBADF", f"{method}: handle {number} is not open")
        if not isinstance(h, kind):
            raise KvmError("ENOTTY", f"{method}: handle {number} is a {h.kind}, not a {kind.kind}")
        return h

    # ---------------------------------------------------------------- handles, lifetimes ------

    def add_handle(self, conn: Connection, h: Handle) -> int:
        """Register a new handle (numbered ``conn.next_handle``); its number."""
        assert h.number == conn.next_handle
        conn.next_handle += 1
        conn.handles[h.number] = h
        self.refs[h.vm] = self.refs.get(h.vm, 0) + 1
        return h.number

    def new_vm(self, name: str | None, max_phyid: int) -> Vm:
        vm = Vm(
            self.host,
            name=name,
            max_phyid=max_phyid,
            max_vcpus=self.config.max_vcpus,
            budget=self.vcpu_budget,
        )
        vm.listener = self._on_line
        self.vms.append(vm)
        self.map_locks[vm] = trio.Lock()
        self.last_vm_id += 1
        self.vm_ids[vm] = self.last_vm_id
        self.vm_by_id[self.last_vm_id] = vm
        if name is not None:
            self.named[name] = vm
        # Named by what `lvz vms` shows and `lvz vm info` takes: its name, else its id.
        if name is None:
            log.info("VM %d created (unnamed, max_phyid %d)", self.last_vm_id, max_phyid)
        else:
            log.info("VM %s created (id %d, max_phyid %d)", name, self.last_vm_id, max_phyid)
        return vm

    def check_handle_room(self, conn: Connection) -> None:
        if len(conn.handles) >= conn.max_handles and conn.swept_at != self.deaths:
            # Handles whose objects were destroyed count only until they are needed: at the
            # limit, they are dropped (they answer EBADF either way) before EMFILE is due —
            # once per death, so a client hammering the limit costs O(1) per refusal.
            conn.swept_at = self.deaths
            for h in [h for h in conn.handles.values() if not h.life.alive]:
                self.release(conn, h)
        if len(conn.handles) >= conn.max_handles:
            raise KvmError("EMFILE", f"this connection already holds {conn.max_handles} handles")

    def subscribe(self, conn: Connection, h: VmHandle) -> None:
        subs = self.subscribers.setdefault(h.vm, {})
        sub = subs.get(conn)
        if sub is None:
            sub = subs[conn] = Subscription()
        sub.add(h.number)

    def release(self, conn: Connection, h: Handle) -> None:
        """Drop one handle: end its run wait and subscription, destroy an orphaned unnamed VM."""
        conn.handles.pop(h.number, None)
        if isinstance(h, VcpuHandle):
            wait = self.running.get(h.vcpu)
            if wait is not None and wait.handle is h:
                self.finish_run(wait, KvmError("EBADF", "vcpu.run: the vCPU handle was closed"))
            self.exits.handle_closed(h)
        subs = self.subscribers.get(h.vm)
        if subs is not None:
            sub = subs.get(conn)
            if sub is not None and sub.discard(h.number):
                del subs[conn]
        vm = h.vm
        n = self.refs.get(vm, 0) - 1
        if n > 0:
            self.refs[vm] = n
            return
        self.refs.pop(vm, None)
        if vm.alive and vm.name is None:
            self._orphaned(vm)

    def _drop_connection(self, conn: Connection) -> None:
        for h in list(conn.handles.values()):
            if h.vm.alive:
                self.release(conn, h)
            else:
                conn.handles.pop(h.number, None)
        conn.handles.clear()
        for subs in self.subscribers.values():
            subs.pop(conn, None)

    def destroy_vcpu(self, vcpu: Vcpu) -> None:
        """``vcpu.destroy``, under the VM's map lock (it drops the phyid)."""
        self.deaths += 1
        try:
            vcpu.vm.destroy_vcpu(vcpu)
        finally:
            self.end_wait(vcpu, "the vCPU was destroyed")
            self.exits.end_vcpu(vcpu, "the vCPU was destroyed")

    async def destroy_vm(self, vm: Vm) -> None:
        """``vm.destroy``: dead at once to every client, torn down in chunks under its lock."""
        await self._tear_down(vm, self._kill_vm(vm))

    def _orphaned(self, vm: Vm) -> None:
        """An unnamed VM lost its last handle: destroy it, in the background if it is big."""
        steps = self._kill_vm(vm)
        lock = self.map_locks[vm]
        if self.nursery is not None and (len(vm.vcpus) > DESTROY_CHUNK or lock.locked()):
            self.nursery.start_soon(self._tear_down, vm, steps)
            return
        for _ in steps:
            pass  # small (or no event loop yet): at once, nothing can be waiting on the lock
        self._torn_down(vm)

    def _kill_vm(self, vm: Vm) -> Iterator[int]:
        """Make the VM dead to everyone now; returns its teardown steps (``Vm.begin_destroy``)."""
        vcpus = list(vm.vcpus.values())
        steps = vm.begin_destroy(DESTROY_CHUNK)
        self.deaths += 1
        for vcpu in vcpus:
            self.end_wait(vcpu, "the VM was destroyed")
            self.exits.end_vcpu(vcpu, "the VM was destroyed")
        if vm.name is not None and self.named.get(vm.name) is vm:
            del self.named[vm.name]
            if self.state is not None:
                self.state.destroyed(vm)  # gone from disk before the answer goes out
        if vm in self.vms:
            self.vms.remove(vm)
        self.subscribers.pop(vm, None)
        self.refs.pop(vm, None)
        vm_id = self.vm_ids.pop(vm, 0)
        self.vm_by_id.pop(vm_id, None)
        if vm.name is None:
            log.info("VM %d destroyed", vm_id)
        else:
            log.info("VM %s destroyed (id %d)", vm.name, vm_id)
        return steps

    async def _tear_down(self, vm: Vm, steps: Iterator[int]) -> None:
        """Run a dead VM's teardown steps under its map lock, letting others run in between.

        Shielded: a teardown once begun finishes (it is bounded), even during shutdown, so no
        chip is left with half its vCPUs destroyed.
        """
        lock = self.map_locks.get(vm) or trio.Lock()
        with trio.CancelScope(shield=True):
            async with lock:
                for _ in steps:
                    await trio.lowlevel.checkpoint()
        self._torn_down(vm)

    def _torn_down(self, vm: Vm) -> None:
        self.map_locks.pop(vm, None)
        # A VM and its chips' view of it are reference cycles: if the collector froze them
        # (heap.py), thaw, so that the next full collection frees them.
        heap.thaw()

    def end_wait(self, vcpu: Vcpu, why: str, errno_name: str = "EBADF") -> None:
        wait = self.running.get(vcpu)
        if wait is not None:
            message = why if why.startswith("vcpu.run") else f"vcpu.run: {why}"
            self.finish_run(wait, KvmError(errno_name, message))

    # ---------------------------------------------------------------- events ------------------

    def _on_line(self, vm: Vm, vcpu_id: int, irq: int, level: int, seq: int) -> None:
        if level:
            vcpu = vm.vcpus.get(vcpu_id)
            if vcpu is not None:
                wait = self.running.get(vcpu)
                if wait is not None:
                    self.finish_run(wait, None, "irq")
        subs = self.subscribers.get(vm)
        if subs:
            v = vm.vcpus.get(vcpu_id)  # phyid: its CPUID while mapped (protocol-additions.md)
            cpuid = v.csrs[abi.CSR_CPUID] if v else -1
            phyid = cpuid if v and vm.phyids.get(cpuid) is v else None
            for conn, sub in subs.items():
                h = sub.carrier
                if not conn.put_event(
                    conn.proto.send_notification(
                        "irq",
                        {
                            "vm": h,
                            "vcpu_id": vcpu_id,
                            "irq": irq,
                            "level": level,
                            "seq": seq,
                            "phyid": phyid,
                        },
                    ),
                    h,
                ):
                    vm.events_lost += 1

    # ---------------------------------------------------------------- vcpu.run ----------------

    def _start_run(self, conn: Connection, msgid: int, h: VcpuHandle, params: Params) -> None:
        """KVM_RUN: complete the exit a VMM holds on this vCPU (``data`` / ``ret``), then return
        the next exit at once, else an interrupt line that is up, else wait (exits.py).

        Exits come before lines: a line stays up until the guest clears it, so a VMM whose
        guest has one up would otherwise never see the guest's accesses.
        """
        vcpu = h.vcpu
        if vcpu in self.running:
            raise KvmError("EBUSY", f"vcpu.run: vCPU {vcpu.vcpu_id} is already running")
        if self.shutting_down:
            raise KvmError("EBADF", "vcpu.run: the daemon is shutting down")
        self.exits.complete(h, params.get("data"), params.get("ret"))
        exit = self.exits.take(h)
        if exit is not None:
            exit["estat"] = h.vm.get_one_reg(vcpu, abi.ESTAT)
            conn.put(conn.proto.send_result(msgid, exit))
            return
        lines = vcpu.lines
        if lines:
            conn.put(
                conn.proto.send_result(
                    msgid, {"exit_reason": "irq", "estat": h.vm.get_one_reg(vcpu, abi.ESTAT)}
                )
            )
            return
        wait = RunWait(conn, h, vcpu, msgid)
        self.running[vcpu] = wait
        assert conn.nursery is not None
        conn.nursery.start_soon(self._run_wait, wait, float(params["timeout"]))

    def finish_run(
        self, wait: RunWait, error: KvmError | None, reason: str = "", fields: Result | None = None
    ) -> None:
        """Answer a waiting run: ``error``, or ``reason`` with ``fields`` (an exit's member)."""
        if self.running.get(wait.vcpu) is not wait:
            return  # already answered
        del self.running[wait.vcpu]
        conn = wait.conn
        if error is not None:
            conn.put(conn.proto.send_error(wait.msgid, error))
        else:
            estat = wait.handle.vm.get_one_reg(wait.vcpu, abi.ESTAT)
            result = {"exit_reason": reason, "estat": estat}
            if fields:
                result.update(fields)
            conn.put(conn.proto.send_result(wait.msgid, result))
        conn.wake()  # the pump writes it if no request is being answered
        wait.event.set()

    async def _run_wait(self, wait: RunWait, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await wait.event.wait()
        self.finish_run(wait, None, "timeout")  # a no-op if something else answered it
        try:
            await wait.conn.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    # ---------------------------------------------------------------- shutdown ----------------

    async def shutdown(self) -> None:
        """Release waiters with a clear error and flush every connection, within the grace time."""
        self.shutting_down = True
        for wait in list(self.running.values()):
            self.finish_run(wait, KvmError("EBADF", "vcpu.run: the daemon is shutting down"))
        self.exits.shutdown()
        with trio.move_on_after(self.config.grace) as scope:
            scope.shield = True
            for conn in list(self.connections):
                try:
                    await conn.flush()
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                    pass


async def serve(
    config: ServeConfig,
    host: PluginHost | None = None,
    *,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled or signalled; ``task_status.started`` once the socket accepts."""
    if host is None:
        host = load_plugins()
    daemon = Daemon(host, config)
    if config.state_dir is not None:
        daemon.state = StateDir(daemon, config.state_dir, config.fsync)
        daemon.state.load()
    path = config.socket
    if config.record is not None:
        daemon.recorder = Recorder.open(config.record, [(p.name, p.version) for p in host.loaded])
    activated = systemd.activated_listener()
    listener = activated if activated is not None else await open_listener(path)
    WATCHDOG.install(config.plugin_timeout)
    log.info("serving on %s (plugins: %s)", path, ", ".join(p.name for p in host.loaded))
    refusal = Connection(None, config, 0).proto.send_protocol_error(
        ProtocolError(
            "EMFILE", "the daemon is out of file descriptors; try again when clients have left"
        )
    )
    # Signals that come once shutdown has begun are logged and ignored, so a second SIGTERM
    # or ^C cannot abort the save: these handlers are what the receiver below restores (and
    # redelivers pending signals to) when it closes.
    previous = {signum: signal.signal(signum, _during_shutdown) for signum in SHUTDOWN_SIGNALS}
    signalled = False
    try:
        async with trio.open_nursery() as handlers:
            daemon.nursery = handlers  # where big orphaned VMs are torn down
            accepting = trio.CancelScope()

            async def accept_loop() -> None:
                with accepting:
                    await accept_forever(listener, handlers, daemon.handle_stream, refusal)

            with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
                handlers.start_soon(accept_loop)
                if daemon.state is not None and config.fsync == "everysec":
                    handlers.start_soon(daemon.state.sync_every_second)
                notify_ready()
                handlers.start_soon(
                    systemd.supervise,
                    lambda: (
                        f"{len(daemon.vms)} VMs, {sum(len(vm.vcpus) for vm in daemon.vms)} vCPUs, "
                        f"{len(daemon.connections)} connections"
                    ),
                )
                task_status.started(daemon)
                async for signum in signals:
                    log.info("signal %s: shutting down", signal.Signals(signum).name)
                    signalled = True
                    break
            systemd.notify("STOPPING=1")
            # Stop accepting first, then let in-flight work finish within the grace time;
            # only then cancel the connections (hypercorn's graceful shutdown).
            accepting.cancel()
            if activated is None:  # systemd's socket outlives us: it will start us again
                unlink_socket(path)
            await daemon.shutdown()
            handlers.cancel_scope.cancel()
    finally:
        if daemon.state is not None:  # the files are current: nothing to save, only to sync
            daemon.state.close()
            daemon.state = None
        WATCHDOG.uninstall()
        if activated is None:
            unlink_socket(path)
        await trio.aclose_forcefully(listener)
        if daemon.recorder is not None:
            daemon.recorder.close()
        if not signalled:  # cancelled from outside (in-process use): the caller goes on.
            # Signalled, the process is ending: a late signal must not turn exit 0 into death.
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _during_shutdown(signum: int, frame: object) -> None:
    log.warning(
        "signal %s during shutdown: ignored, the shutdown (and its save) goes on",
        signal.Signals(signum).name,
    )


def _return_large_buffers() -> None:
    """Make glibc serve buffers of 128 KiB and more with mmap, always.

    Its default threshold rises to the largest block freed so far, so after a few 1 MiB
    messages their buffers come from the heap, fragment it and are never returned: the RSS
    of a daemon that once held 64 MiB of unfinished messages would stay there.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def default_max_connections() -> int:
    """The fd limit less what the daemon needs for itself (``--max-connections``' default)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):
        return 1024
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(1, soft - RESERVED_FDS)


def exit_with_parent() -> None:
    """Get SIGTERM (the ordinary clean shutdown) when the parent process dies.

    For daemons started by a test runner: if the runner is SIGKILLed, no ``finally`` stops its
    daemon, so the daemon must notice on its own. Linux delivers the signal itself
    (PR_SET_PDEATHSIG); elsewhere a thread watches ``getppid()`` once a second.
    """
    parent = os.getppid()
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) == 0:
            if os.getppid() != parent:  # it died before the prctl took effect
                os.kill(os.getpid(), signal.SIGTERM)
            return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="lvz-exit-with-parent", daemon=True).start()


def run(config: ServeConfig, verbose: int = 0) -> int:
    """``lvz serve``: run in the foreground until SIGINT/SIGTERM/SIGHUP; returns the exit
    code."""
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
    if config.exit_with_parent:
        exit_with_parent()
    _return_large_buffers()
    heap.install()  # the collector walks each long-lived object about once (heap.py)
    WATCHDOG.install(config.plugin_timeout)  # plugin code is timed while it loads too
    try:
        host = load_plugins()
    except PluginLoadError as exc:
        log.error("%s", exc)
        print(f"lvz serve: {exc}", flush=True, file=sys.stderr)
        return 125
    finally:
        WATCHDOG.uninstall()
    try:
        trio.run(serve, config, host)
        for signum in SHUTDOWN_SIGNALS:  # served and saved: nothing late may kill the exit
            signal.signal(signum, signal.SIG_IGN)
    except UnsafeDir as exc:
        print(f"lvz serve: cannot use the state directory: {exc}", flush=True, file=sys.stderr)
        return 125
    except (SocketInUse, systemd.ActivationError, RecordingFailed) as exc:
        print(f"lvz serve: {exc}", flush=True, file=sys.stderr)
        return 125
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, "")
        print(
            f"lvz serve: cannot serve on {config.socket}: {name} {exc.strerror or exc}",
            flush=True,
            file=sys.stderr,
        )
        return 125
    return 0
