"""Exits to the VMM: KVM's run loop, between a guest call and a ``vcpu.run`` (issue 14).

In KVM a guest access that no in-kernel device claims, a user hypercall and a crash leave
KVM_RUN with ``kvm_run`` filled in; the VMM emulates, writes the read data / the hypercall's
return value into ``kvm_run`` and calls KVM_RUN again, which completes the instruction. Here
the guest is a client call (``vcpu.mmio_read``, ``vcpu.hypercall``, …) and the VMM is whoever
calls ``vcpu.run`` on that vCPU: the guest call becomes an ``Exit`` queued on its vCPU, a run
returns it, and the next run on the vCPU completes it (``data`` / ``ret``), which answers the
guest call. protocol-additions.md "Exits to the VMM" has the rules and a sequence diagram.

Each vCPU executes one instruction at a time, so its exits form a FIFO: a run returns the
oldest, and the next is offered only once it is completed. Neither side blocks its connection:
the guest call waits in a task of its own (like ``vcpu.run``), so one client may be guest and
VMM on one connection.

How long a guest call waits: with no ``timeout`` it exits only if a VMM runs the vCPU (a
``vcpu.run`` is waiting, or a VMM holds an exit of it), else ENXIO at once as PROTOCOL.md
says; it then waits up to ``DEFAULT_TIMEOUT`` for the completion. With ``timeout`` it waits
that long for a VMM to come and complete it. Out of time: ETIMEDOUT, and the exit is withdrawn
(a VMM already holding it may still complete it; the completion then answers nobody).

Everything here is synchronous except the guest's wait task: an exit changes hands in the
request that causes it, so answers sit in the connections' buffers in the order things happened.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import trio

from lvz.protocol import abi
from lvz.protocol.abi import U64_MAX
from lvz.protocol.errors import KvmError, Unclaimed

from .model import Vcpu, Vm
from .peer import Connection, VcpuHandle

if TYPE_CHECKING:
    from .server import Daemon

__all__ = ["DEFAULT_TIMEOUT", "Detached", "Exit", "Exits", "hypercall_exit"]

#: Seconds a guest call without ``timeout`` waits for the VMM that took its exit to complete it.
DEFAULT_TIMEOUT: Final = 10.0
#: Exits one vCPU may have waiting for a VMM: beyond it a guest call is EBUSY, so a client
#: cannot make the daemon hold an unbounded queue (a real vCPU has one instruction in flight).
MAX_WAITING: Final = 1024

Result = dict[str, Any]

#: ``exit_reason`` -> the ``kvm_run`` member that carries its fields.
MEMBER: Final = {
    "mmio": "mmio",
    "iocsr": "iocsr_io",
    "hypercall": "hypercall",
    "system_event": "system_event",
}


def _signed(value: int, bits: int) -> int:
    """Sign-extend the low ``bits`` of ``value`` (a guest load; an a0 read as a signed int)."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


class Detached:
    """A handler's answer that comes later, out of order: ``start(msgid)`` is called at once by
    the dispatch, and whatever it started answers ``msgid`` itself (the guest side of an exit)."""

    __slots__ = ("start",)

    def __init__(self, start: Callable[[int], None]) -> None:
        self.start = start


class GuestCall:
    """The guest request an exit answers when it completes."""

    __slots__ = ("conn", "done", "handle", "method", "msgid")

    def __init__(self, conn: Connection, handle: VcpuHandle, method: str, msgid: int) -> None:
        self.conn = conn
        self.handle = handle
        self.method = method
        self.msgid = msgid
        self.done = trio.Event()

    def answer(self, result: Result | KvmError) -> None:
        conn = self.conn
        if not conn.closed:
            if isinstance(result, KvmError):
                conn.put(conn.proto.send_error(self.msgid, result))
            else:
                conn.put(conn.proto.send_result(self.msgid, result))
            conn.wake()  # its pump writes it (the VMM's reader is not this one)
        self.done.set()


