"""Errors: the errno table of PROTOCOL.md §2 and the two failure families.

``KvmError`` is an emulated ioctl failing: it carries a Linux errno and a sentence, travels on the
wire as an error map and is re-raised by clients as the same type. It subclasses ``OSError`` so a
caller can write ``except OSError as e: e.errno`` exactly as with real KVM file descriptors.

``ProtocolError`` is the byte stream itself going wrong (h11's split): ``RemoteProtocolError`` when
the peer sent something we cannot frame, ``LocalProtocolError`` when our caller misused the API.
Both carry the errno that the ``protocol_error`` notification reports.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ERRNO",
    "ERRNO_NAMES",
    "KvmError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "error_map",
]

#: The errors PROTOCOL.md §2 uses, by symbolic name.
ERRNO: dict[str, int] = {
    "EPERM": 1,
    "ENOENT": 2,
    "EINTR": 4,  # lvz addition: a vcpu.run ended by vcpu.kick, as KVM_RUN by a signal
    "EIO": 5,
    "ENXIO": 6,
    "E2BIG": 7,
    "EBADF": 9,
    "ENOMEM": 12,
    "EFAULT": 14,
    "EBUSY": 16,
    "EEXIST": 17,
    "ENODEV": 19,
    "EINVAL": 22,
    "EMFILE": 24,
    "ENOTTY": 25,
    "ENOSPC": 28,
    "ERANGE": 34,
    "EPROTO": 71,
    "EBADMSG": 74,
    "EPROTONOSUPPORT": 93,
    "ETIMEDOUT": 110,
}
ERRNO_NAMES: dict[int, str] = {v: k for k, v in ERRNO.items()}


class KvmError(OSError):
    """An emulated ioctl failed with ``errno``; ``message`` says why in a sentence."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(ERRNO[name], message)
        self.name = name
        self.message = message

    def __str__(self) -> str:
        return f"{self.name}: {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.message))

    def to_wire(self) -> dict[str, Any]:
        return {"errno": self.errno, "name": self.name, "message": self.message}

    @classmethod
    def from_wire(cls, error: object) -> KvmError:
        """Rebuild a daemon's error map; a map we cannot read becomes EPROTO, not a crash."""
        if isinstance(error, dict):
            name = error.get("name")
            number = error.get("errno")
            message = error.get("message")
            if not isinstance(name, str) or name not in ERRNO:
                name = ERRNO_NAMES.get(number, "EPROTO") if isinstance(number, int) else "EPROTO"
            if not isinstance(message, str):
                message = "the daemon gave no message"
            err = cls(name, message)
            if isinstance(number, int) and not isinstance(number, bool) and number != err.errno:
                err.errno = number  # an errno this table does not know: keep the daemon's number
            return err
        return cls("EPROTO", f"unreadable error from the daemon: {error!r}")


class Unclaimed(KvmError):
    """ENXIO for a guest access no device claims: where KVM exits to the VMM (the daemon turns
    it into an exit when a VMM runs the vCPU, lvz/daemon/exits.py). ``addr`` is the address as
    the bus saw it, the exit's ``phys_addr``. Here rather than in the model because the model
    may be compiled (mypyc), and a compiled class cannot subclass an exception."""

    def __init__(self, space: str, addr: int, size: int) -> None:
        super().__init__("ENXIO", f"no device claims {space.upper()} {addr:#x}/{size}")
        self.space = space
        self.addr = addr
        self.size = size


def error_map(name: str, message: str) -> dict[str, Any]:
    return {"errno": ERRNO[name], "name": name, "message": message}


class ProtocolError(Exception):
    """The message stream broke; ``name`` is the errno reported in ``protocol_error``."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.message = message

    def to_wire(self) -> dict[str, Any]:
        return error_map(self.name, self.message)


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes we cannot frame (not msgpack, over the size limit)."""


class LocalProtocolError(ProtocolError):
    """Our caller asked for something the protocol cannot express (e.g. a msgid out of range)."""
