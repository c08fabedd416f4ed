"""What a blob fetch asks of the cluster when peers may have the blob (peer-first downloads).

The download package does not know the cluster: it sees these two interfaces, and
:mod:`tensord.cluster.sharing` implements them over the node's peer connections (dependencies
point down: cluster/ uses download/, never the other way round). A fetch given a
:class:`PeerSources` that is :meth:`~PeerSources.available` opens a :class:`BlobPeers` for its
blob and asks it, piece after piece, where the next piece comes from.
"""

from __future__ import annotations

from collections.abc import Set
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .ranges import RangeSet


@dataclass(frozen=True)
class Piece:
    """Piece ``index`` of the blob, bytes ``[start, end)``, to read from ``peer`` (a peer that
    has it or is fetching it from the origin), or from the origin when ``peer`` is None."""

    index: int
    start: int
    end: int
    peer: str | None


class BlobPeers(Protocol):
    """One blob's peer sources for the duration of one fetch of it."""

    @property
    def complete(self) -> bool:
        """Has every piece landed here?"""
        ...

    def next_piece(self, busy: Set[int], *, origin: bool) -> Piece | None:
        """The next piece to fetch from the origin (``origin``) or from a peer, not one in
        ``busy`` (being fetched); None when there is none now (wait for :meth:`changed`)."""
        ...

    async def changed(self) -> None:
        """Until something lands here or a source fails."""
        ...

    def needs_origin(self, busy: Set[int]) -> bool:
        """Would this node still fetch a missing piece, not in ``busy``, from the origin as
        things stand (a peer's failure may add some back)?"""
        ...

    async def fetch(self, peer: str, offset: int, into: memoryview) -> None:
        """Read ``len(into)`` bytes at ``offset`` from ``peer`` straight into ``into``. Raises
        on any failure; the caller then calls :meth:`fail`."""
        ...

    def fail(self, peer: str, error: Exception) -> None:
        """``peer`` failed a fetch: skip it (for this blob) if the error says so."""
        ...

    def landed(self, offset: int, length: int) -> None:
        """Bytes ``[offset, offset + length)`` are written to the partial file (peers may read
        them now)."""
        ...

    def finished(self, path: Path) -> None:
        """The blob is verified and committed at ``path``."""
        ...


class PeerSources(Protocol):
    """The cluster as a source of blob pieces."""

    piece_size: int

    def available(self) -> bool:
        """Is sharing on and is any peer up to share with?"""
        ...

    def open(
        self, digest: str, size: int, path: Path, done: RangeSet
    ) -> AbstractAsyncContextManager[BlobPeers]:
        """Begin sharing blob ``digest`` (``size`` bytes, arriving in the partial file ``path``
        with ``done`` already there): tell the peers, learn what they hold. On exit without
        :meth:`BlobPeers.finished` what landed stops being offered."""
        ...


__all__ = ["BlobPeers", "PeerSources", "Piece"]
