"""Peer-first downloads on the trio side: a blob fetch's peer sources
(:class:`~tensord.download.sources.PeerSources`) over the node's authenticated connections.

When a fetch of blob ``D`` starts (:meth:`Sharing.open`), this node registers it in its
:class:`~tensord.cluster.holdings.Holdings` (so peers can read its ranges as they land), then
tells every live peer "I am fetching D" (``announce``) and asks what it holds of D (``query``).
Announcing *before* asking is what makes nodes that start the same pull at the same moment find
each other: of any two, the one that asks last sees the other, and the other hears of it through
the announcement (read from ``Holdings.heard`` before every piece). From there the sans-I/O
:class:`~tensord.cluster.planner.BlobPlan` says where each piece comes from; a piece owned by a
peer still fetching it is requested from that peer at once - its piece server answers when the
range lands there. A peer that fails (unreachable, corrupt chunk, crawling past
:data:`MIN_PEER_RATE`, or not landing a piece it owns within its wait three times) is skipped for
the blob and its pieces re-planned.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Collection, Set
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Protocol

import trio

from ..download.ranges import RangeSet
from ..download.sources import BlobPeers, PeerSources, Piece
from ..node import TensorNode
from ..wire.messages import BlobEntry
from . import piece_client
from .holdings import Holdings, InFlight
from .piece_client import PieceUnavailable
from .piece_server import NOT_YET_WAIT
from .planner import BlobPlan, Origin, PeerHolding, Take, piece_range

#: The schedule's queues: what a peer holds, this node's own pieces, pieces peers that may
#: join would own, pieces an owner is fetching.
TAKE, MINE, OTHERS, WAIT = range(4)

__all__ = ["BlobShare", "NodePieces", "PieceNetwork", "Sharing"]

log = logging.getLogger("tensord.download")

#: A peer slower than this for a piece is crawling: the piece goes to the next source.
MIN_PEER_RATE = 1 << 20
#: A peer that answers ``not_yet`` this many times in a row for pieces it owns is too slow
#: (``not_yet``: nothing of the piece landed there for :data:`NOT_YET_WAIT`; answers that
#: arrive together, from several waits at once, count once).
MAX_NOT_YET = 3
#: How long a node leaves for the peers that may join a fetch (live, speaking ``pieces``, not
#: yet heard from) the pieces they would own, before it fetches them itself: nodes told to pull
#: "at the same moment" start a CLI, resolve a manifest and reach the blob up to a second or two
#: apart, and a piece both read from the origin is the waste this is for. It ends early once
#: every such peer is a participant, a holder or failed; a node pulling alone pays it only when
#: its own pieces take less than this.
JOIN_GRACE = 2.0


class PieceNetwork(Protocol):
    """What sharing needs of the node: its id, its holdings and the three piece calls."""

    node_id: str
    holdings: Holdings
    io_timeout: float

    async def query(self, peer: str, digest: str) -> BlobEntry | None: ...

    async def announce(self, peer: str, entry: BlobEntry) -> None: ...

    async def fetch_range(self, peer: str, digest: str, offset: int, into: memoryview) -> None: ...


class NodePieces:
    """:class:`PieceNetwork` over a running :class:`TensorNode` (:mod:`.piece_client`)."""

    def __init__(self, node: TensorNode) -> None:
        self.node = node
        self.node_id = node.node_id
        self.holdings = node.holdings
        self.io_timeout = node.settings.transfer.io_timeout

    async def query(self, peer: str, digest: str) -> BlobEntry | None:
        return (await piece_client.query(self.node, peer, [digest])).get(digest)

    async def announce(self, peer: str, entry: BlobEntry) -> None:
        await piece_client.announce(self.node, peer, entry)

    async def fetch_range(self, peer: str, digest: str, offset: int, into: memoryview) -> None:
        await piece_client.fetch_range(self.node, peer, digest, offset, len(into), into)


class Sharing(PeerSources):
    """The cluster as a source of blob pieces. ``live_peers`` names the peers up now;
    ``enabled`` is ``downloads.share`` (read at each download: a reload may change it; None =
    on when there are peers)."""

    def __init__(
        self,
        network: PieceNetwork,
        live_peers: Callable[[], Collection[str]],
        enabled: Callable[[], bool | None],
        piece_size: int,
    ) -> None:
        self.network = network
        self.live_peers = live_peers
        self.enabled = enabled
        self.piece_size = piece_size

    def available(self) -> bool:
        return self.enabled() is not False and bool(self.live_peers())

    def open(
        self, digest: str, size: int, path: Path, done: RangeSet
    ) -> AbstractAsyncContextManager[BlobPeers]:
        return self._open(digest, size, path, done)

    @asynccontextmanager
    async def _open(
        self, digest: str, size: int, path: Path, done: RangeSet
    ) -> AsyncIterator[BlobPeers]:
        flight = self.network.holdings.begin(digest, size, path, self.piece_size)
        share = BlobShare(self.network, flight, self.live_peers, done)
        try:
            for start, end in done:
                share.landed(start, end - start)
            await share.meet_peers()
            yield share
        finally:
            if flight.active:
                flight.abandon()


class BlobShare(BlobPeers):
    """One blob's sharing while this node fetches it (see the module docstring)."""

    def __init__(
        self,
        network: PieceNetwork,
        flight: InFlight,
        live_peers: Callable[[], Collection[str]],
        done: RangeSet,
    ) -> None:
        self.network = network
        self.flight = flight
        self.live_peers = live_peers
        self.done = done
        self.digest = flight.digest
        self.size = flight.size
        self.piece_size = flight.piece_size
        self.plan = BlobPlan(self.digest, self.size, self.piece_size, network.node_id)
        #: The announcement of each peer already taken into the plan.
        self._heard: dict[str, BlobEntry] = {}
        self._not_yet: Counter[str] = Counter()
        self._not_yet_at: dict[str, float] = {}
        self._changed = trio.Event()
        # A blob of one piece is not worth the wait: read twice, it costs one piece at most.
        grace = JOIN_GRACE if self.plan.count > 1 else 0.0
        self._grace_ends = trio.current_time() + grace
        self._schedule_key: tuple[int, frozenset[str]] | None = None
        #: Peers that speak the pieces feature (they answered): who may join the fetch.
        self._capable: set[str] = set()
        self._queues: list[deque[tuple[int, str | None]]] = []

    # -- meeting the peers -------------------------------------------------------------------

    async def meet_peers(self) -> None:
        """Announce this fetch to every live peer, then ask each what it holds. Bounded: a
        peer that does not answer in ``io_timeout`` is not a source (it may still announce)."""
        entry = self.flight.entry()
        # What peers announced before now is older than what they answer now: only later
        # announcements (peers that start after this) are news.
        self._heard = dict(self.network.holdings.heard(self.digest))
        with trio.move_on_after(self.network.io_timeout):
            async with trio.open_nursery() as nursery:
                for peer in self.live_peers():
                    nursery.start_soon(self._meet, peer, entry)

    async def _meet(self, peer: str, entry: BlobEntry) -> None:
        try:
            await self.network.announce(peer, entry)
            got = await self.network.query(peer, self.digest)
        except Exception as exc:  # a peer is a trust boundary: it is just not a source
            log.info("share %s: peer %s is not a source: %s", self.digest, peer, exc)
            return
        self._capable.add(peer)
        self._learn(peer, got)

    def _learn(self, peer: str, entry: BlobEntry | None) -> None:
        if entry is None or entry.size != self.size:
            self.plan.update(peer, None)
            return
        if entry.complete:
            self.plan.update(peer, PeerHolding(complete=True, fetching=False))
            return
        ranges = [
            (first * entry.piece_size, min(self.size, last * entry.piece_size))
            for first, last in entry.pieces
        ]
        holding = PeerHolding.from_ranges(
            ranges, self.size, self.piece_size, fetching=entry.fetching
        )
        self.plan.update(peer, holding)

    def _refresh(self) -> None:
        """Peers that announced this blob since (even those that had nothing when asked: they
        started after): participants; peers no longer up: not."""
        live = set(self.live_peers())
        for peer, entry in self.network.holdings.heard(self.digest).items():
            if peer in live and self._heard.get(peer) is not entry:
                self._heard[peer] = entry
                self._capable.add(peer)
                self._learn(peer, entry)
        self.plan.prospects = live & self._capable
        for peer in list(self.plan.holdings):
            if peer not in live:
                self.plan.update(peer, None)

    # -- BlobPeers -----------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self.plan.complete

    def next_piece(self, busy: Set[int], *, origin: bool) -> Piece | None:
        self._refresh()
        self._reschedule()
        done = self.plan.done
        for n in (MINE, OTHERS) if origin else (TAKE, WAIT):
            if n == OTHERS and not self._others_may_go():
                continue
            queue = self._queues[n]
            while queue and queue[0][0] in done:
                queue.popleft()
            for index, peer in queue:  # past the busy ones (at most one per connection)
                if index not in busy and index not in done:
                    return self._piece(index, peer)
        return None

    def _reschedule(self) -> None:
        """Sort the missing pieces into the order they are fetched in, again only when the plan
        changed (a peer's news, a failure), not at every piece: first what a peer holds, then
        what this node would own with every live peer in (from the end), then what another
        node may soon own (from the start), last what an owner is still fetching.

        Why those two directions: a node that began alone works from the start on the pieces
        of the nodes that join, and they fetch their own from the end, so the two meet only
        once - at most the pieces in flight at that moment are read twice from the origin."""
        key = (self.plan.version, frozenset(self.plan.prospects))
        if key == self._schedule_key:
            return
        self._schedule_key = key
        take: list[tuple[int, str | None]] = []
        mine: list[tuple[int, str | None]] = []
        others: list[tuple[int, str | None]] = []
        wait: list[tuple[int, str | None]] = []
        for i in self.plan.missing():
            action = self.plan.action(i)
            if isinstance(action, Take):
                take.append((i, action.peer))
            elif isinstance(action, Origin):
                expected = self.plan.expected_owner(i)
                (mine if expected == self.plan.node_id else others).append((i, None))
            elif action is not None:
                wait.append((i, action.owner))
        # Owners fetch their own pieces from the end (above): ask for theirs in that order too,
        # or the first piece asked for is the last its owner fetches, and the wait for it runs
        # out (``not_yet``) while the owner is busy with the ones nobody asked for yet.
        mine.reverse()
        wait.reverse()
        self._queues = [deque(take), deque(mine), deque(others), deque(wait)]

    def needs_origin(self, busy: Set[int]) -> bool:
        self._refresh()
        self._reschedule()
        done = self.plan.done
        for queue in (self._queues[MINE], self._queues[OTHERS]):
            while queue and queue[0][0] in done:
                queue.popleft()
            if any(index not in busy and index not in done for index, _ in queue):
                return True
        return False

    def _piece(self, index: int, peer: str | None) -> Piece:
        start, end = piece_range(index, self.size, self.piece_size)
        return Piece(index, start, end, peer)

    async def changed(self) -> None:
        if self._queues and self._queues[OTHERS] and not self._others_may_go():
            with trio.move_on_at(self._grace_ends):  # then the others' pieces may go
                await self._changed.wait()
            return
        await self._changed.wait()

    def _others_may_go(self) -> bool:
        """May this node fetch the pieces peers that have not joined yet would own? After
        :data:`JOIN_GRACE`, or once every prospect has shown up (or failed)."""
        if trio.current_time() >= self._grace_ends:
            return True
        plan = self.plan
        return all(
            p in plan.participants or p in plan.holdings or p in plan.failed for p in plan.prospects
        )

    async def fetch(self, peer: str, offset: int, into: memoryview) -> None:
        limit = 2 * self.network.io_timeout + NOT_YET_WAIT + len(into) / MIN_PEER_RATE
        with trio.fail_after(limit):
            await self.network.fetch_range(peer, self.digest, offset, into)
        self._not_yet[peer] = 0

    def fail(self, peer: str, error: Exception) -> None:
        if isinstance(error, PieceUnavailable) and error.code == "not_yet":
            # Several workers' waits on one owner run out together: one round, counted once.
            now = trio.current_time()
            if now - self._not_yet_at.get(peer, -NOT_YET_WAIT) >= NOT_YET_WAIT / 2:
                self._not_yet[peer] += 1
                self._not_yet_at[peer] = now
            if self._not_yet[peer] < MAX_NOT_YET:
                self._wake()
                return
        if isinstance(error, trio.TooSlowError):
            why = "crawling: a piece took longer than its bound"
        else:
            why = str(error) or type(error).__name__
        if peer not in self.plan.failed:
            log.warning("share %s: skipping peer %s for this blob: %s", self.digest, peer, why)
        self.plan.fail(peer, why)
        self._wake()

    def landed(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        self.flight.landed(offset, length)
        first = offset // self.piece_size
        last = (offset + length - 1) // self.piece_size
        for i in range(first, last + 1):
            start, end = piece_range(i, self.size, self.piece_size)
            if self.done.contains(start, end):
                self.plan.landed(i)
        self._wake()

    def finished(self, path: Path) -> None:
        self.flight.finish(path)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
