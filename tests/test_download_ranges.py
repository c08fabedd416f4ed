"""RangeSet arithmetic, property-tested against a plain set of byte offsets."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tensord.download.ranges import RangeSet, guided_pieces, split_pieces, steal_point

SIZE = 200
ranges = st.lists(
    st.tuples(st.integers(0, SIZE), st.integers(0, SIZE)).map(lambda t: (min(t), max(t))),
    max_size=20,
)


def as_bytes(rs: RangeSet) -> set[int]:
    return {i for s, e in rs for i in range(s, e)}


@given(ranges)
def test_add_matches_a_set_of_offsets(items: list[tuple[int, int]]) -> None:
    rs = RangeSet(items)
    expected = {i for s, e in items for i in range(s, e)}
    assert as_bytes(rs) == expected
    assert rs.total == len(expected)
    spans = list(rs)
    # sorted, disjoint and never adjacent (always merged)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(spans))
    missing = {i for s, e in rs.missing(SIZE) for i in range(s, e)}
    assert missing == set(range(SIZE)) - expected
    prefix = 0
    while prefix in expected:
        prefix += 1
    assert rs.prefix() == prefix
    for s, e in items:
        assert rs.contains(s, e)


@given(ranges)
def test_json_round_trip(items: list[tuple[int, int]]) -> None:
    rs = RangeSet(items)
    assert RangeSet.from_json(rs.to_json(), SIZE) == rs


@pytest.mark.parametrize(
    "bad", [[[0, 300]], [[5, 2]], [[-1, 3]], [["0", 3]], [[0, 1, 2]], "x", [[True, 3]]]
)
def test_bad_control_file_ranges_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        RangeSet.from_json(bad, SIZE)


def test_split_and_steal() -> None:
    assert split_pieces([(0, 10), (20, 25)], 4) == [(0, 4), (4, 8), (8, 10), (20, 24), (24, 25)]
    assert steal_point(0, 100, 10) == 50
    assert steal_point(0, 19, 10) is None


@given(ranges, st.integers(1, 8), st.integers(1, 20), st.integers(0, 40))
def test_guided_pieces_cover_the_gaps_exactly_and_shrink(
    items: list[tuple[int, int]], workers: int, smallest: int, extra: int
) -> None:
    """Every byte of the gaps in exactly one piece, in order; within its bounds (but the end
    of a gap); sizes never grow while the work left shrinks."""
    gaps = RangeSet(items).missing(SIZE)
    largest = smallest + extra
    pieces = guided_pieces(gaps, workers, smallest, largest)
    assert RangeSet(pieces) == RangeSet(gaps)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(pieces))
    assert sum(e - s for s, e in pieces) == sum(e - s for s, e in gaps)
    ends = {e for _, e in gaps}
    for s, e in pieces:
        assert 0 < e - s <= largest + smallest
        assert e - s >= smallest or e in ends
    whole = [e - s for s, e in pieces if e not in ends]
    assert whole == sorted(whole, reverse=True)


def test_guided_pieces_for_a_blob_end_small() -> None:
    mib = 1 << 20
    pieces = guided_pieces([(8 * mib, 128 * mib)], 4, 8 * mib, 32 * mib)
    sizes = [(e - s) // mib for s, e in pieces]
    assert sizes[0] == 15 and max(sizes) == 15
    assert all(n <= 8 + 8 for n in sizes[-3:])  # the last in flight: about min_piece each
    with pytest.raises(ValueError):
        guided_pieces([(0, 10)], 0, 1, 2)
