"""Pipelined chain broadcast (issue 14, track C): ``TensorNode.broadcast_tensor`` sends a tensor
down a chain of peers that forward each chunk as it lands; the chain is repaired around a dead
node; a peer without the ``chain`` feature gets a direct send; hostile chain fields are refused.
"""

from __future__ import annotations

import re
import signal
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from tensord import AsyncClient
from tensord.config import Settings
from tensord.errors import ControlError
from tensord.events import Event, TransferEvent
from tensord.node import TensorNode
from tensord.wire import Begin, Stored
from tensord.wire.handshake import ALL_FEATURES
from tensord.wire.messages import MAX_CHAIN, ChainOutcome, from_header, to_header
from tensord.wire.meta import TensorMeta

from .support.chaos.common import receiver
from .support.cli import run
from .support.cluster import write_cluster_file
from .support.daemons import free_port
from .support.helpers import fast_settings
from .support.raw_peer import RawPeer, header, unauthenticated
from .support.strict_peer import strict_peer
from .support.tensor_files import save

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


async def test_a_peer_without_the_chain_feature_is_sent_to_directly() -> None:
    data = tensor(4 * MiB, seed=1)
    async with AsyncExitStack() as stack:
        a, b, d = await nodes(stack, 3)
        old = await stack.enter_async_context(
            TensorNode(settings(), features=ALL_FEATURES - {"chain"})
        )
        result = await a.broadcast_tensor([b.addr, old.addr, d.addr], "w", data)
        assert result.ok, result
        statuses = {o.peer: o.status for o in result.outcomes}
        # b relays, but cannot ask `old` to: the origin sends to it, and to d after it.
        assert statuses == {b.addr: "stored", old.addr: "direct", d.addr: "direct"}
        assert "chain feature" in result.outcomes[1].detail
        for n, sender in ((b, a), (old, a), (d, a)):
            arrival = await n.receive_tensor()
            assert arrival.sender == sender.node_id and np.array_equal(arrival.array, data)
        # The first peer without it: a direct send, then a chain for the rest.
        result = await a.broadcast_tensor([old.addr, b.addr, d.addr], "v", data)
        assert [o.status for o in result.outcomes] == ["direct", "stored", "stored"]
        assert (await d.receive_tensor()).sender == b.node_id


