"""crc32c_combine / combine_all agree with the crc32c of the concatenation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensord.wire.crc import combine_all, crc32c, crc32c_combine

POOL = np.random.default_rng(0).integers(0, 256, size=(1 << 20) + 4096, dtype=np.uint8).tobytes()

#: lengths on both sides of the chunk sizes used on the wire
EDGES = [0, 1, 2, 3, 4, 7, 8, 255, 256, 4095, 4096, 4097, 16383, 16384, 65535, 65536, 65537,
         (1 << 20) - 1, 1 << 20, (1 << 20) + 1]  # fmt: skip

lengths = st.sampled_from(EDGES) | st.integers(0, 300)


@st.composite
def parts(draw: st.DrawFn) -> bytes:
    """A slice of random bytes (or, sometimes, zeros) with an interesting length."""
    n = draw(lengths)
    how = draw(st.sampled_from(["pool", "zeros", "drawn"] if n <= 512 else ["pool", "zeros"]))
    if how == "pool":
        start = draw(st.integers(0, len(POOL) - n))
        return POOL[start : start + n]
    if how == "zeros":
        return bytes(n)
    return draw(st.binary(min_size=n, max_size=n))  # small only: drawing bytes is slow


def test_known_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the standard crc32c check value
    assert crc32c(b"") == 0


def test_continuation_equals_concatenation() -> None:
    a, b = POOL[:1000], POOL[1000:5000]
    assert crc32c(b, crc32c(a)) == crc32c(a + b)
    assert crc32c(memoryview(POOL)[:5000]) == crc32c(a + b)
    assert crc32c(np.frombuffer(POOL[:5000], dtype=np.uint8)) == crc32c(a + b)


@settings(max_examples=120, deadline=None)
@given(a=parts(), b=parts())
def test_combine_two(a: bytes, b: bytes) -> None:
    assert crc32c_combine(crc32c(a), crc32c(b), len(b)) == crc32c(a + b)


@settings(max_examples=60, deadline=None)
@given(pieces=st.lists(parts(), max_size=6))
def test_combine_all(pieces: list[bytes]) -> None:
    whole = b"".join(pieces)
    assert combine_all((crc32c(p), len(p)) for p in pieces) == crc32c(whole)


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 65536, 300_001])
@pytest.mark.parametrize("chunk", [4096, 65536])
def test_combine_all_over_chunks_equals_the_whole(size: int, chunk: int) -> None:
    data = POOL[:size]
    pieces = [data[i : i + chunk] for i in range(0, size, chunk)]
    assert combine_all((crc32c(p), len(p)) for p in pieces) == crc32c(data)


def test_empty_parts_change_nothing() -> None:
    c = crc32c(POOL[:77])
    assert crc32c_combine(c, 0, 0) == c
    assert crc32c_combine(0, c, 77) == c  # crc of "" is 0: "" || A == A
    assert combine_all([]) == 0
    assert combine_all([(0, 0), (c, 77), (0, 0)]) == c


def test_combine_detects_a_changed_part() -> None:
    a, b = POOL[:4096], bytearray(POOL[4096:8192])
    good = crc32c_combine(crc32c(a), crc32c(b), len(b))
    b[100] ^= 1
    assert crc32c_combine(crc32c(a), crc32c(b), len(b)) != good
    # the length matters too: the same crc of B with another length gives another result
    assert crc32c_combine(crc32c(a), crc32c(POOL[4096:8192]), 4095) != good
