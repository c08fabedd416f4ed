"""TCP transport: dial a peer and serve a listener, yielding handshaken connections."""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable

import trio

from .. import metrics
from ..boundary import report_unexpected
from ..certs import describe_tls_error
from ..config import HostPort
from ..errors import AuthenticationFailed, PeerUnreachable, ProtocolError
from ..wire.frames import FrameDecoder
from ..wire.messages import Hello
from .admission import Admission
from .connection import Connection, client_handshake, server_handshake
from .security import (
    PeerSecurity,
    check_identity,
    client_tls,
    refuse_unexpected_tls,
    server_tls,
)
from .stream import ConnectionClosed, FramedStream, SocketTransport, StreamTransport

log = logging.getLogger("tensord.net")

DecoderFactory = Callable[[], FrameDecoder]


def _tune(stream: trio.SocketStream) -> None:
    # trio sets TCP_NODELAY already; keepalive notices a vanished peer on idle pooled connections.
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


async def dial(
    addr: HostPort,
    hello: Hello,
    decoder: DecoderFactory,
    *,
    connect_timeout: float,
    security: PeerSecurity | None = None,
) -> Connection:
    """Connect, secure and handshake within ``connect_timeout``. Raises :class:`PeerUnreachable`,
    :class:`AuthenticationFailed` (TLS or the cluster secret refused, either way), or
    :class:`ProtocolError` (the peer answered but refused or spoke something else)."""
    sec = security or PeerSecurity()
    stream: trio.SocketStream | None = None
    framed: FramedStream | None = None
    try:
        with trio.fail_after(connect_timeout):
            stream = await trio.open_tcp_stream(addr.host, addr.port)
            _tune(stream)
            if sec.client_ssl is not None:
                tls = await client_tls(stream, sec.client_ssl)
                framed = FramedStream(StreamTransport(tls), decoder())
                try:
                    conn = await client_handshake(framed, hello, sec.key)
                except (trio.BrokenResourceError, ConnectionClosed) as exc:
                    # TLS 1.3: a listener refuses our certificate after our side of the TLS
                    # handshake is done, so the refusal shows up as the first read failing.
                    raise AuthenticationFailed(f"TLS: {describe_tls_error(exc)}") from None
                check_identity(tls, conn.peer_id)
                return conn
            framed = FramedStream(SocketTransport(stream), decoder())
            return await client_handshake(framed, hello, sec.key)
    except (TimeoutError, trio.TooSlowError):
        await _close(stream, framed)
        raise PeerUnreachable(
            f"{addr}: no handshake within {connect_timeout:g} s (transfer.connect_timeout)"
        ) from None
    except AuthenticationFailed as exc:
        await _close(stream, framed)
        raise AuthenticationFailed(f"{addr}: {exc}") from None
    except (OSError, trio.BrokenResourceError, ConnectionClosed) as exc:
        await _close(stream, framed)
        raise PeerUnreachable(f"{addr}: {_describe(exc)}") from None
    except ProtocolError as exc:
        await _close(stream, framed)
        if exc.code == "auth":
            raise AuthenticationFailed(f"{addr}: {exc}") from None
        raise


async def _close(stream: trio.SocketStream | None, framed: FramedStream | None = None) -> None:
    """Close a connection that never became a :class:`Connection`: through its framed stream
    when there is one (a :class:`SocketTransport` holds a ``dup`` of the socket that closing the
    trio stream alone would leak, and the peer would never see EOF)."""
    # Shielded, but bounded: a TLS close_notify to a stranger who never reads must not hang.
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        if framed is not None:
            await framed.aclose()
        elif stream is not None:
            await stream.aclose()