async def test_a_middle_node_killed_mid_transfer_is_repaired_around(tmp_path: Path) -> None:
    """a -> b -> c -> d, c a daemon killed with SIGKILL once d holds chunks from it: b links to
    d, which resumes from what it holds; b and d complete byte-exact, c is reported failed."""
    data = tensor(128 * MiB, seed=2)
    port = free_port()
    async with AsyncExitStack() as stack:
        a, b, d = await nodes(stack, 3)
        c = await stack.enter_async_context(receiver(tmp_path, port, node_id="c"))
        c_addr = f"tensord://c@127.0.0.1:{port}"
        killed: list[int] = []

        async def kill_when_d_holds_chunks(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            async with d.events.subscribe() as events:
                task_status.started()
                async for ev in events:
                    if isinstance(ev, TransferEvent) and ev.peer == "c" and ev.bytes_done > 0:
                        c.proc.send_signal(signal.SIGKILL)
                        killed.append(ev.bytes_done)
                        return

        async with trio.open_nursery() as nursery:
            await nursery.start(kill_when_d_holds_chunks)
            result = await a.broadcast_tensor([b.addr, c_addr, d.addr], "w", data)
            nursery.cancel_scope.cancel()
        assert killed and killed[0] < data.nbytes  # killed mid-transfer
        by_peer = {o.peer: o for o in result.outcomes}
        assert by_peer[b.addr].status == "stored" and by_peer[d.addr].status == "stored"
        assert by_peer[c_addr].status == "failed" and not result.ok
        for n in (b, d):
            assert np.array_equal(n.get_tensor("w"), data)
        # d resumed from what it had from c: those bytes were not sent to it again.
        repaired = by_peer[d.addr]
        assert repaired.bytes_skipped >= killed[0] > 0
        assert repaired.bytes_sent <= data.nbytes - repaired.bytes_skipped + repaired.bytes_resent
        assert (await d.receive_tensor()).sender == b.node_id  # the repaired link


async def test_a_peer_accepting_only_smaller_chunks_is_never_sent_larger_ones() -> None:
    """a -> b -> small -> d, small's hello allowing 64 KiB chunks where the chain's are 256 KiB
    (the origin's first link chose them): b does not link to it (its chunks would be refused);
    the origin sends to it directly in chunks it accepts, and chains d again."""
    data = tensor(3 * MiB + 123, seed=4)
    async with AsyncExitStack() as stack:
        a, b, d = await nodes(stack, 3)
        small = await stack.enter_async_context(strict_peer("small", 64 * 1024))
        result = await a.broadcast_tensor([b.addr, small.ticket, d.addr], "w", data)
        assert result.ok, result
        statuses = {o.peer: o.status for o in result.outcomes}
        assert statuses == {b.addr: "stored", small.ticket: "direct", d.addr: "direct"}
        assert "at most 65536 bytes" in result.outcomes[1].detail, result.outcomes[1]
        assert small.refused == []  # never offered chunks it does not accept
        assert small.chunk_sizes["w"] <= 64 * 1024
        assert small.received["w"] == data.tobytes()
        for n in (b, d):
            assert np.array_equal(n.get_tensor("w"), data)
        # As the head of the chain it is the origin's first link: the chain's chunks are its.
        result = await a.broadcast_tensor([small.ticket], "v", data)
        assert [o.status for o in result.outcomes] == ["stored"], result
        assert small.chunk_sizes["v"] == 64 * 1024 and small.received["v"] == data.tobytes()


async def test_a_hung_middle_node_is_linked_past_after_the_io_timeout(tmp_path: Path) -> None:
    """a -> b -> c -> d, c a daemon stopped with SIGSTOP once d holds chunks from it: its
    connections stay open and its kernel still accepts new ones, but nothing answers. b's link
    finds it after ``io_timeout``, its one redial after ``connect_timeout``; b then links to d,
    which resumes from what it holds, and b and d complete byte-exact."""
    data = tensor(64 * MiB, seed=5)
    port = free_port()

    def quick() -> Settings:  # a node id of its own each
        base = settings()
        return replace(base, transfer=replace(base.transfer, io_timeout=2.0, connect_timeout=1.0))

    async with AsyncExitStack() as stack:
        a, b, d = [await stack.enter_async_context(TensorNode(quick())) for _ in range(3)]
        c = await stack.enter_async_context(receiver(tmp_path, port, node_id="c"))
        c_addr = f"tensord://c@127.0.0.1:{port}"
        stopped: list[int] = []

        async def stop_when_d_holds_chunks(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            async with d.events.subscribe() as events:
                task_status.started()
                async for ev in events:
                    if isinstance(ev, TransferEvent) and ev.peer == "c" and ev.bytes_done > 0:
                        c.proc.send_signal(signal.SIGSTOP)
                        stopped.append(ev.bytes_done)
                        return

        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(stop_when_d_holds_chunks)
                with trio.fail_after(60):
                    result = await a.broadcast_tensor([b.addr, c_addr, d.addr], "w", data)
                nursery.cancel_scope.cancel()
        finally:
            c.proc.send_signal(signal.SIGCONT)  # so that it can be stopped as usual
        assert stopped and stopped[0] < data.nbytes  # hung mid-transfer
        by_peer = {o.peer: o for o in result.outcomes}
        assert by_peer[c_addr].status == "failed" and not result.ok
        assert by_peer[b.addr].status == "stored" and by_peer[d.addr].status == "stored"
        assert "connect_timeout" in by_peer[c_addr].detail, by_peer[c_addr]
        for n in (b, d):
            assert np.array_equal(n.get_tensor("w"), data)
        # b's commit did not wait on its send to c (stuck in a full socket buffer) until a
        # gave up on b: nothing was sent to b twice.
        assert by_peer[b.addr].bytes_resent == 0
        repaired = by_peer[d.addr]
        assert repaired.bytes_skipped >= stopped[0] > 0  # what it had from c did not travel again
        assert (await d.receive_tensor()).sender == b.node_id


# -- daemons: the CLI and the control API ------------------------------------------------------


async def test_cli_and_control_api_broadcast_to_three_daemons(tmp_path: Path) -> None:
    """``tensord send FILE --to all`` and ``--to b,c``, and ``send(to=[...])`` of the client,
    against four real daemons of one cluster file."""
    ids = ["a", "b", "c", "d"]
    ports = {n: free_port() for n in ids}
    cluster = write_cluster_file(tmp_path / "cluster.json", ports, name="t")
    data = tensor(3 * MiB, seed=3)
    path = save(tmp_path / "w.npy", data)
    async with AsyncExitStack() as stack:
        ds = {
            n: await stack.enter_async_context(
                receiver(tmp_path / n, ports[n], "--cluster", str(cluster), node_id=n)
            )
            for n in ids
        }
        result = await run("send", str(path), "--to", "all", socket=ds["a"].socket)
        assert result.code == 0, result
        assert "broadcast w: 3.0 MiB to 3 peers" in result.out
        for n in ("b", "c", "d"):
            assert re.search(rf"^  {n}: stored$", result.out, re.M), result.out
            async with AsyncClient(ds[n].socket) as client:
                assert np.array_equal(await client.load("w"), data)
        async with AsyncClient(ds["a"].socket) as client:
            [done] = await client.send(to=["d", "b"], path=path, name="v")
            assert done["ok"], done["peers"]
            assert [p["peer"] for p in done["peers"]] == ["d", "b"]
            with pytest.raises(ControlError, match="twice"):
                await client.send(to=["b", "b"], name="w")
        result = await run("send", str(path), "--to", "c,nobody", socket=ds["a"].socket)
        assert result.code != 0 and "nobody" in result.err
