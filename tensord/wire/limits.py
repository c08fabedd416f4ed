"""The protocol's hard bounds: what a peer may ask of us, and what we ask of ourselves.

Every number a peer sends is held to these before it sizes anything (DESIGN.md), and the sending
side holds itself to the same floors and ceilings, so that an honest node never builds a transfer
a receiver would refuse. Per-chunk bookkeeping costs tens of bytes, so the chunk count is bounded
too: a tensor is split into at most ``MAX_CHUNKS`` chunks, whatever chunk size was configured.
"""

from __future__ import annotations

MIN_CHUNK = 4096
MAX_CHUNK = 64 << 20
#: The most chunks one transfer has (per-chunk state: ~50 bytes on the sender, ~40 on the receiver).
MAX_CHUNKS = 1 << 20


def chunk_count(nbytes: int, chunk_size: int) -> int:
    return -(-nbytes // chunk_size)


def chunk_size_for(nbytes: int, wanted: int, peer_max: int) -> int:
    """The chunk size a sender uses: ``wanted`` (the configured size, capped by what the peer
    accepts), raised to the next power of two when ``nbytes`` would need more than
    :data:`MAX_CHUNKS` chunks. Raises ``ValueError`` when the peer's maximum forbids that."""
    size = max(MIN_CHUNK, min(wanted, peer_max, MAX_CHUNK))
    while chunk_count(nbytes, size) > MAX_CHUNKS:
        size *= 2
    if size > min(peer_max, MAX_CHUNK):
        raise ValueError(
            f"{nbytes} bytes need chunks of at least {size} bytes (at most {MAX_CHUNKS} chunks), "
            f"and the peer accepts at most {peer_max}"
        )
    return size
