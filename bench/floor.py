"""The floor: a bare trio + msgpack request/response server on a Unix socket.

It does the least work any msgpack-RPC server must do, and nothing more: a streaming Unpacker
decodes whatever arrived, each request gets a small ``[1, msgid, None, {}]`` answer, and all the
answers to one receive go out in one send. lvz runs on the same stack (trio, msgpack, AF_UNIX),
so this is a ceiling for lvz's figures; lvz is reported as a fraction of it.

With ``--flush-every N`` the answers go out every N of them instead, as lvz's daemon sends
them (``FLUSH_ANSWERS``): with many requests in flight the client then works on the first
answers while the server makes the rest, so on two cores this floor is about twice as fast
as the one-send floor, and lvz beats the one-send floor. Issue 13's targets are ratios to the
one-send floor (the one they were set against); the bench shows lvz's pipelined figures
against this floor too, which compares like with like.

Run as ``python -m bench.floor PATH [--flush-every N]``; it serves until SIGTERM or SIGINT,
and says READY=1 to ``$NOTIFY_SOCKET`` once it accepts.
"""

from __future__ import annotations

import os
import signal
import socket as _socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgpack
import trio

RECEIVE_BYTES = 65536


async def handle(stream: trio.SocketStream) -> None:
    """One send per receive."""
    unpacker = msgpack.Unpacker(raw=False)
    pack = msgpack.Packer(use_bin_type=True).pack
    try:
        while True:
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:
                return
            unpacker.feed(data)
            out = [pack([1, msg[1], None, {}]) for msg in unpacker]
            if out:
                await stream.send_all(out[0] if len(out) == 1 else b"".join(out))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


def flushing_every(n: int) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """A send every ``n`` answers, and one for the rest of each receive's.

    A second loop rather than a parameter of ``handle``: the one-send floor stays the very
    code issue 13's figures were measured against (a comprehension; a loop that counts would
    make it slower and every ratio to it flatter).
    """

    async def handle(stream: trio.SocketStream) -> None:
        unpacker = msgpack.Unpacker(raw=False)
        pack = msgpack.Packer(use_bin_type=True).pack
        try:
            while True:
                data = await stream.receive_some(RECEIVE_BYTES)
                if not data:
                    return
                unpacker.feed(data)
                out = []
                for msg in unpacker:
                    out.append(pack([1, msg[1], None, {}]))
                    if len(out) >= n:
                        await stream.send_all(b"".join(out))
                        out = []
                if out:
                    await stream.send_all(out[0] if len(out) == 1 else b"".join(out))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    return handle


def _notify_ready() -> None:
    """READY=1 as ``lvz serve`` sends it, so one spawner (lvz.testing.spawn) starts both."""
    target = os.environ.get("NOTIFY_SOCKET")
    if target:
        with _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM) as s:
            s.sendto(b"READY=1", target)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


async def serve(path: Path, flush_every: int = 0) -> None:
    _unlink(path)
    sock = trio.socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(512)
    listener = trio.SocketListener(sock)
    _notify_ready()
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                handler = flushing_every(flush_every) if flush_every else handle
                nursery.start_soon(trio.serve_listeners, handler, [listener])
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()
    finally:
        _unlink(path)


def main() -> int:
    args = sys.argv[1:]
    flush_every = 0
    if len(args) == 3 and args[1] == "--flush-every" and args[2].isdigit():
        flush_every = int(args[2])
        args = args[:1]
    if len(args) != 1:
        print("usage: python -m bench.floor SOCKET_PATH [--flush-every N]", file=sys.stderr)
        return 2
    trio.run(serve, Path(args[0]), flush_every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
