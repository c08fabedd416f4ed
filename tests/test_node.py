"""The 13 cases of the tensor-iroh stress list, done for real: TensorNodes on loopback sockets."""

from __future__ import annotations

import socket
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import trio
import trio.testing

from tensord.address import parse_address
from tensord.config import HostPort
from tensord.errors import (
    BadAddress,
    BadTensor,
    NodeClosed,
    PeerUnreachable,
    TensorNotFound,
    TransferFailed,
)
from tensord.events import PeerEvent, TransferEvent
from tensord.node import TensorNode
from tensord.wire import Hello, encode, make_hello
from tensord.wire.frames import FrameDecoder
from tensord.wire.handshake import ALL_FEATURES

from .support.helpers import fast_settings, running
from .support.tcp_proxy import Fault, faulty_path


def node_over(transport: str) -> AbstractAsyncContextManager[TensorNode]:
    """A started library node (fast retries) over ``transport``, the test's fixture."""
    return running(fast_settings(transport=transport))


rng = np.random.default_rng(1234)


def random_tensor(n: int, dtype: str = "float32") -> np.ndarray:
    return rng.standard_normal(n).astype(dtype)


# 1. basic send / receive -------------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        rng.integers(-(2**62), 2**62, size=(5, 7, 3), dtype=np.int64),
        rng.standard_normal(100_000).astype(np.float16),
        np.array(3.5, dtype=np.float64),  # 0-d
        np.zeros((0, 4), dtype=np.int32),  # empty
        np.array([True, False, True]),
        rng.standard_normal((3, 300_001)).astype(np.float32),  # several chunks, uneven tail
    ],
    ids=["f32", "i64", "f16", "scalar", "empty", "bool", "multi-chunk"],
)
async def test_basic_send_receive(array: np.ndarray, transport: str) -> None:
    async with node_over(transport) as a, node_over(transport) as b:
        result = await a.send_tensor(b.addr, "layer.0/weight", array)
        got = await b.receive_tensor()
        assert got.name == "layer.0/weight"
        assert got.sender == a.node_id
        assert got.array.dtype == array.dtype and got.array.shape == array.shape
        assert got.array.tobytes() == array.tobytes()
        assert result.nbytes == array.nbytes and result.retries == 0
        assert result.transport == transport
        assert np.array_equal(b.get_tensor("layer.0/weight"), array)


async def test_bf16_carried_as_two_byte_dtype_name(transport: str) -> None:
    raw = rng.integers(0, 2**16, size=(4, 8), dtype=np.uint16)
    async with node_over(transport) as a, node_over(transport) as b:
        await a.send_tensor(b.addr, "bf", raw, dtype="bfloat16", requires_grad=True)
        got = await b.receive_tensor()
        assert got.array.dtype.itemsize == 2
        assert got.array.view(np.uint16).tobytes() == raw.tobytes()


async def test_non_contiguous_array_is_sent_as_its_values(transport: str) -> None:
    base = np.arange(64, dtype=np.int32).reshape(8, 8)
    view = base[:, ::2]
    async with node_over(transport) as a, node_over(transport) as b:
        await a.send_tensor(b.addr, "strided", view)
        assert np.array_equal(b.get_tensor("strided"), view)


async def test_bad_tensor_names_and_dtypes_are_refused_locally() -> None:
    async with running() as a, running() as b:
        with pytest.raises(BadTensor, match="name"):
            await a.send_tensor(b.addr, "../etc/passwd", np.zeros(3))
        with pytest.raises(BadTensor, match="dtype"):
            await a.send_tensor(b.addr, "obj", np.array(["x"], dtype=object))
        assert b.tensor_names() == []


# 2. pull of an existing tensor -------------------------------------------------------------


async def test_pull_existing_tensor(transport: str) -> None:
    array = random_tensor(250_000)
    async with node_over(transport) as a, node_over(transport) as b:
        a.put_tensor("shared", array)
        got = await b.pull_tensor(a.addr, "shared")
        assert np.array_equal(got, array)
        # A pull is not an arrival on the puller, and the owner keeps its copy.
        assert b.tensor_names() == []
        assert np.array_equal(a.get_tensor("shared"), array)


# 3. concurrent sends -----------------------------------------------------------------------


