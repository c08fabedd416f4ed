"""Byte ranges of a download: what is done, what is missing, and how work is split.

Sans-I/O and small on purpose: the fetcher's correctness (never append a reply twice, never skip
a byte, resume exactly the missing ranges) rests on this arithmetic, so it is kept apart from the
HTTP code and property-tested. All ranges are half-open ``[start, end)``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

Range = tuple[int, int]


class RangeSet:
    """A set of disjoint, non-adjacent half-open ranges, kept sorted and merged."""

    def __init__(self, ranges: Iterable[Range] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in ranges:
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        """Mark ``[start, end)`` as present (merging with neighbours it touches)."""
        if start < 0 or end < start:
            raise ValueError(f"bad range [{start}, {end})")
        if start == end:
            return
        # First range whose end >= start (it touches or overlaps) ...
        i = bisect.bisect_left(self._ends, start)
        # ... up to the last range whose start <= end.
        j = bisect.bisect_right(self._starts, end)
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def __iter__(self) -> Iterator[Range]:
        return iter(zip(self._starts, self._ends, strict=True))

    def __len__(self) -> int:
        return len(self._starts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeSet) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"RangeSet({list(self)!r})"

    @property
    def total(self) -> int:
        """Bytes covered."""
        return sum(e - s for s, e in self)

    def contains(self, start: int, end: int) -> bool:
        """Is all of ``[start, end)`` present?"""
        if start >= end:
            return True
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def covered(self, start: int, end: int) -> int:
        """How many bytes of ``[start, end)`` are present."""
        n = 0
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        while i < len(self._starts) and self._starts[i] < end:
            n += max(0, min(end, self._ends[i]) - max(start, self._starts[i]))
            i += 1
        return n

    def prefix(self) -> int:
        """The length of the present run starting at 0 (0 if byte 0 is missing)."""
        if self._starts and self._starts[0] == 0:
            return self._ends[0]
        return 0

    def missing(self, size: int) -> list[Range]:
        """The ranges of ``[0, size)`` not present, in order."""
        out = []
        pos = 0
        for s, e in self:
            if s >= size:
                break
            if s > pos:
                out.append((pos, s))
            pos = max(pos, e)
        if pos < size:
            out.append((pos, size))
        return out

    def to_json(self) -> list[list[int]]:
        return [[s, e] for s, e in self]

    @classmethod
    def from_json(cls, value: object, size: int) -> RangeSet:
        """Ranges read back from a control file, validated against ``size``."""
        if not isinstance(value, list):
            raise ValueError("ranges must be a list")
        out = cls()
        for item in value:
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in item)
                or not 0 <= item[0] <= item[1] <= size
            ):
                raise ValueError(f"bad range {item!r} for a blob of {size} bytes")
            out.add(item[0], item[1])
        return out


def split_pieces(gaps: Iterable[Range], piece: int) -> list[Range]:
    """Cut ``gaps`` into pieces of at most ``piece`` bytes (the last of each gap may be shorter)."""
    if piece <= 0:
        raise ValueError("piece size must be positive")
    out = []
    for start, end in gaps:
        pos = start
        while pos < end:
            out.append((pos, min(pos + piece, end)))
            pos += piece
    return out


def guided_pieces(gaps: Iterable[Range], workers: int, smallest: int, largest: int) -> list[Range]:
    """Cut ``gaps`` into pieces that shrink as the work left does (guided self-scheduling):
    each piece is the bytes not yet handed out divided by ``2 * workers``, kept within
    ``[smallest, largest]`` (a gap's end may cut one shorter; a piece takes the rest of its gap
    when less than ``smallest`` would be left). Handed out in order, the pieces
    in flight at the end are small, so little of the blob lies beyond the contiguous prefix
    when the last byte lands (what the SHA-256 must still read back then), and few requests
    are made while much is left."""
    if smallest <= 0 or largest < smallest or workers <= 0:
        raise ValueError("piece sizes and workers must be positive, smallest <= largest")
    spans = list(gaps)
    left = sum(e - s for s, e in spans)
    out = []
    for start, end in spans:
        pos = start
        while pos < end:
            size = min(largest, max(smallest, -(-left // (2 * workers))))
            cut = min(end, pos + size)
            if end - cut < smallest:
                cut = end  # no sliver of a last piece: one request fewer
            out.append((pos, cut))
            left -= cut - pos
            pos = cut
    return out


def steal_point(start: int, end: int, min_piece: int) -> int | None:
    """Where a thief may split a victim's remaining ``[start, end)``: its middle, if both halves
    are at least ``min_piece`` long; ``None`` if the rest is too small to be worth splitting."""
    if end - start < 2 * min_piece:
        return None
    return start + (end - start) // 2


__all__ = ["Range", "RangeSet", "guided_pieces", "split_pieces", "steal_point"]
