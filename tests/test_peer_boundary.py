"""One connection's worst case is its own end (issue 12): a well-formed but hostile message gets a
typed error and a close, and the node - a library node or a daemon - carries on serving others."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import trio

from tensord import metrics
from tensord.config import Settings
from tensord.errors import BadTensor
from tensord.node import TensorNode
from tensord.receiver import Receiver
from tensord.wire import Error, Hello, Ping, Pong, Request, encode, make_hello
from tensord.wire.handshake import ALL_FEATURES

from .support.daemons import daemon, free_port
from .support.helpers import LogWaiter, fast_settings, running
from .support.raw_peer import RawPeer, header, unauthenticated

BAD_NAMES = ["layers//0", "a/../b", "/etc/passwd", "nul\x00", "x" * 4096]


def with_store(tmp_path: Path) -> Settings:
    s = unauthenticated()
    return Settings(**{**s.__dict__, "state_dir": tmp_path})


async def still_serving(node: TensorNode) -> None:
    """A fresh connection gets its ping answered and a real peer's send is stored."""
    peer = await RawPeer.connect(node.port)
    await peer.stream.send_all(encode(Ping(7)))
    with trio.fail_after(5):
        assert await peer.next_message() == Pong(7)
    async with running(unauthenticated()) as good:
        await good.send_tensor(node.addr, "fine", np.arange(4, dtype=np.float32))
    assert np.array_equal(node.get_tensor("fine"), np.arange(4, dtype=np.float32))


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_a_pull_of_a_bad_name_is_refused_and_the_node_carries_on(
    tmp_path: Path, name: str
) -> None:
    """On the old main ``request 'layers//0'`` reached the store, whose BadTensor left the
    connection handler and tore down the node's nursery."""
    async with running(with_store(tmp_path)) as node:
        node.put_tensor("w", np.ones(3, np.float32))
        peer = await RawPeer.connect(node.port)
        await peer.stream.send_all(header({"t": "request", "name": name}))
        err = await peer.expect_error_then_close("bad_name")
        assert err.message.startswith("bad tensor name")
        assert node.running
        await still_serving(node)
        assert sorted(node.tensor_names()) == ["fine", "w"]


async def test_a_daemon_survives_a_pull_of_a_bad_name(tmp_path: Path) -> None:
    """The reported attack, end to end: a ``tensord serve`` asked for ``layers//0`` exited 1."""
    port = free_port()
    env = {"TENSORD_LISTEN": f"127.0.0.1:{port}", "TENSORD_CLUSTER_SECRET_FILE": ""}
    async with daemon(env) as d:
        await d.wait_for("listening")
        for name in BAD_NAMES:
            peer = await RawPeer.connect(port)
            await peer.stream.send_all(header({"t": "request", "name": name}))
            await peer.expect_error_then_close("bad_name")
        peer = await RawPeer.connect(port)
        await peer.stream.send_all(encode(Request("absent")))
        with trio.fail_after(5):
            reply = await peer.next_message()
        assert isinstance(reply, Error) and reply.code == "not_found"
        assert d.proc.returncode is None, d.text


async def test_a_puller_checks_the_name_before_it_dials(tmp_path: Path) -> None:
    async with running() as node:
        for name in BAD_NAMES:
            with pytest.raises(BadTensor, match="bad tensor name"):
                await node.pull_tensor("127.0.0.1:9", name)  # never dialled: port 9 is closed
        with pytest.raises(BadTensor, match="bad tensor name"):
            await node.pull_tensor("127.0.0.1:9", "fine", as_name="a/../b")


