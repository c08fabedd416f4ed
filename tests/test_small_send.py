"""Small tensors: one flight out (Begin + Chunk + End in one write), one reply back.

A tensor that fits one chunk is sent as ``Begin``, its chunk and ``End`` in a single write and
costs one round trip (``Stored``). The wire is the documented one - nothing is negotiated - so
a receiver written against docs/PROTOCOL.md, reading one frame at a time, must accept it, and
must be able to ask for the chunk again (``Nack``: the chunk is resent alone, ``End`` stands).
The pool's checkout takes a free slot without a scheduler pass and its reaper does not wake per
send; what must not change is tested here: a cancelled caller takes nothing, waiters are
served, idle connections still expire. A request and its reply make one scheduler pass (the
write leaves it to the read), and a receive runs in its caller's scope: a cancel ends it
quietly, only the inactivity deadline is a timeout.
"""

from __future__ import annotations

import numpy as np
import pytest
import trio
import trio.testing

from tensord.errors import ProtocolError
from tensord.net.connection import Connection, receive_chunked
from tensord.net.pool import PeerPool
from tensord.net.stream import FramedStream, SocketTransport, StreamTransport
from tensord.wire import (
    Begin,
    Chunk,
    End,
    FrameDecoder,
    Hello,
    Nack,
    SendTransfer,
    Stored,
    TensorMeta,
    encode,
    make_hello,
)
from tensord.wire.compress import AdaptiveCompressor
from tensord.wire.crc import crc32c
from tensord.wire.handshake import ALL_FEATURES, Agreement
from tensord.wire.transfer import ReceiveTransfer, SendState

from .support.helpers import fast_settings, running

XID = "0123456789abcdef"
KiB = 1024


def _send(data: bytes, *, compressor: AdaptiveCompressor | None = None) -> SendTransfer:
    array = np.frombuffer(data, dtype=np.uint8)
    meta = TensorMeta.of("small", array)
    return SendTransfer(
        XID,
        meta,
        memoryview(data),
        chunk_size=1 << 20,
        window=64,
        compressor=compressor,
    )


# -- sans-I/O: the one-chunk flight ----------------------------------------------------------


def test_one_chunk_is_begin_chunk_end_and_the_end_carries_its_crc() -> None:
    data = np.random.default_rng(0).standard_normal(KiB, dtype=np.float32).tobytes()
    x = _send(data)
    begin = x.begin()
    out = x.next_chunk()
    assert out is not None and x.wants_end
    end = x.end()
    assert isinstance(begin, Begin) and not begin.resume
    assert (out.header.index, out.header.raw_len, bytes(out.payload)) == (0, len(data), data)
    assert end.crc == out.header.crc == crc32c(data)
    assert x.next_chunk() is None and not x.wants_end  # nothing more until the reply
    x.on_message(Stored(XID))
    assert x.state is SendState.DONE and x.bytes_acked == len(data)
    assert x.stats.chunks_sent == 1 and x.stats.chunks_resent == 0


def test_one_chunk_nacked_is_sent_again_and_the_end_stands() -> None:
    data = bytes(range(256)) * 16
    x = _send(data)
    x.begin()
    first = x.next_chunk()
    assert first is not None
    x.end()
    x.on_message(Nack(XID, 0))
    again = x.next_chunk()
    assert again is not None and again.header == first.header
    assert not x.wants_end  # the receiver keeps the End it has: the chunk alone completes it
    x.on_message(Stored(XID))
    assert x.state is SendState.DONE
    assert (x.stats.nacks, x.stats.chunks_resent) == (1, 1)


def test_one_compressed_chunk_ends_with_the_raw_crc() -> None:
    data = bytes(64 * KiB)  # zeros: lz4 shrinks them
    x = _send(data, compressor=AdaptiveCompressor(enabled=True, threshold=4096))
    x.begin()
    out = x.next_chunk()
    assert out is not None and out.header.compressed
    assert out.header.crc == crc32c(out.payload) != crc32c(data)
    assert x.end().crc == crc32c(data)  # the whole tensor's crc is of the raw bytes


def test_stored_before_end_is_refused() -> None:
    x = _send(b"\x01" * 4096)
    x.begin()
    x.next_chunk()
    with pytest.raises(ProtocolError, match="before the transfer ended"):
        x.on_message(Stored(XID))


# -- a receiver written against the documented frames ------------------------------------------


