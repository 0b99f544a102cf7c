"""The floor: a bare trio + msgpack request/response server on a Unix socket.

It does the least work any msgpack-RPC server must do, and nothing more: a streaming Unpacker
decodes whatever arrived, each request gets a small ``[1, msgid, None, {}]`` answer, and all the
answers to one receive go out in one send. lvz runs on the same stack (trio, msgpack, AF_UNIX),
so this is a ceiling no lvz figure can exceed; lvz is reported as a fraction of it.

Run as ``python -m bench.floor PATH``; it serves until SIGTERM or SIGINT, and says READY=1
to ``$NOTIFY_SOCKET`` once it accepts.
"""

from __future__ import annotations

import os
import signal
import socket as _socket
import sys
from pathlib import Path

import msgpack
import trio

RECEIVE_BYTES = 65536


async def handle(stream: trio.SocketStream) -> None:
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


async def serve(path: Path) -> None:
    _unlink(path)
    sock = trio.socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(512)
    listener = trio.SocketListener(sock)
    _notify_ready()
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.serve_listeners, handle, [listener])
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()
    finally:
        _unlink(path)


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m bench.floor SOCKET_PATH", file=sys.stderr)
        return 2
    trio.run(serve, Path(sys.argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
