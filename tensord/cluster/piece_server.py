"""Serving the ``pieces`` messages on an inbound peer connection.

The receiver hands each ``Query``, ``Announce`` and ``PieceRequest`` here (one call per message,
on the connection's task); this module answers from the node's :class:`~.holdings.Holdings`.

A piece is served without a copy in Python: the requested range of the blob's file is
memory-mapped, each chunk's crc32c is computed over the mapping, and the bytes go to the kernel
either with ``os.sendfile`` (a plain TCP connection: the socket is at hand) or as a memoryview
of the mapping in the same gathered write as the chunk's header (TLS, QUIC). A range of a blob
still in flight is sent chunk by chunk as it lands (a piece the origin is still sending here
reaches the peer at the pace it arrives); a chunk not landed yet is waited for while its bytes
keep arriving, and up to :data:`NOT_YET_WAIT` seconds with none landing; then the peer hears
``not_yet`` (in place of the first chunk or of the rest) and asks someone else, or again later.

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
from .holdings import Holdings, InFlight, Source

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
    ``chunk_size`` bytes (capped by what the peer accepts), or with a typed ``Error``. Of a blob
    in flight each chunk is sent once it has landed, waited for while it keeps arriving and up
    to ``wait`` seconds (default :data:`NOT_YET_WAIT`) with nothing landing."""
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
    if src is None:
        await conn.stream.send(Error("not_found", f"no blob {req.digest} on this node"))
        return
    chunk = max(MIN_CHUNK, min(chunk_size, conn.agreement.peer_max_chunk))
    flight = src.in_flight
    if flight is not None and not await _landing(flight, req.offset, min(chunk, req.length), wait):
        await conn.stream.send(_not_landed(flight, req.digest, req.offset, end, wait))
        return
    try:
        await _send_range(conn, src, req.offset, req.length, chunk, wait)
    except _Unreadable as exc:
        log.warning(
            "piece of %s for %s: cannot read %s: %s", req.digest, conn.peer_id, src.path, exc
        )
        await conn.stream.send(Error("not_found", f"blob {req.digest} cannot be read here"))


async def _landing(flight: InFlight, offset: int, length: int, wait: float) -> bool:
    """Wait until ``[offset, offset + length)`` of a blob in flight has landed: for as long as
    its bytes keep landing, and up to ``wait`` seconds with none landing. False if it has not,
    or the download ended without a verified blob."""
    with trio.move_on_after(wait) as scope:
        landed = flight.landed_of(offset, length)
        while flight.active and not flight.has(offset, length):
            await flight.wait_changed()
            now = flight.landed_of(offset, length)
            if now > landed:  # arriving: "not yet" would send the requester to the origin
                landed, scope.deadline = now, trio.current_time() + wait
    return flight.verified or flight.has(offset, length)


def _not_landed(flight: InFlight, digest: str, start: int, end: int, wait: float) -> Error:
    if not flight.active:
        return Error("not_found", f"the download of {digest} stopped here; ask another source")
    return Error(
        "not_yet",
        f"range [{start}, {end}) of blob {digest} has not arrived here (nothing of it landed "
        f"for {wait:g} s)",
    )


class _Unreadable(Exception):
    """The blob's file could not be opened or mapped before the first byte was sent."""


async def _send_range(
    conn: Connection, src: Source, offset: int, length: int, chunk: int, wait: float
) -> None:
    """The range as ``PieceChunk`` frames, from a mapping of the file: no copy in Python. Of a
    blob in flight each chunk goes as soon as it has landed (a piece the origin is still
    sending here reaches the peer at the pace it arrives, not a piece later); a chunk that
    stops arriving ends the reply with an ``Error`` in place of the rest."""
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
        flight = src.in_flight
        for at in range(offset, offset + length, chunk):
            n = min(chunk, offset + length - at)
            if flight is not None and not await _landing(flight, at, n, wait):
                await conn.stream.send(_not_landed(flight, flight.digest, at, at + n, wait))
                return
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
