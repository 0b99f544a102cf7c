"""A bare protocol client for tests that must send what no client library would send."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from lvz.protocol import NEED_DATA, ClientConnection, Notification, Response
from lvz.protocol.events import Event


class Raw:
    """One connection; ``call`` returns the Response and keeps notifications in ``events``."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = ClientConnection()
        self.notifications: list[Notification] = []
        self.early: dict[int, Response] = {}  # answers that came while waiting for another
        self.closed = False

    @classmethod
    async def open(cls, path: Path) -> Raw:
        return cls(await trio.open_unix_socket(str(path)))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def next_event(self) -> Event | None:
        """The next event, or None at EOF."""
        with trio.fail_after(5):
            while True:
                ev = self.conn.next_event()
                if ev is not NEED_DATA:
                    assert isinstance(ev, Event)
                    return ev
                data = await self.stream.receive_some(65536)
                if not data:
                    self.closed = True
                    return None
                self.conn.receive_data(data)

    async def response(self, msgid: int) -> Response:
        if msgid in self.early:
            return self.early.pop(msgid)
        while True:
            ev = await self.next_event()
            assert ev is not None, "connection closed before the response"
            if isinstance(ev, Notification):
                self.notifications.append(ev)
            elif isinstance(ev, Response):
                if ev.msgid == msgid:
                    return ev
                self.early[ev.msgid] = ev

    async def call(self, method: str, **params: Any) -> Response:
        msgid, data = self.conn.send_request(method, params)
        await self.send(data)
        return await self.response(msgid)

    async def ok(self, method: str, **params: Any) -> dict[str, Any]:
        r = await self.call(method, **params)
        assert r.error is None, f"{method} failed: {r.error}"
        assert r.result is not None
        return r.result

    async def err(self, method: str, **params: Any) -> str:
        r = await self.call(method, **params)
        assert r.error is not None, f"{method} unexpectedly succeeded: {r.result}"
        return r.error.name

    async def aclose(self) -> None:
        await self.stream.aclose()
