"""AdaptiveCompressor: dense data goes raw with back-off, compressible data goes lz4 and back."""

from __future__ import annotations

from collections.abc import Callable

import lz4.block
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensord.wire.compress import (
    CHUNK_GAIN,
    MAX_SKIP,
    SAMPLE_LEN,
    AdaptiveCompressor,
    decompress_into,
    lz4_bound,
)

CHUNK = 64 * 1024


def weights(nbytes: int, seed: int = 0) -> memoryview:
    arr = np.random.default_rng(seed).standard_normal(nbytes // 4).astype(np.float32)
    return memoryview(arr.tobytes())


def repetitive(nbytes: int) -> memoryview:
    pattern = np.arange(64, dtype=np.float32).tobytes()
    return memoryview((pattern * (nbytes // len(pattern) + 1))[:nbytes])


def roundtrip(block: bytes, n: int) -> bytes:
    dest = bytearray(n)
    decompress_into(memoryview(block), memoryview(dest))
    return bytes(dest)


def test_random_float32_goes_raw() -> None:
    comp = AdaptiveCompressor()
    assert comp.compress(weights(CHUNK)) is None
    assert (comp.trials, comp.compressed_chunks, comp.skipped_chunks) == (1, 0, 1)


def test_small_random_chunk_is_tried_whole_and_goes_raw() -> None:
    comp = AdaptiveCompressor()
    assert comp.compress(weights(4 * SAMPLE_LEN)) is None  # no sampling at this size
    assert comp.trials == 1


def test_failed_trial_backs_off_exponentially() -> None:
    """After a failed trial the next 1, 2, 4 ... 64 chunks go raw without a trial."""
    comp = AdaptiveCompressor()
    data = weights(CHUNK)
    trial_at = []
    for i in range(260):
        before = comp.trials
        skipped = comp.skipped_chunks
        assert comp.compress(data) is None
        assert comp.skipped_chunks == skipped + 1  # every raw chunk is counted once
        if comp.trials > before:
            trial_at.append(i)
    # trial, skip 1, trial, skip 2, trial, skip 4 ... then a trial every MAX_SKIP + 1 chunks
    expected, i, skip = [], 0, 1
    while i < 260:
        expected.append(i)
        i += skip + 1
        skip = min(skip * 2, MAX_SKIP)
    assert trial_at == expected
    assert trial_at[:7] == [0, 2, 5, 10, 19, 36, 69]
    assert comp.compressed_chunks == 0


def test_trials_do_not_grow_during_the_backoff_period() -> None:
    comp = AdaptiveCompressor()
    data = weights(CHUNK)
    for _ in range(3):  # trials at chunks 0 and 2: the back-off is now 2 chunks
        comp.compress(data)
    assert comp.trials == 2
    for _ in range(2):
        comp.compress(data)
    assert comp.trials == 2
    assert comp.skipped_chunks == 5
    comp.compress(data)
    assert comp.trials == 3


def test_a_change_of_content_is_noticed_after_the_backoff() -> None:
    comp = AdaptiveCompressor()
    dense = weights(CHUNK)
    for _ in range(200):
        comp.compress(dense)
    zeros = memoryview(bytes(CHUNK))
    results = [comp.compress(zeros) for _ in range(MAX_SKIP + 2)]
    first = next(i for i, r in enumerate(results) if r is not None)
    assert first <= MAX_SKIP
    # once a trial succeeds the back-off is reset: every following chunk is compressed
    assert all(r is not None for r in results[first:])


@pytest.mark.parametrize("make", [lambda n: memoryview(bytes(n)), repetitive], ids=["zeros", "rep"])
@pytest.mark.parametrize("n", [4096, 5000, 4 * SAMPLE_LEN + 1, CHUNK, 1 << 20])
def test_compressible_data_is_compressed_and_restored(
    make: Callable[[int], memoryview], n: int
) -> None:
    raw = make(n)
    comp = AdaptiveCompressor()
    block = comp.compress(raw)
    assert block is not None
    assert len(block) <= CHUNK_GAIN * n
    assert comp.compressed_chunks == 1
    assert roundtrip(block, n) == bytes(raw)


def test_half_zero_chunk_is_compressed() -> None:
    raw = bytes(weights(CHUNK // 2)) + bytes(CHUNK // 2)
    block = AdaptiveCompressor().compress(memoryview(raw))
    # the samples come from the start (dense) and the middle (zeros) and average well enough
    assert block is not None
    assert roundtrip(block, len(raw)) == raw


@settings(max_examples=60, deadline=None)
@given(
    segments=st.lists(
        st.tuples(st.sampled_from(["zeros", "dense", "text"]), st.integers(1, 20_000)),
        min_size=1,
        max_size=6,
    ),
    threshold=st.sampled_from([0, 1, 4096]),
)
def test_whatever_is_compressed_decompresses_exactly(
    segments: list[tuple[str, int]], threshold: int
) -> None:
    pieces = []
    for kind, n in segments:
        if kind == "zeros":
            pieces.append(bytes(n))
        elif kind == "dense":
            pieces.append(bytes(weights(n + 4, seed=n))[:n])
        else:
            pieces.append((b"tensord " * (n // 8 + 1))[:n])
    raw = b"".join(pieces)
    comp = AdaptiveCompressor(threshold=threshold)
    block = comp.compress(memoryview(raw))
    if block is None:
        assert comp.compressed_chunks == 0
    else:
        assert len(block) <= CHUNK_GAIN * len(raw) <= lz4_bound(len(raw))
        assert roundtrip(block, len(raw)) == raw


def test_below_threshold_is_never_compressed() -> None:
    comp = AdaptiveCompressor(threshold=4096)
    for n in (0, 1, 100, 4095):
        assert comp.compress(memoryview(bytes(n))) is None
    assert (comp.trials, comp.skipped_chunks, comp.compressed_chunks) == (0, 0, 0)
    assert comp.compress(memoryview(bytes(4096))) is not None  # the threshold itself is eligible


def test_below_threshold_does_not_consume_the_backoff() -> None:
    comp = AdaptiveCompressor(threshold=4096)
    comp.compress(weights(CHUNK))  # failed trial: the next chunk is skipped
    comp.compress(memoryview(bytes(100)))  # small: not counted, not a skip
    assert comp.skipped_chunks == 1
    assert comp.compress(memoryview(bytes(CHUNK))) is None  # this one is the skipped one
    assert comp.compress(memoryview(bytes(CHUNK))) is not None


def test_disabled_never_compresses() -> None:
    comp = AdaptiveCompressor(enabled=False)
    for _ in range(10):
        assert comp.compress(memoryview(bytes(CHUNK))) is None
    assert (comp.trials, comp.skipped_chunks, comp.compressed_chunks) == (0, 0, 0)


def test_decompress_into_refuses_a_corrupted_block() -> None:
    raw = repetitive(CHUNK)
    block = lz4.block.compress(raw, store_size=False)
    dest = memoryview(bytearray(CHUNK))
    for bad in (block[: len(block) // 2], b"\xff" * 32, b"", b"\x1f" + block[1:]):
        with pytest.raises(ValueError):
            decompress_into(memoryview(bad), dest)


@pytest.mark.parametrize("size", [CHUNK - 1, CHUNK + 1, 2 * CHUNK, 1])
def test_decompress_into_refuses_a_wrong_size(size: int) -> None:
    block = lz4.block.compress(repetitive(CHUNK), store_size=False)
    with pytest.raises(ValueError):
        decompress_into(memoryview(block), memoryview(bytearray(size)))


def test_lz4_bound_covers_incompressible_data() -> None:
    for n in (0, 1, 255, 4096, CHUNK):
        raw = bytes(weights(n + 4))[:n]
        assert len(lz4.block.compress(raw, store_size=False)) <= lz4_bound(n)
