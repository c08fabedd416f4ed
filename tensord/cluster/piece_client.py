"""Asking peers for blob pieces: what the fetcher (peer-first downloads) calls.

Three calls, each over one of the node's pooled, authenticated connections to the peer:

* :func:`query` - which of these blobs does the peer hold (complete, or which pieces of one it
  is still fetching)?
* :func:`announce` - tell the peer what this node holds or is fetching, so that nodes that
  start the same pull at the same moment learn of each other;
* :func:`fetch_range` - bytes ``[offset, offset + length)`` of a blob, received with
  ``recv_into`` straight into the caller's buffer and checked chunk by chunk with crc32c.

Every failure is a :class:`PieceError` naming the peer and the blob, so the fetcher can decide
per peer: :class:`PiecesUnsupported` (an older peer: raised before anything is sent, no wait),
:class:`PieceUnavailable` (``not_found``, ``not_yet``, ``bad_range``: the connection stays
usable), :class:`CorruptPiece` (a chunk failed its crc32c: skip this peer for the blob; its
connection is closed). A connection that breaks raises what the outbound path raises
(``ConnectionClosed``, ``OSError``, ``TimeoutError``, ``ProtocolError``...), the fetcher's cue to
try the next source.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

import trio

from ..address import PeerAddress
from ..errors import ProtocolError, TransferFailed
from ..net.connection import Connection
from ..node import TensorNode
from ..wire.crc import crc32c
from ..wire.messages import (
    MAX_PIECE,
    MAX_QUERY_DIGESTS,
    Announce,
    BlobEntry,
    Error,
    Have,
    Noted,
    PieceChunk,
    PieceRequest,
    Query,
)
from .piece_server import NOT_YET_WAIT

PeerRef = str | PeerAddress


class PieceError(TransferFailed):
    """A piece call to ``peer`` about blob ``digest`` failed (``code`` says how)."""

    def __init__(self, message: str, *, peer: str, digest: str = "", code: str) -> None:
        super().__init__(message, code=code)
        self.peer = peer
        self.digest = digest


class PiecesUnsupported(PieceError):
    """The peer does not speak the ``pieces`` feature (an older tensord)."""


class PieceUnavailable(PieceError):
    """The peer does not have the range: ``not_found``, ``not_yet`` (it is fetching the blob
    but the range did not land within its wait) or ``bad_range`` (outside the blob)."""


class CorruptPiece(PieceError):
    """A chunk from the peer failed its crc32c: do not take this blob from that peer again."""


async def query(node: TensorNode, peer: PeerRef, digests: Iterable[str]) -> dict[str, BlobEntry]:
    """What ``peer`` holds of each of ``digests``, by digest (blobs it lacks are absent)."""
    wanted = list(dict.fromkeys(digests))
    out: dict[str, BlobEntry] = {}

    async def ask(conn: Connection) -> None:
        for i in range(0, len(wanted), MAX_QUERY_DIGESTS):
            batch = wanted[i : i + MAX_QUERY_DIGESTS]
            await conn.stream.send(Query(tuple(batch)))
            with trio.fail_after(node.settings.transfer.io_timeout):
                reply = await conn.stream.receive()
            if not isinstance(reply, Have):
                raise _unexpected(conn, reply, "have")
            asked = set(batch)
            out.update((e.digest, e) for e in reply.entries if e.digest in asked)

    if wanted:
        await _on_peer(node, peer, "", ask)
    return out


async def announce(node: TensorNode, peer: PeerRef, entry: BlobEntry) -> None:
    """Tell ``peer`` that this node holds (or is fetching) ``entry``'s blob; returns once the
    peer noted it."""

    async def tell(conn: Connection) -> None:
        await conn.stream.send(Announce(entry))
        with trio.fail_after(node.settings.transfer.io_timeout):
            reply = await conn.stream.receive()
        if not isinstance(reply, Noted) or reply.digest != entry.digest:
            raise _unexpected(conn, reply, "noted")

    await _on_peer(node, peer, entry.digest, tell)


async def fetch_range(
    node: TensorNode, peer: PeerRef, digest: str, offset: int, length: int, into: memoryview
) -> None:
    """Bytes ``[offset, offset + length)`` of blob ``digest`` from ``peer``, received straight
    into ``into`` (exactly ``length`` bytes, e.g. a slice of a memory-mapped partial file).

    Each chunk's crc32c is checked as it arrives: a mismatch raises :class:`CorruptPiece` (what
    ``into`` holds is then undefined). A peer still fetching the blob sends each chunk as it
    lands there (or ``not_yet``, also after some chunks: ``into`` is then partly written).
    ``length`` is at most one piece (``MAX_PIECE``).
    """
    if len(into) != length or not 0 < length <= MAX_PIECE or offset < 0:
        raise ValueError(
            f"a range of 1..{MAX_PIECE} bytes at a non-negative offset into a buffer of its "
            f"length, not {length} bytes at {offset} into {len(into)}"
        )
    io_timeout = node.settings.transfer.io_timeout
    refused: list[tuple[str, Error]] = []

    async def fetch(conn: Connection) -> None:
        stream = conn.stream
        await stream.send(PieceRequest(digest, offset, length))
        got = 0
        # Every frame may wait for its bytes to land at the peer (its bounded wait): a peer
        # still fetching the blob sends each chunk as it lands, and may end with ``not_yet``.
        wait = io_timeout + NOT_YET_WAIT
        while got < length:
            with trio.fail_after(wait):
                msg = await stream.receive()
                if isinstance(msg, Error):
                    refused.append((conn.peer_id, msg))
                    return
                if not isinstance(msg, PieceChunk):
                    raise _unexpected(conn, msg, "pchunk")
                if msg.offset != offset + got or msg.wire_len > length - got:
                    raise ProtocolError(
                        f"peer {conn.peer_id} sent bytes [{msg.offset}, "
                        f"{msg.offset + msg.wire_len}) of {digest}, expected from "
                        f"{offset + got} up to {offset + length}"
                    )
                part = into[got : got + msg.wire_len]
                await stream.receive_payload_into(part)
            if crc32c(part) != msg.crc:
                raise CorruptPiece(
                    f"peer {conn.peer_id} sent a corrupt chunk of blob {digest} (bytes "
                    f"{msg.offset}..{msg.offset + msg.wire_len}: crc32c mismatch)",
                    peer=conn.peer_id,
                    digest=digest,
                    code="checksum",
                )
            got += msg.wire_len

    await _on_peer(node, peer, digest, fetch)
    if refused:  # raised once the connection is back in the pool: it stays usable
        who, err = refused[0]
        cls = PieceUnavailable if err.code in ("not_found", "not_yet", "bad_range") else PieceError
        raise cls(f"peer {who}: {err.message or err.code}", peer=who, digest=digest, code=err.code)


async def _on_peer(
    node: TensorNode, peer: PeerRef, digest: str, fn: Callable[[Connection], Awaitable[None]]
) -> None:
    """Run ``fn`` on a pooled connection to ``peer`` that agreed to ``pieces``; on one that did
    not, raise :class:`PiecesUnsupported` at once (the connection goes back to the pool)."""
    lacking: list[str] = []

    async def run(conn: Connection) -> None:
        if conn.agreement.pieces:
            await fn(conn)
        else:
            lacking.append(conn.peer_id)

    await node.with_peer_connection(peer, run)
    if lacking:
        raise PiecesUnsupported(
            f"peer {lacking[0]} does not support sharing blob pieces (an older tensord); "
            "fetch from another source",
            peer=lacking[0],
            digest=digest,
            code="unsupported",
        )


def _unexpected(conn: Connection, msg: object, wanted: str) -> ProtocolError:
    if isinstance(msg, Error):
        return ProtocolError(f"peer {conn.peer_id}: {msg.message}", code=msg.code)
    return ProtocolError(f"peer {conn.peer_id}: expected {wanted}, got {type(msg).__name__}")


__all__ = [
    "CorruptPiece",
    "PieceError",
    "PieceUnavailable",
    "PiecesUnsupported",
    "announce",
    "fetch_range",
    "query",
]
