"""Serving a blob while it lands: a client pulling a 40 GB layer on a miss gets bytes as the
download writes them, not after the whole blob is fetched and verified.

Where the bytes are: the download (:mod:`tensord.download.fetch`, or the peer-first fetch)
writes ``blobs/sha256-<hex>.incomplete`` at the bytes' offsets and records the ranges written in
its resume record (``.incomplete.json``, saved after ``fdatasync`` every checkpoint). The mirror
reads that record (:meth:`~.store.ModelDir.landing`), sends the landed run from the client's
position on from a map of the partial file, and when it has caught up waits for the next event
of the download job (no polling) and reads the record again. When the blob is verified the
fetch renames the partial file into place: the same inode, so the map goes on reading the same
bytes, now complete.

What is promised: headers (``Content-Length``, ``Content-Range`` for a ``Range``) go out once
the blob's size is known; bytes go out as they land, all but the last; the last byte - with
which the client holds a complete body - only once the blob's SHA-256 is verified and the file
the bytes came from is the verified blob (same inode). So a ``Range`` inside what has landed
still completes only with the whole blob's verification. If the download fails, or starts over
in a new file, the connection is dropped before the end (:data:`~.reply.ABORT`): the client
sees a body cut short, never unverified bytes as a complete ``200``. A registry streams a blob
the same way (its bytes are not re-verified as they go out); the client verifies the digest of
what it received, as every OCI client does.

How soon bytes follow the download: the record is saved every checkpoint (1 s) and the job's
events come at most 10 times a second, so a client trails the download by about a second. The
events are the only wake-up the mirror has without a hook in ``download/``: bytes recorded
after the job's last event before a stall wait for its next event (or its end). An origin that
ignores ``Range`` is fetched in one stream without checkpoints: no record until the end, so such
a blob is sent once it is complete.
"""

from __future__ import annotations

import logging
import mmap
import os
from pathlib import Path

import trio

from ..asgi import Headers
from ..download.ranges import RangeSet
from ..events import Event
from .misses import Misses
from .protocol import MirrorError, parse_range
from .reply import Reply
from .store import Landing, ModelDir

log = logging.getLogger("tensord.mirror")


def blob_headers(digest: str, size: int, start: int, end: int, ranged: bool) -> Headers:
    headers = [
        (b"content-type", b"application/octet-stream"),
        (b"docker-content-digest", digest.encode()),
        (b"etag", f'"{digest}"'.encode()),
        (b"accept-ranges", b"bytes"),
        (b"content-length", str(end - start).encode()),
    ]
    if ranged:
        headers.append((b"content-range", f"bytes {start}-{end - 1}/{size}".encode()))
    return headers


async def send_blob(reply: Reply, digest: str, path: Path, size: int, range_: str | None) -> None:
    """A complete blob (or the ``Range`` asked of it), from a read-only map of its file."""
    wanted = parse_range(range_, size)
    start, end = wanted or (0, size)
    await reply.start(206 if wanted else 200, blob_headers(digest, size, start, end, bool(wanted)))
    if not reply.head and end > start:
        mapped = await trio.to_thread.run_sync(_map, path)
        with mapped, memoryview(mapped) as view:
            await reply.slices(view, start, end)
    await reply.end()


async def serve_landing(
    models: ModelDir, misses: Misses, job_id: str, digest: str, range_: str | None, reply: Reply
) -> None:
    """Blob ``digest``, which download ``job_id`` brings, sent as it lands (see the module)."""
    async with misses.events.subscribe() as events:  # before any look: no event is missed
        follow = _Follow(models, misses, job_id, events, digest)
        while True:  # until the size is known: the blob is complete, or its record is there
            found = models.blob(digest)
            if found is not None:
                await send_blob(reply, digest, *found, range_)
                return
            if misses.ended(job_id):
                if models.blob(digest) is not None:
                    continue  # it ended with the blob in place
                raise MirrorError(404, "BLOB_UNKNOWN", "blob unknown to the mirror", digest)
            landing = await trio.to_thread.run_sync(models.landing, digest)
            if landing is not None:
                opened = await trio.to_thread.run_sync(_open, landing)
                if opened is not None:
                    break
                continue  # renamed into place (complete) or started over: look again
            await follow.changed()
        with opened as mapped:
            await follow.stream(landing, mapped, range_, reply)


