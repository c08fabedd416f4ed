"""Serving the ``pieces`` messages on an inbound peer connection.

The receiver hands each ``Query``, ``Announce`` and ``PieceRequest`` here (one call per message,
on the connection's task); this module answers from the node's :class:`~.holdings.Holdings`.

A piece is served without a copy in Python: the requested range of the blob's file is
memory-mapped, each chunk's crc32c is computed over the mapping, and the bytes go to the kernel
either with ``os.sendfile`` (a plain TCP connection: the socket is at hand) or as a memoryview
of the mapping in the same gathered write as the chunk's header (TLS, QUIC). A range of a blob
still in flight that has not landed yet is waited for, up to :data:`NOT_YET_WAIT` seconds; then
the peer hears ``not_yet`` and asks someone else (or again later).

Everything a peer asks is bounded before it sizes anything: the decoder checked the digest's
form, the range's length (at most one piece, ``MAX_PIECE``) and its end; here the range must lie
within the blob, and a ``Have`` reply is cut to fit a frame header (:data:`MAX_REPLY_RANGES`):
a node may under-claim what it holds, never over-claim.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
from contextlib import ExitStack

import trio

from ..errors import ProtocolError
from ..limits import MIN_CHUNK
from ..net.connection import Connection
from ..net.stream import SocketTransport
from ..wire.crc import crc32c
from ..wire.messages import (
    Announce,
    BlobEntry,
    Error,
    Have,
    Noted,
    PieceChunk,
    PieceRequest,
    Query,
)
from .holdings import Holdings, Source

log = logging.getLogger("tensord.cluster")

#: How long a request for a range of a blob in flight waits for it to land before ``not_yet``.
NOT_YET_WAIT = 10.0
#: Piece ranges one ``Have`` reply carries in all (~10 bytes each: well inside a frame header).
MAX_REPLY_RANGES = 2048


def _require_pieces(conn: Connection, what: str) -> None:
    if not conn.agreement.pieces:
        raise ProtocolError(f"unexpected {what}: the pieces feature was not agreed")


async def serve_query(conn: Connection, msg: Query, holdings: Holdings) -> None:
    """Answer ``Query`` with what this node holds of each digest (unknown ones left out)."""
    _require_pieces(conn, "query")
    entries: list[BlobEntry] = []
    budget = MAX_REPLY_RANGES
    for digest in dict.fromkeys(msg.digests):
        entry = holdings.entry(digest)
        if entry is None:
            continue
        if len(entry.pieces) > budget:  # under-claim rather than overflow the header
            entry = BlobEntry(
                entry.digest,
                entry.size,
                entry.piece_size,
                False,
                entry.pieces[:budget],
                entry.fetching,
            )
        budget -= len(entry.pieces)
        entries.append(entry)
    await conn.stream.send(Have(tuple(entries)))


async def serve_announce(conn: Connection, msg: Announce, holdings: Holdings) -> None:
    """Remember a peer's announcement (bounded per peer) and acknowledge it."""
    _require_pieces(conn, "announce")
    holdings.remember(conn.peer_id, msg.entry)
    await conn.stream.send(Noted(msg.entry.digest))


async def serve_piece(
    conn: Connection,
    req: PieceRequest,
    holdings: Holdings,
    *,
    chunk_size: int,
    wait: float | None = None,
) -> None:
    """Answer ``PieceRequest`` with the range's bytes in ``PieceChunk`` frames of at most
    ``chunk_size`` bytes (capped by what the peer accepts), or with a typed ``Error``. A range
    not landed yet is waited for ``wait`` seconds (default :data:`NOT_YET_WAIT`)."""
    _require_pieces(conn, "piece request")
    if wait is None:
        wait = NOT_YET_WAIT
    src = holdings.source(req.digest)
    end = req.offset + req.length
    if src is not None and end > src.size:
        await conn.stream.send(
            Error(
                "bad_range",
                f"range [{req.offset}, {end}) is outside blob {req.digest} of {src.size} bytes",
            )
        )
        return
    if src is not None and not src.has(req.offset, req.length):
        src = await _wait_landed(holdings, req, wait)
        if src is not None and not src.has(req.offset, req.length):
            await conn.stream.send(
                Error(
                    "not_yet",
                    f"range [{req.offset}, {end}) of blob {req.digest} has not arrived here "
                    f"within {wait:g} s",
                )
            )
            return
    if src is None:
        await conn.stream.send(Error("not_found", f"no blob {req.digest} on this node"))
        return
    chunk = max(MIN_CHUNK, min(chunk_size, conn.agreement.peer_max_chunk))
    try:
        await _send_range(conn, src, req.offset, req.length, chunk)
    except _Unreadable as exc:
        log.warning(
            "piece of %s for %s: cannot read %s: %s", req.digest, conn.peer_id, src.path, exc
        )
        await conn.stream.send(Error("not_found", f"blob {req.digest} cannot be read here"))


async def _wait_landed(holdings: Holdings, req: PieceRequest, wait: float) -> Source | None:
    """The blob's source once the range landed, or as it is after ``wait`` seconds (None: the
    download was abandoned)."""
    src = holdings.source(req.digest)
    with trio.move_on_after(wait):
        while src is not None and src.in_flight is not None:
            if src.has(req.offset, req.length):
                break
            await src.in_flight.wait_changed()
            src = holdings.source(req.digest)  # it may have finished, or been abandoned
    return src


class _Unreadable(Exception):
    """The blob's file could not be opened or mapped before the first byte was sent."""


async def _send_range(conn: Connection, src: Source, offset: int, length: int, chunk: int) -> None:
    """The range as ``PieceChunk`` frames, from a mapping of the file: no copy in Python."""
    with ExitStack() as stack:
        try:
            fd = os.open(src.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            stack.callback(os.close, fd)
            # A mapping past the file's end would fault (SIGBUS) when read: check it first.
            if os.fstat(fd).st_size < offset + length:
                raise OSError(f"the file holds fewer than {offset + length} bytes")
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            mapped = mmap.mmap(fd, length + offset - start, access=mmap.ACCESS_READ, offset=start)
        except (OSError, ValueError) as exc:
            raise _Unreadable(str(exc)) from exc
        stack.callback(mapped.close)  # after every view below is released
        view = memoryview(mapped)
        stack.callback(view.release)
        transport = conn.stream.transport
        sock = transport.sock if isinstance(transport, SocketTransport) else None
        pos = offset - start
        for at in range(offset, offset + length, chunk):
            n = min(chunk, offset + length - at)
            with view[pos : pos + n] as part:
                header = PieceChunk(at, n, crc32c(part))
                if sock is not None:
                    await conn.stream.send(header)
                    await _sendfile(sock, fd, at, n)
                    conn.stream.bytes_out += n
                else:
                    await conn.stream.send_with_payload(header, part)
            pos += n


async def _sendfile(sock: socket.socket, fd: int, offset: int, count: int) -> None:
    """``count`` bytes of file ``fd`` from ``offset`` to a non-blocking socket, kernel to
    kernel; the task waits (and yields) only when the socket's buffer is full."""
    out = sock.fileno()
    while count:
        try:
            sent = os.sendfile(out, fd, offset, count)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        if not sent:  # mid-frame: the connection cannot carry on
            raise OSError(f"file of {count} more bytes ended early")
        offset += sent
        count -= sent
    await trio.lowlevel.cancel_shielded_checkpoint()


__all__ = ["MAX_REPLY_RANGES", "NOT_YET_WAIT", "serve_announce", "serve_piece", "serve_query"]
