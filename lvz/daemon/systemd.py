"""systemd integration beyond READY=1: socket activation, STATUS=, STOPPING=1, the watchdog.

All of it is the documented environment protocol (sd_listen_fds(3), sd_notify(3)) spoken
directly, without libsystemd: a listening socket arrives as fd 3 when ``LISTEN_PID`` is our pid,
and notifications are datagrams to ``$NOTIFY_SOCKET``. Without those variables every function
here does nothing, so ``lvz serve`` behaves the same under any other supervisor.
"""

from __future__ import annotations

import logging
import os
import socket as _socket
from collections.abc import Callable

import trio

log = logging.getLogger("lvz.daemon")

SD_LISTEN_FDS_START = 3
#: How often STATUS= is refreshed when there is no watchdog to set the pace.
STATUS_INTERVAL = 5.0


class ActivationError(Exception):
    """systemd passed something lvz cannot serve on; the message says what."""


def activated_listener() -> trio.SocketListener | None:
    """The listening socket systemd passed us, or None when we were not socket-activated.

    As sd_listen_fds(3): only when ``LISTEN_PID`` names this process (the variables may have
    been inherited by accident), and the variables are then removed so that nothing we start
    mistakes the socket for its own.
    """
    pid = os.environ.get("LISTEN_PID")
    fds = os.environ.get("LISTEN_FDS")
    if pid is None or fds is None:
        return None
    if pid != str(os.getpid()):
        log.info("LISTEN_PID=%s is not this process; ignoring LISTEN_FDS", pid)
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    try:
        count = int(fds)
    except ValueError:
        raise ActivationError(f"LISTEN_FDS={fds!r} is not a number") from None
    if count != 1:
        raise ActivationError(
            f"systemd passed {count} sockets; lvz.socket must list exactly one ListenStream="
        )
    try:
        sock = _socket.socket(fileno=SD_LISTEN_FDS_START)
    except OSError as exc:
        raise ActivationError(
            f"fd {SD_LISTEN_FDS_START} is not a socket: {exc.strerror or exc}"
        ) from None
    if sock.family != _socket.AF_UNIX or sock.type != _socket.SOCK_STREAM:
        sock.detach()
        raise ActivationError(f"fd {SD_LISTEN_FDS_START} is not a Unix stream socket")
    if not sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ACCEPTCONN):
        sock.detach()
        raise ActivationError(f"fd {SD_LISTEN_FDS_START} is not listening")
    os.set_inheritable(sock.fileno(), False)
    log.info("socket-activated on %s", sock.getsockname())
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


#: NOTIFY_SOCKETs whose last message failed: logged once, not at every STATUS= or ping.
_unheard: set[str] = set()


def notify(message: str) -> bool:
    """Send one sd_notify message; False when there is nobody to tell.

    The first failure is logged, the repeats are not until a message gets through again: a
    starter that only waits for READY=1 (lvz's own spawner, the pytest fixture, many
    supervisors) closes its socket, and a warning every STATUS= interval would fill the log.
    The send never blocks: a supervisor that stops reading must not stop the event loop.
    """
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    addr = "\0" + target[1:] if target.startswith("@") else target
    with _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        try:
            s.connect(addr)
            s.send(message.encode())
        except OSError as exc:
            if target not in _unheard:
                _unheard.add(target)
                log.warning(
                    "could not notify %s: %s (not logged again until a notification gets through)",
                    target,
                    exc,
                )
            return False
    if target in _unheard:
        _unheard.discard(target)
        log.info("notifying %s works again", target)
    return True


def watchdog_seconds() -> float | None:
    """Half the watchdog timeout (sd_watchdog_enabled(3)'s advice), if one is set for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a number; no watchdog pings", usec)
        return None
    return value / 2e6 if value > 0 else None


async def supervise(status: Callable[[], str]) -> None:
    """Keep systemd informed until cancelled: ``STATUS=`` always, ``WATCHDOG=1`` if asked.

    The ping comes from the trio loop itself, so a daemon whose loop is stuck stops pinging
    and systemd restarts it — which is the point of a watchdog.
    """
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    interval = watchdog_seconds()
    while True:
        message = f"STATUS={status()}"
        if interval is not None:
            message += "\nWATCHDOG=1"
        notify(message)
        await trio.sleep(interval if interval is not None else STATUS_INTERVAL)