async def _documented_receiver(
    listener: trio.SocketListener, nacks: int, seen: list[object], got: list[bytes]
) -> None:
    """Accept one connection; per tensor: read Begin, Chunk + payload, End (one frame at a
    time, as an implementation from the docs would), answer Nack ``nacks`` times, then Stored."""
    stream = await listener.accept()
    decoder = FrameDecoder()

    async def frame() -> object:
        while (msg := decoder.next_message()) is None:
            data = await stream.receive_some(65536)
            assert data, "the sender closed the connection"
            decoder.feed(data)
        return msg

    async def payload(n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got_n = decoder.take_payload_into(view)
        while got_n < n:
            data = await stream.receive_some(n - got_n)
            assert data
            view[got_n : got_n + len(data)] = data
            got_n += len(data)
            decoder.payload_received(len(data))
        return bytes(buf)

    hello = await frame()
    assert isinstance(hello, Hello)
    await stream.send_all(encode(make_hello("documented", ALL_FEATURES - {"lz4"}, 1 << 20)))
    async with stream:
        begin = await frame()
        assert isinstance(begin, Begin)
        seen.append(begin)
        for attempt in range(nacks + 1):
            chunk = await frame()
            assert isinstance(chunk, Chunk) and chunk.index == 0
            data = await payload(chunk.wire_len)
            seen.append(chunk)
            if attempt == 0:  # End follows the first sending; a resent chunk comes alone
                end = await frame()
                assert isinstance(end, End) and end.crc == crc32c(data) == chunk.crc
                seen.append(end)
            if attempt < nacks:
                await stream.send_all(encode(Nack(begin.id, 0)))
        got.append(data)
        await stream.send_all(encode(Stored(begin.id)))
        assert await stream.receive_some(1) == b""  # the sender's node closes at shutdown


@pytest.mark.parametrize("nacks", [0, 1])
async def test_a_receiver_written_from_the_docs_accepts_the_one_write(nacks: int) -> None:
    array = np.random.default_rng(1).standard_normal(KiB, dtype=np.float32)  # 4 KiB
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    seen: list[object] = []
    got: list[bytes] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_documented_receiver, listeners[0], nacks, seen, got)
            async with running(fast_settings(authenticated=False)) as node:
                result = await node.send_tensor(f"127.0.0.1:{port}", "small", array)
    assert got == [array.tobytes()]
    assert (result.retries, result.nacks, result.legacy) == (0, nacks, False)
    assert [type(m).__name__ for m in seen] == ["Begin", "Chunk", "End"] + ["Chunk"] * nacks


# -- the pool's checkout ------------------------------------------------------------------------


def _agreement() -> Agreement:
    return Agreement(1, "peer", ALL_FEATURES, 1 << 20)


class _Dialer:
    """Connections over in-memory streams; counts the dials."""

    def __init__(self) -> None:
        self.dials = 0

    async def __call__(self) -> Connection:
        self.dials += 1
        left, _right = trio.testing.memory_stream_pair()
        return Connection(FramedStream(StreamTransport(left), FrameDecoder()), _agreement(), True)


async def test_a_cancelled_caller_takes_no_connection() -> None:
    dial = _Dialer()
    pool = PeerPool(dial, max_connections=2, max_idle=60)
    async with pool.connection():
        pass
    with trio.CancelScope() as scope:
        scope.cancel()
        async with pool.connection():
            raise AssertionError("a cancelled caller got a connection")
    assert scope.cancelled_caught
    assert (dial.dials, pool.idle, pool.in_use, pool.stats.evictions) == (1, 1, 0, 0)


async def test_waiters_for_the_only_slot_are_served_in_turn() -> None:
    dial = _Dialer()
    pool = PeerPool(dial, max_connections=1, max_idle=60)
    order: list[int] = []
    release = trio.Event()

    async def user(i: int) -> None:
        async with pool.connection():
            order.append(i)
            if i == 0:
                await release.wait()

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(user, i)
            await trio.testing.wait_all_tasks_blocked()
        assert order == [0] and pool.in_use == 1
        release.set()
    assert order == [0, 1, 2]
    assert (dial.dials, pool.stats.reuses, pool.size()) == (1, 2, 1)


async def test_a_connection_reused_then_left_idle_is_closed_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    dial = _Dialer()
    pool = PeerPool(dial, max_connections=4, max_idle=10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.reap_idle)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(5):  # in use while the reaper looks: it must still expire later
            async with pool.connection():
                await trio.sleep(6)
        assert (pool.idle, pool.stats.idle_closed) == (1, 0)
        await trio.sleep(9)  # 9 s after its last use: still there
        assert (pool.idle, pool.stats.idle_closed) == (1, 0)
        await trio.sleep(2)
        assert (pool.idle, pool.stats.idle_closed) == (0, 1)
        async with pool.connection():  # a new one is dialled and expires in turn
            pass
        await trio.sleep(11)
        assert (pool.idle, pool.stats.idle_closed, dial.dials) == (0, 2, 2)
        nursery.cancel_scope.cancel()


