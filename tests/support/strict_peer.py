"""Peers written for the chain and remote pull tests, from the node's own parts.

:func:`strict_peer`: a receiving peer that advertises a small maximum chunk in its ``hello``
and holds senders to it, as a stricter implementation (or a future tensord) may: a ``begin``
with larger chunks is refused with ``error(too_large)``. Every tensord advertises 64 MiB, so
this is how a test meets such a peer. Built from the node's own parts (the listener handshake
with the cluster secret, ``ReceiveTransfer``, ``receive_chunked``), it accepts exactly what the
protocol says, and keeps what a test asks about: each tensor's bytes and chunk size, and the
chunk sizes it refused.

:func:`silent_peer`: a peer that completes the handshake, then reads every frame and never
answers - a hung process whose connections the kernel still serves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import trio

from tensord.errors import ProtocolError
from tensord.net.connection import Connection, ConnectionClosed, receive_chunked, server_handshake
from tensord.net.security import PeerSecurity
from tensord.net.stream import FramedStream, SocketTransport
from tensord.wire import Begin, Error, make_hello
from tensord.wire.frames import FrameDecoder
from tensord.wire.handshake import ALL_FEATURES
from tensord.wire.transfer import ReceiveTransfer

from .helpers import fast_settings


@dataclass
class StrictPeer:
    """What the peer saw. ``ticket``: how a node names it (``tensord://id@127.0.0.1:port``)."""

    node_id: str
    max_chunk: int
    port: int = 0
    received: dict[str, bytes] = field(default_factory=dict)
    chunk_sizes: dict[str, int] = field(default_factory=dict)
    refused: list[int] = field(default_factory=list)
    arrived: trio.Event = field(default_factory=trio.Event)

    @property
    def ticket(self) -> str:
        return f"tensord://{self.node_id}@127.0.0.1:{self.port}"

    async def serve(self, stream: trio.SocketStream) -> None:
        framed = FramedStream(SocketTransport(stream), FrameDecoder())
        key = PeerSecurity.from_settings(fast_settings().security).key
        hello = make_hello(self.node_id, ALL_FEATURES, self.max_chunk)
        try:
            conn = await server_handshake(framed, hello, key)
            while True:
                await self._one(conn)
        except (ConnectionClosed, ProtocolError, OSError, trio.BrokenResourceError):
            pass  # the sender went away or broke the protocol: this connection ends
        finally:
            await stream.aclose()

    async def _one(self, conn: Connection) -> None:
        begin = await conn.stream.receive()
        if not isinstance(begin, Begin):
            raise ProtocolError(f"expected begin, got {type(begin).__name__}")
        dest = bytearray(begin.meta.nbytes)
        agr = conn.agreement
        try:
            xfer = ReceiveTransfer(
                begin, memoryview(dest), crc=agr.crc, lz4=agr.lz4, max_chunk=self.max_chunk
            )
        except ProtocolError as exc:
            self.refused.append(begin.chunk_size)
            await conn.stream.send(Error(exc.code, str(exc), begin.id))
            raise
        if begin.resume:
            await conn.stream.send(xfer.accept())
        await receive_chunked(conn, xfer, io_timeout=30)
        self.received[begin.meta.name] = bytes(dest)
        self.chunk_sizes[begin.meta.name] = begin.chunk_size
        self.arrived.set()


@asynccontextmanager
async def strict_peer(node_id: str, max_chunk: int) -> AsyncIterator[StrictPeer]:
    """A :class:`StrictPeer` listening on 127.0.0.1 (an ephemeral port) until the block ends."""
    peer = StrictPeer(node_id, max_chunk)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), peer.serve, 0)
        peer.port = listeners[0].socket.getsockname()[1]
        yield peer
        nursery.cancel_scope.cancel()


@dataclass
class SilentPeer:
    """Handshakes (with the cluster secret), then reads and never answers; ``heard`` counts
    the frames it read."""

    node_id: str
    port: int = 0
    heard: int = 0

    @property
    def ticket(self) -> str:
        return f"tensord://{self.node_id}@127.0.0.1:{self.port}"

    async def serve(self, stream: trio.SocketStream) -> None:
        framed = FramedStream(SocketTransport(stream), FrameDecoder())
        key = PeerSecurity.from_settings(fast_settings().security).key
        try:
            conn = await server_handshake(
                framed, make_hello(self.node_id, ALL_FEATURES, 1 << 26), key
            )
            while True:
                await conn.stream.receive()
                self.heard += 1
                if conn.stream.decoder.payload_pending:
                    await conn.stream.discard_payload()
        except (ConnectionClosed, ProtocolError, OSError, trio.BrokenResourceError):
            pass
        finally:
            await stream.aclose()


@asynccontextmanager
async def silent_peer(node_id: str) -> AsyncIterator[SilentPeer]:
    """A :class:`SilentPeer` listening on 127.0.0.1 (an ephemeral port) until the block ends."""
    peer = SilentPeer(node_id)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), peer.serve, 0)
        peer.port = listeners[0].socket.getsockname()[1]
        yield peer
        nursery.cancel_scope.cancel()
