"""A QUIC listener against clients without credentials: raw aioquic clients that complete the
QUIC handshake (anyone can, without ``security.tls``) and then never send a valid Hello - they
open streams and push data, hold connections open, or ignore the limits they were given.

What they may get (docs/QUIC.md, "Before authentication"): one stream
with credit for a Hello, a deadline, a slot among ``max_unauthenticated`` that the next stranger
takes from the oldest, and nothing from the slots of ``max_connections`` that authenticated
peers hold."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from aioquic.quic.packet import QuicErrorCode

from tensord.config import HostPort
from tensord.errors import PeerUnreachable
from tensord.net.connection import Connection
from tensord.net.quic import (
    E_REFUSED,
    PRE_AUTH_WINDOW,
    ListenerStats,
    QuicDialer,
    serve_quic,
)
from tensord.net.quic._aioquic import FlowControlledConnection
from tensord.net.stream import ConnectionClosed
from tensord.wire.auth import ClusterKey
from tensord.wire.frames import PREFIX, FrameDecoder, encode
from tensord.wire.handshake import ALL_FEATURES, make_hello
from tensord.wire.messages import Hello, Ping, Pong

from .support.quic_client import raw_client
from .support.quic_echo import KEY, echo, hello, ping, quic_dialer, send_payload

MiB = 1 << 20
KiB = 1 << 10


@asynccontextmanager
async def listener(
    handler: Callable[[Connection], Awaitable[None]] = echo,
    *,
    handshake_timeout: float = 30.0,
    **kwargs: Any,
) -> AsyncIterator[int]:
    """A listener with the cluster secret (its members have it, the raw clients do not)."""
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(
            partial(
                serve_quic,
                HostPort("127.0.0.1", 0),
                hello("server"),
                FrameDecoder,
                handler,
                handshake_timeout=handshake_timeout,
                key=KEY,
                **kwargs,
            )
        )
        yield port
        nursery.cancel_scope.cancel()


async def dial(dialer: QuicDialer, port: int, *, key: ClusterKey | None = KEY) -> Connection:
    return await dialer.dial(
        HostPort("127.0.0.1", port), hello("client"), FrameDecoder, connect_timeout=5, key=key
    )


# --------------------------------------------------------------------------------------------


def test_the_pre_auth_stream_credit_holds_the_largest_hello_and_its_auth() -> None:
    """The credit before authentication is small, but a Hello at every bound the decoder
    accepts (64 features of 32 characters, the longest node id, 16 versions, challenge and
    proof) and the Auth after it fit."""
    biggest = Hello(
        "tensor" * 5,
        tuple(range(1, 17)),
        "n" * 63,
        frozenset(f"{i:02d}" + "f" * 30 for i in range(64)),
        1 << 62,
        b"n" * 32,
        b"p" * 32,
    )
    frame = encode(biggest)
    decoder = FrameDecoder()
    decoder.feed(frame)
    assert decoder.next_message() == biggest
    auth_frame = 64  # {"t": "auth", "pf": 32 bytes}, framed
    assert len(frame) + auth_frame <= PRE_AUTH_WINDOW
    normal = encode(make_hello("some-node.example", ALL_FEATURES, 16 * MiB))
    assert len(normal) * 4 < PRE_AUTH_WINDOW


async def test_unauthenticated_connections_get_credit_for_a_hello_and_nothing_more() -> None:
    """Three clients each open 64 streams and push 32 MiB without a Hello: the listener gives
    each one stream and a Hello's worth of credit (it used to give 128 streams of 8 MiB in a
    32 MiB connection window, all buffered). Streams beyond the first are not even allowed to
    exist. A member still gets in and transfers meanwhile."""
    stats = ListenerStats()
    with trio.fail_after(20):
        async with (
            listener(stats=stats) as port,
            quic_dialer() as dialer,
            raw_client(port) as a,
            raw_client(port) as b,
            raw_client(port) as c,
        ):
            for client in (a, b, c):
                await client.established.wait()
                client.push(streams=64, per_stream=512 * KiB)
            for client in (a, b, c):
                await client.settled()
            for client in (a, b, c):
                assert not client.terminated.is_set(), client.close_event
                # What the listener granted, as the peer sees it: one stream, a Hello's worth.
                assert client.quic._remote_max_streams_bidi == 1
                assert client.quic._remote_max_streams_uni == 0
                assert client.quic._remote_max_data == PRE_AUTH_WINDOW
                assert client.accepted <= PRE_AUTH_WINDOW
            assert (stats.open, stats.unauthenticated) == (3, 3)
            conn = await dial(dialer, port)
            assert await send_payload(conn, 1, 4 * MiB)  # a member gets its full windows
            assert (stats.open, stats.unauthenticated, stats.authenticated) == (4, 3, 1)


async def test_a_client_that_ignores_the_limits_is_closed_without_buffering() -> None:
    """A client that opens streams beyond MAX_STREAMS and sends beyond MAX_DATA anyway (its
    aioquic told the listener allowed more) is closed by the listener's QUIC stack with the
    protocol error; the listener goes on serving."""
    with trio.fail_after(20):
        async with (
            listener() as port,
            quic_dialer() as dialer,
            raw_client(port) as streams,
            raw_client(port) as data,
        ):
            await streams.established.wait()
            await data.established.wait()
            streams.quic._remote_max_streams_bidi = 64  # "the listener allows 64 streams"
            streams.push(streams=8, per_stream=1000)
            data.quic._remote_max_data = 1 << 30  # "... and a GiB of data"
            data.quic._remote_max_stream_data_bidi_remote = 1 << 30
            # A frame that would be a Hello if it ever ended, so that only the excess is wrong.
            data.quic.send_stream_data(0, PREFIX.pack(60000) + os.urandom(4 * MiB))
            data.flush()
            await streams.terminated.wait()
            await data.terminated.wait()
            assert streams.close_event is not None and data.close_event is not None
            assert streams.close_event.error_code == QuicErrorCode.STREAM_LIMIT_ERROR
            assert data.close_event.error_code == QuicErrorCode.FLOW_CONTROL_ERROR
            assert await ping(await dial(dialer, port))


async def test_more_quic_connections_than_max_connections_are_refused() -> None:
    """Two members hold the two slots: a third connection - a member's or a stranger's - is
    refused at once with CONNECTION_REFUSED naming the setting; the two carry on. (Streams
    used to be counted instead: the third connection got in.)"""
    stats = ListenerStats()
    with trio.fail_after(20):
        async with (
            listener(max_connections=2, stats=stats) as port,
            quic_dialer() as one,
            quic_dialer() as two,
            quic_dialer() as three,
        ):
            first, second = await dial(one, port), await dial(two, port)
            assert await ping(first) and await ping(second)
            with pytest.raises(PeerUnreachable, match=r"refused.*transfer\.max_connections"):
                await dial(three, port)
            async with raw_client(port) as stranger:
                await stranger.terminated.wait()
                assert stranger.close_event is not None
                assert stranger.close_event.error_code == QuicErrorCode.CONNECTION_REFUSED
                assert "max_connections" in stranger.close_event.reason_phrase
            assert stats.refused == 2 and stats.open == 2
            assert await send_payload(first, 2, MiB) and await ping(second)
            more = await dial(one, port)  # a new stream on a member's connection is no new slot
            assert await ping(more)


@pytest.mark.parametrize(
    ("limits", "setting"),
    [
        ({"max_unauthenticated": 3}, "transfer.max_unauthenticated"),
        ({"max_connections": 3, "max_unauthenticated": 10}, "transfer.max_connections"),
    ],
    ids=["max_unauthenticated", "max_connections"],
)
async def test_strangers_holding_every_pre_auth_slot_cannot_lock_a_member_out(
    limits: dict[str, int], setting: str
) -> None:
    """``max_unauthenticated`` - or every slot of ``max_connections`` - held by connections
    that completed the QUIC handshake and say nothing: a member still gets in, and the
    oldest stranger is the one dropped for it (sshd's MaxStartups), told which setting."""
    stats = ListenerStats()
    with trio.fail_after(20):
        async with (
            listener(stats=stats, **limits) as port,
            quic_dialer() as dialer,
            contextlib.AsyncExitStack() as stack,
        ):
            strangers = []
            for _ in range(3):  # one after the other: their age is their order
                client = await stack.enter_async_context(raw_client(port))
                await client.established.wait()
                strangers.append(client)
            assert (stats.open, stats.unauthenticated) == (3, 3)
            conn = await dial(dialer, port)
            assert await ping(conn)
            oldest, *others = strangers
            await oldest.terminated.wait()
            assert oldest.close_event is not None
            assert oldest.close_event.error_code == E_REFUSED
            assert setting in oldest.close_event.reason_phrase
            assert not any(c.terminated.is_set() for c in others)
            assert stats.evicted == 1 and stats.refused == 0
            assert (stats.open, stats.unauthenticated) == (3, 2)


@pytest.mark.parametrize("says", ["nothing", "half a hello"])
async def test_the_handshake_deadline_closes_a_connection_without_a_hello(says: str) -> None:
    """From its first packet a connection has ``handshake_timeout`` to pass its Hello: one that
    completes the QUIC handshake and then sends nothing (or half a Hello) is closed with a
    reason naming the setting - not kept until the 30 s idle timeout."""
    stats = ListenerStats()
    with trio.fail_after(10):
        async with (
            listener(handshake_timeout=0.3, stats=stats) as port,
            quic_dialer() as dialer,
            raw_client(port) as client,
        ):
            await client.established.wait()
            if says != "nothing":
                frame = encode(hello("client"))
                client.quic.send_stream_data(0, frame[: len(frame) // 2])
                client.flush()
            await client.terminated.wait()
            assert client.close_event is not None
            assert client.close_event.error_code == E_REFUSED
            assert "transfer.handshake_timeout" in client.close_event.reason_phrase
            assert stats.handshake_timeouts == 1 and stats.open == 0
            # A member passes its Hello well within the deadline, and is not held to it after.
            conn = await dial(dialer, port)
            await trio.sleep(0.6)  # not synchronisation: the deadline passing, for a member
            assert await ping(conn)
            assert stats.handshake_timeouts == 1


async def test_an_unexpected_error_ends_one_connection_not_the_listener(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug hit by one peer's datagram (here: aioquic raising on it) or by one stream's
    handler is logged with the peer's address, counted, and closes that connection or
    stream only; the listener and the other peers carry on."""
    caplog.set_level(logging.ERROR, logger="tensord.net")
    stats = ListenerStats()
    doomed: list[int] = []
    original = FlowControlledConnection.receive_datagram

    def receive_datagram(
        self: FlowControlledConnection, data: bytes, addr: tuple[str, int], now: float
    ) -> None:
        if addr[1] in doomed:
            raise RuntimeError("a bug reached by this datagram")
        original(self, data, addr, now)

    monkeypatch.setattr(FlowControlledConnection, "receive_datagram", receive_datagram)

    async def handler(conn: Connection) -> None:
        msg = await conn.stream.receive()
        if msg == Ping(666):
            raise ValueError("a bug in the handler")
        await conn.stream.send(Pong(msg.seq) if isinstance(msg, Ping) else msg)
        await echo(conn)

    with trio.fail_after(20):
        async with listener(handler=handler, stats=stats) as port, quic_dialer() as dialer:
            conn = await dial(dialer, port)
            assert await ping(conn)
            async with raw_client(port) as victim:
                await victim.established.wait()
                doomed.append(victim.sock.getsockname()[1])
                victim.quic.send_ping(1)
                victim.flush()
                await victim.terminated.wait()
            assert victim.close_event is not None
            assert victim.close_event.error_code == QuicErrorCode.INTERNAL_ERROR
            other = await dial(dialer, port)
            await other.stream.send(Ping(666))
            with pytest.raises((trio.BrokenResourceError, ConnectionClosed)):
                await other.stream.receive()
            assert stats.errors == 2
            assert await ping(conn) and await ping(await dial(dialer, port))
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(f"127.0.0.1:{doomed[0]}" in m and "unexpected error" in m for m in logged)
    assert any("stream" in m and "unexpected error" in m for m in logged)


def _rss(pid: int) -> int:
    """Resident set size of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


async def test_a_daemon_under_three_unauthenticated_connections_stays_small(
    tmp_path: Path,
) -> None:
    """The attack of issue 12 against a real ``tensord serve`` over QUIC: three connections
    without the cluster secret open 64 streams each and push 32 MiB each, never a Hello. The
    daemon's RSS grows by less than 8 MiB (it was +78 MiB: every stream buffered up to its
    8 MiB window), and a member's transfer still arrives."""
    import numpy as np

    from .support.chaos.common import receiver
    from .support.daemons import free_port
    from .support.helpers import fast_settings, running

    port = free_port()
    with trio.fail_after(60):
        async with receiver(tmp_path, port, TENSORD_TRANSPORT="quic") as d:
            pid = d.proc.pid
            # Warm-up: the first connection's one-time costs (imports, TLS) are not the attack.
            async with raw_client(port) as warm:
                await warm.established.wait()
                warm.push(streams=1, per_stream=4 * KiB)
                await warm.settled()
            before = _rss(pid)
            async with raw_client(port) as a, raw_client(port) as b, raw_client(port) as c:
                for client in (a, b, c):
                    await client.established.wait()
                    client.push(streams=64, per_stream=512 * KiB)
                for client in (a, b, c):
                    await client.settled()
                grown = _rss(pid) - before
                accepted = [client.accepted for client in (a, b, c)]
                sender = replace(fast_settings(), transport="quic")
                array = np.arange(1 << 18, dtype=np.float32)
                async with running(sender) as node:
                    result = await node.send_tensor(f"tensord://r@127.0.0.1:{port}", "w", array)
                await d.wait_for("tensor arrived: 'w'")
    assert result.transport == "quic"
    assert all(n <= PRE_AUTH_WINDOW for n in accepted), accepted
    assert grown < 8 * MiB, f"RSS grew by {grown / MiB:.1f} MiB"


async def test_retiring_connection_ids_over_and_over_leaves_the_routes_bounded() -> None:
    """Each connection id a peer retires makes aioquic issue a new one. The listener's routes
    (connection id -> connection) follow: they used to keep every id ever issued for the
    connection's lifetime, so a peer - before its Hello, too - could grow them at will."""
    stats = ListenerStats()
    with trio.fail_after(20):
        async with listener(stats=stats) as port, raw_client(port) as client:
            await client.established.wait()
            for _ in range(100):
                while not client.quic._peer_cid_available:
                    await client.changed()
                client.quic.change_connection_id()  # retire the one in use, take the next
                client.flush()
            assert not client.terminated.is_set(), client.close_event
            # Its 8 live ids and the one the client first chose (routed for its Initials).
            assert stats.connection_ids <= 9, stats
            async with quic_dialer() as dialer:
                assert await ping(await dial(dialer, port))
