"""One blob from peers first: the pieces a peer has (or is fetching) come from that peer, only the
pieces this node owns (or nobody else will fetch) from the origin.

:class:`SharedBlobFetch` is a :class:`~tensord.download.fetch.BlobFetch` that, when it is given
:class:`~tensord.download.sources.PeerSources` that are available and the blob's size and digest
are known (a manifest's layer, ``download --sha256`` with a size), replaces the HTTP work
stealing with the cluster's plan: each of its ``connections`` workers asks the plan for the next
piece and reads it either from a peer - ``recv_into`` straight into a shared memory map of the
``.incomplete`` file, no copy in Python - or from the origin with the ordinary checked ranged
GET. Everything else is the plain fetch's: the partial file and its resume record, the
checkpoints, the slow-connection watchdog for origin ranges, and the SHA-256 of the whole blob,
checked before the rename, so nothing a peer sent is committed unverified. Each range that lands
is reported to the plan (peers waiting for it may take it at once).

A blob whose digest is wrong after peers supplied part of it is fetched again from the origin
alone (the peers that supplied it are named in the log): with no per-piece digests the culprit
cannot be told apart, and the second attempt must not depend on it.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from functools import partial
from typing import Any

import trio

from ..errors import DownloadError
from .fetch import BlobFetch, TooLarge
from .fetch_errors import _StartOver
from .ranged_get import content_range
from .sources import BlobPeers, PeerSources, Piece

log = logging.getLogger("tensord.download")


class SharedBlobFetch(BlobFetch):
    """A :class:`BlobFetch` that takes pieces from peers first (see the module docstring).
    Without available peers, or without a known size and digest, it is the plain fetch."""

    def __init__(self, *args: Any, peers: PeerSources, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.peers = peers
        self._sharing = True

    async def _run_once_inner(self) -> Any:
        sha256 = self.sha256
        if not self._sharing or sha256 is None or not self.peers.available():
            return await super()._run_once_inner()
        if self.size is None:  # a URL download: its size is the origin's total
            self.size = await self._probe_size()
        size = self.size
        if not size:  # no ranges at the origin, or an empty blob: the plain fetch does it
            return await super()._run_once_inner()
        if size > self.cfg.max_bytes:
            raise TooLarge(
                f"{self.url}: the blob is {size} bytes, more than downloads.max_bytes "
                f"({self.cfg.max_bytes}); raise downloads.max_bytes to fetch it"
            )
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        resumed = self._blob.load(sha256)
        if resumed is not None and resumed != size:
            self._discard()
        digest = f"sha256:{sha256}"
        self._blob.open(size)
        try:
            async with self.peers.open(digest, size, self.partial, self.done) as share:
                self.on_landed = share.landed
                try:
                    await self._shared(share, size)
                finally:
                    if self._blob.is_open:
                        with contextlib.suppress(OSError):
                            self._save()
                        self._blob.close()
                try:
                    path = await trio.to_thread.run_sync(self._finish)
                except _StartOver:
                    peers = sorted(p for p in self.sources if p != "origin")
                    if peers:
                        log.warning(
                            "download %s: the blob assembled with pieces from %s fails its "
                            "digest; fetching it again from the origin alone",
                            self.url,
                            ", ".join(peers),
                        )
                        self._sharing = False
                    raise
                share.finished(path)
                return path
        finally:
            self.on_landed = None
            if self._blob.is_open:
                self._blob.close()

    async def _probe_size(self) -> int | None:
        """The blob's size from a one-byte ranged GET (None if the origin ignores ranges)."""
        resp = await self._http.open(0, 1)
        try:
            if resp.status_code != 206:
                return None
            return content_range(resp, self.url, 0, None)[2]
        finally:
            await resp.aclose()

    async def _shared(self, share: BlobPeers, size: int) -> None:
        self.size = size
        busy: set[int] = set()
        fd = os.open(self.partial, os.O_RDWR)
        try:
            mapped = mmap.mmap(fd, size) if size else None
        finally:
            os.close(fd)
        try:
            whole = memoryview(mapped) if mapped is not None else memoryview(b"")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._checkpoints)
                nursery.start_soon(self._watch_slow)
                async with self._writing(), trio.open_nursery() as workers:
                    self._workers = workers
                    for _ in range(max(1, self.cfg.connections)):
                        for origin in (True, False):
                            workers.start_soon(
                                partial(self._share_worker, share, busy, whole, origin=origin)
                            )
                nursery.cancel_scope.cancel()
        finally:
            whole.release()
            if mapped is not None:
                with contextlib.suppress(BufferError):  # a view held by a traceback: GC closes it
                    mapped.close()
        if self._failed is not None:
            raise self._failed
        if self.done.missing(size):
            raise DownloadError(f"{self.url}: ranges still missing: {self.done.missing(size)}")

    async def _share_worker(
        self, share: BlobPeers, busy: set[int], whole: memoryview, *, origin: bool
    ) -> None:
        """Fetch pieces until the blob is complete: from the origin (``origin``), or from
        peers. Two kinds of worker, so that a piece a peer has is taken the moment it lands,
        not after whatever slow origin range the worker was reading."""
        while self._failed is None:
            piece = share.next_piece(busy, origin=origin)
            if piece is None:
                if share.complete:
                    return
                origin_done = self.on_origin_done
                if origin and origin_done is not None and not share.needs_origin(busy):
                    self.on_origin_done = None  # the rest comes from peers
                    origin_done()
                await share.changed()  # every missing piece is on its way: wait for news
                continue
            busy.add(piece.index)
            try:
                if piece.peer is None:
                    await self._origin_piece(share, piece)
                else:
                    await self._peer_piece(share, piece, whole)
            finally:
                busy.discard(piece.index)
            await self._save_async()
        if self._workers is not None:
            self._workers.cancel_scope.cancel()  # a failure: the other workers stop too

    async def _origin_piece(self, share: BlobPeers, piece: Piece) -> None:
        pending = [(piece.start, piece.end)]
        while pending and self._failed is None:
            await self._fetch_piece(pending.pop(), None)
            # A connection judged slow gave the rest of its range back: fetch it again here.
            pending.extend(self._queue)
            self._queue.clear()
        # Read is not written: the piece stays busy until the writer has it in the file.
        while self._failed is None and not self.done.contains(piece.start, piece.end):
            await share.changed()

    async def _peer_piece(self, share: BlobPeers, piece: Piece, whole: memoryview) -> None:
        assert piece.peer is not None
        n = piece.end - piece.start
        self.connections += 1
        self.peak_connections = max(self.peak_connections, self.connections)
        try:
            with whole[piece.start : piece.end] as into:
                await share.fetch(piece.peer, piece.start, into)
        except Exception as exc:  # a peer is a trust boundary: next source, never a crash
            log.info(
                "download %s: piece %d (bytes %d-%d) from peer %s failed: %s",
                self.url,
                piece.index,
                piece.start,
                piece.end - 1,
                piece.peer,
                exc,
            )
            self.retries += 1
            share.fail(piece.peer, exc)
            return
        finally:
            self.connections -= 1
        self.done.add(piece.start, piece.end)
        self.bytes_fetched += n
        self._count(piece.peer, n)
        share.landed(piece.start, n)
        self._report()
        # An empty write wakes the writer thread, which hashes whatever became contiguous (read
        # back from the page cache): the SHA-256 keeps pace instead of all waiting for the end.
        await self._queue_write(piece.start, memoryview(b""))


__all__ = ["SharedBlobFetch"]
