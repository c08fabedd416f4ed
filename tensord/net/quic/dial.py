"""Dialing: one QUIC connection per peer, a new stream on it for every :func:`dial_quic`.

:class:`QuicDialer` keeps the live connections, keyed by peer address *and* local identity
(two nodes in one process never share one), and runs their tasks in its nursery. The Hello
runs once per connection, on its first stream; later streams reuse its ``Agreement``.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from typing import Any

import trio
from aioquic.quic.configuration import QuicConfiguration

from ...config import HostPort, TlsSettings
from ...errors import AuthenticationFailed, PeerUnreachable, ProtocolError, TensorError
from ...wire.auth import ClusterKey
from ...wire.messages import Hello
from ..connection import Connection, client_handshake
from ..stream import ConnectionClosed, FramedStream
from ._aioquic import FlowControlledConnection
from .codes import E_NONE, close_args
from .session import DecoderFactory, QuicSession
from .tls import check_identity, client_config
from .tuning import DEFAULT_TUNING, QuicTuning
from .udp import UdpSocket, tune_socket

log = logging.getLogger("tensord.net")


@dataclass
class DialerStats:
    """What a dialer opened, since it started."""

    connections: int = 0  # QUIC connections opened
    streams: int = 0  # Connections (streams) handed out


@dataclass
class QuicDialer:
    """The client side's registry: one live QUIC connection per (peer address, local
    identity, security), reused by every dial, its tasks run in :meth:`run`'s nursery.

    A node should own one (``await nursery.start(dialer.run)``) and pass it to
    :func:`dial_quic`; without one, :func:`dial_quic` uses a dialer per Trio run, started as a
    system task and cancelled when the run ends.
    """

    tuning: QuicTuning = DEFAULT_TUNING
    stats: DialerStats = field(default_factory=DialerStats)

    def __post_init__(self) -> None:
        self._sessions: dict[tuple[Any, ...], QuicSession] = {}
        self._configs: dict[TlsSettings | None, QuicConfiguration] = {}
        self._nursery: trio.Nursery | None = None
        self._running = trio.Event()

    def connections(self) -> list[QuicSession]:
        """The live QUIC connections."""
        return [s for s in self._sessions.values() if s.failure is None]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drive the dialer's connections until cancelled (then they are closed)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._running.set()
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    async def dial(
        self,
        addr: HostPort,
        hello: Hello,
        decoder: DecoderFactory,
        *,
        connect_timeout: float,
        key: ClusterKey | None = None,
        tls: TlsSettings | None = None,
    ) -> Connection:
        """A new stream on the peer's QUIC connection (dialled if there is none), as a
        handshaken :class:`Connection`. Errors as :func:`dial_quic`.

        A connection whose peer has left our packets unanswered for ``connect_timeout`` is
        closed and replaced (see :meth:`QuicSession.silent_for`)."""
        session: QuicSession | None = None
        try:
            with trio.fail_after(connect_timeout):
                session = await self._session(addr, hello, key, tls, connect_timeout)
                conn = await self._open(session, hello, decoder, key, tls)
                self.stats.streams += 1
                return conn
        except (TimeoutError, trio.TooSlowError):
            if session is not None and session.failure is not None:
                raise _with_addr(session.failure, addr) from None
            raise PeerUnreachable(
                f"{addr}: no QUIC handshake within {connect_timeout:g} s (transfer.connect_timeout)"
            ) from None
        except ProtocolError as exc:
            if exc.code == "auth":
                raise AuthenticationFailed(f"{addr}: {exc}") from None
            raise
        except (AuthenticationFailed, PeerUnreachable) as exc:
            raise _with_addr(exc, addr) from None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ConnectionClosed):
            if session is not None and session.failure is not None:
                raise _with_addr(session.failure, addr) from None
            raise PeerUnreachable(f"{addr}: the QUIC connection was lost") from None

    async def _session(
        self,
        addr: HostPort,
        hello: Hello,
        key: ClusterKey | None,
        tls: TlsSettings | None,
        silence_limit: float,
    ) -> QuicSession:
        ident = (addr.host, addr.port, hello, key, tls)
        session = self._sessions.get(ident)
        if session is not None and session.failure is None:
            silent = session.silent_for(trio.current_time())
            if silent >= silence_limit:
                # The attempt that failed before this dial most likely timed out on this
                # connection: do not hand out another stream on it (the idle timeout may be
                # long away); its streams fail now and the retry gets a new connection.
                why = f"no answer from the peer for {silent:.1f} s"
                log.info("QUIC connection to %s: %s; dialling a new one", addr, why)
                session.close(E_NONE, why)
        if session is None or session.failure is not None:
            session = await self._dial_session(ident, addr, tls)
        await session.established.wait()
        if session.failure is not None:
            raise _copy(session.failure)
        return session

    async def _dial_session(
        self, ident: tuple[Any, ...], addr: HostPort, tls: TlsSettings | None
    ) -> QuicSession:
        if self._nursery is None:
            raise RuntimeError("QuicDialer.run() is not running")
        cfg = self._configs.get(tls)
        if cfg is None:
            cfg = self._configs[tls] = client_config(tls, self.tuning)
        try:
            infos = await trio.socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise PeerUnreachable(f"cannot resolve {addr.host!r}: {exc}") from None
        # Another task may have connected while we resolved.
        existing = self._sessions.get(ident)
        if existing is not None and existing.failure is None:
            return existing
        family, _, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_DGRAM, proto)
        try:
            tune_socket(sock, self.tuning)
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            raise PeerUnreachable(f"{addr}: {(exc.strerror or str(exc)).lower()}") from None
        quic = FlowControlledConnection(
            configuration=cfg,
            connection_window=self.tuning.connection_window,
            request_client_certificate=False,
        )
        session = QuicSession(
            quic,
            UdpSocket(sock, connected=True, offload=self.tuning.udp_offload),
            sockaddr,
            name=str(addr),
            tuning=self.tuning,
        )

        def closed(s: QuicSession) -> None:
            if self._sessions.get(ident) is s:
                del self._sessions[ident]

        session.on_closed = closed
        self._sessions[ident] = session
        self.stats.connections += 1
        quic.connect(sockaddr, now=trio.current_time())
        self._nursery.start_soon(_run_client_session, session, name=f"quic-client {addr}")
        return session

    async def _open(
        self,
        session: QuicSession,
        hello: Hello,
        decoder: DecoderFactory,
        key: ClusterKey | None,
        tls: TlsSettings | None,
    ) -> Connection:
        """The hello gate: the first caller runs the Hello on the first stream; the others
        wait for it and reuse its agreement."""
        while True:
            if session.agreement is not None:
                framed = FramedStream(session.open_stream(), decoder())
                return Connection(framed, session.agreement, outbound=True)
            if session.hello_failure is not None:
                raise _copy(session.hello_failure)
            if session.failure is not None:
                raise _copy(session.failure)
            if not session.hello_started:
                break
            await session.hello_done.wait()
        session.hello_started = True
        stream = session.open_stream()
        framed = FramedStream(stream, decoder())
        try:
            conn = await client_handshake(framed, hello, key)
            try:
                check_identity(session.peer_node_id, conn.peer_id, tls)
            except AuthenticationFailed as exc:
                await conn.send_error("auth", str(exc))
                raise
        except BaseException as exc:
            failure = _hello_failure(session, exc)
            session.hello_failure = failure
            session.close(*close_args(failure))
            stream._close()
            session.hello_done.set()
            raise
        session.agreement = conn.agreement
        session.hello_done.set()
        return conn


def _hello_failure(session: QuicSession, exc: BaseException) -> TensorError:
    if session.failure is not None:
        return session.failure
    if isinstance(exc, ProtocolError) and exc.code == "auth":
        return AuthenticationFailed(str(exc))
    if isinstance(exc, TensorError):
        return exc
    return PeerUnreachable("the handshake on the connection's first stream did not complete")


def _copy(exc: TensorError, prefix: str = "") -> TensorError:
    """A fresh copy of a session's stored error (each raise gets its own traceback)."""
    msg = f"{prefix}{exc}"
    if isinstance(exc, AuthenticationFailed):
        return AuthenticationFailed(msg)
    if isinstance(exc, ProtocolError):
        return ProtocolError(msg, code=exc.code)
    return PeerUnreachable(msg)