async def test_a_hello_with_a_one_byte_max_chunk_is_refused() -> None:
    """``mc=1`` made the owner of a 4 MiB tensor build per-chunk state for 4 M one-byte chunks
    (66 -> 400 MiB RSS); now the Hello itself is refused."""
    async with running(unauthenticated()) as node:
        node.put_tensor("w", np.zeros(1 << 20, np.float32))
        peer = await RawPeer.connect(node.port, hello=False)
        hello = {"t": "hello", "proto": "tensord", "v": [1], "node": "raw", "f": [], "mc": 1}
        await peer.stream.send_all(header(hello))
        with trio.fail_after(5):
            reply = await peer.next_message()
            assert isinstance(reply, Error) and "'mc'" in reply.message
            assert await peer.next_message() is None  # closed
        await still_serving(node)


async def test_an_unexpected_exception_closes_only_its_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug in a handler (injected here) is logged with its traceback, counted, answered with an
    ``internal`` error, and closes that connection: the node and its other peers carry on."""

    async def broken(self: Receiver, conn: object, req: Request) -> None:
        raise RuntimeError("injected bug")

    before = metrics.UNEXPECTED_ERRORS.labels("peer")._value.get()
    async with running(unauthenticated()) as node:
        monkeypatch.setattr(Receiver, "_serve_pull", broken)
        errors = LogWaiter(lambda m: "unexpected RuntimeError: injected bug" in m)
        with errors.watching("tensord.transfer"):
            peer = await RawPeer.connect(node.port)
            await peer.stream.send_all(encode(Request("w")))
            err = await peer.expect_error_then_close("internal")
        assert "request 'w'" in err.message
        assert errors.count == 1
        assert metrics.UNEXPECTED_ERRORS.labels("peer")._value.get() == before + 1
        assert node.running
        await still_serving(node)


async def test_a_send_to_a_peer_whose_max_chunk_forbids_the_chunk_count_fails_cleanly() -> None:
    """The sender holds itself to the receiver's bounds: a peer accepting only 4 KiB chunks gets
    a typed refusal for a tensor that would need over a million of them, not a send it refuses."""
    from tensord.limits import MAX_CHUNKS, chunk_size_for

    assert (
        chunk_size_for(10 * (1 << 30), 4096, 1 << 26) == 12288
    )  # 10 KiB per 1 Mi chunks, in 4 KiB
    assert chunk_size_for(40 * (1 << 30), 4096, 48 << 10) == 40960  # fits a 48 KiB peer
    assert chunk_size_for(1 << 20, 1 << 20, 1 << 26) == 1 << 20  # small tensors: as configured
    with pytest.raises(ValueError, match="at most"):
        chunk_size_for(MAX_CHUNKS * 4096 + 1, 4096, 4096)


def test_the_boundary_logs_at_error(caplog: pytest.LogCaptureFixture) -> None:
    from tensord.boundary import report_unexpected

    with caplog.at_level(logging.ERROR):
        report_unexpected(logging.getLogger("x"), "peer", "peer p, ping", ValueError("boom"))
    assert "peer p, ping: unexpected ValueError: boom" in caplog.text


async def test_idle_strangers_cannot_lock_members_out() -> None:
    """Hole 2: one host held every ``transfer.max_connections`` slot with idle TCP connections
    and real peers were refused. Strangers (not yet authenticated) now share a smaller budget;
    when it - or the node-wide cap - is full, the oldest stranger is dropped for the newcomer."""
    settings = fast_settings().with_transfer(
        max_connections=8, max_unauthenticated=4, handshake_timeout=600.0
    )
    before = metrics.PEER_CONNECTIONS_DROPPED.labels("budget")._value.get()
    async with running(settings) as node, running() as member:
        idle = [await trio.open_tcp_stream("127.0.0.1", node.port) for _ in range(12)]
        # The member gets in, authenticates and its tensor is stored, the strangers idle on.
        await member.send_tensor(node.addr, "w", np.ones(8, np.float32))
        assert np.array_equal(node.get_tensor("w"), np.ones(8, np.float32))
        # The oldest strangers were closed to make room (12 arrived, 4 fit the budget).
        with trio.fail_after(5):
            for stream in idle[:8]:
                assert await stream.receive_some(100) == b""
        assert metrics.PEER_CONNECTIONS_DROPPED.labels("budget")._value.get() >= before + 8
        # ...and the member's pooled connection is not a stranger: more strangers do not drop it.
        more = [await trio.open_tcp_stream("127.0.0.1", node.port) for _ in range(8)]
        await member.send_tensor(node.addr, "w2", np.zeros(8, np.float32))
        assert member.pool_stats()[node.node_id]["dials"] == 1
        for stream in idle + more:
            await stream.aclose()


async def test_when_every_slot_is_held_by_members_a_newcomer_is_refused() -> None:
    settings = fast_settings().with_transfer(max_connections=2, max_unauthenticated=2)
    before = metrics.PEER_CONNECTIONS_DROPPED.labels("limit")._value.get()
    async with running(settings) as node, running() as a, running() as b:
        await a.send_tensor(node.addr, "a", np.ones(2, np.float32))
        await b.send_tensor(node.addr, "b", np.ones(2, np.float32))
        stranger = await trio.open_tcp_stream("127.0.0.1", node.port)
        with trio.fail_after(5):
            assert await stranger.receive_some(100) == b""
        assert metrics.PEER_CONNECTIONS_DROPPED.labels("limit")._value.get() == before + 1
        await a.send_tensor(node.addr, "a2", np.ones(2, np.float32))  # members carry on


@pytest.mark.parametrize(
    "argv",
    [
        ["pull", "node-b", "layers//0"],
        ["pull", "node-b", "w", "--as", "a/../b"],
        ["get", "/etc/passwd", "-o", "x.npy"],
        ["rm", "x/"],
    ],
)
def test_the_cli_refuses_a_bad_name_with_the_wires_words(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI checks names with the same validator as the wire and the control API, before it
    talks to any daemon (there is none here)."""
    from tensord.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "bad tensor name" in err and not err.rstrip().endswith(":")


