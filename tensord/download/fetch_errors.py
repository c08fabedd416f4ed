"""How a blob fetch fails: the kinds of :class:`~tensord.errors.DownloadError` it raises, and how
the one that says what went wrong is picked out of an exception group.

The kind decides what happens next: a :class:`Refused` download (the server lied, or the blob is
too big) is not retried and leaves nothing behind; a :class:`DiskFull` one keeps its partial for
a pull once space is freed; a :class:`_StartOver` (digest mismatch, a 416 on a partial) discards
the partial and fetches once more from zero.
"""

from __future__ import annotations

import errno

import trio

from ..errors import DownloadError


class Refused(DownloadError):
    """The download was refused for what the server said (not for a network fault): nothing it
    wrote is kept, and it is not retried."""


class BadReply(Refused):
    """The server answered something other than what was asked: a range other than the one
    requested, more bytes than the size promised, a ``Content-Length`` that contradicts its
    ``Content-Range``."""


class TooLarge(Refused):
    """The blob is bigger than ``downloads.max_bytes`` (promised, declared or counted)."""


class DiskFull(DownloadError):
    """The disk filled up: the download stopped, nothing stored was harmed."""


class _StartOver(Exception):
    """The partial cannot be trusted: discard it and fetch the blob once more from zero."""


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The most telling leaf of an exception group: a disk-full, then any download error, then
    whatever came first."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(group)
    for leaf in leaves:
        if isinstance(leaf, OSError) and leaf.errno in (errno.ENOSPC, errno.EDQUOT):
            return DiskFull(f"the disk filled up: {leaf}; free space and pull again")
    for kind in (DiskFull, Refused, _StartOver, DownloadError):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    non_cancel = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    return non_cancel[0] if non_cancel else leaves[0]