class _Follow:
    """Following one download while its blob is sent: what has landed, whether it is verified,
    whether it failed."""

    def __init__(
        self,
        models: ModelDir,
        misses: Misses,
        job_id: str,
        events: trio.MemoryReceiveChannel[Event],
        digest: str,
    ) -> None:
        self.models = models
        self.misses = misses
        self.job_id = job_id
        self.events = events
        self.digest = digest
        self.inode = -1

    async def changed(self) -> None:
        await self.misses.changed(self.events, self.job_id)

    def cut(self, why: str) -> MirrorError:
        return MirrorError(502, "BLOB_UNKNOWN", f"blob {self.digest}: {why}; pull it again")

    def verified(self) -> bool:
        """Is the blob complete and verified, in the very file the bytes were sent from?"""
        complete = self.models.inode(self.digest)
        if complete is not None and complete != self.inode:
            raise self.cut("it was fetched again into another file while being sent")
        return complete is not None

    async def more(self) -> Landing | None:
        """After the next event of the download: the record, if it still describes the file
        being sent from (None once the blob is complete). Raises when the download ended
        without a verified blob, or started over in a new file."""
        if self.misses.ended(self.job_id) and not self.verified():
            raise self.cut("its download failed (see tensord downloads)")
        await self.changed()
        fresh = await trio.to_thread.run_sync(self.models.landing, self.digest)
        if fresh is not None and fresh.inode != self.inode:
            raise self.cut("its download started over in a new file while being sent")
        return fresh

    async def stream(
        self, landing: Landing, mapped: mmap.mmap | None, range_: str | None, reply: Reply
    ) -> None:
        size, self.inode = landing.size, landing.inode
        wanted = parse_range(range_, size)
        start, end = wanted or (0, size)
        headers = blob_headers(self.digest, size, start, end, bool(wanted))
        await reply.start(206 if wanted else 200, headers)
        if reply.head or mapped is None:  # a HEAD, or an empty blob
            await reply.end()
            return
        done = landing.done
        # The last byte waits for the SHA-256: a client holding Content-Length bytes holds a
        # complete body, so that must never happen before the blob is verified.
        last = end - 1
        with memoryview(mapped) as view:
            pos = start
            while pos < last:
                upto = min(_run_end(done, pos), last)
                if upto > pos:
                    await reply.slices(view, pos, upto)
                    pos = upto
                elif self.verified():
                    done = RangeSet([(0, size)])
                else:
                    fresh = await self.more()
                    if fresh is not None:
                        done = fresh.done
            while not self.verified():
                await self.more()
            await reply.slices(view, last, end)
        await reply.end()


def _run_end(done: RangeSet, pos: int) -> int:
    """Where the landed run holding byte ``pos`` ends (``pos`` if it has not landed)."""
    for start, end in done:
        if start <= pos < end:
            return end
    return pos


class _Opened:
    """The partial file's map (None for an empty blob), closed with the ``with``."""

    def __init__(self, mapped: mmap.mmap | None) -> None:
        self.mapped = mapped

    def __enter__(self) -> mmap.mmap | None:
        return self.mapped

    def __exit__(self, *exc: object) -> None:
        if self.mapped is not None:
            self.mapped.close()


def _open(landing: Landing) -> _Opened | None:
    """A read-only map of the partial file, if it is still the one ``landing`` describes."""
    try:
        with open(landing.path, "rb") as f:
            if os.fstat(f.fileno()).st_ino != landing.inode:
                return None
            if landing.size == 0:
                return _Opened(None)
            return _Opened(mmap.mmap(f.fileno(), landing.size, access=mmap.ACCESS_READ))
    except (FileNotFoundError, ValueError):
        return None


def _map(path: Path) -> mmap.mmap:
    """A read-only map of the file (which may be closed once mapped)."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


__all__ = ["send_blob", "serve_landing"]
