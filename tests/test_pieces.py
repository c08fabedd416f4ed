"""Blob pieces between two real library nodes, over TCP and QUIC: holdings, ranges byte-exact,
ranges served as they land, typed refusals, corrupt peers, old peers and hostile requests."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from tensord.cluster import piece_server
from tensord.cluster.holdings import Holdings, InFlight
from tensord.cluster.piece_client import (
    CorruptPiece,
    PiecesUnsupported,
    PieceUnavailable,
    announce,
    fetch_range,
    query,
)
from tensord.config import HostPort
from tensord.net.connection import Connection
from tensord.net.security import PeerSecurity
from tensord.net.stream import ConnectionClosed
from tensord.net.tcp import dial, open_listeners, serve
from tensord.node import TensorNode
from tensord.wire.frames import PREFIX, FrameDecoder
from tensord.wire.handshake import ALL_FEATURES, make_hello
from tensord.wire.messages import (
    MAX_PIECE,
    BlobEntry,
    Error,
    Have,
    PieceChunk,
    PieceRequest,
    Ping,
    Pong,
    Query,
)

from .support.helpers import fast_settings, running

MiB = 1 << 20
ABSENT = "sha256:" + "0" * 64


def blob(tmp: Path, size: int, seed: int = 0) -> tuple[str, Path, bytes]:
    data = os.urandom(size) if seed == 0 else bytes((i * seed) % 251 for i in range(size))
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = tmp / digest.replace(":", "-")
    path.write_bytes(data)
    return digest, path, data


async def fetched(node: TensorNode, peer: str, digest: str, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await fetch_range(node, peer, digest, offset, length, memoryview(buf))
    return bytes(buf)


class Landing:
    """A blob in flight on node ``a``: its partial file, and ``land`` to write a range there
    and tell the holdings, as a download does."""

    def __init__(self, a: TensorNode, tmp: Path, data: bytes, name: str) -> None:
        self.data = data
        self.digest = "sha256:" + hashlib.sha256(data).hexdigest()
        part = tmp / name
        with part.open("wb") as f:
            f.truncate(len(data))
        self.flight = a.holdings.begin(self.digest, len(data), part)
        self._fd = os.open(part, os.O_WRONLY)

    def write(self, offset: int, length: int) -> None:
        """Write without telling (a download that then finishes)."""
        os.pwrite(self._fd, self.data[offset : offset + length], offset)

    def land(self, offset: int, length: int) -> None:
        self.write(offset, length)
        self.flight.landed(offset, length)

    def close(self) -> None:
        os.close(self._fd)


@asynccontextmanager
async def pair(transport: str = "tcp", **kw: Any) -> AsyncIterator[tuple[TensorNode, TensorNode]]:
    async with (
        running(fast_settings(transport=transport, **kw)) as a,
        running(fast_settings(transport=transport, **kw)) as b,
    ):
        yield a, b


async def test_query_and_ranges_of_a_complete_blob(
    transport: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest, path, data = blob(tmp_path, 9 * MiB + 123)
    sendfile = os.sendfile
    kernel_copies: list[int] = []

    def counted(out: int, fd: int, offset: int, count: int) -> int:
        kernel_copies.append(count)
        return sendfile(out, fd, offset, count)

    monkeypatch.setattr(os, "sendfile", counted)
    async with pair(transport) as (a, b):
        a.holdings.add(digest, path)
        got = await query(b, a.addr, [digest, ABSENT, digest])
        assert got == {digest: BlobEntry.whole(digest, len(data), a.holdings.piece_size)}
        assert got[digest].complete and not got[digest].fetching
        # Whole pieces, an unaligned range over several chunk frames, the short last piece.
        for offset, length in [(0, 4 * MiB), (4 * MiB, 4 * MiB), (12345, 3 * MiB + 7),
                               (8 * MiB, MiB + 123), (len(data) - 1, 1)]:  # fmt: skip
            assert await fetched(b, a.addr, digest, offset, length) == data[offset:][:length]
        assert b.pool_size(a.node_id) == 1  # every call over the one pooled connection
    # Plain TCP: file to socket in the kernel; QUIC: from the mapping, as chunks are sent.
    assert bool(kernel_copies) == (transport == "tcp")


async def test_a_range_in_flight_is_served_once_it_lands(transport: str, tmp_path: Path) -> None:
    size = 6 * MiB
    async with pair(transport) as (a, b):
        blob = Landing(a, tmp_path, os.urandom(size), "blob.incomplete")
        digest, data, flight, land = blob.digest, blob.data, blob.flight, blob.land
        try:
            land(0, 4 * MiB)
            entry = (await query(b, a.addr, [digest]))[digest]
            assert entry == BlobEntry(digest, size, 4 * MiB, False, ((0, 1),), fetching=True)
            results: dict[str, bytes] = {}

            async def take(offset: int, length: int) -> None:
                results["got"] = await fetched(b, a.addr, digest, offset, length)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(take, 3 * MiB, 2 * MiB)
                await _until_waiting(flight)
                land(4 * MiB, MiB // 2)  # not all of it yet: the request keeps waiting
                await _until_waiting(flight)
                assert "got" not in results
                land(4 * MiB + MiB // 2, MiB // 2)
            assert results["got"] == data[3 * MiB : 5 * MiB]

            # The download completes while a request waits: served as the complete blob.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(take, 5 * MiB, MiB)
                await _until_waiting(flight)
                blob.write(5 * MiB, size - 5 * MiB)
                flight.finish()
            assert results["got"] == data[5 * MiB :]
            assert (await query(b, a.addr, [digest]))[digest].complete
        finally:
            blob.close()


async def test_an_abandoned_download_answers_not_found(tmp_path: Path) -> None:
    part = tmp_path / "x.incomplete"
    part.write_bytes(b"\0" * MiB)
    async with pair() as (a, b):
        flight = a.holdings.begin(ABSENT, MiB, part)
        refused: list[PieceUnavailable] = []

        async def take() -> None:
            try:
                await fetched(b, a.addr, ABSENT, 0, 4096)
            except PieceUnavailable as exc:
                refused.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(take)
            await _until_waiting(flight)
            flight.abandon()
        assert refused[0].code == "not_found" and refused[0].peer == a.node_id
        assert a.holdings.source(ABSENT) is None


async def _until_waiting(flight: InFlight) -> None:
    """Until a peer's request waits on ``flight`` (its bytes may still be in a socket)."""
    while not flight.waiting:
        await trio.testing.wait_all_tasks_blocked(cushion=0.001)