class Exit:
    """One exit: its ``exit_reason``, the ``kvm_run`` fields for it, and how a completion
    (the next run's ``data`` / ``ret``) becomes the guest call's result."""

    __slots__ = ("fields", "guest", "reason", "taken")

    def __init__(self, reason: str, fields: dict[str, Any]) -> None:
        self.reason = reason
        self.fields = fields
        #: None once the guest call gave up (timeout, closed handle): completing it answers nobody.
        self.guest: GuestCall | None = None
        #: The handle whose ``vcpu.run`` returned it; None while it waits in the queue.
        self.taken: VcpuHandle | None = None

    @property
    def is_read(self) -> bool:
        return self.reason in ("mmio", "iocsr") and not self.fields["is_write"]

    @property
    def sticky(self) -> bool:
        """A crash is never completed: the PC stays on the ``hvcl``, so KVM_RUN exits again."""
        return self.reason == "system_event"

    def run_result(self) -> Result:
        return {MEMBER[self.reason]: dict(self.fields)}

    def check(self, data: int | None, ret: int | None, vcpu_id: int) -> None:
        """EINVAL when the completion does not fit this exit (before anything changes)."""
        if data is not None and not self.is_read:
            raise KvmError(
                "EINVAL",
                f"vcpu.run: data completes an MMIO or IOCSR read, but the "
                f"exit pending on vCPU {vcpu_id} is {self.describe()}",
            )
        if ret is not None and self.reason != "hypercall":
            raise KvmError(
                "EINVAL",
                f"vcpu.run: ret completes a hypercall, but the exit "
                f"pending on vCPU {vcpu_id} is {self.describe()}",
            )

    def result(self, data: int | None, ret: int | None) -> Result:
        """The guest call's result: ``kvm_complete_mmio_read`` / ``_iocsr_read`` /
        ``kvm_complete_user_service``."""
        if self.reason == "hypercall":
            value = self.fields["ret"] if ret is None else ret
            return {"a0": _signed(value, 64)}
        if self.fields["is_write"]:
            return {}
        return {"value": _signed(0 if data is None else data, 8 * self.fields["len"]) & U64_MAX}

    def describe(self) -> str:
        f = self.fields
        if self.reason == "hypercall":
            return f"a hypercall {f['nr']:#x}"
        if self.reason == "system_event":
            return f"a system event (type {f['type']})"
        kind = "write" if f["is_write"] else "read"
        return f"an {self.reason.upper()} {kind} of {f['len']} at {f['phys_addr']:#x}"


def access_exit(miss: Unclaimed, value: int | None) -> Exit:
    """``kvm_emu_mmio_read/write``, ``kvm_emu_iocsr`` on a bus miss: the write's data is the
    source register cut to the access width (little-endian bytes, here as an integer)."""
    size = miss.size
    data = 0 if value is None else value & ((1 << (8 * size)) - 1)
    return Exit(
        "mmio" if miss.space == "mmio" else "iocsr",
        {"phys_addr": miss.addr, "len": size, "is_write": value is not None, "data": data},
    )


def hypercall_exit(vm: Vm, code: int, args: list[int]) -> Exit | None:
    """The exit ``hvcl code`` makes, or None when the kernel answers it itself
    (``kvm_handle_hypercall``: USER_SERVICE with KVM_FEATURE_USER_HCALL, and the maintainer
    tree's CRASH with KVM_FEATURE_CRASH; without the feature both are INVALID_CODE)."""
    if code == abi.KVM_HCALL_USER_SERVICE and vm.pv_features & abi.KVM_FEATURE_USER_HCALL:
        regs = [x & U64_MAX for x in args] + [0] * (6 - len(args))
        return Exit(
            "hypercall",
            {"nr": code, "args": regs, "ret": abi.KVM_HCALL_INVALID_CODE & U64_MAX, "flags": 0},
        )
    if code == abi.KVM_HCALL_CRASH and vm.pv_features & abi.KVM_FEATURE_CRASH:
        return Exit("system_event", {"type": abi.KVM_SYSTEM_EVENT_CRASH, "ndata": 0, "data": []})
    return None


class VcpuExits:
    """A vCPU's exits: the one a VMM holds (``taken``) and those waiting behind it."""

    __slots__ = ("queue", "taken")

    def __init__(self) -> None:
        self.queue: deque[Exit] = deque()
        self.taken: Exit | None = None


