"""TCP transport: dial a peer and serve a listener, yielding handshaken connections."""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable

import trio

from ..config import HostPort
from ..errors import PeerUnreachable, ProtocolError
from ..wire.frames import FrameDecoder
from ..wire.messages import Hello
from .connection import Connection, client_handshake, server_handshake
from .stream import ConnectionClosed, FramedStream, SocketTransport

log = logging.getLogger("tensord.net")

DecoderFactory = Callable[[], FrameDecoder]


def _tune(stream: trio.SocketStream) -> None:
    # trio sets TCP_NODELAY already; keepalive notices a vanished peer on idle pooled connections.
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


async def dial(
    addr: HostPort, hello: Hello, decoder: DecoderFactory, *, connect_timeout: float
) -> Connection:
    """Connect and handshake within ``timeout``. Raises :class:`PeerUnreachable` or
    :class:`ProtocolError` (the peer answered but refused or spoke something else)."""
    stream: trio.SocketStream | None = None
    try:
        with trio.fail_after(connect_timeout):
            stream = await trio.open_tcp_stream(addr.host, addr.port)
            _tune(stream)
            framed = FramedStream(SocketTransport(stream), decoder())
            return await client_handshake(framed, hello)
    except (TimeoutError, trio.TooSlowError):
        await _close(stream)
        raise PeerUnreachable(
            f"{addr}: no handshake within {connect_timeout:g} s (transfer.connect_timeout)"
        ) from None
    except (OSError, trio.BrokenResourceError, ConnectionClosed) as exc:
        await _close(stream)
        raise PeerUnreachable(f"{addr}: {_describe(exc)}") from None
    except ProtocolError:
        await _close(stream)
        raise


async def _close(stream: trio.SocketStream | None) -> None:
    if stream is not None:
        with trio.CancelScope(shield=True):
            await stream.aclose()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


async def open_listeners(addr: HostPort) -> list[trio.SocketListener]:
    """Bind the peer listener(s). Port 0 picks a free port."""
    host = None if addr.host in ("0.0.0.0", "::") else addr.host
    return await trio.open_tcp_listeners(addr.port, host=host)


async def serve(
    listeners: list[trio.SocketListener],
    hello: Hello,
    decoder: DecoderFactory,
    handler: Callable[[Connection], Awaitable[None]],
    *,
    handshake_timeout: float,
    handler_nursery: trio.Nursery | None = None,
) -> None:
    """Accept connections forever; each one is handshaken and passed to ``handler``.

    A connection that fails its handshake is logged and closed; it never affects the others.
    """

    async def on_stream(stream: trio.SocketStream) -> None:
        _tune(stream)
        framed = FramedStream(SocketTransport(stream), decoder())
        try:
            with trio.fail_after(handshake_timeout):
                conn = await server_handshake(framed, hello)
        except (
            TimeoutError,
            trio.TooSlowError,
            OSError,
            trio.BrokenResourceError,
            ConnectionClosed,
            ProtocolError,
        ) as exc:
            log.info("peer connection refused during handshake: %s", _describe(exc))
            await _close(stream)
            return
        try:
            await handler(conn)
        finally:
            await conn.aclose()

    await trio.serve_listeners(on_stream, listeners, handler_nursery=handler_nursery)