async def test_concurrent_sends(transport: str) -> None:
    arrays = {f"t{i}": random_tensor(10_000 + 997 * i) for i in range(24)}
    settings = fast_settings(transport=transport)
    settings = settings.with_pool(max_connections=4)
    async with running(settings) as a, node_over(transport) as b:
        async with trio.open_nursery() as nursery:
            for name, arr in arrays.items():
                nursery.start_soon(a.send_tensor, b.addr, name, arr)
        assert sorted(b.tensor_names()) == sorted(arrays)
        for name, arr in arrays.items():
            assert np.array_equal(b.get_tensor(name), arr)
        stats = a.pool_stats()
        (peer_stats,) = stats.values()
        assert 1 <= peer_stats["size"] <= 4
        assert peer_stats["dials"] <= 4


# 4. rapid-fire sends -----------------------------------------------------------------------


async def test_rapid_fire_1000_small_tensors(transport: str) -> None:
    async with node_over(transport) as a, node_over(transport) as b:
        for i in range(1000):
            await a.send_tensor(b.addr, f"s{i}", np.full(16, i, dtype=np.int32))
        names = []
        for _ in range(1000):
            got = await b.receive_tensor()
            names.append(got.name)
            assert int(got.array[0]) == int(got.name[1:])
        assert names == [f"s{i}" for i in range(1000)]
        assert a.pool_size() == 1
        (peer_stats,) = a.pool_stats().values()
        assert peer_stats["dials"] == 1 and peer_stats["reuses"] == 999


