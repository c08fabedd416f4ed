"""The disk under the store: reserving real blocks, telling a full disk, file times.

A full disk is found at the start, not mid-transfer: space is reserved with ``posix_fallocate``
because a write through a mapping into a sparse file on a full disk is a ``SIGBUS`` that would
kill the daemon.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

#: Free space kept beyond the tensor itself for the sidecar, progress file and temp files.
_DISK_SLACK = 1 << 20
#: errno values that mean "the disk (or the user's quota) is full".
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
#: errno values of a filesystem without fallocate support: fall back to a sparse file.
_NO_FALLOCATE_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})


def _is_full(exc: OSError) -> bool:
    return exc.errno in _FULL_ERRNOS


def _reserve(fd: int, size: int) -> None:
    """Give the file ``size`` bytes of real disk blocks, so a full disk fails here, not in a page
    fault (``SIGBUS``) halfway through a transfer. Falls back to a sparse file where the
    filesystem or platform has no ``fallocate``."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is not None and size > 0:
        try:
            fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno not in _NO_FALLOCATE_ERRNOS:
                raise
    os.ftruncate(fd, size)


def _mtime(*paths: Path) -> float | None:
    """The newest mtime of those of ``paths`` that exist."""
    times = []
    for p in paths:
        with contextlib.suppress(OSError):
            times.append(p.stat().st_mtime)
    return max(times) if times else None


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
