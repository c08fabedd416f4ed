"""Who fetches each piece of a blob from the origin: highest-random-weight (rendezvous) hashing.

Every node that fetches a blob computes, for each piece, a weight per participant from
``(digest, piece, node)`` and the heaviest node owns the piece. Nodes that agree on the
participants agree on every owner without talking (no tracker), each participant owns about
``1/N`` of the pieces, and when a participant leaves only *its* pieces move (each to the node
that was second for it) - so a node that dies mid-pull re-plans the least work. Sans-I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

__all__ = ["owner", "ranked", "weight"]


def weight(digest: str, piece_index: int, node_id: str) -> int:
    """The node's weight for this piece: 64 bits of BLAKE2b, the same on every machine."""
    h = hashlib.blake2b(digest_size=8)
    # Lengths first, so no two different triples hash the same bytes.
    key = f"{len(digest)}:{digest}|{piece_index}|{len(node_id)}:{node_id}"
    h.update(key.encode())
    return int.from_bytes(h.digest(), "big")


def ranked(digest: str, piece_index: int, participants: Iterable[str]) -> list[str]:
    """The participants, heaviest first: the owner, then who takes over if it is gone."""
    # Ties (2^-64) are broken by the id, so the order is total and the same everywhere.
    return sorted(
        set(participants), key=lambda n: (weight(digest, piece_index, n), n), reverse=True
    )


def owner(digest: str, piece_index: int, participants: Iterable[str]) -> str:
    """The node that fetches piece ``piece_index`` of ``digest`` from the origin."""
    best: tuple[int, str] | None = None
    for node in participants:
        key = (weight(digest, piece_index, node), node)
        if best is None or key > best:
            best = key
    if best is None:
        raise ValueError("no participants: someone must own the piece")
    return best[1]
