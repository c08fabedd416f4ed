"""The piece planner: with nodes that agree on the participants, each piece is read from the
origin once across the cluster; what a live peer holds is never read from the origin; failed
sources are never read from and their pieces are re-planned."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensord.cluster.planner import (
    BlobPlan,
    Origin,
    PeerHolding,
    Take,
    Wait,
    piece_count,
    piece_range,
)

DIGEST = "sha256:" + "ab" * 32


def cluster(n: int, size: int, piece: int) -> dict[str, BlobPlan]:
    """``n`` nodes starting the same pull together, each knowing all the others take part."""
    ids = [f"n{i}" for i in range(n)]
    plans = {i: BlobPlan(DIGEST, size, piece, i) for i in ids}
    for me, plan in plans.items():
        for other in ids:
            if other != me:
                plan.update(other, PeerHolding())
    return plans


def share_news(plans: dict[str, BlobPlan], alive: set[str]) -> None:
    """Every live node tells every other what it holds (perfect, instant gossip)."""
    for me, plan in plans.items():
        for other in alive:
            if other != me:
                plan.update(other, PeerHolding(pieces=frozenset(plans[other].done)))


def run(plans: dict[str, BlobPlan], kill: str | None = None, at: int = -1) -> Counter[int]:
    """Rounds of every node doing what its plan says; returns origin reads per piece."""
    origin: Counter[int] = Counter()
    alive = set(plans)
    for step in range(10_000):
        if step == at and kill is not None:
            alive.discard(kill)
            for p in alive:
                plans[p].fail(kill, "died")
        share_news(plans, alive)
        if all(plans[p].complete for p in alive):
            return origin
        progress = False
        for me in sorted(alive):
            plan = plans[me]
            for i, action in plan.plan().items():
                if isinstance(action, Origin):
                    origin[i] += 1
                elif isinstance(action, Take):
                    assert action.peer in alive and i in plans[action.peer].done
                else:
                    assert isinstance(action, Wait) and action.owner in alive
                    continue
                plan.landed(i)
                progress = True
        assert progress or step == at, "nobody could move: the plans disagree"
    raise AssertionError("the pull never finished")


def test_pieces_and_their_ranges() -> None:
    assert piece_count(0, 4) == 0
    assert piece_count(9, 4) == 3
    assert piece_range(2, 9, 4) == (8, 9)
    with pytest.raises(ValueError):
        piece_range(3, 9, 4)


def test_holding_from_ranges_counts_whole_pieces_only() -> None:
    h = PeerHolding.from_ranges([(0, 5), (8, 9)], 9, 4)
    assert h.pieces == {0, 2} and not h.complete
    assert PeerHolding.from_ranges([(0, 9)], 9, 4).complete


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.integers(1, 200), st.integers(1, 16))
def test_nodes_starting_together_read_each_piece_from_the_origin_once(
    n: int, pieces: int, piece: int
) -> None:
    size = pieces * piece - (piece // 2)  # a short last piece
    size = max(size, 1)
    plans = cluster(n, size, piece)
    first = {me: plan.plan() for me, plan in plans.items()}
    for i in range(piece_count(size, piece)):
        fetchers = [me for me, p in first.items() if isinstance(p[i], Origin)]
        assert len(fetchers) == 1
        assert all(p[i] == Wait(fetchers[0]) for me, p in first.items() if me != fetchers[0])
    origin = run(plans)
    assert origin == Counter(range(piece_count(size, piece)))


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(1, 60), st.data())
def test_a_node_that_dies_mid_pull_costs_at_most_its_unshared_pieces(
    n: int, pieces: int, data: st.DataObject
) -> None:
    plans = cluster(n, pieces * 4, 4)
    victim = data.draw(st.sampled_from(sorted(plans)))
    at = data.draw(st.integers(0, 3))
    origin = run(plans, kill=victim, at=at)
    # Nothing is read from the origin twice, except pieces only the dead node had: those are
    # read again by exactly one survivor.
    assert max(origin.values(), default=0) <= 2
    assert set(origin) == set(range(pieces))


def test_what_a_live_peer_holds_is_taken_from_it_never_from_the_origin() -> None:
    plan = BlobPlan(DIGEST, 40, 4, "me")
    plan.update("seed", PeerHolding(complete=True))
    plan.update("half", PeerHolding(pieces=frozenset(range(5))))
    actions = plan.plan()
    assert all(isinstance(a, Take) for a in actions.values())
    # Pieces both hold are spread over both.
    assert {a.peer for i, a in actions.items() if i < 5 and isinstance(a, Take)} == {
        "seed",
        "half",
    }


def test_a_failed_source_is_never_read_and_its_pieces_go_to_the_next_holder_or_origin() -> None:
    plan = BlobPlan(DIGEST, 40, 4, "me")
    plan.update("bad", PeerHolding(complete=True))
    plan.update("ok", PeerHolding(pieces=frozenset({0, 1})))
    plan.fail("bad", "served a corrupt piece")
    actions = plan.plan()
    assert actions[0] == Take("ok") and actions[1] == Take("ok")
    # "bad" owned nothing any more: the rest is split between this node and "ok" (fetching).
    assert all(a in (Origin(), Wait("ok")) for i, a in actions.items() if i > 1)
    assert "bad" not in {getattr(a, "peer", getattr(a, "owner", None)) for a in actions.values()}


def test_a_peer_that_stops_fetching_stops_owning_pieces() -> None:
    plan = BlobPlan(DIGEST, 400, 4, "me")
    plan.update("other", PeerHolding())
    assert any(isinstance(a, Wait) for a in plan.plan().values())
    plan.update("other", None)
    assert all(isinstance(a, Origin) for a in plan.plan().values())


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 6), st.integers(1, 80))
def test_pieces_a_node_reads_first_alone_are_its_own_once_the_others_join(
    n: int, pieces: int
) -> None:
    """A node that starts alone but knows its live peers (prospects) fetches first the pieces it
    will still own when they join: those reads are never wasted."""
    ids = [f"n{i}" for i in range(n)]
    alone = BlobPlan(DIGEST, pieces * 4, 4, "n0", prospects=set(ids[1:]))
    together = cluster(n, pieces * 4, 4)["n0"]
    for i in range(pieces):
        assert alone.action(i) == Origin()  # alone, it owns everything ...
        mine_later = together.action(i) == Origin()
        assert (alone.expected_owner(i) == "n0") == mine_later  # ... and knows what stays its


def test_a_peer_that_holds_the_blob_but_fetches_nothing_owns_no_piece() -> None:
    plan = BlobPlan(DIGEST, 40, 4, "me")
    plan.update("seed", PeerHolding(complete=True, fetching=False))
    plan.update("stopped", PeerHolding(pieces=frozenset({0}), fetching=False))
    assert plan.live == {"me"}
    assert plan.action(0) in (Take("seed"), Take("stopped")) and plan.action(5) == Take("seed")
