"""Opening a file a control client names, safely and on the caller's behalf.

A control request may name a path (``PUT /v1/tensors/x {"path": ...}``, ``POST /v1/send
{"path": ...}``); the daemon reads it with its own rights. Two things must not follow:

- **A path that blocks.** ``open()`` on a FIFO waits for a writer, forever; a device file reads
  forever (``/dev/zero``). Each such request would pin one of trio's worker threads, and forty
  of them exhaust the thread limiter that the receive path shares. So the file is opened with
  ``O_NONBLOCK`` (a FIFO opens at once, with no writer) and anything but a regular file is
  refused from ``fstat`` of the opened descriptor. (A hung network mount can still block
  ``open()`` itself in the kernel: that is why the control API runs this work on its own small
  thread limiter (:data:`FILE_THREADS` threads), never on the default one.)
- **A confused deputy.** A member of the socket's group must not get the daemon to read what
  only the daemon's user may read. On the *opened* descriptor (``fstat``, no race with a path
  swapped after the check), the caller's uid and groups (``SO_PEERCRED`` and
  ``/proc/<pid>/status``) must pass the file's owner/group/other read bits, and the caller must
  be able to search every directory of the file's resolved path (a 0644 file inside someone's
  0700 home is not theirs to read); that resolved path must still name the opened file after
  the check, or the request is refused.

Symlinks are followed (no ``O_NOFOLLOW``): people pass them all the time (the Hugging Face cache
is a tree of symlinks to blobs), and every check above is made on what the link resolved to, so
following one grants nothing the caller could not read by following it themselves.

The file is then read through ``/proc/self/fd/<n>`` (:class:`OpenedPath`): the very inode that
was checked, whatever happens to the path meanwhile.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PosixPath
from typing import TYPE_CHECKING

from ..errors import BadTensor, TensorError
from ..tensorfile import file_error

if TYPE_CHECKING:
    from .server import Caller

#: Worker threads for the files control requests name (open, parse, copy): a few (each control
#: app has its own ``trio.CapacityLimiter`` of this size), so that requests stuck on a hung mount
#: can never take the threads the receive path needs.
FILE_THREADS = 4

_R, _W, _X = 4, 2, 1


class NotAllowed(TensorError):
    """The caller could not read (or write) the file itself: answered ``403``."""

    http_status = 403
    http_code = "forbidden"


class OpenedPath(PosixPath):
    """A path that prints as what the user gave, but opens the descriptor already checked.

    ``os.fspath()`` (what ``open``, ``np.load`` and ``np.memmap`` call) gives
    ``/proc/self/fd/<n>``, which opens the same inode as ``fd`` even if the path was replaced;
    ``str()``, ``suffix`` and ``stem`` are the user's path, for names and error messages. The
    link is a class attribute of a per-file subclass (:meth:`of`), so that paths pathlib derives
    from this one (``resolve()``, which ``np.memmap`` calls) keep it.
    """

    fd_link = ""

    def __fspath__(self) -> str:
        return self.fd_link or super().__fspath__()

    @classmethod
    def of(cls, path: Path, fd: int) -> OpenedPath:
        sub: type[OpenedPath] = type(cls.__name__, (cls,), {"fd_link": f"/proc/self/fd/{fd}"})
        return sub(path)


def _may(caller: Caller, st: os.stat_result, want: int) -> bool:
    """Whether ``caller`` passes ``st``'s owner/group/other bits for ``want`` (POSIX rules: only
    the first class that matches counts; root passes; ACLs are not consulted)."""
    if caller.uid == 0:
        return True
    if caller.uid == st.st_uid:
        bits = st.st_mode >> 6
    elif st.st_gid in caller.gids:
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bits & want == want


def _who(caller: Caller) -> str:
    return f"uid {caller.uid}"


def open_for_caller(path: Path, caller: Caller | None) -> tuple[int, OpenedPath]:
    """Open ``path`` read-only for ``caller``: a regular file the caller could read themselves.

    Returns the descriptor (the caller of this function closes it) and an :class:`OpenedPath`
    to read it through. Raises :class:`BadTensor` (400) for a missing file or one that is not a
    regular file, :class:`NotAllowed` (403) when the caller could not read it. Blocking: run it
    in a thread of the control API's own limiter.
    """
    if caller is None:
        raise NotAllowed(
            f"{path}: the control connection has no credentials to check the file against: "
            "use the daemon's control socket"
        )
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise file_error(path, exc) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = _kind(st.st_mode)
            raise BadTensor(f"{path}: is {kind}, not a regular file: name a .npy or .safetensors")
        if not _may(caller, st, _R):
            raise NotAllowed(
                f"{path}: {_who(caller)} may not read this file itself, so the daemon will not "
                "read it for it: make it readable by that user, or run the command as its owner"
            )
        _check_directories(path, caller, st)
        return fd, OpenedPath.of(path, fd)
    except BaseException:
        os.close(fd)
        raise


def _check_directories(path: Path, caller: Caller, st: os.stat_result) -> None:
    """The caller can search every directory on the way to the opened file, and the resolved
    path still names it (checked after the open: a swapped symlink fails the comparison)."""
    if caller.uid == 0:
        return
    real = Path(os.path.realpath(path))
    for parent in reversed(real.parents):
        try:
            pst = os.stat(parent)
        except OSError:
            continue  # vanished: the comparison below fails
        if not _may(caller, pst, _X):
            raise NotAllowed(
                f"{path}: {_who(caller)} may not enter {parent} to reach this file, so the "
                "daemon will not read it for it: run the command as a user who can"
            )
    try:
        now = os.stat(real)
    except OSError:
        now = None
    if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        raise NotAllowed(f"{path}: changed while it was being checked: try again")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


__all__ = ["FILE_THREADS", "NotAllowed", "OpenedPath", "open_for_caller"]
