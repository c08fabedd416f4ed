"""Pipelined chain broadcast (issue 14, track C): ``TensorNode.broadcast_tensor`` sends a tensor
down a chain of peers that forward each chunk as it lands; the chain is repaired around a dead
node; a peer without the ``chain`` feature gets a direct send; hostile chain fields are refused.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import trio

from tensord.config import Settings
from tensord.events import Event, TransferEvent
from tensord.node import TensorNode
from tensord.wire import Begin, Stored
from tensord.wire.handshake import ALL_FEATURES
from tensord.wire.messages import MAX_CHAIN, ChainOutcome, from_header, to_header
from tensord.wire.meta import TensorMeta

from .support.helpers import fast_settings
from .support.raw_peer import RawPeer, header, unauthenticated

MiB = 1 << 20


def settings(transport: str = "tcp", **protocol: Any) -> Settings:
    base = fast_settings(transport=transport, chunk_size=256 * 1024, **protocol)
    return replace(base, transfer=replace(base.transfer, window_bytes=2 * MiB))


def tensor(nbytes: int, seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).integers(0, 255, nbytes, dtype=np.uint8)


async def nodes(stack: AsyncExitStack, n: int, transport: str = "tcp", **kw: Any) -> list[Any]:
    return [
        await stack.enter_async_context(TensorNode(settings(transport), **kw)) for _ in range(n)
    ]


def drained(events: trio.MemoryReceiveChannel[Event]) -> list[TransferEvent]:
    """The transfer events waiting in a subscription, in the order they were published."""
    out = []
    while True:
        try:
            ev = events.receive_nowait()
        except trio.WouldBlock:
            return out
        if isinstance(ev, TransferEvent):
            out.append(ev)


# -- wire ----------------------------------------------------------------------------------


def test_chain_fields_round_trip() -> None:
    meta = TensorMeta.of("w", np.zeros(4, np.float32))
    chain = ("tensord://c@127.0.0.1:7001", "tensord://_@[::1]:7002")
    for begin in (Begin("ab" * 8, meta, 4096, 8), Begin("ab" * 8, meta, 4096, 8, True, chain)):
        assert from_header(to_header(begin), 1 << 30) == begin
    out = (ChainOutcome(chain[0], "stored", "", 10, 2, 4), ChainOutcome(chain[1], "failed", "x"))
    for stored in (Stored("ab" * 8), Stored("ab" * 8, out)):
        assert from_header(to_header(stored), 1 << 30) == stored
    assert "chain" in ALL_FEATURES


@pytest.mark.parametrize(
    "chain",
    [
        "tensord://c@h:1",  # not a list
        [f"tensord://n{i}@127.0.0.1:{7000 + i}" for i in range(MAX_CHAIN + 1)],
        ["tensord://c@h:1", "tensord://c@h:1"],  # twice: a loop
        ["http://evil/"],
        ["tensord://c@h:99999"],
        ["tensord://c@h:1\n"],
        [["nested"]],
    ],
)
def test_bad_chain_fields_are_refused_at_decode(chain: object) -> None:
    h = to_header(Begin("ab" * 8, TensorMeta.of("w", np.zeros(4, np.float32)), 4096, 8))
    h["chain"] = chain
    with pytest.raises(Exception, match="chain"):
        from_header(h, 1 << 30)


async def test_hostile_chain_is_answered_with_an_error() -> None:
    async with TensorNode(unauthenticated()) as node:
        meta = TensorMeta.of("w", np.zeros(1024, np.float32))
        begin = to_header(Begin("ab" * 8, meta, 4096, 8))
        for bad, code in (
            ([f"tensord://n{i}@127.0.0.1:1" for i in range(MAX_CHAIN + 1)], "bad_message"),
            ([f"tensord://{node.node_id}@127.0.0.1:1"], "bad_chain"),  # back to itself
        ):
            peer = await RawPeer.connect(node.port)
            await peer.stream.send_all(header({**begin, "chain": bad}))
            with trio.fail_after(5):
                msg = await peer.next_message()
            assert msg is not None and getattr(msg, "code", None) in (code, "protocol"), msg
            await peer.stream.aclose()
        assert node.tensor_names() == []


# -- library nodes ---------------------------------------------------------------------------


async def test_broadcast_to_three_peers_is_byte_exact_and_pipelined(transport: str) -> None:
    data = tensor(16 * MiB)
    async with AsyncExitStack() as stack:
        a, b, c, d = await nodes(stack, 4, transport)
        async with b.events.subscribe() as events:
            result = await a.broadcast_tensor([b.addr, c.addr, d.addr], "w", data)
            order = drained(events)
        assert result.ok, result
        assert [o.peer for o in result.outcomes] == [b.addr, c.addr, d.addr]
        assert [o.status for o in result.outcomes] == ["stored"] * 3
        for n, sender in ((b, a), (c, b), (d, c)):  # each got it from its predecessor
            arrival = await n.receive_tensor()
            assert arrival.sender == sender.node_id and np.array_equal(arrival.array, data)
        # b forwarded chunks to c before it had received its last chunk: pipelined.
        last_in = next(
            i
            for i, ev in enumerate(order)
            if ev.direction == "receive" and ev.state == "progress" and ev.bytes_done == data.nbytes
        )
        first_out = next(
            i
            for i, ev in enumerate(order)
            if ev.direction == "send" and ev.peer == c.node_id and ev.state == "progress"
        )
        assert first_out < last_in
