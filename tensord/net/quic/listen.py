"""Serving: one UDP socket, its QUIC connections, admission, and the handler of each stream.

:func:`serve_quic` binds (or takes) the socket and runs a :class:`_Listener`, whose receive
loop routes each datagram to its connection by destination connection id, admits new ones
as :class:`~tensord.net.admission.Admission` (sans-I/O) decides - within ``max_connections``
/ ``max_unauthenticated``, evicting the oldest stranger of the busiest source, refusing only
when members hold every slot - answers packets for connections
it never had with a stateless reset, and runs every stream of an authenticated connection
under an error boundary. The rules a stranger meets: "Before authentication" in docs/QUIC.md.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

import trio
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.packet import QuicErrorCode, QuicFrameType, QuicHeader, QuicPacketType

from ... import metrics
from ...config import HostPort, TlsSettings
from ...errors import AuthenticationFailed, PeerUnreachable, ProtocolError
from ...wire.auth import ClusterKey
from ...wire.frames import FrameDecoder
from ...wire.messages import Hello, Message
from ..admission import Admission
from ..connection import Connection, server_handshake
from ..stream import ByteTransport, ConnectionClosed, FramedStream
from ._aioquic import FlowControlledConnection, parse_header
from .codes import E_NONE, E_PROTOCOL, E_REFUSED, close_args
from .reset import ResetTokens, reset_key
from .session import DecoderFactory, Handler, QuicSession, QuicStreamTransport
from .tls import check_identity, server_config
from .tuning import CID_LENGTH, DEFAULT_TUNING, RECV_BATCH, QuicTuning
from .udp import UdpSocket, open_quic_socket

log = logging.getLogger("tensord.net")

#: New connections refused per second with a CONNECTION_CLOSE when ``max_connections`` is full
#: (each costs a TLS handshake's CPU); beyond that, their Initial packets are dropped unanswered.
MAX_REFUSALS_PER_SECOND = 32


@dataclass
class ListenerStats:
    """What a QUIC listener admitted, refused and shed (for tests, logs and ``/metrics``).

    ``open`` and ``unauthenticated`` are gauges, the others count since the listener started.
    """

    open: int = 0  # QUIC connections counted against max_connections
    unauthenticated: int = 0  # of those, still before their authenticated Hello
    connections: int = 0  # QUIC connections admitted
    authenticated: int = 0  # ... whose first stream's Hello exchange succeeded
    refused: int = 0  # new connections refused: max_connections held by authenticated peers
    evicted: int = 0  # unauthenticated connections dropped for a newer one
    handshake_timeouts: int = 0  # closed for no authenticated Hello within handshake_timeout
    errors: int = 0  # unexpected exceptions (bugs) caught at a connection's or stream's boundary
    connection_ids: int = 0  # (gauge) routed connection ids: at most 9 per connection


class _Listener:
    """The server side: one UDP socket, its QUIC connections, and their streams' handlers.

    Admission (docs/QUIC.md, "Before authentication"): at most ``max_connections`` QUIC
    connections are counted at once, and of those at most ``max_unauthenticated`` before their
    first stream's Hello exchange succeeded; a new connection takes the place of the oldest
    unauthenticated one when either bound is reached, and is refused (CONNECTION_CLOSE with
    CONNECTION_REFUSED) only when authenticated peers hold every slot. Every connection must
    pass its Hello within ``handshake_timeout`` of its first packet.

    Every trust boundary is an error boundary: an unexpected exception while handling one
    datagram, one connection's events or one stream is logged with the peer's address,
    counted in ``stats.errors``, and closes that connection (or stream) only.
    """

    def __init__(
        self,
        sock: socket.socket,
        hello: Hello,
        decoder: DecoderFactory,
        handler: Handler,
        *,
        handshake_timeout: float,
        key: ClusterKey | None,
        tls: TlsSettings | None,
        max_connections: int | None,
        max_unauthenticated: int,
        tuning: QuicTuning,
        stats: ListenerStats,
    ) -> None:
        self.udp = UdpSocket(sock, connected=False, offload=tuning.udp_offload)
        self.hello = hello
        self.decoder = decoder
        self.handler = handler
        self.handshake_timeout = handshake_timeout
        self.key = key
        self.tls = tls
        self.tuning = tuning
        self.stats = stats
        self.config, cadata = server_config(tls, tuning)
        self.cadata = cadata or None
        key_material = reset_key(
            hello.node,
            tls_key=tls.key.read_bytes() if tls is not None else None,
            secret=key.secret if key is not None else None,
        )
        self.reset_tokens = ResetTokens(key_material, CID_LENGTH)
        self.routes: dict[bytes, QuicSession] = {}
        self.sessions: set[QuicSession] = set()  # until their driver ends
        # Counted against max_connections (a dropped one stops counting at once, before its
        # driver has ended), and those not authenticated yet.
        self.admission: Admission[QuicSession] = Admission(
            max_connections, max_unauthenticated, answers_per_second=MAX_REFUSALS_PER_SECOND
        )
        self.accepting = True
        self._nursery: trio.Nursery | None = None
        self._handlers: trio.Nursery | None = None

    async def run(
        self, handlers: trio.Nursery | None, *, task_status: trio.TaskStatus[int]
    ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._handlers = handlers or nursery
                nursery.start_soon(self._receive_loop)
                task_status.started(self.udp.sock.getsockname()[1])
        finally:
            self.udp.close()

    def stop_accepting(self) -> None:
        """No new connections or streams; idle connections close now, busy ones when their
        last stream ends; the socket closes with the last connection."""
        self.accepting = False
        for session in list(self.sessions):
            if not session.streams:
                session.close(E_NONE, "the node is shutting down")
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if not self.accepting and not self.sessions and self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _update_gauges(self) -> None:
        self.stats.open = self.admission.open
        self.stats.unauthenticated = self.admission.unauthenticated
        self.stats.connection_ids = len(self.routes)

    async def _receive_loop(self) -> None:
        udp = self.udp
        touched: set[QuicSession] = set()
        # recvfrom(65536) would allocate (and shrink) 64 KiB per datagram: receive into one
        # buffer and copy out the datagrams.
        buf = bytearray(65536)
        while True:
            await trio.lowlevel.wait_readable(udp.sock)
            now = trio.current_time()
            count = 0
            while count < RECV_BATCH:  # datagrams, not syscalls: one may return many (GRO)
                try:
                    datagrams, addr = udp.receive(buf)
                except BlockingIOError:
                    break
                except OSError:
                    count += 1
                    continue  # an ICMP error for some earlier datagram: not fatal here
                count += len(datagrams)
                for data in datagrams:
                    self._receive_one(data, addr, now, touched)
            for session in touched:
                try:
                    session.after_receive(now)
                except Exception:
                    self._failed(session, session.peer_addr, "its events")
            touched.clear()

    def _receive_one(
        self, data: bytes, addr: NetworkAddress, now: float, touched: set[QuicSession]
    ) -> None:
        """Hand one datagram to its connection (noted in ``touched``), or drop it."""
        # Short header (all packets after the handshake): the destination connection id
        # sits right after the first byte; only long headers need parsing.
        session = self.routes.get(data[1 : 1 + CID_LENGTH]) if data and data[0] < 0x80 else None
        try:
            if session is None:
                session = self._route(data, addr, now)
                if session is None:
                    return
            if session.terminated:
                return  # dropped: its driver has yet to end
            session.quic.receive_datagram(data, addr, now)
        except Exception:
            self._failed(session, addr, "a datagram")
            return
        touched.add(session)

    def _route(self, data: bytes, addr: NetworkAddress, now: float) -> QuicSession | None:
        """The connection of a datagram the short-header fast path did not find: a known one
        (a long header, routed by its destination id: the client's first one stays routed), a
        new one (an Initial, if admitted), or none (dropped, or answered with a stateless
        reset)."""
        header = parse_header(data, CID_LENGTH)
        if header is None:
            return None
        session = self.routes.get(header.destination_cid)
        if session is None:
            session = self._new_session(header.destination_cid, header, data, addr, now)
            if session is None and data[0] < 0x80:
                self._unknown_connection(data, addr)
        return session

    def _failed(self, session: QuicSession | None, addr: NetworkAddress, what: str) -> None:
        """An unexpected exception (a bug, in tensord or aioquic) while handling ``what`` of one
        connection: log it loudly, count it, close that connection only."""
        self.stats.errors += 1
        metrics.UNEXPECTED_ERRORS.labels("quic").inc()
        name = session.name if session is not None else _addr_name(addr)
        log.exception(
            "QUIC connection from %s: unexpected error while handling %s; closing that "
            "connection (a bug: please report it with this traceback)",
            name,
            what,
        )
        if session is None:
            return
        self._forget(session)
        try:
            session.drop(QuicErrorCode.INTERNAL_ERROR, "internal error", transport=True)
        except Exception:  # aioquic's state is what failed: stop without it
            session._lost("internal error")

    def _unknown_connection(self, data: bytes, addr: NetworkAddress) -> None:
        """A short-header packet for a connection id with no route - every id a connection of
        ours has out is routed as it is issued (:meth:`_on_cid`), so this is a connection this
        process never had (a previous incarnation's, or junk): answer with a stateless reset.
        Constant work per datagram, whatever the number of connections."""
        reset = self.reset_tokens.reset_for(data)
        if reset is not None:
            self.udp.send_nowait(reset, addr)

    def _new_session(
        self, dcid: bytes, header: QuicHeader, data: bytes, addr: NetworkAddress, now: float
    ) -> QuicSession | None:
        if (
            header.packet_type != QuicPacketType.INITIAL
            or len(data) < SMALLEST_MAX_DATAGRAM_SIZE
            or header.version not in self.config.supported_versions
            or not self.accepting
        ):
            return None
        assert self._nursery is not None
        room = self.admission.make_room()
        if room.victim is not None:
            self._evict(room.victim, addr, full=room.full)
        elif room.refused:
            self._refuse(dcid, data, addr, now)
            return None
        quic = FlowControlledConnection(
            configuration=self.config,
            original_destination_connection_id=dcid,
            connection_window=self.tuning.connection_window,
            request_client_certificate=self.cadata is not None,
            reset_tokens=self.reset_tokens,
            authenticated=False,
        )
        session = QuicSession(
            quic,
            self.udp,
            addr,
            name=_addr_name(addr),
            tuning=self.tuning,
            verify_cadata=self.cadata,
            on_stream=self._on_stream,
        )
        session.cids.add(dcid)
        session.on_closed = self._on_closed
        session.on_idle = self._on_idle
        session.on_cid = self._on_cid
        session.auth_deadline = now + self.handshake_timeout
        session.on_auth_deadline = self._on_auth_deadline
        self.sessions.add(session)
        self.admission.admit(session, _host_of(addr))
        self.stats.connections += 1
        for cid in session.cids:
            self.routes[cid] = session
        self._update_gauges()
        self._nursery.start_soon(self._drive, session, name=f"quic-server {session.name}")
        return session

    def _forget(self, session: QuicSession) -> None:
        """``session`` no longer counts against the limits (it is being dropped or is gone)."""
        self.admission.forget(session)
        self._update_gauges()

    def _evict(self, session: QuicSession, newcomer: NetworkAddress, *, full: bool) -> None:
        """sshd's MaxStartups: a connection still in its handshake makes room."""
        self.stats.evicted += 1
        metrics.PEER_CONNECTIONS_DROPPED.labels("budget").inc()
        if full:
            why = (
                f"all {self.admission.open} peer connections are taken (transfer.max_connections) "
                "and this was the oldest still in its handshake from the address holding the most "
                "(transfer.max_unauthenticated)"
            )
        else:
            why = (
                f"{self.admission.unauthenticated} connections are in their handshake "
                "(transfer.max_unauthenticated) and this was the oldest from the address holding "
                "the most"
            )
        log.info(
            "peer connection from %s dropped before authenticating for one from %s: %s",
            session.name,
            _addr_name(newcomer),
            why,
        )
        self._forget(session)
        session.drop(E_REFUSED, f"{why}: authenticate sooner, or try again")

    def _refuse(self, dcid: bytes, data: bytes, addr: NetworkAddress, now: float) -> None:
        """``max_connections`` authenticated connections are open: answer a new one with a
        CONNECTION_CLOSE (CONNECTION_REFUSED) from a connection that lives for this only."""
        self.stats.refused += 1
        metrics.PEER_CONNECTIONS_DROPPED.labels("limit").inc()
        warn, answer = self.admission.refusal(now)
        if warn:  # one line per 10 s, not one per attempt
            log.warning(
                "peer connection from %s refused: %d QUIC connections open "
                "(transfer.max_connections)",
                _addr_name(addr),
                self.admission.open,
            )
        if not answer:
            return  # unanswered: the dialer times out
        quic = QuicConnection(configuration=self.config, original_destination_connection_id=dcid)
        quic.receive_datagram(data, addr, now)
        quic.close(
            error_code=QuicErrorCode.CONNECTION_REFUSED,
            frame_type=QuicFrameType.PADDING,
            reason_phrase=(
                f"the node has {self.admission.open} peer connections open "
                "(transfer.max_connections): try again later, or raise the limit"
            ),
        )
        for datagram, to in quic.datagrams_to_send(now=now):
            self.udp.send_nowait(datagram, to)

    async def _drive(self, session: QuicSession) -> None:
        try:
            await session.drive()
        except Exception:
            self.stats.errors += 1
            metrics.UNEXPECTED_ERRORS.labels("quic").inc()
            log.exception(
                "QUIC connection from %s failed (a bug: please report it with this traceback)",
                session.name,
            )

    def _on_closed(self, session: QuicSession) -> None:
        self.sessions.discard(session)
        routes = self.routes
        for cid in session.cids:
            if routes.get(cid) is session:
                del routes[cid]
        self._forget(session)
        if session.hello_failure is None and isinstance(session.failure, AuthenticationFailed):
            log.warning("peer connection from %s refused: %s", session.name, session.failure)
        self._maybe_finish()

    def _on_cid(self, session: QuicSession, cid: bytes, issued: bool) -> None:
        """Routes follow the connection ids a connection has out: at most aioquic's 8 (and
        the client's original one) per connection, however often the peer retires them."""
        if issued:
            if not session.terminated:
                self.routes[cid] = session
        elif self.routes.get(cid) is session:
            del self.routes[cid]
        self.stats.connection_ids = len(self.routes)

    def _on_idle(self, session: QuicSession) -> None:
        if not self.accepting:
            session.close(E_NONE, "the node is shutting down")

    def _on_auth_deadline(self, session: QuicSession) -> None:
        self.stats.handshake_timeouts += 1
        metrics.PEER_CONNECTIONS_DROPPED.labels("deadline").inc()
        why = (
            f"no authenticated Hello within {self.handshake_timeout:g} s of the first packet "
            "(transfer.handshake_timeout)"
        )
        log.info("peer connection from %s closed: %s", session.name, why)
        self._forget(session)
        session.drop(E_REFUSED, why)

    def _authenticated(self, session: QuicSession) -> None:
        self.stats.authenticated += 1
        self.admission.authenticated(session)
        self._update_gauges()
        session.authenticate()

    def _on_stream(self, stream: QuicStreamTransport) -> bool:
        """A new stream from a peer: serve it (the first one carries the Hello), or refuse.

        Before the Hello exchange succeeded a peer can open no stream but the first
        (``PRE_AUTH_STREAMS``); one that arrives anyway is refused, never buffered."""
        session = stream.session
        if not self.accepting:
            return False
        # Decided here, in arrival order: tasks may start in any order.
        first = not session.hello_started
        if not first and session.agreement is None:
            return False
        session.hello_started = True
        assert self._handlers is not None
        self._handlers.start_soon(
            self._serve_stream, stream, first, name=f"quic-stream {session.name}"
        )
        return True

    async def _serve_stream(self, stream: QuicStreamTransport, first: bool) -> None:
        """One stream, under an error boundary: whatever the handler (or this module) raises,
        it ends this stream - and, during the Hello, its connection - and nothing else."""
        session = stream.session
        conn: Connection | None = None
        try:
            framed = FramedStream(stream, self.decoder())
            if first:
                try:
                    conn = await self._first_stream(session, framed)
                finally:
                    session.hello_done.set()
                if conn is None:
                    return
            else:
                assert session.agreement is not None  # checked by _on_stream
                conn = Connection(framed, session.agreement, outbound=False)
            await self.handler(conn)
        except Exception:
            self.stats.errors += 1
            metrics.UNEXPECTED_ERRORS.labels("quic").inc()
            log.exception(
                "QUIC stream %d from %s: unexpected error; closing %s (a bug: please report it "
                "with this traceback)",
                stream.stream_id,
                session.name,
                "the stream" if session.authenticated else "the connection",
            )
            if not session.authenticated:
                self._forget(session)
                session.close(E_PROTOCOL, "[internal] the listener failed during the handshake")
        finally:
            if conn is not None:
                await conn.aclose()
            stream._close()

    async def _first_stream(self, session: QuicSession, framed: FramedStream) -> Connection | None:
        """The Hello (and cluster-secret check) on a QUIC connection's first stream, by the
        connection's handshake deadline; a failure closes the whole connection, with the reason
        in CONNECTION_CLOSE. Success grants the peer its windows and streams."""
        if self.tls is not None:
            framed = _IdentityCheckedStream(framed.transport, framed.decoder, session, self.tls)
        # No deadline here: the driver drops the connection at ``session.auth_deadline``, which
        # fails this stream (one owner of the deadline, one log line, one count).
        try:
            conn = await server_handshake(framed, self.hello, self.key)
        except (AuthenticationFailed, ProtocolError) as exc:
            auth = isinstance(exc, AuthenticationFailed) or exc.code == "auth"
            if session.failure is None:
                session.hello_failure = AuthenticationFailed(str(exc)) if auth else exc
                if auth:
                    log.warning("peer connection from %s refused: %s", session.name, exc)
                else:
                    log.info(
                        "peer connection from %s refused during handshake: %s", session.name, exc
                    )
                session.close(*close_args(session.hello_failure))
            return None
        except (
            TimeoutError,
            trio.TooSlowError,
            OSError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            ConnectionClosed,
        ) as exc:
            why = session.close_reason or str(exc) or type(exc).__name__
            if isinstance(session.failure, AuthenticationFailed):
                log.warning("peer connection from %s refused: %s", session.name, why)
            else:
                log.info("peer connection from %s failed during handshake: %s", session.name, why)
            if session.failure is None:
                session.hello_failure = PeerUnreachable(why)
                session.close(E_PROTOCOL, "no handshake on the first stream")
            return None
        session.agreement = conn.agreement
        self._authenticated(session)
        return conn


def _host_of(addr: NetworkAddress) -> str:
    return str(addr[0])


def _addr_name(addr: NetworkAddress) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _IdentityCheckedStream(FramedStream):
    """The listener's first stream with TLS: the dialer's Hello must claim the node id of its
    certificate, checked as it is read - an impostor never even gets our Hello back."""

    def __init__(
        self,
        transport: ByteTransport,
        decoder: FrameDecoder,
        session: QuicSession,
        tls: TlsSettings,
    ) -> None:
        super().__init__(transport, decoder)
        self._session = session
        self._tls: TlsSettings | None = tls

    async def receive(self) -> Message:
        msg = await super().receive()
        if isinstance(msg, Hello) and self._tls is not None:
            tls, self._tls = self._tls, None
            check_identity(self._session.peer_node_id, msg.node, tls)
        return msg


async def serve_quic(
    addr_or_socket: HostPort | socket.socket,
    hello: Hello,
    decoder: DecoderFactory,
    handler: Handler,
    *,
    handshake_timeout: float,
    handler_nursery: trio.Nursery | None = None,
    key: ClusterKey | None = None,
    tls: TlsSettings | None = None,
    max_connections: int | None = None,
    max_unauthenticated: int = 32,
    tuning: QuicTuning = DEFAULT_TUNING,
    stats: ListenerStats | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve QUIC until cancelled: every stream whose connection passed its first-stream
    handshake becomes a :class:`Connection` passed to ``handler``. Reports the bound UDP port
    with ``task_status.started(port)``.

    With ``handler_nursery``, the connections (their UDP socket included) live in that nursery:
    cancelling ``serve_quic`` only stops accepting - new QUIC connections and new streams are
    refused, idle connections are closed, the transfers in flight carry on, and the socket is
    closed after the last connection (this is what ``TensorNode.drain`` needs). Without it,
    cancelling ``serve_quic`` closes everything.

    ``max_connections`` bounds the QUIC connections open at once (handshakes included; each
    carries up to :data:`MAX_PEER_STREAMS` streams), ``max_unauthenticated`` those still
    before their first stream's Hello, which must succeed within ``handshake_timeout`` of the
    connection's first packet (see "Before authentication" in docs/QUIC.md). ``stats``,
    if given, is kept up to date.
    """
    sock = (
        addr_or_socket
        if isinstance(addr_or_socket, socket.socket)
        else await open_quic_socket(addr_or_socket, tuning)
    )
    sock.setblocking(False)
    try:
        listener = _Listener(
            sock,
            hello,
            decoder,
            handler,
            handshake_timeout=handshake_timeout,
            key=key,
            tls=tls,
            max_connections=max_connections,
            max_unauthenticated=max_unauthenticated,
            tuning=tuning,
            stats=stats if stats is not None else ListenerStats(),
        )
    except BaseException:
        sock.close()
        raise
    if handler_nursery is None:
        try:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(listener.run, None)
                task_status.started(port)
        finally:
            listener.accepting = False
        return
    port = await handler_nursery.start(listener.run, handler_nursery)
    task_status.started(port)
    try:
        await trio.sleep_forever()
    finally:
        listener.stop_accepting()
