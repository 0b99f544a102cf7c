"""Where the daemon's socket lives (PROTOCOL.md §1); both ends resolve it the same way."""

from __future__ import annotations

import os
from pathlib import Path


def default_socket_path() -> Path:
    """``$XDG_RUNTIME_DIR/lvz/lvz.sock``, else ``/tmp/lvz-$UID/lvz.sock``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "lvz" / "lvz.sock"
    return Path(f"/tmp/lvz-{os.getuid()}") / "lvz.sock"


def resolve_socket_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The endpoint a command uses: ``--socket`` > ``$LVZ_SOCKET`` > the default path."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("LVZ_SOCKET")
    if env:
        return Path(env)
    return default_socket_path()
