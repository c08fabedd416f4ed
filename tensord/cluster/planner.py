"""Where each piece of one blob comes from: a peer that has it, the peer fetching it, or the origin.

Sans-I/O (no trio, no sockets): :class:`BlobPlan` is fed what this node learned - who takes
part in fetching the blob, what each peer holds, which pieces landed here, which sources failed -
and answers, per piece, one :data:`Action`:

* :class:`Take` - a live peer holds the whole piece: read it from that peer. Among several
  holders the piece's rendezvous order picks one, so the load spreads over holders.
* :class:`Wait` - nobody has it yet and another participant owns it (rendezvous hashing of
  digest and piece over the live participants): it is fetching that piece from the origin, and
  this node takes it from there once it has landed.
* :class:`Origin` - this node owns the piece, so it fetches it from the origin itself.

A source that dies, crawls or serves a piece that fails verification is marked failed for this
blob (:meth:`BlobPlan.fail`): it is never read from again, and the pieces it owned move to the
next participant in their rendezvous order - the same one on every node that saw the failure,
so even after a failure each piece is fetched from the origin once. A node that waits too long
for a piece fails the owner itself (the caller decides what "too long" is), so a peer that is
slow only for this node costs at worst one more origin fetch of its pieces, never a stall.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .rendezvous import owner, ranked

__all__ = [
    "Action",
    "BlobPlan",
    "Origin",
    "PeerHolding",
    "Take",
    "Wait",
    "piece_count",
    "piece_range",
]


def piece_count(size: int, piece_size: int) -> int:
    """How many pieces a blob of ``size`` bytes has (an empty blob has none)."""
    if piece_size <= 0:
        raise ValueError(f"piece size must be positive, not {piece_size}")
    return -(-size // piece_size)


def piece_range(index: int, size: int, piece_size: int) -> tuple[int, int]:
    """Piece ``index`` as a half-open byte range ``[start, end)`` (the last may be short)."""
    start = index * piece_size
    if index < 0 or start >= size:
        raise ValueError(f"piece {index} is outside a blob of {size} bytes")
    return start, min(size, start + piece_size)


@dataclass(frozen=True)
class PeerHolding:
    """What a peer holds of the blob: all of it, or some whole pieces; ``fetching`` says more
    are arriving (the peer takes part in fetching the blob, so it owns pieces)."""

    complete: bool = False
    pieces: frozenset[int] = frozenset()
    fetching: bool = True

    def has(self, index: int) -> bool:
        return self.complete or index in self.pieces

    @classmethod
    def from_ranges(
        cls,
        ranges: Iterable[tuple[int, int]],
        size: int,
        piece_size: int,
        *,
        fetching: bool = True,
    ) -> PeerHolding:
        """The whole pieces covered by byte ranges ``[start, end)`` (a partly landed piece
        does not count: it cannot be read whole yet)."""
        held: set[int] = set()
        count = piece_count(size, piece_size)
        for start, end in ranges:
            start, end = max(0, start), min(size, end)
            first = -(-start // piece_size)
            for i in range(first, count):
                s, e = piece_range(i, size, piece_size)
                if e > end:
                    break
                if s >= start:
                    held.add(i)
        if count and len(held) == count:
            return cls(complete=True, fetching=False)
        return cls(pieces=frozenset(held), fetching=fetching)


@dataclass(frozen=True)
class Take:
    """Read the piece from ``peer``, which has all of it."""

    peer: str


@dataclass(frozen=True)
class Wait:
    """``owner`` is fetching the piece from the origin: take it from there once it lands."""

    owner: str


@dataclass(frozen=True)
class Origin:
    """Fetch the piece from the origin (this node owns it)."""


Action = Take | Wait | Origin
ORIGIN = Origin()


@dataclass
class BlobPlan:
    """The plan of one blob on this node (``node_id``); see the module docstring."""

    digest: str
    size: int
    piece_size: int
    node_id: str
    #: Peers fetching or holding the blob (this node is always a participant).
    participants: set[str] = field(default_factory=set)
    holdings: dict[str, PeerHolding] = field(default_factory=dict)
    #: Sources not to read from again for this blob, with why.
    failed: dict[str, str] = field(default_factory=dict)
    #: Pieces landed here.
    done: set[int] = field(default_factory=set)
    #: Peers that are up and may start fetching the blob any moment (not yet participants).
    prospects: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.count = piece_count(self.size, self.piece_size)
        #: Changes whenever an answer could change (not when a piece lands here): callers that
        #: keep a schedule rebuild it only then.
        self.version = 0
        # Owners depend only on the live set: computed once per set, not per question.
        self._owners: dict[int, str] = {}
        self._owners_of: frozenset[str] = frozenset()
        self._expected: dict[int, str] = {}
        self._expected_of: frozenset[str] = frozenset()

    # -- what the node learns ----------------------------------------------------------------

    def update(self, peer: str, holding: PeerHolding | None) -> None:
        """A peer's answer: what it holds of the blob (``None``: nothing, and not fetching it -
        it stops being a participant)."""
        if peer == self.node_id:
            return
        self.version += 1
        if holding is None:
            self.participants.discard(peer)
            self.holdings.pop(peer, None)
            return
        if holding.fetching:
            self.participants.add(peer)
        else:  # complete, or stopped: a source, but it fetches nothing more
            self.participants.discard(peer)
        self.holdings[peer] = holding

    def fail(self, peer: str, why: str) -> None:
        """Never read from ``peer`` again for this blob; its pieces are re-planned."""
        if peer != self.node_id and peer not in self.failed:
            self.failed[peer] = why
            self.version += 1

    def landed(self, index: int) -> None:
        self.done.add(index)

    # -- what the node does ------------------------------------------------------------------

    @property
    def live(self) -> set[str]:
        """The participants that own pieces: this node and the peers not failed."""
        return {p for p in self.participants if p not in self.failed} | {self.node_id}

    def action(self, index: int) -> Action | None:
        """Where piece ``index`` comes from, or ``None`` if it is here already."""
        if index in self.done:
            return None
        holders = [p for p, h in self.holdings.items() if p not in self.failed and h.has(index)]
        if holders:
            return Take(ranked(self.digest, index, holders)[0])
        who = self.owner(index)
        return ORIGIN if who == self.node_id else Wait(who)

    def owner(self, index: int) -> str:
        """The live participant that fetches piece ``index`` from the origin."""
        live = frozenset(self.live)
        if live != self._owners_of:
            self._owners, self._owners_of = {}, live
        who = self._owners.get(index)
        if who is None:
            who = self._owners[index] = owner(self.digest, index, live)
        return who

    def expected_owner(self, index: int) -> str:
        """The owner of piece ``index`` should every prospect join: a node that fetches its own
        expected pieces first has fetched nothing twice when peers that start a moment later
        take their share (until then it owns everything, so it fetches the rest after)."""
        everyone = frozenset(self.live | (self.prospects - self.failed.keys()))
        if everyone != self._expected_of:
            self._expected, self._expected_of = {}, everyone
        who = self._expected.get(index)
        if who is None:
            who = self._expected[index] = owner(self.digest, index, everyone)
        return who

    def plan(self) -> dict[int, Action]:
        """Every missing piece's action."""
        out: dict[int, Action] = {}
        for i in range(self.count):
            a = self.action(i)
            if a is not None:
                out[i] = a
        return out

    def missing(self) -> Iterator[int]:
        return (i for i in range(self.count) if i not in self.done)

    @property
    def complete(self) -> bool:
        return len(self.done) >= self.count
