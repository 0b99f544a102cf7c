"""Private directories: the one ownership check for the socket directory and the state dir.

``listener.prepare_socket_path`` and the state dir (``state.py``) both call ``ensure_private_dir``.

Whoever controls a directory controls what is in it: another user who owns (or may write to)
the state dir can plant a VM file that the daemon then loads, or a symlink that redirects a
save. So, as tmux, ssh-agent and systemd do, the daemon uses a directory only if it is a real
directory (not a symlink), owned by the daemon's user, and not writable by group or others; it
creates a missing one 0700 itself. After the check the directory is held open (``O_DIRECTORY |
O_NOFOLLOW``) and every file in it is opened relative to that descriptor with ``O_NOFOLLOW``,
so swapping the path or a file for a symlink afterwards changes nothing.

Writes are atomic the way databases make them: write a temporary file, fsync it, rename it over
the old name, fsync the directory (without the last step a crash can keep the old name).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = [
    "UnsafeDir",
    "check_private_dir",
    "ensure_private_dir",
    "open_private_dir",
    "replace_file",
]


class UnsafeDir(OSError):
    """A directory another user could control, or one that cannot be used; says which."""


def check_private_dir(
    path: Path, st: os.stat_result | None = None, what: str = "directory", risk: str = ""
) -> None:
    """Refuse ``path`` unless it is a real directory we own that no one else may write to.

    ``st`` is its ``lstat`` (or the ``fstat`` of an open descriptor) if the caller has it;
    ``what`` names the directory and ``risk`` what another user could do, in the messages.
    """
    risk = risk or f"replace what is in the {what}"
    if st is None:
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise UnsafeDir(f"{path}: cannot inspect the {what}: {exc.strerror or exc}") from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeDir(
            f"{path} is a symbolic link; the {what} must be a real directory the daemon's user owns"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDir(f"{path} is not a directory")
    me = os.getuid()
    if st.st_uid != me:
        raise UnsafeDir(
            f"{path} is owned by uid {st.st_uid}, not by this daemon's uid {me}; "
            f"another user could {risk}"
        )
    if st.st_mode & 0o022:
        raise UnsafeDir(
            f"{path} is group- or world-writable (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); another user could {risk} (use a "
            "0700 directory)"
        )


def ensure_private_dir(path: Path, what: str = "directory", risk: str = "") -> None:
    """Create ``path`` 0700 if it is missing (parents as needed), then check it."""
    if not os.path.lexists(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        old = os.umask(0o077)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass  # made meanwhile: checked below like any other
        finally:
            os.umask(old)
    check_private_dir(path, what=what, risk=risk)


def open_private_dir(path: Path, what: str = "directory") -> int:
    """``ensure_private_dir``, then a descriptor of it, checked again through the descriptor
    (so the directory checked is the directory held)."""
    ensure_private_dir(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise UnsafeDir(f"{path}: cannot open the {what}: {exc.strerror or exc}") from None
    try:
        check_private_dir(path, os.fstat(fd), what)
    except BaseException:
        os.close(fd)
        raise
    return fd


def replace_file(dir_fd: int, name: str, data: bytes, *, sync: bool = True) -> None:
    """Atomically make ``name`` (in ``dir_fd``) hold ``data``: write, fsync, rename, fsync dir.

    The temporary name is ``.name.tmp``; an old one (a crash mid-write) is replaced, and a
    symlink planted there is unlinked, never followed.
    """
    tmp = f".{name}.tmp"
    try:
        os.unlink(tmp, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    fd = os.open(
        tmp,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=dir_fd,
    )
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    if sync:
        os.fsync(dir_fd)