class Exits:
    """Every vCPU's exits, and the two sides that meet in them."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.vcpus: dict[Vcpu, VcpuExits] = {}

    # ---------------------------------------------------------------- the guest side ----------

    def guest_call(
        self, conn: Connection, h: VcpuHandle, method: str, exit: Exit, timeout: float | None
    ) -> Detached:
        """A guest call that exits: ENXIO now if no VMM runs the vCPU and no ``timeout`` says
        to wait for one; else the exit is queued once the dispatch names the request."""
        vcpu = h.vcpu
        q = self.vcpus.get(vcpu)
        if timeout is None and vcpu not in self.daemon.running and (q is None or q.taken is None):
            raise KvmError(
                "ENXIO",
                f"{method}: {exit.describe()} exits to the VMM, and no VMM "
                f"runs vCPU {vcpu.vcpu_id} (vcpu.run); pass timeout to "
                f"wait for one",
            )
        if q is not None and len(q.queue) >= MAX_WAITING:
            raise KvmError(
                "EBUSY",
                f"{method}: vCPU {vcpu.vcpu_id} already has {MAX_WAITING} "
                f"exits waiting for the VMM",
            )
        if self.daemon.shutting_down:
            raise KvmError("EBADF", f"{method}: the daemon is shutting down")
        seconds = DEFAULT_TIMEOUT if timeout is None else float(timeout)

        def start(msgid: int) -> None:
            guest = exit.guest = GuestCall(conn, h, method, msgid)
            q = self.vcpus.get(vcpu)
            if q is None:
                q = self.vcpus[vcpu] = VcpuExits()
            q.queue.append(exit)
            self.offer(vcpu)
            assert conn.nursery is not None
            conn.nursery.start_soon(self._wait, exit, guest, seconds)

        return Detached(start)

    async def _wait(self, exit: Exit, guest: GuestCall, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await guest.done.wait()
        if not guest.done.is_set():
            held = "the VMM did not complete" if exit.taken else "no VMM took"
            self.withdraw(
                exit,
                KvmError(
                    "ETIMEDOUT", f"{guest.method}: {held} {exit.describe()} within {seconds:g} s"
                ),
            )
        try:
            await guest.conn.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def withdraw(self, exit: Exit, error: KvmError) -> None:
        """The guest call ends without a completion: out of the queue, or abandoned if a VMM
        holds it (its completion is then accepted and answers nobody)."""
        guest = exit.guest
        if guest is None:
            return
        exit.guest = None
        vcpu = guest.handle.vcpu
        q = self.vcpus.get(vcpu)
        if q is not None and exit.taken is None:
            try:
                q.queue.remove(exit)
            except ValueError:
                pass
            if not q.queue and q.taken is None:
                del self.vcpus[vcpu]
        guest.answer(error)

    # ---------------------------------------------------------------- the VMM side ------------

    def offer(self, vcpu: Vcpu) -> None:
        """Hand the oldest exit to a ``vcpu.run`` waiting on the vCPU, if both exist."""
        q = self.vcpus.get(vcpu)
        if q is None or q.taken is not None or not q.queue:
            return
        wait = self.daemon.running.get(vcpu)
        if wait is not None:
            exit = q.queue.popleft()
            q.taken = exit
            exit.taken = wait.handle
            self.daemon.finish_run(wait, None, exit.reason, exit.run_result())

    def complete(self, h: VcpuHandle, data: int | None, ret: int | None) -> None:
        """The start of a ``vcpu.run``: complete the exit a VMM holds on this vCPU, as KVM_RUN
        does on entry. ``data`` / ``ret`` must fit that exit (EINVAL, nothing changed)."""
        vcpu = h.vcpu
        q = self.vcpus.get(vcpu)
        exit = q.taken if q is not None else None
        if exit is None:
            if data is not None or ret is not None:
                raise KvmError(
                    "EINVAL",
                    f"vcpu.run: no exit is pending on vCPU "
                    f"{vcpu.vcpu_id} for data or ret to complete",
                )
            return
        exit.check(data, ret, vcpu.vcpu_id)
        assert q is not None
        q.taken = None
        exit.taken = None
        guest = exit.guest
        if guest is None:
            pass  # the guest gave up: the completion answers nobody
        elif exit.sticky:
            q.queue.appendleft(exit)  # the hvcl runs again and exits again
        else:
            exit.guest = None
            guest.answer(exit.result(data, ret))
        if not q.queue:
            del self.vcpus[vcpu]

    def take(self, h: VcpuHandle) -> Result | None:
        """The oldest waiting exit for a run that just started (``run_result``), or None."""
        q = self.vcpus.get(h.vcpu)
        if q is None or q.taken is not None or not q.queue:
            return None
        exit = q.taken = q.queue.popleft()
        exit.taken = h
        return {"exit_reason": exit.reason, **exit.run_result()}

    # ---------------------------------------------------------------- endings -----------------

    def handle_closed(self, h: VcpuHandle) -> None:
        """A vCPU handle closed (its connection too, handle by handle): a guest call made
        through it ends with EBADF; an exit a VMM took through it goes back to the front of
        the queue for the next VMM, as if it had never been taken."""
        q = self.vcpus.get(h.vcpu)
        if q is None:
            return
        taken = q.taken
        for exit in [*q.queue, *([taken] if taken is not None else [])]:
            guest = exit.guest
            if guest is not None and guest.handle is h:
                self.withdraw(
                    exit, KvmError("EBADF", f"{guest.method}: the vCPU handle was closed")
                )
        if taken is not None and taken.taken is h:
            q.taken = None
            taken.taken = None
            if taken.guest is not None:
                q.queue.appendleft(taken)
        if not q.queue and q.taken is None:
            self.vcpus.pop(h.vcpu, None)
        else:
            self.offer(h.vcpu)

    def end_vcpu(self, vcpu: Vcpu, why: str, errno_name: str = "EBADF") -> None:
        """The vCPU or its VM was destroyed (or the daemon stops): every guest call on it ends."""
        q = self.vcpus.pop(vcpu, None)
        if q is None:
            return
        exits = ([q.taken] if q.taken is not None else []) + list(q.queue)
        for exit in exits:
            guest = exit.guest
            exit.guest = None
            if guest is not None:
                guest.answer(KvmError(errno_name, f"{guest.method}: {why}"))

    def shutdown(self) -> None:
        for vcpu in list(self.vcpus):
            self.end_vcpu(vcpu, "the daemon is shutting down")