# 5. large tensor ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_large_tensor_512_mib_byte_exact(transport: str) -> None:
    big = np.random.default_rng(5).integers(0, 2**63, size=(512 << 20) // 8, dtype=np.uint64)
    async with node_over(transport) as a, node_over(transport) as b:
        result = await a.send_tensor(b.addr, "big", big)
        assert result.transport == transport
        got = b.get_tensor("big")
        assert got.nbytes == 512 << 20
        assert np.array_equal(got, big)
        assert result.bytes_resent == 0
        del got
        b.delete_tensor("big")


# 6. several receivers ----------------------------------------------------------------------


async def test_several_receivers(transport: str) -> None:
    array = random_tensor(300_000)
    async with (
        node_over(transport) as a,
        node_over(transport) as b,
        node_over(transport) as c,
        node_over(transport) as d,
    ):
        async with trio.open_nursery() as nursery:
            for peer in (b, c, d):
                nursery.start_soon(a.send_tensor, peer.addr, "bcast", array)
        for peer in (b, c, d):
            got = await peer.receive_tensor()
            assert got.sender == a.node_id and np.array_equal(got.array, array)
        assert a.pool_size() == 3


# 7. send before the peer is ready ----------------------------------------------------------


def _free_port() -> int:
    """A port number free for TCP and for UDP (a QUIC node listens on both)."""
    while True:
        with socket.socket() as s, socket.socket(type=socket.SOCK_DGRAM) as u:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


async def test_send_before_peer_is_ready_retries_then_succeeds(transport: str) -> None:
    port = _free_port()
    array = random_tensor(50_000)
    receiver_settings = replace(
        fast_settings(transport=transport), listen=HostPort("127.0.0.1", port)
    )
    async with node_over(transport) as a:
        results = []

        async def send() -> None:
            results.append(await a.send_tensor(f"127.0.0.1:{port}", "early", array))

        async with a.events.subscribe() as events, trio.open_nursery() as nursery:
            nursery.start_soon(send)
            async for event in events:  # the first attempt has failed: now start the peer
                if isinstance(event, PeerEvent) and event.state == "connect_failed":
                    break
            async with running(receiver_settings) as b:
                got = await b.receive_tensor()
                assert np.array_equal(got.array, array)
        assert results[0].retries >= 1
        assert results[0].transport == transport


# 8. immediate shutdown mid-transfer --------------------------------------------------------


async def test_shutdown_mid_transfer_cancels_cleanly(transport: str) -> None:
    big = random_tensor(64 << 20)  # 256 MiB: long enough to be caught in flight
    async with node_over(transport) as b:
        a = TensorNode(fast_settings(transport=transport))
        errors: list[BaseException] = []
        with trio.fail_after(30):
            async with a.events.subscribe() as events, trio.open_nursery() as outer:
                await a.start(outer)

                async def send() -> None:
                    try:
                        await a.send_tensor(b.addr, "big", big)
                    except NodeClosed as exc:
                        errors.append(exc)

                outer.start_soon(send)
                async for event in events:
                    if isinstance(event, TransferEvent) and event.state == "progress":
                        break
                a.shutdown()
        # the outer nursery exited: no task of the node is left running
        assert len(errors) == 1
        assert not a.running
        with pytest.raises(NodeClosed):
            await a.send_tensor(b.addr, "again", big[:10])
        with pytest.raises(TensorNotFound):
            b.get_tensor("big")
        # the receiver is unharmed and keeps serving others
        async with node_over(transport) as c:
            await c.send_tensor(b.addr, "after", big[:1000])
            assert np.array_equal(b.get_tensor("after"), big[:1000])


# 9. timeouts -------------------------------------------------------------------------------


async def test_connect_timeout_against_a_silent_peer() -> None:
    """A peer that accepts TCP but never answers the Hello: a typed error, never a hang."""
    settings = fast_settings(max_retries=1).with_transfer(connect_timeout=0.2)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    accepted: list[trio.SocketStream] = []

    async def silent(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, silent, listeners)
        async with running(settings) as a:
            with trio.fail_after(10), pytest.raises(PeerUnreachable, match="handshake"):
                await a.send_tensor(f"127.0.0.1:{port}", "x", np.zeros(10))
        assert len(accepted) == 2  # one attempt + one retry
        nursery.cancel_scope.cancel()


async def test_quic_handshake_timeout_against_a_silent_peer() -> None:
    """A peer whose UDP port swallows every datagram and whose TCP port accepts and says
    nothing: each attempt gives up on QUIC after connect_timeout, tries TCP, and the send ends
    in a typed error. The retry dials a new QUIC connection (the first never answered)."""
    settings = replace(fast_settings(max_retries=1), transport="quic").with_transfer(
        connect_timeout=0.2
    )
    udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await udp.bind(("127.0.0.1", 0))
    port = udp.getsockname()[1]
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    sources: set[tuple[str, int]] = set()
    accepted: list[trio.SocketStream] = []

    async def swallow() -> None:
        while True:
            _, source = await udp.recvfrom(65536)
            sources.add(source)

    async def silent(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()

    with udp:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(swallow)
            nursery.start_soon(trio.serve_listeners, silent, listeners)
            async with running(settings) as a:
                with trio.fail_after(10), pytest.raises(PeerUnreachable, match="after 2 attempts"):
                    await a.send_tensor(f"127.0.0.1:{port}", "x", np.zeros(10))
            assert len(sources) == 2  # a QUIC connection per attempt
            assert len(accepted) == 2  # ...and the TCP fallback of each
            nursery.cancel_scope.cancel()


async def test_io_timeout_when_peer_stops_acknowledging() -> None:
    """A peer that handshakes, then reads but never acknowledges: the attempt times out."""
    settings = fast_settings(max_retries=1, authenticated=False).with_transfer(io_timeout=0.3)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def mute(stream: trio.SocketStream) -> None:
        decoder = FrameDecoder()
        while (msg := decoder.next_message()) is None:
            decoder.feed(await stream.receive_some(65536))
        assert isinstance(msg, Hello)
        await stream.send_all(encode(make_hello("mute", ALL_FEATURES, 1 << 26)))
        while await stream.receive_some(65536):
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, mute, listeners)
        async with running(settings) as a:
            with trio.fail_after(10), pytest.raises(TransferFailed, match="no progress"):
                await a.send_tensor(f"127.0.0.1:{port}", "x", np.zeros(1 << 20))
        nursery.cancel_scope.cancel()


async def test_io_timeout_when_a_quic_peer_stops_acknowledging() -> None:
    """Over QUIC: a peer that reads every stream but never answers. Its QUIC stack still
    acknowledges packets, so the peer is alive: the retry opens a new stream on the same QUIC
    connection (a dead path would get a new connection), and times out again."""
    from tensord.net.connection import Connection
    from tensord.net.quic import serve_quic

    settings = replace(
        fast_settings(max_retries=1, authenticated=False), transport="quic"
    ).with_transfer(io_timeout=0.3)
    streams: list[Connection] = []

    async def mute(conn: Connection) -> None:
        streams.append(conn)
        buf = memoryview(bytearray(65536))
        while await conn.stream.transport.recv_into(buf, len(buf)):
            pass

    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            partial(
                serve_quic,
                HostPort("127.0.0.1", 0),
                make_hello("mute", ALL_FEATURES, 1 << 26),
                FrameDecoder,
                mute,
                handshake_timeout=5,
            )
        )
        async with running(settings) as a:
            with trio.fail_after(10), pytest.raises(TransferFailed, match="no progress"):
                await a.send_tensor(f"127.0.0.1:{port}", "x", np.zeros(1 << 20))
        assert len(streams) == 2  # one attempt + one retry...
        sessions = {id(getattr(c.stream.transport, "session", None)) for c in streams}
        assert len(sessions) == 1  # ...on one QUIC connection
        nursery.cancel_scope.cancel()