async def test_refusals_are_typed_and_keep_the_connection(
    transport: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest, path, data = blob(tmp_path, MiB, seed=7)
    monkeypatch.setattr(piece_server, "NOT_YET_WAIT", 0.05)
    part = tmp_path / "y.incomplete"
    part.write_bytes(b"")
    async with pair(transport) as (a, b):
        a.holdings.add(digest, path)
        a.holdings.begin(ABSENT, MiB, part)  # nothing lands
        cases = [(ABSENT.replace("0", "1"), 0, 10, "not_found"),
                 (ABSENT, 0, 10, "not_yet"),
                 (digest, MiB - 10, 11, "bad_range")]  # fmt: skip
        for d, offset, length, code in cases:
            with pytest.raises(PieceUnavailable) as info:
                await fetched(b, a.addr, d, offset, length)
            assert info.value.code == code and info.value.peer == a.node_id
            assert info.value.digest == d
        assert b.pool_stats()[a.node_id]["dials"] == 1  # the connection stayed usable
        assert await fetched(b, a.addr, digest, 0, 10) == data[:10]
        with pytest.raises(ValueError):
            await fetched(b, a.addr, digest, 0, MAX_PIECE + 1)


async def test_announcements_are_noted(transport: str) -> None:
    async with pair(transport) as (a, b):
        entry = BlobEntry(ABSENT, 10 * MiB, 4 * MiB, False, ((1, 2),), fetching=True)
        await announce(b, a.addr, entry)
        assert a.holdings.heard(ABSENT) == {b.node_id: entry}
        assert a.holdings.heard("sha256:" + "1" * 64) == {}


async def test_blobs_in_the_store_are_served(tmp_path: Path) -> None:
    s = replace(fast_settings(), state_dir=tmp_path / "a")
    async with running(s) as a, running() as b:
        blobs = tmp_path / "a" / "models" / "blobs"
        assert blobs.is_dir()
        digest, _, data = blob(blobs, 100_000)
        assert (await query(b, a.addr, [digest]))[digest].size == len(data)
        assert await fetched(b, a.addr, digest, 99_000, 1000) == data[99_000:]
        assert await query(b, a.addr, [ABSENT]) == {}
    assert Holdings.for_store(None, 4 * MiB).source(digest) is None


async def test_a_peer_without_the_feature_is_unsupported(tmp_path: Path) -> None:
    async with running() as a, running(features=ALL_FEATURES - {"pieces"}) as old:
        for call in (
            partial(query, a, old.addr, [ABSENT]),
            partial(announce, a, old.addr, BlobEntry.whole(ABSENT, 1, 4 * MiB)),
            partial(fetched, a, old.addr, ABSENT, 0, 1),
        ):
            with pytest.raises(PiecesUnsupported) as info:
                await call()
            assert info.value.peer == old.node_id and info.value.code == "unsupported"
        assert a.pool_stats()[old.node_id]["dials"] == 1
        await a.ping(old.addr)  # and it keeps working for everything else


async def _evil_peer(conn: Connection) -> None:
    """Answers every piece request with one chunk whose crc32c is wrong."""
    while True:
        msg = await conn.stream.receive()
        if isinstance(msg, PieceRequest):
            payload = b"\x01" * msg.length
            await conn.stream.send_with_payload(PieceChunk(msg.offset, msg.length, 1234), payload)
        elif isinstance(msg, Query):
            await conn.stream.send(Have((BlobEntry.whole(msg.digests[0], 100, 4 * MiB),)))


async def test_a_corrupt_chunk_is_detected_and_names_the_peer() -> None:
    async with running() as b, trio.open_nursery() as nursery:
        listeners = await open_listeners(HostPort("127.0.0.1", 0))
        port = listeners[0].socket.getsockname()[1]
        hello = make_hello("evil", ALL_FEATURES, MAX_PIECE)
        security = PeerSecurity.from_settings(b.settings.security)
        nursery.start_soon(
            partial(
                serve,
                listeners,
                hello,
                FrameDecoder,
                _evil_peer,
                handshake_timeout=5,
                security=security,
            )
        )
        peer = f"127.0.0.1:{port}"
        assert ABSENT in await query(b, peer, [ABSENT])
        with pytest.raises(CorruptPiece) as info:
            await fetched(b, peer, ABSENT, 0, 100)
        assert info.value.peer == "evil" and info.value.digest == ABSENT
        assert info.value.code == "checksum"
        assert b.pool_size(peer) == 0  # its connection is closed, not reused
        nursery.cancel_scope.cancel()


async def test_hostile_requests_are_refused_and_the_node_carries_on(tmp_path: Path) -> None:
    digest, path, data = blob(tmp_path, MiB, seed=3)
    async with running() as a, running() as b:
        a.holdings.add(digest, path)
        security = PeerSecurity.from_settings(a.settings.security)

        async def raw(header: dict[str, Any]) -> tuple[object, object]:
            conn = await dial(
                HostPort("127.0.0.1", a.port),
                make_hello("raw", ALL_FEATURES, MAX_PIECE),
                FrameDecoder,
                connect_timeout=5,
                security=security,
            )
            try:
                h = msgpack.packb(header)
                await conn.stream.transport.send_buffers((PREFIX.pack(len(h)) + h,))
                with trio.fail_after(10):
                    reply = await conn.stream.receive()
                    try:
                        await conn.stream.send(Ping(1))
                        after: object = await conn.stream.receive()
                    except (ConnectionClosed, OSError, trio.BrokenResourceError):
                        after = None  # the node closed this connection
            finally:
                await conn.aclose()
            return reply, after

        # Bounds the decoder refuses: an error frame, then the connection closes.
        for header in (
            {"t": "piece", "d": digest, "o": 0, "l": 1 << 40},
            {"t": "piece", "d": digest, "o": 1 << 60, "l": 1},
            {"t": "piece", "d": "sha256:../../etc/passwd", "o": 0, "l": 1},
            {"t": "query", "d": [digest] * 300},
            {"t": "announce", "b": {"d": digest, "s": 1 << 50, "ps": 4096}},
        ):
            reply, after = await raw(header)
            assert isinstance(reply, Error) and reply.code == "protocol", reply
            assert after is None
        # A range beyond the blob: a typed answer on a connection that stays open.
        reply, after = await raw({"t": "piece", "d": digest, "o": MiB, "l": 1})
        assert isinstance(reply, Error) and reply.code == "bad_range"
        assert isinstance(after, Pong)
        assert await fetched(b, a.addr, digest, 0, MiB) == data


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 40_000),
    st.integers(4096, 9000),
    st.lists(st.tuples(st.integers(0, 40_000), st.integers(0, 9000)), max_size=12),
)
def test_in_flight_pieces_are_exactly_the_pieces_wholly_landed(
    size: int, piece: int, writes: list[tuple[int, int]]
) -> None:
    holdings = Holdings(None, 4096)
    flight = holdings.begin(ABSENT, size, Path("/nonexistent"), piece)
    written = bytearray(size)
    for offset, length in writes:
        offset, length = min(offset, size), min(length, size - min(offset, size))
        flight.landed(offset, length)
        written[offset : offset + length] = b"\1" * length
    n = -(-size // piece)
    held = [i for i in range(n) if all(written[i * piece : min((i + 1) * piece, size)])]
    got = [i for a, b in flight.pieces() for i in range(a, b)]
    assert got == held
    assert flight.entry().pieces == flight.pieces() and flight.entry().fetching
    with pytest.raises(ValueError):
        flight.landed(size, 1)
    flight.finish()
    assert holdings.in_flight(ABSENT) is None
    assert holdings.entry(ABSENT) == BlobEntry.whole(ABSENT, size, 4096)


async def test_a_piece_in_flight_streams_chunk_by_chunk_as_it_lands(
    transport: str, tmp_path: Path
) -> None:
    """A piece the origin is still sending to a node reaches its peers as it arrives: each
    chunk goes once it has landed, not once the whole range has."""
    size = 3 * MiB
    async with pair(transport, chunk_size=MiB) as (a, b):
        blob = Landing(a, tmp_path, os.urandom(size), "s.incomplete")
        buf = bytearray(size)
        try:
            async with trio.open_nursery() as nursery:
                into = memoryview(buf)
                nursery.start_soon(fetch_range, b, a.addr, blob.digest, 0, size, into)
                await _until_waiting(blob.flight)
                blob.land(0, MiB)  # the first chunk: sent at once, while the rest is missing
                with trio.fail_after(10):
                    while buf[:MiB] != blob.data[:MiB]:
                        await trio.testing.wait_all_tasks_blocked(cushion=0.001)
                assert not any(buf[MiB:])
                blob.land(MiB, 2 * MiB)
            assert buf == blob.data
        finally:
            blob.close()


async def test_a_range_that_keeps_arriving_is_waited_for_past_the_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``not_yet`` means "nothing of it landed for NOT_YET_WAIT", not "slower than that": a
    range landing slowly but steadily is served whole; one that stops half-way ends with
    ``not_yet`` after what was there, and the connection stays usable."""
    monkeypatch.setattr(piece_server, "NOT_YET_WAIT", 1.0)
    async with pair(chunk_size=MiB) as (a, b):
        blob = Landing(a, tmp_path, os.urandom(2 * MiB), "k.incomplete")
        digest, data, land = blob.digest, blob.data, blob.land
        try:
            step = MiB // 16
            got: dict[str, bytes] = {}

            async def take() -> None:
                got["first"] = await fetched(b, a.addr, digest, 0, MiB)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(take)
                for at in range(0, MiB, step):  # 16 steps 0.1 s apart: 1.6 s in all
                    await trio.sleep(0.1)
                    land(at, step)
            assert got["first"] == data[:MiB]
            # The second MiB: half of it lands, then nothing.
            land(MiB, MiB // 2)
            with pytest.raises(PieceUnavailable) as info:
                await fetched(b, a.addr, digest, MiB // 2, MiB + MiB // 2)
            assert info.value.code == "not_yet"
            assert b.pool_stats()[a.node_id]["dials"] == 1  # the connection stayed usable
            assert await fetched(b, a.addr, digest, MiB, MiB // 2) == data[MiB:][: MiB // 2]
        finally:
            blob.close()
