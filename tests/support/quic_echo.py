"""A QUIC echo server on 127.0.0.1 and the clients that talk to it, for the QUIC tests.

:func:`quic_server` serves :func:`echo` (or a test's own handler) with ``serve_quic``;
:func:`quic_dialer` and :func:`dial` reach it. A payload is a seeded pseudo-random byte string
(:func:`payload`), so the echo side checks it byte for byte without being told its content.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import trio

from tensord.config import HostPort, TlsSettings
from tensord.net.connection import Connection
from tensord.net.quic import DEFAULT_TUNING, QuicDialer, QuicTuning, serve_quic
from tensord.net.stream import ConnectionClosed
from tensord.wire.auth import ClusterKey
from tensord.wire.frames import FrameDecoder
from tensord.wire.handshake import ALL_FEATURES, make_hello
from tensord.wire.messages import Chunk, Hello, Ping, Pong

MiB = 1 << 20
#: A cluster secret for listeners and dialers that should authenticate each other.
KEY = ClusterKey(b"x" * 32)

Handler = Callable[[Connection], Awaitable[None]]


def hello(node: str) -> Hello:
    return make_hello(node, ALL_FEATURES, 16 * MiB)


def payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def echo(conn: Connection) -> None:
    """Ping -> Pong; a Chunk's payload is compared with ``payload(int(id, 16), len)`` and
    answered Pong(1) if it is byte-exact, Pong(0) if not."""
    try:
        while True:
            msg = await conn.stream.receive()
            if isinstance(msg, Ping):
                await conn.stream.send(Pong(msg.seq))
            elif isinstance(msg, Chunk):
                buf = bytearray(msg.wire_len)
                await conn.stream.receive_payload_into(memoryview(buf))
                exact = buf == payload(int(msg.id, 16), msg.wire_len)
                await conn.stream.send(Pong(1 if exact else 0))
    except (ConnectionClosed, trio.BrokenResourceError):
        return


async def send_payload(conn: Connection, seed: int, n: int) -> bool:
    chunk = Chunk(f"{seed:016x}", 0, 0, n, n, None)
    await conn.stream.send_with_payload(chunk, payload(seed, n))
    return await conn.stream.receive() == Pong(1)


async def ping(conn: Connection, seq: int = 7) -> bool:
    await conn.stream.send(Ping(seq))
    return await conn.stream.receive() == Pong(seq)


@asynccontextmanager
async def quic_server(
    handler: Handler = echo,
    *,
    node: str = "server",
    key: ClusterKey | None = None,
    tls: TlsSettings | None = None,
    tuning: QuicTuning = DEFAULT_TUNING,
) -> AsyncIterator[int]:
    """A listener on 127.0.0.1, port chosen by the kernel; yields the port."""
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(
            partial(
                serve_quic,
                HostPort("127.0.0.1", 0),
                hello(node),
                FrameDecoder,
                handler,
                handshake_timeout=5,
                key=key,
                tls=tls,
                tuning=tuning,
            )
        )
        yield port
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def quic_dialer(tuning: QuicTuning = DEFAULT_TUNING) -> AsyncIterator[QuicDialer]:
    dialer = QuicDialer(tuning)
    async with trio.open_nursery() as nursery:
        await nursery.start(dialer.run)
        yield dialer
        nursery.cancel_scope.cancel()


async def dial(
    dialer: QuicDialer,
    port: int,
    *,
    node: str = "client",
    key: ClusterKey | None = None,
    tls: TlsSettings | None = None,
) -> Connection:
    return await dialer.dial(
        HostPort("127.0.0.1", port),
        hello(node),
        FrameDecoder,
        connect_timeout=5,
        key=key,
        tls=tls,
    )
