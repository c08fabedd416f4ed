"""The protocol's hard bounds: what a peer may ask of us, and what we ask of ourselves.

One module with no heavy imports, so that the CLI and the settings check names and sizes with
the very functions the wire uses.

Every number a peer sends is held to these before it sizes anything (DESIGN.md), and the sending
side holds itself to the same floors and ceilings, so that an honest node never builds a transfer
a receiver would refuse. Per-chunk bookkeeping costs tens of bytes, so the chunk count is bounded
too: a tensor is split into at most ``MAX_CHUNKS`` chunks, whatever chunk size was configured.
"""

from __future__ import annotations

import re

from .errors import ProtocolError

MIN_CHUNK = 4096
MAX_CHUNK = 64 << 20
#: The most chunks one transfer has (per-chunk state: ~50 bytes on the sender, ~40 on the receiver).
MAX_CHUNKS = 1 << 20


def chunk_count(nbytes: int, chunk_size: int) -> int:
    return -(-nbytes // chunk_size)


def chunk_size_for(nbytes: int, wanted: int, peer_max: int) -> int:
    """The chunk size a sender uses: ``wanted`` (the configured size, capped by what the peer
    accepts), raised - to the smallest multiple of 4 KiB that fits - when ``nbytes`` would need
    more than :data:`MAX_CHUNKS` chunks. Raises ``ValueError`` when the peer's maximum forbids
    that."""
    size = max(MIN_CHUNK, min(wanted, peer_max, MAX_CHUNK))
    if chunk_count(nbytes, size) > MAX_CHUNKS:
        size = -(-chunk_count(nbytes, MAX_CHUNKS) // MIN_CHUNK) * MIN_CHUNK
    if size > min(peer_max, MAX_CHUNK):
        raise ValueError(
            f"{nbytes} bytes need chunks of at least {size} bytes (at most {MAX_CHUNKS} chunks), "
            f"and the peer accepts at most {peer_max}"
        )
    return size


MAX_NAME_LEN = 256
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@+=\-/]*\Z")  # \Z: "$" lets "x\n" through


def preview(value: object, limit: int) -> str:
    """A peer's value, short and safe to put in an error message.

    Never ``str()`` of a container: a peer controls its size and nesting, and the ``repr`` of a
    list nested a thousand deep raises RecursionError instead of the ProtocolError we mean.
    """
    if isinstance(value, str):
        return repr(value[:limit])
    if (
        value is None
        or isinstance(value, float)
        or (isinstance(value, int) and value.bit_length() <= 64)
    ):
        return repr(value)
    return f"<{type(value).__name__}>"


def check_name(name: object) -> str:
    """A tensor name: 1-256 chars of ``[A-Za-z0-9_.:@+=-/]``, no empty, ``.`` or ``..`` segment."""
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_LEN or not _NAME_RE.match(name):
        raise ProtocolError(
            f"bad tensor name {preview(name, 80)}: expected 1-{MAX_NAME_LEN} characters of "
            "letters, digits and _ . : @ + = - /",
            code="bad_name",
        )
    if any(seg in ("", ".", "..") for seg in name.split("/")):
        raise ProtocolError(
            f"bad tensor name {name!r}: empty, '.' and '..' path segments are not allowed",
            code="bad_name",
        )
    return name
