"""The blobs this node can serve to its peers, and what its peers said they hold.

Two kinds of blob are served: **complete** ones - in the daemon's blob store
(``models/blobs/sha256-...``, written only by a verified rename) or registered with :meth:`add`
- and blobs **in flight**: a download (track P2's fetcher) calls :meth:`Holdings.begin` before
its first byte, :meth:`InFlight.landed` after each range it wrote, and :meth:`InFlight.finish`
or :meth:`InFlight.abandon` at the end. A peer asking for a range that has not landed yet waits
(bounded by the server) on the blob's :class:`trio.Event`, which ``landed`` sets and replaces, so
that nodes pulling the same blob at the same moment take each piece from whoever fetched it as
soon as it is written.

"Landed" means written to the file with ``pwrite`` (or an equivalent): the page cache makes the
bytes visible to every reader of that file at once, which is all serving needs. A piece served
from a blob in flight is not yet verified by its SHA-256 - neither is the origin's - so the
receiver checks crc32c per chunk and the whole blob by SHA-256 before it commits anything.

The announcements peers push (``Announce``) are kept here too, per peer and bounded, for the
planner to read (:meth:`Holdings.heard`); a waiter learns of a new one through
:meth:`Holdings.wait_heard`.

No I/O happens here except ``stat`` of a store file; everything is synchronous and cheap, called
from the trio thread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..download.ranges import RangeSet
from ..wire.messages import (
    DIGEST_RE,
    MAX_BLOB_BYTES,
    MAX_PIECE,
    MIN_PIECE,
    BlobEntry,
)

if TYPE_CHECKING:  # the download package pulls in httpx: a library node does not need it
    from ..download.blobs import BlobStore
    from ..store import TensorStore

#: Announcements kept per peer (the oldest are forgotten first).
MAX_HEARD_PER_PEER = 1024
#: Peers whose announcements are kept (the cluster file bounds honest clusters far below).
MAX_HEARD_PEERS = 4096


@dataclass(frozen=True, slots=True)
class Source:
    """Where the bytes of a blob held by this node are: its file and size, and the download
    writing it, if it is still in flight."""

    path: Path
    size: int
    in_flight: InFlight | None = None

    def has(self, offset: int, length: int) -> bool:
        """Is ``[offset, offset + length)`` readable now?"""
        return self.in_flight is None or self.in_flight.has(offset, length)


class InFlight:
    """A blob being downloaded by this node, served to peers as its ranges land.

    Made by :meth:`Holdings.begin`; the fetcher calls :meth:`landed` for each range once it is
    written to ``path`` and :meth:`finish` (the blob is complete and verified) or
    :meth:`abandon` (the download stopped; its bytes are no longer served) when it ends.
    """

    def __init__(self, holdings: Holdings, digest: str, size: int, path: Path, piece_size: int):
        self._holdings = holdings
        self.digest = digest
        self.size = size
        self.path = path
        self.piece_size = piece_size
        self.written = RangeSet()
        self.active = True
        #: Ended with a verified blob: every byte is in the file.
        self.verified = False
        self._changed = trio.Event()

    def landed(self, offset: int, length: int) -> None:
        """Bytes ``[offset, offset + length)`` are written to :attr:`path`: serve them, and wake
        the peers waiting for them."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"range [{offset}, {offset + length}) is outside blob {self.digest} "
                f"of {self.size} bytes"
            )
        if length:
            self.written.add(offset, offset + length)
            self._wake()

    def has(self, offset: int, length: int) -> bool:
        """Has all of ``[offset, offset + length)`` landed?"""
        return self.written.contains(offset, offset + length)

    def landed_of(self, offset: int, length: int) -> int:
        """How many bytes of ``[offset, offset + length)`` have landed."""
        return self.written.covered(offset, offset + length)

    def pieces(self) -> tuple[tuple[int, int], ...]:
        """The piece indices wholly landed, as half-open ranges."""
        out: list[tuple[int, int]] = []
        p, n = self.piece_size, -(-self.size // self.piece_size)
        for start, end in self.written:
            first = -(-start // p)  # pieces that start inside the range ...
            last = n if end == self.size else end // p  # ... and end inside it (a short last)
            if first < last:
                out.append((first, last))
        return tuple(out)

    def entry(self) -> BlobEntry:
        """This blob as the wire describes it."""
        return BlobEntry(self.digest, self.size, self.piece_size, False, self.pieces(), True)

    @property
    def waiting(self) -> int:
        """Tasks waiting for this blob's next change (peers' requests for ranges not landed)."""
        return self._changed.statistics().tasks_waiting

    async def wait_changed(self) -> None:
        """Until the next :meth:`landed`, :meth:`finish` or :meth:`abandon`."""
        await self._changed.wait()

    def finish(self, path: Path | None = None) -> None:
        """The blob is complete and verified, now at ``path`` (default: where it was written):
        from now on it is served as a complete blob."""
        if self.active:
            self.verified = True
        self._end(Source(path if path is not None else self.path, self.size))

    def abandon(self) -> None:
        """The download stopped without a verified blob: none of its bytes are served any
        more (peers waiting for a range hear ``not_found``)."""
        self._end(None)

    def _end(self, complete: Source | None) -> None:
        if self.active:
            self.active = False
            self._holdings._ended(self, complete)
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


class Holdings:
    """The node's table of blobs it can serve (complete and in flight), and of its peers'
    announcements.

    ``blobs`` is the daemon's blob store (a library node without a store passes None: only
    blobs registered with :meth:`add` or begun with :meth:`begin` are served).
    ``piece_size`` is the piece size entries of complete blobs are described with
    (``downloads.piece_size``).
    """

    def __init__(self, blobs: BlobStore | None, piece_size: int = 4 << 20) -> None:
        if not MIN_PIECE <= piece_size <= MAX_PIECE:
            raise ValueError(f"piece size {piece_size} is outside {MIN_PIECE}..{MAX_PIECE}")
        self.blobs = blobs
        self.piece_size = piece_size
        self._complete: dict[str, Source] = {}
        self._in_flight: dict[str, InFlight] = {}
        self._heard: dict[str, dict[str, BlobEntry]] = {}
        self._heard_changed = trio.Event()

    @classmethod
    def for_store(cls, store: TensorStore | None, piece_size: int) -> Holdings:
        """The table of a node: over the daemon's model blobs (``<store>/models``, where its
        download manager keeps them) with a store, else empty."""
        if store is None:
            return cls(None, piece_size)
        from ..download.blobs import BlobStore

        return cls(BlobStore(store.root / "models"), piece_size)

    # -- what the fetcher calls ----------------------------------------------------------------

    def begin(self, digest: str, size: int, path: Path, piece_size: int | None = None) -> InFlight:
        """A download of blob ``digest`` (``size`` bytes) into ``path`` starts: its ranges are
        served as they land. Replaces an earlier download of the same blob (which is abandoned)."""
        _check_digest(digest)
        if not 0 <= size <= MAX_BLOB_BYTES:
            raise ValueError(f"blob size {size} is outside 0..{MAX_BLOB_BYTES}")
        old = self._in_flight.get(digest)
        if old is not None:
            old.abandon()
        flight = InFlight(self, digest, size, path, piece_size or self.piece_size)
        self._in_flight[digest] = flight
        return flight

    def add(self, digest: str, path: Path, size: int | None = None) -> None:
        """Serve the complete, verified blob at ``path`` (a blob outside the store)."""
        _check_digest(digest)
        self._complete[digest] = Source(path, path.stat().st_size if size is None else size)

    def in_flight(self, digest: str) -> InFlight | None:
        """This node's download of ``digest`` running now, if any."""
        return self._in_flight.get(digest)

    # -- what the piece server calls -----------------------------------------------------------

    def source(self, digest: str) -> Source | None:
        """Where this node's bytes of ``digest`` are, or None if it holds none of them."""
        flight = self._in_flight.get(digest)
        if flight is not None:
            return Source(flight.path, flight.size, flight)
        known = self._complete.get(digest)
        if known is not None:
            return known
        if self.blobs is None:
            return None
        path = self.blobs.path(digest)
        try:
            st = os.stat(path)
        except OSError:
            return None
        return Source(path, st.st_size)

    def entry(self, digest: str) -> BlobEntry | None:
        """What this node holds of ``digest``, as the wire describes it."""
        src = self.source(digest)
        if src is None:
            return None
        if src.in_flight is not None:
            return src.in_flight.entry()
        return BlobEntry.whole(digest, src.size, self.piece_size)

    # -- announcements from peers --------------------------------------------------------------

    def remember(self, peer: str, entry: BlobEntry) -> None:
        """Peer ``peer`` announced ``entry`` (bounded: the oldest are forgotten first)."""
        if peer not in self._heard and len(self._heard) >= MAX_HEARD_PEERS:
            del self._heard[next(iter(self._heard))]
        mine = self._heard.setdefault(peer, {})
        mine.pop(entry.digest, None)
        mine[entry.digest] = entry
        while len(mine) > MAX_HEARD_PER_PEER:
            del mine[next(iter(mine))]
        self._heard_changed.set()
        self._heard_changed = trio.Event()

    def heard(self, digest: str) -> dict[str, BlobEntry]:
        """The latest announcement of ``digest`` from each peer that made one."""
        return {p: e[digest] for p, e in self._heard.items() if digest in e}

    def forget(self, peer: str) -> None:
        """Drop what ``peer`` announced (it left the cluster, or restarted)."""
        self._heard.pop(peer, None)

    async def wait_heard(self) -> None:
        """Until the next announcement from any peer."""
        await self._heard_changed.wait()

    def _ended(self, flight: InFlight, complete: Source | None) -> None:
        if self._in_flight.get(flight.digest) is flight:
            del self._in_flight[flight.digest]
            if complete is not None:
                self._complete[flight.digest] = complete


def _check_digest(digest: str) -> None:
    if not DIGEST_RE.match(digest):
        raise ValueError(f"bad digest {digest[:80]!r}: expected sha256:<64 hex digits>")


__all__ = ["Holdings", "InFlight", "Source"]