async def test_unreachable_peer_is_a_typed_error(transport: str) -> None:
    settings = fast_settings(transport=transport, max_retries=2)
    async with running(settings) as a:
        with pytest.raises(PeerUnreachable, match="after 3 attempts"):
            await a.send_tensor(f"127.0.0.1:{_free_port()}", "x", np.zeros(4))


# 10. pull of a non-existent tensor ---------------------------------------------------------


async def test_pull_missing_tensor_raises_not_found(transport: str) -> None:
    async with node_over(transport) as a, node_over(transport) as b:
        with pytest.raises(TensorNotFound, match="nope"):
            await b.pull_tensor(a.addr, "nope")
        # the connection stays usable after the refusal
        a.put_tensor("yes", np.ones(3))
        assert np.array_equal(await b.pull_tensor(a.addr, "yes"), np.ones(3))
        (peer_stats,) = b.pool_stats().values()
        assert peer_stats["dials"] == 1


# 11. bad ticket / address parsing ----------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "tensord://",
        "tensord://node@",
        "tensord://node@host",
        "tensord://node@host:0",
        "tensord://node@host:70000",
        "tensord://bad id@host:1",
        "http://host:1",
        "host",
        "host:port",
        "[::1:7070",
        "a b:7070",
        "x" * 600,
    ],
)
def test_bad_addresses_are_rejected(text: str) -> None:
    with pytest.raises(BadAddress):
        parse_address(text)


def test_good_addresses_parse() -> None:
    a = parse_address("tensord://node-1@10.0.0.5:7070")
    assert (a.node_id, a.host, a.port) == ("node-1", "10.0.0.5", 7070)
    assert parse_address(a.ticket()) == a
    b = parse_address("[::1]:7070")
    assert (b.host, b.port, b.node_id) == ("::1", 7070, None)
    assert parse_address("gpu-3.cluster.local:9000").host == "gpu-3.cluster.local"


async def test_bad_address_in_send_and_wrong_node_id(transport: str) -> None:
    async with node_over(transport) as a, node_over(transport) as b:
        with pytest.raises(BadAddress):
            await a.send_tensor("not an address", "x", np.zeros(1))
        with pytest.raises(BadAddress, match="unknown peer"):
            await a.send_tensor("no-such-node", "x", np.zeros(1))
        wrong = b.addr.replace(b.node_id, "someone-else")
        with pytest.raises(BadAddress, match="not 'someone-else'"):
            await a.send_tensor(wrong, "x", np.zeros(1))
        assert b.tensor_names() == []


# 12. calls after shutdown ------------------------------------------------------------------


async def test_calls_after_shutdown_raise_node_closed(transport: str) -> None:
    async with node_over(transport) as b:
        a = TensorNode(fast_settings(transport=transport))
        with pytest.raises(NodeClosed):
            await a.send_tensor(b.addr, "x", np.zeros(1))  # never started
        async with a:
            pass
        for call in (
            lambda: a.send_tensor(b.addr, "x", np.zeros(1)),
            lambda: a.pull_tensor(b.addr, "x"),
            a.receive_tensor,
        ):
            with pytest.raises(NodeClosed):
                await call()
        with pytest.raises(NodeClosed):
            async with a:
                pass


async def test_receive_waiter_is_woken_by_shutdown(transport: str) -> None:
    a = TensorNode(fast_settings(transport=transport))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await a.start(nursery)

            async def wait() -> None:
                with pytest.raises(NodeClosed):
                    await a.receive_tensor()

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            a.shutdown()


# 13. pool reuse and idle expiry ------------------------------------------------------------


