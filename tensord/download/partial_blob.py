"""A blob on its way to disk: ``<name>.incomplete`` (bytes at their offsets), its resume record
``<name>.incomplete.json`` (the completed ranges) and the SHA-256 computed as bytes arrive.

Resume across restarts: the record is written only after ``fdatasync`` of the data it vouches
for (ranges written during that sync wait for the next record), every few MiB written, so a
``kill -9`` loses at most those few MiB and a restarted fetch asks only for the missing ranges.
The digest is fed by arriving bytes while they arrive in order; the rest is read back from the
page cache once it is contiguous. Everything here is synchronous file I/O: the
fetch (:mod:`tensord.download.fetch`) runs the slow parts in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
from pathlib import Path

from ..fsutil import atomic_write
from .fetch_errors import DiskFull, _StartOver
from .ranges import RangeSet

log = logging.getLogger("tensord.download")


class _Hasher:
    """SHA-256 of the blob, fed in order: directly from arriving bytes when they are the next
    ones, otherwise caught up later by reading the file back (from the page cache)."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.offset = 0

    def feed(self, pos: int, data: memoryview) -> None:
        if pos == self.offset:
            self.h.update(data)
            self.offset += len(data)

    def catch_up(self, fd: int, until: int) -> None:
        while self.offset < until:
            data = os.pread(fd, min(8 << 20, until - self.offset), self.offset)
            if not data:
                raise OSError(errno.EIO, "short read while hashing the blob")
            self.h.update(data)
            self.offset += len(data)


class PartialBlob:
    """The partial file of the blob fetched from ``url`` into ``dest``, with its resume record.

    :attr:`done` is the set of byte ranges written (and, once saved, recorded). Only one thread
    at a time writes (:meth:`write`); the digest is touched only there and in :meth:`finish`.
    """

    def __init__(self, dest: Path, url: str) -> None:
        self.dest = dest
        self.url = url
        self.path = dest.with_name(dest.name + ".incomplete")
        self.control = dest.with_name(dest.name + ".incomplete.json")
        self.done = RangeSet()
        self._fd = -1
        self._hasher = _Hasher()

    @property
    def is_open(self) -> bool:
        return self._fd >= 0

    def open(self, total: int | None) -> None:
        """Open (or create) the partial file, checking first that the blob fits on the disk.

        Not ``posix_fallocate``: on ext4, writes into fallocated (unwritten) extents run at a
        quarter of the speed of writes into a sparse file (measured: 0.64 vs 2.8 GB/s), and this
        is a plain ``pwrite`` file, not a mapping, so a full disk mid-way is an ``ENOSPC`` the
        fetch reports cleanly rather than a ``SIGBUS``.
        """
        if total is not None:
            have = self.path.stat().st_size if self.path.exists() else 0
            st = os.statvfs(self.path.parent)
            free = st.f_bavail * st.f_frsize
            if total - min(have, total) + (1 << 20) > free:
                raise DiskFull(
                    f"download {self.url}: {total} bytes do not fit on the disk holding "
                    f"{self.path.parent} ({free} bytes free); free space and pull again"
                )
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if total is not None and os.fstat(self._fd).st_size != total:
            os.ftruncate(self._fd, total)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        os.close(fd)

    def write(self, batch: list[tuple[int, memoryview]]) -> None:
        """(worker thread) Write a batch at its offsets. Not hashed here: the fetch marks the
        batch written (and so recordable) first, then calls :meth:`hash` - a catch-up of tens
        of MiB must not hold back the resume record (a kill -9 meanwhile re-fetched them)."""
        fd = self._fd
        for pos, data in batch:
            view, at = data, pos
            while len(view):  # a short write is how a filling disk starts: write the rest
                n = os.pwrite(fd, view, at)
                if n <= 0:
                    raise OSError(errno.ENOSPC, f"no byte written at {at}")
                view, at = view[n:], at + n

    def hash(self, batch: list[tuple[int, memoryview]], prefix: int) -> None:
        """(worker thread, after :meth:`write` of ``batch``) Catch up from the file on what
        became contiguous before the batch (``prefix``: the written run from byte 0 before it),
        then hash what of the batch continues the hashed prefix. Only this thread touches the
        hash, and batches come in the order they were written."""
        if prefix > self._hasher.offset:
            self._hasher.catch_up(self._fd, prefix)
        for pos, data in batch:
            self._hasher.feed(pos, data)

    def load(self, sha256: str | None) -> int | None:
        """Resume state from the control file: the blob's size, with ``done`` filled in."""
        try:
            doc = json.loads(self.control.read_bytes())
            size = doc["size"]
            if not isinstance(size, int) or size < 0 or not self.path.exists():
                raise ValueError("bad size or no data file")
            if sha256 is not None and doc.get("sha256") != sha256:
                raise ValueError("for another blob")
            self.done = RangeSet.from_json(doc["done"], size)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning(
                "download %s: ignoring a damaged resume file %s: %s", self.url, self.control, exc
            )
            self.discard()
            return None
        log.info(
            "download %s: resuming with %d of %d bytes on disk", self.url, self.done.total, size
        )
        return size

    def save(self, size: int, sha256: str | None, done: list[list[int]] | None = None) -> None:
        """Record completed ranges; the data they name is made durable first.

        ``done`` is a snapshot of :attr:`done` taken (on the event loop) before this call: the
        ranges written while ``fdatasync`` runs are not covered by it, so recording them would
        vouch for bytes a crash can still lose. ``None``: snapshot here (no writer running)."""
        if self._fd < 0:
            return
        if done is None:
            done = self.done.to_json()
        os.fdatasync(self._fd)
        body = json.dumps({"size": size, "sha256": sha256, "url": self.url, "done": done})
        atomic_write(self.control, body.encode())

    def discard(self) -> None:
        self.done = RangeSet()
        self._hasher = _Hasher()
        for p in (self.control, self.path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def finish(self, size: int, sha256: str | None) -> str:
        """Verify the digest, then rename the blob into place; returns its SHA-256 (hex)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            self._hasher.catch_up(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        got = self._hasher.h.hexdigest()
        if sha256 is not None and got != sha256:
            raise _StartOver(f"sha256 mismatch: expected {sha256}, got {got}")
        os.replace(self.path, self.dest)
        with contextlib.suppress(FileNotFoundError):
            self.control.unlink()
        return got
