"""The daemon's socket: where it lives, how it is opened safely, how a peer is let go.

PROTOCOL.md §1: a Unix socket, mode 0600 in a 0700 directory. A stale socket file (a daemon
that died) is replaced; a live daemon or a file that is not a socket is never touched.
"""

from __future__ import annotations

import logging
import os
import socket as _socket
import stat
from pathlib import Path

import trio

log = logging.getLogger("lvz.daemon")


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
            while drained < (1 << 22) and (chunk := await stream.receive_some(65536)):
                drained += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    await trio.aclose_forcefully(stream)


class SocketInUse(Exception):
    """Another daemon is alive on the socket path."""


def prepare_socket_path(path: Path) -> None:
    """Create the 0700 directory; replace a stale socket; refuse a live daemon or a non-socket."""
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True)
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
    os.chmod(path, 0o600)
    sock.listen(512)
    return trio.SocketListener(sock)


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
