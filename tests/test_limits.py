"""What one peer may hold of a node: connections, transfers in flight, bytes, partials.

An abusive (or broken) peer is refused with ``busy`` and the node carries on for the others.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import trio

from tensord.config import Settings
from tensord.wire import Accept, Ack, Begin, Chunk, Error, encode
from tensord.wire.crc import crc32c
from tensord.wire.meta import TensorMeta

from .support.helpers import fast_settings, running
from .support.raw_peer import RawPeer


def limited(**transfer: int) -> Settings:
    base = fast_settings(authenticated=False)  # raw peers below do not authenticate
    return replace(base, transfer=replace(base.transfer, **transfer))


def begin(xid: str, nbytes: int = 8192, resume: bool = False) -> Begin:
    return Begin(xid, TensorMeta(f"t{xid[:4]}", "|u1", (nbytes,), nbytes), 4096, 4, resume)


async def test_transfers_in_flight_per_peer_are_capped() -> None:
    async with running(limited(max_peer_transfers=2)) as node:
        peers = [await RawPeer.connect(node.port) for _ in range(3)]
        for i, p in enumerate(peers[:2]):  # two transfers begun, never finished
            await p.stream.send_all(encode(begin(f"{i:02d}" * 8, resume=True)))
            assert isinstance(await p.next_message(), Accept)
        await peers[2].stream.send_all(encode(begin("02" * 8)))
        err = await peers[2].expect_error_then_close("busy")
        assert "max_peer_transfers = 2" in err.message
        # Another peer (another node id) is not affected.
        async with running(fast_settings(authenticated=False)) as other:
            array = np.arange(1000, dtype=np.float64)
            await other.send_tensor(f"127.0.0.1:{node.port}", "fine", array)
            assert np.array_equal((await node.receive_tensor()).array, array)


async def test_bytes_pending_per_peer_are_capped() -> None:
    async with running(limited(max_peer_pending_bytes=10_000)) as node:
        p = await RawPeer.connect(node.port)
        await p.stream.send_all(encode(begin("aa" * 8, nbytes=16_384)))
        err = await p.expect_error_then_close("busy")
        assert "max_peer_pending_bytes = 10000" in err.message


async def test_connections_per_peer_are_capped() -> None:
    async with running(limited(max_peer_connections=2)) as node:
        kept = [await RawPeer.connect(node.port) for _ in range(2)]
        extra = await RawPeer.connect(node.port)
        err = await extra.expect_error_then_close("busy")
        assert "max_peer_connections" in err.message
        await kept[0].stream.aclose()
        # A slot is free again once a connection closes; the node checks on the next one.
        with trio.fail_after(5):
            while True:
                again = await RawPeer.connect(node.port)
                await again.stream.send_all(encode(begin("bb" * 8, resume=True)))
                msg = await again.next_message()
                if isinstance(msg, Accept):
                    break
                assert isinstance(msg, Error) and msg.code == "busy"  # not yet released
                await trio.testing.wait_all_tasks_blocked()


async def test_connections_beyond_the_node_wide_cap_make_the_oldest_stranger_go() -> None:
    """At the node-wide cap a newcomer takes the place of the oldest connection that has not
    authenticated (``MaxStartups``); see test_peer_boundary for the members-only case."""
    async with running(limited(max_connections=2)) as node:
        # Two connections that never say hello hold both slots (until the handshake timeout).
        holders = [await trio.open_tcp_stream("127.0.0.1", node.port) for _ in range(2)]
        late = await trio.open_tcp_stream("127.0.0.1", node.port)
        with trio.fail_after(5):
            assert await holders[0].receive_some(100) == b""  # closed without a word
        for h in [*holders, late]:
            await h.aclose()
        with trio.fail_after(5):
            while True:  # the slots free up as the node notices the closes
                try:
                    peer = await RawPeer.connect(node.port)
                except (AssertionError, trio.BrokenResourceError):
                    await trio.testing.wait_all_tasks_blocked()
                    continue
                break
        await peer.stream.aclose()


async def test_partials_kept_per_peer_are_capped_oldest_first() -> None:
    async with running(limited(max_peer_transfers=2)) as node:
        chunk = bytes(range(256)) * 16
        ids = ["a1" * 8, "b2" * 8, "c3" * 8]
        for xid in ids:  # each: begin, one chunk acknowledged, then the connection is cut
            p = await RawPeer.connect(node.port)
            await p.stream.send_all(
                encode(begin(xid, resume=True))
                + encode(Chunk(xid, 0, 0, 4096, 4096, crc32c(chunk)))
                + chunk
            )
            assert isinstance(await p.next_message(), Accept)
            assert isinstance(await p.next_message(), Ack)  # chunk 0 is in
            await p.stream.aclose()
            with trio.fail_after(5):
                while node.transfers_in_flight:  # the node sees the cut, keeps the partial
                    await trio.testing.wait_all_tasks_blocked()
        haves = {}
        for xid in ids:
            p = await RawPeer.connect(node.port)
            await p.stream.send_all(encode(begin(xid, resume=True)))
            accept = await p.next_message()
            assert isinstance(accept, Accept)
            haves[xid] = accept.have
            await p.stream.aclose()
        assert haves[ids[0]] == ()  # evicted: starts over
        assert haves[ids[2]] == ((0, 1),)  # kept: resumes after chunk 0