async def test_a_body_that_fails_closes_its_connection_and_frees_the_slot() -> None:
    dial = _Dialer()
    pool = PeerPool(dial, max_connections=1, max_idle=60)
    with pytest.raises(OSError):
        async with pool.connection() as conn:
            raise OSError("broken")
    assert conn.closed
    assert (pool.idle, pool.in_use, pool.stats.evictions) == (0, 0, 1)
    async with pool.connection() as again:  # the slot is free: a new connection is dialled
        assert again is not conn
    assert (dial.dials, pool.idle) == (2, 1)


# -- one scheduler pass per round trip -------------------------------------------------------


async def _socket_streams() -> tuple[FramedStream, FramedStream]:
    import socket

    a, b = socket.socketpair()
    return tuple(  # type: ignore[return-value]
        FramedStream(
            SocketTransport(trio.SocketStream(trio.socket.from_stdlib_socket(s))), FrameDecoder()
        )
        for s in (a, b)
    )


class _Steps(trio.abc.Instrument):
    """Counts the scheduler passes of one task (each step it ends by yielding)."""

    def __init__(self) -> None:
        self.task = trio.lowlevel.current_task()
        self.passes = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.passes += 1


async def _request(client: FramedStream, steps: _Steps) -> int:
    """``End`` out and the reply in, as the one-chunk flight does: the passes it took."""
    before = steps.passes
    await client.send(End(XID, 1), reply_next=True)
    assert steps.passes == before  # the write made no pass of its own
    assert await client.receive() == Stored(XID)
    return steps.passes - before


async def test_a_request_and_its_reply_make_one_scheduler_pass() -> None:
    """``reply_next`` moves the write's scheduler pass to the read: one per round trip, also
    when the reply was already there (in the socket, or read along with an earlier frame)."""
    client, server = await _socket_streams()
    steps = _Steps()
    trio.lowlevel.add_instrument(steps)
    try:
        async with trio.open_nursery() as nursery:

            async def answer() -> None:
                assert await server.receive() == End(XID, 1)
                await server.send(Stored(XID))

            nursery.start_soon(answer)
            assert await _request(client, steps) == 1  # the reply is awaited

        await server.send(Stored(XID))  # in the client's socket before it asks
        assert await _request(client, steps) == 1

        await server.send(Stored(XID), Stored(XID))  # two replies, read in one go
        assert await _request(client, steps) == 1
        assert await _request(client, steps) == 1  # the second was already decoded
        for _ in range(3):
            assert await server.receive() == End(XID, 1)
    finally:
        trio.lowlevel.remove_instrument(steps)
    await client.aclose()
    await server.aclose()


async def test_a_request_is_still_a_cancel_point() -> None:
    client, server = await _socket_streams()
    with trio.CancelScope() as scope:
        scope.cancel()
        await client.send(End(XID, 1), reply_next=True)
    assert scope.cancelled_caught
    with trio.move_on_after(0.05):
        await server.receive()
        raise AssertionError("a cancelled request was written")
    await client.aclose()
    await server.aclose()


# -- the receive's scope: a cancel ends it quietly, the inactivity deadline is a timeout -------


async def _idle_receive(scope: trio.CancelScope, io_timeout: float) -> None:
    left, _right = trio.testing.memory_stream_pair()
    conn = Connection(FramedStream(StreamTransport(left), FrameDecoder()), _agreement(), False)
    data = np.zeros(4 * KiB, dtype=np.uint8)
    begin = Begin(XID, TensorMeta.of("small", data), 1 << 20, 64)
    xfer = ReceiveTransfer(begin, memoryview(data))
    await receive_chunked(conn, xfer, io_timeout=io_timeout, scope=scope)


async def test_a_cancelled_receive_scope_ends_the_receive_without_a_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_idle_receive, scope, 10.0)
        await trio.sleep(1)
        scope.cancel()  # a superseding transfer
    assert scope.cancelled_caught and trio.current_time() < 2


async def test_the_receive_scope_times_out_without_progress(
    autojump_clock: trio.testing.MockClock,
) -> None:
    scope = trio.CancelScope()
    with pytest.raises(TimeoutError):
        await _idle_receive(scope, 10.0)
    assert 10 <= trio.current_time() <= 11.5
