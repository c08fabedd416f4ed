"""The progress file of a partial receive: which chunks arrived, and each one's crc32c.

Binary, small and self-checking: ``TNSDPRG1``, the chunk count, one byte per chunk (0 or 1), one
little-endian ``u32`` crc32c per chunk, and a crc32c of all that. It is written atomically after
the data pages it vouches for were flushed, so a resume after a restart trusts it without
re-reading the data; a damaged one is ignored (logged) and the receive starts over.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np

from ..wire.crc import crc32c
from ..wire.meta import TensorMeta

log = logging.getLogger("tensord.store")

_PROGRESS_MAGIC = b"TNSDPRG1"
_PROGRESS_HEAD = struct.Struct("<8sI")
_PROGRESS_TAIL = struct.Struct("<I")


def _progress_bytes(have: bytes | bytearray, raw_crcs: list[int]) -> bytes:
    """The progress file's content for a checked bitmap ``have`` and its crcs."""
    body = (
        _PROGRESS_HEAD.pack(_PROGRESS_MAGIC, len(have))
        + bytes(have)
        + np.asarray(raw_crcs, dtype="<u4").tobytes()
    )
    return body + _PROGRESS_TAIL.pack(crc32c(body))


def _read_progress(
    path: Path, meta: TensorMeta, chunk_size: int | None
) -> tuple[bytes, list[int]] | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    head, tail = _PROGRESS_HEAD.size, _PROGRESS_TAIL.size
    try:
        if len(raw) < head + tail:
            raise ValueError("too short")
        magic, n = _PROGRESS_HEAD.unpack_from(raw)
        if magic != _PROGRESS_MAGIC or len(raw) != head + 5 * n + tail:
            raise ValueError("bad magic or length")
        (check,) = _PROGRESS_TAIL.unpack_from(raw, len(raw) - tail)
        if check != crc32c(memoryview(raw)[: len(raw) - tail]):
            raise ValueError("checksum mismatch")
        have = raw[head : head + n]
        if have.translate(None, b"\x00\x01"):
            raise ValueError("bitmap holds values other than 0 and 1")
        if chunk_size and n != -(-meta.nbytes // chunk_size):
            raise ValueError("chunk count does not match the chunk size")
        crcs = np.frombuffer(raw, dtype="<u4", count=n, offset=head + n).tolist()
    except (ValueError, struct.error) as exc:
        log.warning("ignoring damaged progress file %s: %s", path, exc)
        return None
    return have, [int(c) for c in crcs]


def _bytes_have(have: bytes, nbytes: int, chunk_size: int | None) -> int:
    """Bytes covered by the set chunks of ``have``; exact when the chunk size is known."""
    n = len(have)
    count = have.count(1)
    if not count:
        return 0
    cs = chunk_size if chunk_size else -(-nbytes // n)
    last_len = min(cs, max(0, nbytes - (n - 1) * cs))
    total = count * cs - ((cs - last_len) if have[n - 1] else 0)
    return max(0, min(nbytes, total))