async def test_pool_reuses_one_connection(transport: str) -> None:
    async with node_over(transport) as a, node_over(transport) as b:
        for i in range(50):
            await a.send_tensor(b.addr, f"p{i}", np.full(100, i))
        assert a.pool_size() == 1
        assert a.pool_size(b.node_id) == 1
        (peer_stats,) = a.pool_stats().values()
        assert peer_stats == {
            "size": 1,
            "idle": 1,
            "in_use": 0,
            "dials": 1,
            "reuses": 49,
            "evictions": 0,
            "idle_closed": 0,
        }


async def test_pool_idle_connections_expire(
    autojump_clock: trio.testing.MockClock, transport: str
) -> None:
    settings = fast_settings(transport=transport).with_pool(max_idle_seconds=300)
    settings = settings.with_transfer(io_timeout=1e6, connect_timeout=1e6)
    async with running(settings) as a, running(settings) as b:
        await a.send_tensor(b.addr, "x", np.zeros(10))
        assert a.pool_size() == 1
        await trio.sleep(299)
        assert a.pool_size() == 1
        await trio.sleep(2)
        assert a.pool_size() == 0
        (peer_stats,) = a.pool_stats().values()
        assert peer_stats["idle_closed"] == 1
        # the next send dials again
        await a.send_tensor(b.addr, "y", np.zeros(10))
        assert a.pool_size() == 1


async def test_dead_pooled_connection_is_evicted_and_redialled(transport: str) -> None:
    async with node_over(transport) as a:
        b = TensorNode(fast_settings(transport=transport))
        async with trio.open_nursery() as nursery:
            await b.start(nursery)
            port = b.port
            await a.send_tensor(b.addr, "x", np.zeros(10))
            b.shutdown()
        # the peer restarts on the same port; the pooled connection to the old one is dead
        b2 = replace(
            fast_settings(transport=transport),
            listen=HostPort("127.0.0.1", port),
            node_id=b.node_id,
        )
        async with running(b2) as b_again:
            result = await a.send_tensor(f"127.0.0.1:{port}", "y", np.ones(10))
            assert np.array_equal(b_again.get_tensor("y"), np.ones(10))
        # the dead connection was noticed at checkout (no failed attempt) and replaced
        assert result.retries == 0
        (peer_stats,) = a.pool_stats().values()
        assert peer_stats["dials"] == 2
        assert peer_stats["evictions"] == 1


async def test_a_cancelled_send_publishes_failed_cancelled() -> None:
    """The caller goes away mid-transfer: watchers of the events stream hear about it, every
    time (a cancellation can surface wrapped in an exception group from a nursery inside)."""
    from tensord.events import TransferEvent

    from .support.tcp_proxy import proxied

    settings = fast_settings()
    noise = np.random.default_rng(5).integers(0, 255, 1 << 22, dtype=np.uint8)  # no lz4 gains
    for attempt in range(5):
        async with (
            running(settings) as a,
            running(fast_settings()) as b,
            proxied(b.port, {}, rate=2_000_000) as proxy,
            a.events.subscribe() as events,
        ):
            with trio.move_on_after(0.2 + 0.05 * attempt):
                await a.send_tensor(proxy.addr, "slow", noise)
            with trio.fail_after(5):
                async for ev in events:
                    if isinstance(ev, TransferEvent) and ev.state == "failed":
                        assert ev.detail == "cancelled", ev
                        break


async def test_a_cut_pull_resumes_from_the_chunks_it_already_has(transport: str) -> None:
    """The first connection is cut after 12 MiB of a 24 MiB pull: the retry names the
    interrupted transfer and the peer sends only what is missing. (Over QUIC the path of the
    first connection goes dark: the puller notices the silence at io_timeout.)"""
    size = 24 << 20
    array = np.random.default_rng(9).integers(0, 255, size, dtype=np.uint8)
    settings = fast_settings(transport=transport).with_transfer(connect_timeout=1.0, io_timeout=1.5)
    async with running(settings) as a, node_over(transport) as b:
        b.put_tensor("big", array)
        async with faulty_path(transport, b.port, {0: Fault(down_cut_after=12 << 20)}) as proxy:
            with trio.fail_after(30):
                got = await a.pull_tensor(proxy.addr, "big")
        assert np.array_equal(got, array)
        assert proxy.conns[0].cut
        sent_down = sum(c.downstream for c in proxy.conns)
        # Without resume the second attempt would send all 24 MiB again (>= 36 MiB in all);
        # QUIC adds a few % of packet overhead.
        assert sent_down < (size + (4 << 20)) * (1 if transport == "tcp" else 1.05), sent_down
