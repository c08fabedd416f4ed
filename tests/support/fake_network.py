"""A network in memory, for timing tests under ``autojump_clock``.

Real sockets and a virtual clock do not mix (the clock jumps while bytes are in the kernel), so
tests of retry budgets, backoff, stalls and expiry give the node a fake dialer instead, as
trio's own ``test_highlevel_open_tcp_stream.py`` does: each dial makes a pair of handshaken
:class:`~tensord.net.connection.Connection` s over ``trio.testing.memory_stream_pair`` and hands
the far end to whatever plays the peer.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable

import trio
import trio.testing

from tensord.address import PeerAddress
from tensord.config import MAX_CHUNK_SIZE
from tensord.net.connection import Connection, client_handshake, server_handshake
from tensord.net.stream import FramedStream, StreamTransport
from tensord.wire.frames import FrameDecoder
from tensord.wire.handshake import ALL_FEATURES, make_hello


def _framed(stream: trio.abc.Stream) -> FramedStream:
    return FramedStream(StreamTransport(stream), FrameDecoder())


async def connection_pair(
    client: str = "a", server: str = "b", features: frozenset[str] = ALL_FEATURES
) -> tuple[Connection, Connection]:
    """Two ends of one handshaken connection: ``client`` dialled ``server``."""
    near, far = trio.testing.memory_stream_pair()
    out: list[Connection] = []

    async def serve() -> None:
        out.append(
            await server_handshake(_framed(far), make_hello(server, features, MAX_CHUNK_SIZE))
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        conn = await client_handshake(_framed(near), make_hello(client, features, MAX_CHUNK_SIZE))
    return conn, out[0]


class FakeNetwork:
    """A dialer whose every dial is recorded (its virtual time) and answered by ``peer``: a
    coroutine given the far end of a new connection, run in ``nursery``. Without ``peer`` every
    dial fails with what ``refuse`` raises."""

    def __init__(
        self,
        nursery: trio.Nursery,
        peer: Callable[[Connection], Awaitable[None]] | None = None,
        refuse: Callable[[PeerAddress], BaseException] | None = None,
    ) -> None:
        self.nursery = nursery
        self.peer = peer
        self.refuse = refuse
        self.dials: list[float] = []

    async def dial(self, addr: PeerAddress) -> Connection:
        self.dials.append(trio.current_time())
        if self.peer is None:
            assert self.refuse is not None
            raise self.refuse(addr)
        near, far = await connection_pair(server=addr.node_id or "b")
        self.nursery.start_soon(self.peer, far)
        return near

    def gaps(self) -> list[float]:
        """Seconds between one dial and the next."""
        return [b - a for a, b in itertools.pairwise(self.dials)]
