"""lvz wire protocol, version 1 (PROTOCOL.md): sans-I/O, no trio, no sockets.

Bytes in, typed events out; events in, bytes out. Both the daemon and the clients are thin
adapters over ``ServerConnection`` / ``ClientConnection``.
"""

from . import abi
from .connection import (
    DEFAULT_MAX_MESSAGE,
    NEED_DATA,
    ClientConnection,
    ServerConnection,
)
from .errors import (
    ERRNO,
    ERRNO_NAMES,
    KvmError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from .events import BadRequest, Event, Malformed, Notification, Request, Response
from .schema import HANDLE_PARAM, METHODS, validate

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "NEED_DATA",
    "ClientConnection",
    "ServerConnection",
    "ERRNO",
    "ERRNO_NAMES",
    "KvmError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "BadRequest",
    "Event",
    "Malformed",
    "Notification",
    "Request",
    "Response",
    "HANDLE_PARAM",
    "METHODS",
    "validate",
    "abi",
]
