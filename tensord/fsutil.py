"""Small durable-file helpers: atomic replace (temp file, fsync, rename, fsync of the directory).

Shared by the tensor store, the download fetcher's ranges file, pulled manifests and the
download queue: every small file tensord rewrites must read back as the old or the new
version after a crash, never a torn one.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, no wait


def unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def fsync_dir(path: Path) -> None:
    """Make renames and unlinks in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def libc_function(name: str, *argtypes: Any) -> Callable[..., int] | None:
    """The C library's ``name`` (returning ``int``) through ctypes, which lets go of the GIL
    during the call; ``None`` where the C library has no such function (not Linux)."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return cast("Callable[..., int]", fn)


#: ``sync_file_range(2)``, if the C library has it.
_sync_file_range = libc_function(
    "sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint
)


def start_writeback(fd: int, offset: int, nbytes: int) -> bool:
    """Ask the kernel to start writing ``fd``'s dirty pages in ``[offset, offset + nbytes)`` to
    disk, without waiting for them (``sync_file_range(SYNC_FILE_RANGE_WRITE)``): a later
    ``fsync`` then has only what landed since to wait for. Durability still comes from that
    ``fsync`` alone. Whether the kernel took the request (``False`` where there is no such call)."""
    if _sync_file_range is None or nbytes <= 0:
        return False
    return _sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE) == 0


def temp_path(final: Path) -> Path:
    """A dotfile next to ``final``: never mistaken for a tensor, swept when stale."""
    return final.with_name(f".{final.name}.{secrets.token_hex(8)}.tmp")


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part.

    Temp file + ``fsync`` + ``rename`` + ``fsync`` of the directory. On failure the temp file is
    removed and the old ``path`` is untouched.
    """
    tmp = write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def write_temp(final: Path, data: bytes, mode: int = 0o644) -> Path:
    """``data`` in a fsynced temp file next to ``final``; returns its path. The file has
    ``mode`` exactly (whatever the umask) before any byte is written: a key is never readable
    by others, not even for a moment."""
    tmp = temp_path(final)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        unlink_quietly(tmp)
        raise
    return tmp


__all__ = ["atomic_write", "fsync_dir", "temp_path", "unlink_quietly", "write_temp"]
