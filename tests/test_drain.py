"""Draining a node (what SIGTERM does) and pinging peers."""

from __future__ import annotations

import numpy as np
import pytest
import trio

from tensord.errors import PeerUnreachable, TensorError
from tensord.events import TransferEvent
from tensord.node import TensorNode

from .support.helpers import fast_settings, running


async def test_ping_measures_rtt_on_a_pooled_connection() -> None:
    async with running() as a, running() as b:
        rtts = [await a.ping(b.addr) for _ in range(5)]
        assert all(0 < r < 1 for r in rtts)
        (stats,) = a.pool_stats().values()
        assert stats["dials"] == 1 and stats["reuses"] == 4


async def test_ping_unreachable_peer() -> None:
    async with running(fast_settings(max_retries=0)) as a:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        await listeners[0].aclose()
        with pytest.raises(PeerUnreachable):
            await a.ping(f"127.0.0.1:{port}")


async def test_drain_lets_the_transfer_in_flight_finish_and_refuses_new_ones() -> None:
    big = np.random.default_rng(3).standard_normal(32 << 20).astype(np.float32)  # 128 MiB
    b = TensorNode(fast_settings())
    async with running(fast_settings(max_retries=0)) as a, trio.open_nursery() as nursery:
        await b.start(nursery)
        results = []
        sent = trio.Event()

        async def send() -> None:
            results.append(await a.send_tensor(b.addr, "big", big))
            sent.set()

        async with b.events.subscribe() as events:
            nursery.start_soon(send)
            async for event in events:
                if isinstance(event, TransferEvent) and event.state == "progress":
                    break
        assert b.transfers_in_flight == 1
        drained = await b.drain(30)
        assert drained
        with trio.fail_after(10):
            await sent.wait()  # the sender hears Stored just after the receiver finished
        assert results[0].nbytes == big.nbytes and results[0].retries == 0
        assert not b.running
        with pytest.raises(TensorError):
            await a.send_tensor(b.addr, "late", big[:10])


async def test_drain_with_no_grace_cuts_the_transfer() -> None:
    big = np.random.default_rng(4).standard_normal(32 << 20).astype(np.float32)
    b = TensorNode(fast_settings())
    async with running(fast_settings(max_retries=0)) as a, trio.open_nursery() as nursery:
        await b.start(nursery)
        failures: list[BaseException] = []

        async def send() -> None:
            try:
                await a.send_tensor(b.addr, "big", big)
            except TensorError as exc:
                failures.append(exc)

        async with b.events.subscribe() as events:
            nursery.start_soon(send)
            async for event in events:
                if isinstance(event, TransferEvent) and event.state == "progress":
                    break
        assert not await b.drain(0)
    assert len(failures) == 1
