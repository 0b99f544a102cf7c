"""``lvz serve --state-dir``: named VMs that survive ``kill -9``, flag changes and upgrades.

docs/state.md says why it is built this way. In short, one file per named VM
(``vm-<hash of the name>.lvzj``; the name lives inside), holding a snapshot of the VM followed
by a journal of every request applied to it since (``journal.py``). The daemon appends each
request's entry to an in-memory buffer as the request takes effect, and ``flush`` writes the
buffers to the files before any connection sends anything (``Connection.flush`` calls it), so
a response — or an event revealing a change — never leaves before its change is in the OS:
a daemon killed at any instant restarts with every change it acknowledged. Many requests of one
read share one ``write`` (group commit), which is why durability costs pipelined clients little.
``--fsync`` chooses what survives a power loss: ``always`` (fdatasync before answering),
``everysec`` (the default, as Redis: at most a second of acknowledged changes), ``no`` (the OS
decides). Appends are synced with ``fdatasync``, as Redis syncs its AOF: the data and the file
size, not the timestamps.

When a journal outgrows ``COMPACT_RATIO`` times its snapshot (and ``COMPACT_MIN`` bytes), the
file is rewritten as a fresh snapshot — write, fsync, rename, fsync the directory — so it
cannot grow without bound and a crash mid-compaction leaves the old file whole.

Nothing that fails to load is deleted: the file is renamed ``vm-<hash>.<time>.failed`` next to
a ``.reason`` text saying why, and every start tries those again, so a daemon restarted with
the old flags (say, a larger ``--max-vcpus``) gets the VM back.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

import lvz
from lvz.protocol import abi, snapshot
from lvz.protocol.abi import CSR_ESTAT, CSR_GINTC
from lvz.protocol.errors import KvmError
from lvz.protocol.schema import HANDLE_PARAM

from . import journal
from .journal import JOURNALED, Entry, JournalError, Noted
from .peer import DeviceHandle, Handle, VcpuHandle
from .safedir import open_private_dir, replace_file

if TYPE_CHECKING:
    from .model import Vm
    from .peer import Connection
    from .server import Daemon

log = logging.getLogger("lvz.daemon")

SUFFIX: Final = ".lvzj"
FAILED: Final = ".failed"
REASON: Final = ".reason"
LEGACY: Final = ".lvzvm"  # lvz before the journal: a bare snapshot per VM, url-quoted name
FSYNC_POLICIES: Final = ("always", "everysec", "no")
#: A journal is compacted when it is this many times its snapshot's size ...
COMPACT_RATIO: Final = 4
#: ... and at least this big (so small VMs are not rewritten every few requests). Not Final:
#: a test lowers it, and a compiled build would inline a Final.
COMPACT_MIN = 1 << 20


#: method -> its handle parameter, for the methods that are journaled.
JOURNAL_PARAM: Final = {method: HANDLE_PARAM[method][0] for method in JOURNALED}


def _target(h: Handle) -> int | str | None:
    """What a handle names, in terms a restarted daemon can find again."""
    if isinstance(h, VcpuHandle):
        return h.vcpu.vcpu_id
    if isinstance(h, DeviceHandle):
        return h.device.type_name
    return None


#: register id -> what ``vcpu.set_one_reg`` of it changes, if only that register's own value
#: (plain CSRs, CPUID, CPUCFG words): ``(class, index)``, so ids that alias one register
#: share it. None for ESTAT and GINTC (lines), the counter and ``VCPU_RESET``.
_OWN_VALUE: dict[int, tuple[int, int] | None] = {}
_OWN_VALUE_MAX: Final = 8192  # bounded as abi's cache: a client cycling ids must not grow it


def own_value(reg_id: int) -> tuple[int, int] | None:
    """The register a successful ``set_one_reg`` of ``reg_id`` sets, if it sets nothing else."""
    try:
        return _OWN_VALUE[reg_id]
    except KeyError:
        pass
    try:
        cls, index = abi.decode(reg_id)
    except KvmError:
        return None
    own = (
        (int(cls), index)
        if cls is abi.RegClass.CPUCFG
        or (cls is abi.RegClass.CSR and index not in (CSR_ESTAT, CSR_GINTC))
        else None
    )
    if len(_OWN_VALUE) < _OWN_VALUE_MAX:
        _OWN_VALUE[reg_id] = own
    return own


def file_name(vm_name: str) -> str:
    """Any VM name fits: the file is named by a hash, the name itself is inside."""
    return (
        "vm-" + hashlib.sha256(vm_name.encode("utf-8", "surrogatepass")).hexdigest()[:32] + SUFFIX
    )


@dataclass(slots=True, eq=False)
class _Journal:
    """One open VM file: where entries are appended."""

    vm: Vm
    name: str  # the file's name in the state dir
    fd: int
    head: int  # bytes of the header and snapshot record
    size: int
    pending: list[Noted] = field(default_factory=list)
    #: The handles ``pending`` names (with their connection's number): their targets go along.
    handles: dict[Handle, int] = field(default_factory=dict)
    seq: int = 0
    dirty: bool = False  # written since the last fsync
    #: What registers hold, by (vCPU, register), as far as this journal knows it: a
    #: ``set_one_reg`` noted here, with no other change to the VM noted since. A write of the
    #: value a register is known to hold is a no-op (the kernel's too), so it is not noted:
    #: VMMs re-put every register after each reset or migration. Empty after every rewrite.
    regs: dict[tuple[object, tuple[int, int]], int] = field(default_factory=dict)


class StateDir:
    """The state directory of one daemon: loads it at start, then keeps it current."""

    def __init__(self, daemon: Daemon, path: Path, fsync: str = "everysec") -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"--fsync {fsync!r} is not one of {', '.join(FSYNC_POLICIES)}")
        self.daemon = daemon
        self.path = path
        self.fsync = fsync
        self.dir_fd = open_private_dir(path, "state directory")
        self.journals: dict[Vm, _Journal] = {}
        self.pending: list[_Journal] = []  # journals with noted requests, each once
        self.plugins = [(p.name, p.version) for p in daemon.host.loaded]

    # ---------------------------------------------------------------- the daemon's hooks -----

    def applied(
        self, conn: Connection, method: str, params: dict[str, Any], error: KvmError | None
    ) -> None:
        """A request reached its handler (answered ``error`` or a result): note it if it
        concerns a named VM. Called before its response is queued; the hot path of a durable
        daemon, so it only appends (``flush`` encodes)."""
        param = JOURNAL_PARAM.get(method)
        if param is None:
            return
        h = conn.handles.get(params[param])
        if h is None:
            return
        j = self.journals.get(h.vm)
        if j is None:
            return  # unnamed
        noted = j.pending
        if error is None:
            outcome = None
            if method == "vcpu.set_one_reg":
                own = own_value(params["id"])
                if own is not None:
                    key = (h.life, own)
                    value = params["value"]
                    if j.regs.get(key) == value:
                        return  # the value it already holds: nothing changed, nothing to note
                    j.regs[key] = value
                # (any set_one_reg changes at most its own register, lines or the counter)
            elif j.regs:
                j.regs.clear()  # this may have changed any register: known values are stale
        elif error.name in ("EBADF", "ENOTTY"):
            return  # the handle did not resolve: nothing was touched
        else:
            outcome = error.name
            j.regs.clear()
        if not noted:
            self.pending.append(j)
        noted.append((method, params, outcome, conn.number))
        j.handles[h] = conn.number

    def named(self, vm: Vm) -> None:
        """``vm`` just got its name (``kvm.create_vm`` or ``vm.set_name``): its file starts
        with a snapshot of what it is now."""
        self._write_head(vm)

    def destroyed(self, vm: Vm) -> None:
        """A named VM was destroyed: its file goes before the answer does."""
        j = self.journals.pop(vm, None)
        if j is None:
            return
        j.pending.clear()  # flush skips it
        os.close(j.fd)
        try:
            os.unlink(j.name, dir_fd=self.dir_fd)
            if self.fsync == "always":
                os.fsync(self.dir_fd)
        except OSError as exc:
            log.error("state dir %s: could not remove %s: %s", self.path, j.name, exc)

    def flush(self) -> None:
        """Write every buffered entry to its file (before any response leaves the daemon)."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        for j in pending:
            if not j.pending:
                continue  # its VM was destroyed or rewritten meanwhile
            handles = [(c, h.number, _target(h)) for h, c in j.handles.items()]
            j.handles.clear()
            j.seq += 1
            data = journal.encode_group(handles, j.pending, j.seq)
            j.pending = []
            try:
                written = os.write(j.fd, data)
                if written < len(data):  # a short write (a full disk, a signal): the rest
                    view = memoryview(data)[written:]
                    while view:
                        view = view[os.write(j.fd, view) :]
                if self.fsync == "always":
                    os.fdatasync(j.fd)  # the appended bytes and the size: all a reader needs
                else:
                    j.dirty = True
            except OSError as exc:
                # The disk refused (full, gone): say so loudly; the VM lives on in memory and
                # the next compaction rewrites the file whole if the disk comes back.
                log.error("state dir %s: could not write %s: %s", self.path, j.name, exc)
                j.regs.clear()  # what it noted is not in the file
            j.size += len(data)
        for j in pending:
            if (
                j.size - j.head > max(COMPACT_RATIO * j.head, COMPACT_MIN)
                and self.journals.get(j.vm) is j
            ):
                self._write_head(j.vm)

    async def sync_every_second(self) -> None:
        """``--fsync everysec``: fsync what was written, once a second, off the event loop."""
        while True:
            await trio.sleep(1.0)
            dirty = [j for j in self.journals.values() if j.dirty]
            fds = []
            for j in dirty:
                j.dirty = False
                fds.append(os.dup(j.fd))  # ours: a destroy may close j.fd meanwhile
            if fds:
                await trio.to_thread.run_sync(_sync_all, fds)

    def close(self) -> None:
        """Shutdown: everything written and synced; nothing to save, the files are current."""
        self.flush()
        for j in self.journals.values():
            try:
                if self.fsync != "no":
                    os.fsync(j.fd)
            except OSError as exc:
                log.error("state dir %s: could not sync %s: %s", self.path, j.name, exc)
            os.close(j.fd)
        self.journals.clear()
        os.close(self.dir_fd)

    # ---------------------------------------------------------------- writing ----------------

    def _save(self, vm: Vm) -> bytes:
        d = self.daemon
        conn = d.local_connection()
        try:
            assert vm.name is not None
            [opened] = d.call_local(conn, [("kvm.open_vm", {"name": vm.name})])
            if isinstance(opened, KvmError):
                raise opened
            saved = snapshot.drive(snapshot.save_vm(opened["vm"]), lambda b: d.call_local(conn, b))
        finally:
            d.drop_local(conn)
        return snapshot.encode(saved)

    def _write_head(self, vm: Vm) -> None:
        """(Re)write ``vm``'s file as a snapshot with an empty journal, atomically."""
        assert vm.name is not None
        old = self.journals.pop(vm, None)  # (its noted requests are all written: see flush)
        name = file_name(vm.name)
        try:
            data = journal.encode_file(self._save(vm), lvz.__version__, self.plugins)
            replace_file(self.dir_fd, name, data, sync=self.fsync != "no")
            fd = os.open(
                name, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd
            )
        except (OSError, KvmError) as exc:
            log.error(
                "state dir %s: could not write VM %s to %s: %s", self.path, vm.name, name, exc
            )
            if old is not None:  # keep appending to the old file: it is still whole
                self.journals[vm] = old
            return
        if old is not None:
            os.close(old.fd)
        self.journals[vm] = _Journal(vm, name, fd, len(data), len(data))
        log.info("state dir: VM %s written to %s (%d bytes)", vm.name, name, len(data))

    # ---------------------------------------------------------------- loading -----------------

    def load(self) -> None:
        """Bring back every VM of the directory; set aside (never delete) what cannot load."""
        ours: list[str] = []
        legacy: list[str] = []
        failed: list[str] = []
        with os.scandir(self.dir_fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            kind = (
                SUFFIX
                if e.name.endswith(SUFFIX)
                else FAILED
                if e.name.endswith(FAILED)
                else LEGACY
                if e.name.endswith(LEGACY)
                else None
            )
            if kind is None:
                continue
            if not e.is_file(follow_symlinks=False):
                log.warning("state dir %s: skipping %s: not a regular file", self.path, e.name)
                continue
            {SUFFIX: ours, FAILED: failed, LEGACY: legacy}[kind].append(e.name)
        for name in ours:
            self._load_file(name, retry=False)
        for name in legacy:
            self._load_file(name, retry=False, legacy=True)
        for name in failed:
            self._load_file(name, retry=True)

    def _read(self, name: str) -> bytes:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.dir_fd
        )
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            if st.st_uid != os.getuid():
                raise OSError(errno.EPERM, f"owned by uid {st.st_uid}, not by this daemon's")
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def _load_file(self, name: str, *, retry: bool, legacy: bool = False) -> None:
        source = str(self.path / name)
        try:
            data = self._read(name)
            parsed = journal.Parsed(data, [], len(data), False) if legacy else journal.parse(data)
            snap = snapshot.decode(parsed.snapshot, source)
            vm = self._restore(snap, parsed.entries, source)
        except (OSError, KvmError, JournalError) as exc:
            if retry:
                log.warning("state dir %s: %s still does not load: %s", self.path, name, exc)
            else:
                self._set_aside(name, exc)
            return
        assert vm.name is not None
        target = file_name(vm.name)
        if legacy or retry or parsed.torn or parsed.entries or name != target:
            # Start it afresh: a torn tail dropped, a legacy or set-aside file taken back.
            self._write_head(vm)
            if vm in self.journals and name != target:
                self._unlink(name)
                if retry:
                    self._unlink(name.removesuffix(FAILED) + REASON)
        else:
            fd = os.open(
                name, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd
            )
            self.journals[vm] = _Journal(vm, name, fd, len(data), len(data))
        if parsed.torn:
            log.warning(
                "state dir %s: %s ended in a torn write (never acknowledged); dropped",
                self.path,
                name,
            )
        log.info(
            "state dir: VM %s loaded from %s (%d journal entries)",
            vm.name,
            name,
            len(parsed.entries),
        )

    def _unlink(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self.dir_fd)
        except FileNotFoundError:
            pass

    def _set_aside(self, name: str, exc: BaseException) -> None:
        # Named by a hash of the old name: a legacy file's url-quoted name may be near NAME_MAX.
        base = (
            name.removesuffix(SUFFIX)
            if name.endswith(SUFFIX)
            else "legacy-" + hashlib.sha256(name.encode(errors="surrogateescape")).hexdigest()[:32]
        )
        aside = f"{base}.{time.time_ns()}"
        reason = f"{exc}\n"
        log.error(
            "state dir %s: %s cannot be loaded: %s (kept as %s%s)",
            self.path,
            name,
            exc,
            aside,
            FAILED,
        )
        try:
            replace_file(self.dir_fd, aside + REASON, reason.encode(), sync=True)
            os.rename(name, aside + FAILED, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
            os.fsync(self.dir_fd)
        except OSError as err:
            log.error("state dir %s: could not set %s aside: %s", self.path, name, err)

    def _restore(self, snap: dict[str, Any], entries: list[Entry], source: str) -> Vm:
        """Rebuild one VM inside the daemon, all or nothing: unnamed until it is whole."""
        name = snap["vm"]["name"]
        if not isinstance(name, str) or not name:
            raise JournalError(f"{source}: the snapshot is of an unnamed VM")
        d = self.daemon
        conn = d.local_connection()
        try:

            def call(batch: snapshot.Batch) -> snapshot.Results:
                if batch and batch[0][0] == "vm.destroy":
                    # The failure path of restore_vm: the VM is unnamed, so dropping this
                    # connection (below) destroys it; vm.destroy itself waits (in chunks),
                    # which a request made inside the daemon cannot.
                    return [{} for _ in batch]
                return d.call_local(conn, batch)

            unnamed = dict(snap, vm=dict(snap["vm"], name=None))
            vm_h = snapshot.drive(snapshot.restore_vm(unnamed), call)
            _Replay(call, vm_h, source).run(entries)
            [named] = call([("vm.set_name", {"vm": vm_h, "name": name})])
            if isinstance(named, KvmError):
                raise named
            return conn.handles[vm_h].vm
        finally:
            d.drop_local(conn)  # on failure the unnamed VM dies with its last handle


class _Replay:
    """Re-apply journal entries with local handles, checking each answer against the file's."""

    def __init__(
        self, call: Callable[[snapshot.Batch], snapshot.Results], vm: int, source: str
    ) -> None:
        self.call = call
        self.vm = vm
        self.source = source
        self.vcpus: dict[int, int] = {}
        self.devices: dict[str, int] = {}

    def _one(self, method: str, params: dict[str, Any]) -> dict[str, Any] | KvmError:
        return self.call([(method, params)])[0]

    def _handle(self, kind: str, target: int | str | None) -> int | KvmError:
        if kind == "vm":
            return self.vm
        if kind == "vcpu":
            h = self.vcpus.get(target)  # type: ignore[arg-type]
            if h is None:
                r = self._one("vm.open_vcpu", {"vm": self.vm, "vcpu_id": target})
                if isinstance(r, KvmError):
                    return r
                h = self.vcpus[target] = r["vcpu"]  # type: ignore[index]
            return h
        h = self.devices.get(target)  # type: ignore[arg-type]
        if h is None:
            r = self._one("vm.open_device", {"vm": self.vm, "type": target})
            if isinstance(r, KvmError):
                return r
            h = self.devices[target] = r["device"]  # type: ignore[index]
        return h

    def run(self, entries: list[Entry]) -> None:
        for i, e in enumerate(entries):
            kind = JOURNALED[e.method]
            h = self._handle(kind, e.target)
            if isinstance(h, KvmError):
                raise JournalError(
                    f"{self.source}: entry {i} ({e.method}) names "
                    f"{kind} {e.target!r}, which is not there: {h}"
                )
            r = self._one(e.method, dict(e.params, **{HANDLE_PARAM[e.method][0]: h}))
            got = r.name if isinstance(r, KvmError) else None
            if got != e.outcome:
                why = f": {r.message}" if isinstance(r, KvmError) else ""
                raise JournalError(
                    f"{self.source}: entry {i} ({e.method}) was answered "
                    f"{e.outcome or 'ok'} when it was made but {got or 'ok'} now{why} "
                    f"(was the daemon restarted with other limits?)"
                )
            if e.method == "vm.create_vcpu" and not isinstance(r, KvmError):
                self.vcpus[e.params["vcpu_id"]] = r["vcpu"]
            elif e.method == "vm.create_device" and not isinstance(r, KvmError):
                self.devices[e.params["type"]] = r["device"]
            elif e.method == "vcpu.destroy":
                self.vcpus.pop(e.target, None)  # type: ignore[arg-type]


def _sync_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.fdatasync(fd)
        except OSError as exc:
            log.error("state dir: fsync failed: %s", exc)
        finally:
            os.close(fd)
