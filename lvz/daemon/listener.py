"""The daemon's socket: where it lives, how it is opened safely, how a peer is let go.

PROTOCOL.md §1: a Unix socket, mode 0600 in a 0700 directory. As tmux, ssh-agent and systemd
do, the daemon creates that directory itself and refuses one that another local user could
have prepared (a symlink, someone else's, group- or world-writable): whoever controls the
directory can rename the socket away and plant an impostor. The socket is born 0600 (bound
under a umask), so no path is chmodded after ``bind`` -- a path can be swapped for a symlink.
A stale socket file (a daemon that died) is replaced; a live daemon or a file that is not a
socket is never touched.

Also here: the accept loop (a full fd table must not make clients hang or flood the log) and
the log filter that keeps client-supplied strings from forging log lines.
"""

from __future__ import annotations

import errno
import logging
import os
import socket as _socket
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from .safedir import UnsafeDir, ensure_private_dir

log = logging.getLogger("lvz.daemon")

# C0 controls, DEL, C1 controls and the Unicode line/paragraph separators: anything a terminal
# or a log reader could take as a line break or an escape sequence.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_CONTROLS.update({0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def escape_controls(text: str) -> str:
    """``text`` with every control character written as a backslash escape."""
    return text.translate(_CONTROLS)


class _EscapeControls(logging.Filter):
    """VM names, client names and error messages come from clients: a newline in one must
    not write a forged line into the log. Applied to the formatted message of every record
    of the daemon's loggers, so no call site has to remember it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        escaped = escape_controls(message)
        if escaped != message:
            record.msg = escaped
            record.args = None
        return True


for _name in ("lvz.daemon", "lvz.plugins"):
    logging.getLogger(_name).addFilter(_EscapeControls())


class Throttled:
    """A log line that repeats at most once per ``interval`` seconds, counting the rest."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.last = -float("inf")
        self.suppressed = 0

    def __call__(self, level: int, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            self.suppressed += 1
            return
        if self.suppressed:
            message += f" ({self.suppressed} more like this in the last {self.interval:g} s)"
        self.last = now
        self.suppressed = 0
        log.log(level, message, *args)


async def goodbye(stream: trio.SocketStream, last_words: bytes) -> None:
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
            while drained < (1 << 22):
                n = len(await stream.receive_some(16384))  # no chunk kept while waiting
                if not n:
                    break
                drained += n
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    await trio.aclose_forcefully(stream)


class SocketInUse(Exception):
    """The socket path cannot be served: another daemon is alive on it, or it is unsafe."""


class UnsafeSocketDir(SocketInUse):
    """The socket's directory could be controlled by another user."""


def prepare_socket_path(path: Path) -> None:
    """Create the 0700 directory or check the one there; replace a stale socket; refuse a
    live daemon, a non-socket, or a directory another user could control."""
    try:  # the one private-directory rule of the daemon (safedir.py; the state dir too)
        ensure_private_dir(path.parent, what="socket directory", risk="replace the socket")
    except UnsafeDir as exc:
        raise UnsafeSocketDir(str(exc)) from None
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
    sock.listen(512)
    return trio.SocketListener(sock)


#: accept() errors that mean "no room right now", not "the listener is broken".
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


async def accept_forever(
    listener: trio.SocketListener,
    nursery: trio.Nursery,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    refusal: bytes,
) -> None:
    """Accept until cancelled, one ``handler`` task per connection.

    Out of file descriptors, accept() fails while the client waits in the backlog; retrying
    in a loop would leave it hanging and the log flooded (trio's serve_listeners logs ten
    lines a second). So one spare fd is held: at EMFILE it is given up for a moment to accept
    the waiting client, send it ``refusal`` (a protocol_error EMFILE) and close it -- the
    client learns why at once -- and the log says so at most once a second.
    """
    spare: int | None = _open_spare()
    warn = Throttled()
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                raise
            warn(
                logging.WARNING,
                "accept failed: %s (%s); refusing new clients until connections close",
                errno.errorcode.get(exc.errno or 0, "?"),
                exc.strerror,
            )
            if spare is not None and exc.errno == errno.EMFILE:
                os.close(spare)
                spare = None
                with trio.move_on_after(0.1):
                    refused = await listener.accept()
                    with trio.move_on_after(0.1):
                        try:
                            await refused.send_all(refusal)
                        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                            pass
                    await trio.aclose_forcefully(refused)
                spare = _open_spare()
            if spare is None:
                await trio.sleep(0.1)
            continue
        nursery.start_soon(handler, stream)


def _open_spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


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


def unlink_socket(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
