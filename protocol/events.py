"""Typed messages at the protocol boundary (h11/wsproto style: frozen, slotted, keyword-only).

Decoded bytes become one of these before any other layer sees them, so the daemon and the
clients never handle raw msgpack arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import KvmError, ProtocolError

__all__ = ["BadRequest", "Event", "Malformed", "Notification", "Request", "Response"]


class Event:
    """Base of everything ``next_event`` returns; do not subclass the subclasses."""

    __slots__ = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Request(Event):
    """A well-formed, validated request: ``params`` passed the method table."""

    msgid: int
    method: str
    params: dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class BadRequest(Event):
    """A request that must be answered with ``error`` (EBADMSG, ENOTTY or EINVAL)."""

    msgid: int
    error: KvmError


@dataclass(frozen=True, slots=True, kw_only=True)
class Malformed(Event):
    """Valid msgpack with no usable msgid: answered by a ``protocol_error`` notification."""

    error: ProtocolError


@dataclass(frozen=True, slots=True, kw_only=True)
class Response(Event):
    msgid: int
    error: KvmError | None
    result: dict[str, Any] | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Notification(Event):
    event: str
    params: dict[str, Any]