def _with_addr(exc: TensorError, addr: HostPort) -> TensorError:
    """The error, naming the peer."""
    return _copy(exc, f"{addr}: ")


async def _run_client_session(session: QuicSession) -> None:
    """A client connection's two tasks; never raises into the dialer's nursery."""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.receive_loop)
            await session.drive()
            nursery.cancel_scope.cancel()
    except Exception:  # a bug in a driver must not take the other connections down
        log.exception("QUIC connection to %s failed", session.name)
    finally:
        session.udp.close()


_default_dialer: trio.lowlevel.RunVar[QuicDialer] = trio.lowlevel.RunVar("tensord_quic_dialer")


async def default_dialer() -> QuicDialer:
    """The dialer of this Trio run, started on first use as a system task."""
    try:
        dialer = _default_dialer.get()
    except LookupError:
        dialer = QuicDialer()
        _default_dialer.set(dialer)
        trio.lowlevel.spawn_system_task(dialer.run, name="tensord QUIC dialer")
    await dialer._running.wait()
    return dialer


async def dial_quic(
    addr: HostPort,
    hello: Hello,
    decoder: DecoderFactory,
    *,
    connect_timeout: float,
    key: ClusterKey | None = None,
    tls: TlsSettings | None = None,
    dialer: QuicDialer | None = None,
) -> Connection:
    """Open a stream to ``addr`` (on its live QUIC connection, or a new one) and hand it out as
    a handshaken :class:`Connection`, within ``connect_timeout``.

    Raises :class:`PeerUnreachable` (no answer, refused, timed out), :class:`AuthenticationFailed`
    (TLS, node id, or cluster secret refused, either way), or :class:`ProtocolError`.
    """
    if dialer is None:
        dialer = await default_dialer()
    return await dialer.dial(
        addr, hello, decoder, connect_timeout=connect_timeout, key=key, tls=tls
    )
