"""Typed messages at the protocol boundary: decoded bytes become one of these first.

Plain slotted classes rather than frozen dataclasses: one is built per message, and a frozen
dataclass costs four times as much to construct (0.59 µs against 0.15 µs), which was a tenth of
the daemon's whole per-request budget. They keep the dataclass manners that matter: keyword
construction, equality by value and a readable repr. Treat them as immutable: nothing in lvz
assigns to one after it is built.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .errors import KvmError, ProtocolError

__all__ = ["BadRequest", "Event", "Malformed", "Notification", "Request", "Response"]


class Event:
    """Base of everything ``next_event`` returns; do not subclass the subclasses."""

    #: The fields, named once: compiled (mypyc) classes have no ``__slots__`` to look at.
    _FIELDS: ClassVar[tuple[str, ...]] = ()
    __slots__ = ()

    def _fields(self) -> tuple[str, ...]:
        return self._FIELDS

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(
            getattr(self, f) == getattr(other, f) for f in self._fields()
        )

    def __hash__(self) -> int:
        return hash((type(self), *(repr(getattr(self, f)) for f in self._fields())))

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields())
        return f"{type(self).__name__}({fields})"


class Request(Event):
    """A well-formed, validated request: ``params`` passed the method table."""

    _FIELDS: ClassVar[tuple[str, ...]] = ("method", "msgid", "params")
    __slots__ = _FIELDS
    msgid: int
    method: str
    params: dict[str, Any]

    def __init__(self, msgid: int, method: str, params: dict[str, Any]) -> None:
        self.msgid = msgid
        self.method = method
        self.params = params


class BadRequest(Event):
    """A request that must be answered with ``error`` (EBADMSG, ENOTTY or EINVAL)."""

    _FIELDS: ClassVar[tuple[str, ...]] = ("error", "msgid")
    __slots__ = _FIELDS
    msgid: int
    error: KvmError

    def __init__(self, *, msgid: int, error: KvmError) -> None:
        self.msgid = msgid
        self.error = error


class Malformed(Event):
    """Valid msgpack with no usable msgid: answered by a ``protocol_error`` notification."""

    _FIELDS: ClassVar[tuple[str, ...]] = ("error",)
    __slots__ = _FIELDS
    error: ProtocolError

    def __init__(self, *, error: ProtocolError) -> None:
        self.error = error


class Response(Event):
    _FIELDS: ClassVar[tuple[str, ...]] = ("error", "msgid", "result")
    __slots__ = _FIELDS
    msgid: int
    error: KvmError | None
    result: dict[str, Any] | None

    def __init__(
        self, *, msgid: int, error: KvmError | None, result: dict[str, Any] | None
    ) -> None:
        self.msgid = msgid
        self.error = error
        self.result = result


class Notification(Event):
    _FIELDS: ClassVar[tuple[str, ...]] = ("event", "params")
    __slots__ = _FIELDS
    event: str
    params: dict[str, Any]

    def __init__(self, *, event: str, params: dict[str, Any]) -> None:
        self.event = event
        self.params = params