def _remote(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "a peer"
    return f"{host}:{port}"


def _source(stream: trio.SocketStream) -> str:
    """The remote address without its port: whose strangers these are."""
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return "?"


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
    security: PeerSecurity | None = None,
    max_connections: int | None = None,
    max_unauthenticated: int | None = None,
) -> None:
    """Accept connections forever; each one is handshaken and passed to ``handler``.

    A connection that fails its handshake is logged and closed; it never affects the others,
    and neither does anything ``handler`` raises (a bug there is logged and counted).

    Until a connection has completed its (authenticated) handshake it is a stranger: it gets
    ``handshake_timeout`` seconds in all, and strangers share a budget of
    ``max_unauthenticated`` connections. When the budget - or ``max_connections``, which counts
    every open connection - is full, a stranger is dropped to make room for the new one (sshd's
    ``MaxStartups`` idea): the oldest of the source address holding the most strangers, so that
    neither idle connections nor a flood from one host can lock cluster members out (a member
    is a stranger too while its handshake runs: it is dropped only if its own address holds as
    many strangers as any other). Only when every slot is held by an authenticated peer is a
    newcomer refused. :class:`~tensord.net.admission.Admission` decides, as for the QUIC
    listener; a dropped stranger holds its slot here until its socket is closed.
    """

    sec = security or PeerSecurity()
    #: Each connection is known by the scope that drops it (at its deadline, or for a newer one).
    slots: Admission[trio.CancelScope] = Admission(max_connections, max_unauthenticated)
    #: Strangers dropped for a newer connection, until their task has ended.
    dropped: set[trio.CancelScope] = set()

    async def on_stream(stream: trio.SocketStream) -> None:
        room = slots.make_room()
        if room.refused:
            metrics.PEER_CONNECTIONS_DROPPED.labels("limit").inc()
            warn, _ = slots.refusal(trio.current_time())
            if warn:  # one line per 10 s, not one per attempt
                log.warning(
                    "peer connection from %s refused: %d connections open, all authenticated "
                    "(transfer.max_connections)",
                    _remote(stream),
                    slots.open,
                )
            await _close(stream)
            return
        if room.victim is not None:
            # It counts until its socket is closed, but is not chosen again meanwhile.
            slots.dropping(room.victim)
            dropped.add(room.victim)
            room.victim.cancel()
            metrics.PEER_CONNECTIONS_DROPPED.labels("budget").inc()
        scope = trio.CancelScope(deadline=trio.current_time() + handshake_timeout)
        slots.admit(scope, _source(stream))
        try:
            await _serve_one(stream, scope)
        except Exception as exc:  # the boundary: one connection's bug is logged, not fatal
            report_unexpected(log, "peer", f"peer connection from {_remote(stream)}", exc)
        finally:
            slots.forget(scope)
            dropped.discard(scope)

    async def _serve_one(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        _tune(stream)
        framed: FramedStream | None = None
        conn: Connection | None = None
        try:
            with scope:
                tls = None
                if sec.server_ssl is not None:
                    tls = await server_tls(stream, sec.server_ssl)
                    framed = FramedStream(StreamTransport(tls), decoder())
                else:
                    await refuse_unexpected_tls(stream)
                    framed = FramedStream(SocketTransport(stream), decoder())
                conn = await server_handshake(framed, hello, sec.key)
                if tls is not None:
                    try:
                        check_identity(tls, conn.peer_id)
                    except AuthenticationFailed as exc:
                        await conn.send_error("auth", str(exc))
                        raise
        except AuthenticationFailed as exc:
            log.warning("peer connection from %s refused: %s", _remote(stream), exc)
            await _close(stream, framed)
            return
        except ProtocolError as exc:
            if exc.code == "auth":
                log.warning("peer connection from %s refused: %s", _remote(stream), exc)
            else:
                log.info("peer connection refused during handshake: %s", _describe(exc))
            await _close(stream, framed)
            return
        except (OSError, trio.BrokenResourceError, ConnectionClosed) as exc:
            log.info("peer connection refused during handshake: %s", _describe(exc))
            await _close(stream, framed)
            return
        if conn is None:  # the scope was cancelled: dropped, or out of time
            if scope in dropped:
                why = "dropped for a newer one (transfer.max_unauthenticated)"
            else:
                metrics.PEER_CONNECTIONS_DROPPED.labels("deadline").inc()
                why = f"no handshake within {handshake_timeout:g} s (transfer.handshake_timeout)"
            log.info(
                "peer connection from %s closed before it authenticated: %s", _remote(stream), why
            )
            await _close(stream, framed)
            return
        slots.authenticated(scope)  # out of the strangers' budget, still holding its slot
        try:
            await handler(conn)
        finally:
            with trio.CancelScope(shield=True):
                await conn.aclose()

    await trio.serve_listeners(on_stream, listeners, handler_nursery=handler_nursery)
