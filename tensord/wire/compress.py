"""Adaptive lz4: compress a chunk only when a cheap sampled trial says it will pay.

Dense float weights don't compress (lz4 ratio 1.00) and lz4 runs at ~0.8 GB/s, a third of what
loopback TCP moves - compressing them is pure cost. Before compressing a chunk we lz4 two small
samples of it (~8 KiB, a few microseconds); if they don't shrink by ``SAMPLE_GAIN`` the chunk goes
raw. After a failed trial the next trials are skipped with exponential back-off (1, 2, 4 ... 64
chunks) so a long run of incompressible chunks costs almost nothing, while a tensor whose content
changes (say, zero padding at the end) is still noticed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import lz4.block

SAMPLE_LEN = 4096
SAMPLE_GAIN = 0.85  # samples must compress to <= 85 % to try the whole chunk
CHUNK_GAIN = 0.90  # the whole chunk must compress to <= 90 % to be sent compressed
MAX_SKIP = 64


def lz4_bound(n: int) -> int:
    """Worst-case size of lz4 block output for ``n`` input bytes."""
    return n + n // 255 + 16


@dataclass
class AdaptiveCompressor:
    """Per-transfer compression policy. Not thread-safe; one per sending transfer."""

    enabled: bool = True
    threshold: int = 4096
    trials: int = 0
    compressed_chunks: int = 0
    skipped_chunks: int = 0
    _skip: int = field(default=0, repr=False)
    _backoff: int = field(default=1, repr=False)

    def compress(self, raw: memoryview) -> bytes | None:
        """The lz4 block of ``raw`` if worth sending compressed, else ``None`` (send raw)."""
        n = len(raw)
        if not self.enabled or n < self.threshold:
            return None
        if self._skip:
            self._skip -= 1
            self.skipped_chunks += 1
            return None
        self.trials += 1
        if n > 4 * SAMPLE_LEN:
            mid = n // 2
            sample_in = 2 * SAMPLE_LEN
            sample_out = len(lz4.block.compress(raw[:SAMPLE_LEN], store_size=False)) + len(
                lz4.block.compress(raw[mid : mid + SAMPLE_LEN], store_size=False)
            )
            if sample_out > SAMPLE_GAIN * sample_in:
                return self._incompressible()
        out: bytes = lz4.block.compress(raw, store_size=False)
        if len(out) > CHUNK_GAIN * n:
            return self._incompressible()
        self._backoff = 1
        self.compressed_chunks += 1
        return out

    def _incompressible(self) -> bytes | None:
        self._skip = self._backoff
        self._backoff = min(self._backoff * 2, MAX_SKIP)
        self.skipped_chunks += 1
        return None


def decompress_into(payload: memoryview, dest: memoryview) -> None:
    """Decompress an lz4 block that must expand to exactly ``len(dest)`` bytes into ``dest``.

    Raises ``ValueError`` if the block is malformed or has another size.
    """
    try:
        out = lz4.block.decompress(payload, uncompressed_size=len(dest))
    except lz4.block.LZ4BlockError as exc:
        raise ValueError(f"bad lz4 block: {exc}") from None
    if len(out) != len(dest):
        raise ValueError(f"lz4 block expands to {len(out)} bytes, expected {len(dest)}")
    dest[:] = out
