"""The receiver's timers, in virtual time: a :class:`~tensord.receiver.Receiver` built on its
own and fed connections of a fake network (no sockets) under ``autojump_clock``: partials
expire after their TTL, idle inbound connections are closed."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import pytest
import trio

from tensord.config import Settings
from tensord.errors import TensorNotFound
from tensord.events import EventBus, TransferEvent
from tensord.net.connection import receive_chunked, send_chunked
from tensord.net.quic import ListenerStats, QuicTuning
from tensord.net.security import PeerSecurity
from tensord.net.stream import ConnectionClosed
from tensord.receiver import Receiver
from tensord.results import InFlight, TransferIds
from tensord.sending import meta_of, new_send
from tensord.sink import flat_bytes
from tensord.wire.frames import FrameDecoder
from tensord.wire.handshake import ALL_FEATURES, make_hello
from tensord.wire.messages import Begin, Chunk, Stored
from tensord.wire.meta import TensorMeta
from tensord.wire.transfer import ReceiveTransfer

from .support.fake_network import connection_pair
from .support.helpers import fast_settings

TTL = 10.0


def settings() -> Settings:
    return (
        fast_settings(chunk_size=64 * 1024, enable_compression=False)
        .with_transfer(partial_ttl_seconds=TTL, window_bytes=256 * 1024)
        .with_pool(max_idle_seconds=40.0)
    )


def nothing_held(name: str) -> tuple[TensorMeta, np.ndarray[Any, Any]]:
    raise TensorNotFound(name)


def receiver(
    events: EventBus, s: Settings, arrive: Callable[[str, Any, str], None] = lambda *_: None
) -> Receiver:
    return Receiver(
        s,
        store=None,
        hello=make_hello("b", ALL_FEATURES, 64 << 20),
        decoder=FrameDecoder,
        security=PeerSecurity(),
        quic_tuning=QuicTuning(),
        quic_stats=ListenerStats(),
        events=events,
        ids=TransferIds(),
        in_flight=InFlight(),
        stored=nothing_held,
        arrive=arrive,
    )


async def test_a_partial_older_than_the_ttl_is_swept(autojump_clock: trio.abc.Clock) -> None:
    s = settings()
    events = EventBus()
    recv = receiver(events, s)
    data = np.arange(1 << 20, dtype=np.uint32)  # 4 MiB: 64 chunks, a window of 4
    async with trio.open_nursery() as nursery:
        await nursery.start(recv.sweep)
        sender, served = await connection_pair("a", "b")
        nursery.start_soon(recv.serve_connection, served)
        xfer = new_send(
            s, TransferIds().next(), meta_of("w", data), flat_bytes(data), sender.agreement
        )
        async with events.subscribe() as seen:
            with trio.CancelScope() as cut:
                async with trio.open_nursery() as sending:
                    sending.start_soon(
                        lambda: send_chunked(sender, xfer, resume=False, io_timeout=60)
                    )
                    async for event in seen:  # the first chunks arrived: cut the connection
                        if isinstance(event, TransferEvent) and event.state == "progress":
                            cut.cancel()
            await sender.aclose()
            async for event in seen:
                if isinstance(event, TransferEvent) and event.state == "interrupted":
                    break
        cut_at = trio.current_time()
        assert recv.partials == 1  # kept for the sender's retry...
        await trio.sleep(TTL - 0.5)
        assert recv.partials == 1  # ...for the whole TTL...
        await trio.sleep(TTL / 2 + 1)  # (the sweep runs every TTL / 2)
        assert recv.partials == 0  # ...and no longer
        assert trio.current_time() - cut_at < TTL * 1.6
        nursery.cancel_scope.cancel()


async def test_an_idle_inbound_connection_is_closed(autojump_clock: trio.abc.Clock) -> None:
    """A peer that connects and says nothing holds a connection for the pool's idle time plus
    30 s (here 40 + 30), not forever."""
    recv = receiver(EventBus(), settings())
    _, served = await connection_pair("a", "b")
    started = trio.current_time()
    await recv.serve_connection(served)
    assert trio.current_time() - started == pytest.approx(70.0)


async def test_a_stored_that_cannot_be_sent_is_confirmed_again_on_resume() -> None:
    """The tensor is committed but the connection breaks while ``Stored`` is being sent: the
    sender's resumed ``Begin`` hears "stored" (every chunk accepted), nothing is sent twice and
    nothing arrives twice - the receiver remembered the completed transfer on the failing path
    too."""
    s = settings()
    arrivals: list[str] = []
    recv = receiver(EventBus(), s, lambda name, array, sender: arrivals.append(name))
    data = np.arange(1 << 18, dtype=np.uint32)  # 1 MiB: 16 chunks
    sender, served = await connection_pair("a", "b")
    real_send = served.stream.send

    async def send_breaking_on_stored(*msgs: Any, **kwargs: Any) -> None:
        if any(isinstance(m, Stored) for m in msgs):
            await served.aclose()  # the sender sees the connection end without a reply
            raise trio.BrokenResourceError("the connection broke under Stored")
        await real_send(*msgs, **kwargs)

    served.stream.send = send_breaking_on_stored  # type: ignore[method-assign]
    xfer = new_send(s, TransferIds().next(), meta_of("w", data), flat_bytes(data), sender.agreement)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(recv.serve_connection, served)
        with pytest.raises((ConnectionClosed, trio.BrokenResourceError, trio.EndOfChannel)):
            await send_chunked(sender, xfer, resume=False, io_timeout=5)
        await sender.aclose()
        assert arrivals == ["w"]

        again, served_again = await connection_pair("a", "b")
        nursery.start_soon(recv.serve_connection, served_again)
        sent: list[int] = []
        real_again = again.stream.send

        async def count_chunks(*msgs: Any, **kwargs: Any) -> None:
            sent.extend(m.index for m in msgs if isinstance(m, Chunk))
            await real_again(*msgs, **kwargs)

        again.stream.send = count_chunks  # type: ignore[method-assign]
        await send_chunked(again, xfer, resume=True, io_timeout=5)
        assert sent == [] and arrivals == ["w"]  # confirmed, not re-sent, not stored twice
        await again.aclose()
        nursery.cancel_scope.cancel()


async def test_a_commit_longer_than_the_io_timeout_still_answers_stored(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The inactivity timeout watches the sender, not the receiver's own commit (an fsync of a
    large tensor, a relay waiting for the rest of its chain): a commit that takes three
    io_timeouts ends with ``Stored``, not with a timeout that throws the tensor away."""
    s = settings()
    data = np.arange(1 << 16, dtype=np.uint32)
    sender, served = await connection_pair("a", "b")
    xfer = new_send(s, TransferIds().next(), meta_of("w", data), flat_bytes(data), sender.agreement)
    dest = bytearray(data.nbytes)
    committed: list[float] = []

    async def slow_commit() -> None:
        await trio.sleep(3.0)
        committed.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(send_chunked, sender, xfer, resume=False, io_timeout=60))
        begin = await served.stream.receive()
        assert isinstance(begin, Begin)
        recv_xfer = ReceiveTransfer(begin, memoryview(dest), lz4=False)
        await receive_chunked(served, recv_xfer, io_timeout=1.0, on_complete=slow_commit)
    assert committed and dest == flat_bytes(data)  # and send_chunked returned: it heard Stored
