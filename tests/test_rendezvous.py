"""Rendezvous hashing: stable, about 1/N of the pieces each, and a leaver moves only its own."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from tensord.cluster.rendezvous import owner, ranked, weight

node_ids = st.lists(
    st.text(alphabet="abcdefghij0123456789-", min_size=1, max_size=12),
    min_size=1,
    max_size=12,
    unique=True,
)
digests = st.from_regex(r"sha256:[0-9a-f]{64}", fullmatch=True)


def test_weights_are_fixed_across_runs_and_machines() -> None:
    # A constant: every node of a cluster, whatever its Python, must compute the same owner.
    assert weight("sha256:00", 0, "a") == weight("sha256:00", 0, "a")
    assert owner("sha256:ab", 3, ["a", "b", "c"]) == owner("sha256:ab", 3, ["c", "b", "a"])


@given(digests, node_ids, st.integers(0, 10_000))
def test_the_owner_does_not_depend_on_the_order_of_the_participants(
    digest: str, nodes: list[str], piece: int
) -> None:
    assert owner(digest, piece, nodes) == owner(digest, piece, list(reversed(nodes)))
    assert ranked(digest, piece, nodes)[0] == owner(digest, piece, nodes)


@settings(max_examples=25, deadline=None)
@given(digests, st.integers(2, 8))
def test_each_participant_owns_about_one_nth_of_the_pieces(digest: str, n: int) -> None:
    nodes = [f"node-{i}" for i in range(n)]
    pieces = 4000
    owned = Counter(owner(digest, i, nodes) for i in range(pieces))
    assert set(owned) == set(nodes)
    fair = pieces / n
    # Binomial: 6 standard deviations either side is never hit by a fair hash.
    spread = 6 * (pieces * (1 / n) * (1 - 1 / n)) ** 0.5
    for node in nodes:
        assert abs(owned[node] - fair) < spread, (node, owned[node], fair)


@settings(max_examples=50, deadline=None)
@given(digests, node_ids.filter(lambda n: len(n) >= 2), st.data())
def test_removing_a_participant_moves_only_its_pieces(
    digest: str, nodes: list[str], data: st.DataObject
) -> None:
    gone = data.draw(st.sampled_from(nodes))
    rest = [n for n in nodes if n != gone]
    for piece in range(300):
        before = owner(digest, piece, nodes)
        after = owner(digest, piece, rest)
        if before != gone:
            assert after == before
        else:
            # ... to the node that was second for it.
            assert after == ranked(digest, piece, nodes)[1]