async def test_a_flood_from_one_host_evicts_its_own_strangers_not_a_member_mid_handshake() -> None:
    """A member is a stranger too while its handshake runs: when the budget is full the one to
    go is the oldest stranger of the source holding the most, so a flooding host evicts its
    own connections and a slow member from another address still completes its handshake."""
    settings = unauthenticated().with_transfer(max_unauthenticated=4, handshake_timeout=600.0)

    async def from_(host: str) -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", node.port, local_address=host)

    async with running(settings) as node:
        flood = [await from_("127.0.0.2") for _ in range(3)]
        member = RawPeer(await from_("127.0.0.3"))  # connected, its Hello not sent yet
        flood += [await from_("127.0.0.2") for _ in range(8)]
        with trio.fail_after(5):
            for stream in flood[:8]:  # 11 from the flooder, 3 of its own left with the member
                assert await stream.receive_some(100) == b""
        await member.stream.send_all(encode(make_hello("member", ALL_FEATURES, 1 << 26)))
        with trio.fail_after(5):
            assert isinstance(await member.next_message(), Hello)
        for stream in flood:
            await stream.aclose()


async def test_a_pull_whose_chunking_the_puller_forbids_is_answered_too_large() -> None:
    """The owner cannot split this tensor into at most 2^20 chunks of the puller's max chunk:
    it answers ``too_large`` (it used to close without a word, and the puller retried)."""
    async with running(unauthenticated()) as node:
        node.put_tensor("big", np.zeros((4 << 30) + 4096, np.uint8))  # untouched pages: cheap
        peer = await RawPeer.connect(node.port, hello=False)
        await peer.stream.send_all(encode(make_hello("small", ALL_FEATURES, 4096)))
        with trio.fail_after(5):
            assert isinstance(await peer.next_message(), Hello)
            await peer.stream.send_all(encode(Request("big")))
            reply = await peer.next_message()
        assert isinstance(reply, Error) and reply.code == "too_large", reply
        assert "4096" in reply.message
        await peer.stream.send_all(encode(Ping(1)))  # the connection carries on
        with trio.fail_after(5):
            assert await peer.next_message() == Pong(1)
