"""One QUIC connection to a peer and the Trio tasks that drive it.

Per connection one *driver* task (:meth:`QuicSession.drive`) handles aioquic's timers, the
keepalive and datagrams the kernel refused for a moment; everything else is sent by
:meth:`QuicSession.flush` from the task that changed aioquic's state. A receive task per UDP
socket (the dialer's :meth:`QuicSession.receive_loop`, or the listener's) feeds datagrams in
batches and calls :meth:`QuicSession.after_receive`, which dispatches aioquic's events to the
streams. Why it is shaped so: "Driving aioquic from Trio" in docs/QUIC.md.

A stream (:class:`QuicStreamTransport`) lives here too: its receive buffer (a deque of the packets
aioquic delivered, counted in bytes: what flow control grants credit in) and the Trio parking
lots its reader and writer wait in belong to the session that feeds it events and moves its
credit, and each calls into the other - one idea, one module.
"""

from __future__ import annotations

import errno
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import trio
from aioquic.quic import events as qe
from aioquic.quic.connection import NetworkAddress
from aioquic.quic.packet import QuicFrameType

from ...errors import PeerUnreachable, TensorError
from ...wire.frames import FrameDecoder
from ...wire.handshake import Agreement
from ..connection import Connection
from ..stream import BufferLike
from ._aioquic import FlowControlledConnection
from .codes import E_NONE, E_REFUSED, close_failure
from .reset import MAX_RESET_SIZE, is_stateless_reset
from .tls import PeerRefused, peer_identity
from .tuning import RECV_BATCH, QuicTuning
from .udp import UdpSocket

log = logging.getLogger("tensord.net")

#: Makes the frame decoder of each stream (a stream is one :class:`Connection`).
DecoderFactory = Callable[[], FrameDecoder]
#: Serves one inbound stream, handshaken, as a :class:`Connection`.
Handler = Callable[[Connection], Awaitable[None]]


class QuicStreamTransport:
    """One bidirectional QUIC stream as a :class:`~tensord.net.stream.ByteTransport`.

    ``recv_into`` copies from the packets aioquic delivered into the caller's buffer (aioquic
    decrypts into new ``bytes`` per packet, so one copy is unavoidable); ``send_buffers``
    copies into aioquic's send buffer, bounded as described in docs/QUIC.md ("Flow control
    and back-pressure"). ``fileno`` is -1: there is no descriptor per stream.
    """

    def __init__(self, session: QuicSession, stream_id: int) -> None:
        self._session = session
        self.stream_id = stream_id
        self._chunks: deque[bytes] = deque()
        self._offset = 0  # into _chunks[0]
        self._buffered = 0
        self._consumed = 0
        self._eof = False
        self._recv_error: str | None = None  # why receiving is broken
        self._send_error: str | None = None
        self._fin_sent = False
        self._closed_by_app = False
        self._sending = False
        self._readers = trio.lowlevel.ParkingLot()
        self._writers = trio.lowlevel.ParkingLot()
        #: Bytes handed to aioquic so far, and high-water marks: for tests and diagnostics.
        self.bytes_queued = 0
        self.max_receive_buffered = 0
        self.max_send_buffered = 0

    @property
    def session(self) -> QuicSession:
        """The QUIC connection this stream belongs to."""
        return self._session

    @property
    def receive_buffered(self) -> int:
        """Bytes received and not yet read by the application."""
        return self._buffered

    @property
    def send_buffered(self) -> int:
        """Bytes handed to aioquic and not yet acknowledged by the peer."""
        return self._session.quic.send_buffered(self.stream_id)

    # -- ByteTransport -----------------------------------------------------------------------

    async def recv_into(self, buf: memoryview, nbytes: int) -> int:
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._chunks:
            if self._closed_by_app:
                raise trio.ClosedResourceError("the stream was closed")
            if self._recv_error is not None:
                raise trio.BrokenResourceError(self._recv_error)
            if self._eof:
                return 0
            await self._readers.park()
        if buf.format != "B" or buf.ndim != 1:
            buf = buf.cast("B")
        want = min(nbytes, len(buf))
        chunks = self._chunks
        n = 0
        while n < want and chunks:
            head = chunks[0]
            off = self._offset
            k = min(len(head) - off, want - n)
            if off == 0 and k == len(head):
                buf[n : n + k] = head
                chunks.popleft()
            else:
                buf[n : n + k] = memoryview(head)[off : off + k]
                if off + k == len(head):
                    chunks.popleft()
                    self._offset = 0
                else:
                    self._offset = off + k
            n += k
        self._buffered -= n
        self._consumed += n
        self._session._consumed(self, n)
        return n

    async def send_buffers(self, buffers: Sequence[BufferLike]) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        await trio.lowlevel.checkpoint_if_cancelled()
        self._sending = True
        session = self._session
        limit = session.tuning.send_buffer
        try:
            for b in buffers:
                view = memoryview(b).cast("B")
                while view:
                    self._check_send()
                    room = limit - self.send_buffered
                    if room <= 0:
                        session._blocked_writers.add(self)
                        await self._writers.park()
                        continue
                    piece = view[:room]
                    # aioquic types ``data`` as bytes; it only does ``bytearray += data``.
                    session.quic.send_stream_data(self.stream_id, piece)  # type: ignore[arg-type]
                    view = view[len(piece) :]
                    self.bytes_queued += len(piece)
                    buffered = self.send_buffered
                    if buffered > self.max_send_buffered:
                        self.max_send_buffered = buffered
                    session.flush()
        finally:
            self._sending = False
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def aclose(self) -> None:
        """Send FIN, tell the peer to stop sending (if it has not finished), forget the stream.

        Buffered unread data is dropped and its connection-level credit returned.
        """
        self._close()
        await trio.lowlevel.checkpoint()

    def fileno(self) -> int:
        return -1

    def looks_alive(self) -> bool:
        """For an idle pooled connection: usable, and nothing unexpected waiting to be read.

        ``Connection.looks_alive`` cannot ``select`` a QUIC stream (``fileno`` is -1); it
        should ask this instead (see the integration notes).
        """
        return (
            not self._closed_by_app
            and self._recv_error is None
            and self._send_error is None
            and not self._eof
            and not self._chunks
            and self._session.failure is None
        )

    # -- used by the session ----------------------------------------------------------------

    def _feed(self, data: bytes, end: bool) -> None:
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
            self._session.quic.app_buffered += len(data)
            if self._buffered > self.max_receive_buffered:
                self.max_receive_buffered = self._buffered
        if end:
            self._eof = True
        self._readers.unpark_all()

    def _fail(self, why: str, *, receive: bool = True, send: bool = True) -> None:
        if receive and self._recv_error is None and not self._eof:
            self._recv_error = why
        if send and self._send_error is None:
            self._send_error = why
        self._readers.unpark_all()
        self._writers.unpark_all()

    def _check_send(self) -> None:
        if self._closed_by_app or self._fin_sent:
            raise trio.ClosedResourceError("the stream was closed")
        if self._send_error is not None:
            raise trio.BrokenResourceError(self._send_error)

    def _close(self) -> None:
        if self._closed_by_app:
            return
        self._closed_by_app = True
        session = self._session
        if session.failure is None:
            quic = session.quic
            try:
                if not self._fin_sent and self._send_error is None:
                    quic.send_stream_data(self.stream_id, b"", end_stream=True)
                if not self._eof and self._recv_error is None:
                    quic.stop_stream(self.stream_id, E_NONE)
            except (ValueError, RuntimeError, AssertionError):
                pass  # aioquic already finished or reset the stream
            session.flush()
        self._fin_sent = True
        session.quic.app_buffered -= self._buffered
        self._chunks.clear()
        self._buffered = 0
        self._readers.unpark_all()
        self._writers.unpark_all()
        session._stream_closed(self)


class QuicSession:
    """One QUIC connection to a peer and the Trio tasks that drive it.

    Created by :class:`QuicDialer` (client) or by :func:`serve_quic` (server). Its
    ``failure`` is set as soon as the connection starts closing, for whatever reason; from then
    on every stream raises ``trio.BrokenResourceError`` (data already received can still be
    read) and a dialer waiting on it gets the typed error.
    """

    def __init__(
        self,
        quic: FlowControlledConnection,
        udp: UdpSocket,
        peer_addr: NetworkAddress,
        *,
        name: str,
        tuning: QuicTuning,
        verify_cadata: bytes | None = None,
        on_stream: Callable[[QuicStreamTransport], bool] | None = None,
    ) -> None:
        self.quic = quic
        self.udp = udp
        self.peer_addr = peer_addr
        self.name = name
        self.tuning = tuning
        self.is_client = quic.configuration.is_client
        self._verify_cadata = verify_cadata
        self._on_stream = on_stream
        self.streams: dict[int, QuicStreamTransport] = {}
        self._blocked_writers: set[QuicStreamTransport] = set()
        self._wakeup = trio.Event()
        self._sleep: trio.CancelScope | None = None  # the driver's, while it sleeps
        self._backlog: list[tuple[bytes, NetworkAddress]] = []  # datagrams after EAGAIN
        self._stream_step = max(tuning.stream_window // 4, 1)
        # Peer streams we closed while aioquic still tracks them: late data for them is not
        # a new stream (ids alone cannot tell: with reordering, stream 12 may start after 16).
        self._closed_ids: set[int] = set()
        self._keepalive_at = math.inf
        #: When a datagram from the peer last arrived (see :meth:`silent_for`).
        self.last_heard = trio.current_time()
        self._terminated = False
        #: Set when the connection starts closing; the typed error a dialer raises.
        self.failure: TensorError | None = None
        self.close_reason = ""
        #: The node id in the peer's certificate (with TLS), checked against its Hello.
        self.peer_node_id: str | None = None
        self.established = trio.Event()  # TLS handshake done (or failed: see ``failure``)
        self.closed = trio.Event()  # the driver has finished
        # The first stream's Hello, shared by every later stream.
        self.agreement: Agreement | None = None
        self.hello_started = False
        self.hello_done = trio.Event()
        self.hello_failure: TensorError | None = None
        self.on_idle: Callable[[QuicSession], None] | None = None  # last stream closed
        self.on_closed: Callable[[QuicSession], None] | None = None
        #: A listener's: when the peer must have passed its Hello (see :meth:`authenticate`),
        #: and what to do when it has not (the driver calls it at the deadline).
        self.auth_deadline = math.inf
        self.on_auth_deadline: Callable[[QuicSession], None] | None = None
        #: A listener's: a connection id of ours was issued to the peer (True: route it) or
        #: retired by it (False: its route goes). Called from the flush that sent the
        #: NEW_CONNECTION_ID, so the route exists before the peer can use the id.
        self.on_cid: Callable[[QuicSession, bytes, bool], None] | None = None
        self.cids: set[bytes] = {quic.host_cid}

    def __repr__(self) -> str:
        return f"<QuicSession {self.name} streams={len(self.streams)}>"

    @property
    def stream_count(self) -> int:
        return len(self.streams)

    async def wait_closed(self) -> None:
        await self.closed.wait()

    def kick(self) -> None:
        """Wake the driver (closing, refusing a stream: nothing latency-critical)."""
        self._wakeup.set()

    def flush(self) -> None:
        """Send what aioquic has to send *now*, from the task that changed its state.

        No await, so it is atomic between tasks, and no task switch: waking the driver to
        send a message (and again for the reply's ACKs) was a third of a ping's round trip.
        What the kernel does not take (EAGAIN) waits in the backlog for the driver, which sends
        it first; the driver's sleep is then re-aimed at aioquic's timer, which sending arms
        (loss detection) or moves.
        """
        if self._terminated:
            return
        datagrams = self.quic.datagrams_to_send(now=trio.current_time())
        if datagrams:
            if self._backlog:
                self._backlog.extend(datagrams)
            else:
                try:
                    sent = self.udp.send_many(datagrams)
                except OSError as exc:
                    self._unreachable(exc)
                    return
                if sent < len(datagrams):
                    self._backlog.extend(datagrams[sent:])
                    self._wakeup.set()
            self._dispatch()  # sending may start the closing period
        sleep = self._sleep
        if sleep is not None:
            timer = self.quic.get_timer()
            if timer is not None and timer < sleep.deadline:
                sleep.deadline = timer

    def close(self, error_code: int = E_NONE, reason: str = "", *, transport: bool = False) -> None:
        """Start closing: CONNECTION_CLOSE goes out with the next flush."""
        frame_type = QuicFrameType.PADDING if transport else None
        self.quic.close(error_code=error_code, frame_type=frame_type, reason_phrase=reason)
        self._check_closing()
        self.kick()

    def drop(self, error_code: int, reason: str, *, transport: bool = False) -> None:
        """Close now, without the closing period: the CONNECTION_CLOSE goes out once, every
        stream fails, and the driver ends (freeing the connection) at its next turn. For a
        listener shedding a connection it will not keep waiting for."""
        if not self._terminated:
            self.close(error_code, reason, transport=transport)
            self.flush()
        self._terminated = True
        self._wakeup.set()

    @property
    def authenticated(self) -> bool:
        return self.quic.authenticated

    @property
    def terminated(self) -> bool:
        """Nothing more is sent or received: the driver ends at its next turn."""
        return self._terminated

    def authenticate(self) -> None:
        """The first stream's Hello exchange succeeded: the peer gets the configured window
        and streams, and the handshake deadline is lifted."""
        self.quic.authenticate()
        self.auth_deadline = math.inf
        self.flush()

    def open_stream(self) -> QuicStreamTransport:
        """A new locally initiated bidirectional stream (created in aioquic right away, so the
        next call gets the next id; nothing is sent until data is)."""
        if self.failure is not None:
            raise trio.BrokenResourceError(f"QUIC connection to {self.name}: {self.close_reason}")
        sid = self.quic.get_next_available_stream_id()
        self.quic.send_stream_data(sid, b"")
        stream = QuicStreamTransport(self, sid)
        self.streams[sid] = stream
        self.kick()  # an open stream arms the keepalive
        return stream

    # -- tasks -------------------------------------------------------------------------------

    async def drive(self) -> None:
        """Handle aioquic's timers (loss detection, ACK delay, pacing, idle timeout), the
        keepalive, and datagrams the kernel refused for a moment; everything else is sent by
        :meth:`flush`. Runs until the connection is terminated. On cancellation, closes with a
        best-effort CONNECTION_CLOSE so the peer knows at once, not after its idle timeout."""
        quic = self.quic
        try:
            while not self._terminated:
                self._wakeup = trio.Event()
                if self._backlog:
                    await self._send_backlog()
                self.flush()
                if self._terminated:
                    break
                timer = quic.get_timer()
                deadline = math.inf if timer is None else timer
                keepalive = bool(self.streams) and self.failure is None
                if keepalive:
                    deadline = min(deadline, self._keepalive_at)
                if self.failure is None:
                    deadline = min(deadline, self.auth_deadline)
                with trio.CancelScope(deadline=deadline) as sleep:
                    self._sleep = sleep
                    await self._wakeup.wait()
                self._sleep = None
                now = trio.current_time()
                if now >= self.auth_deadline and self.failure is None:
                    self.auth_deadline = math.inf
                    if self.on_auth_deadline is not None:
                        self.on_auth_deadline(self)
                    continue
                timer = quic.get_timer()
                if timer is not None and now >= timer:
                    quic.handle_timer(now)
                    self._dispatch()
                if keepalive and now >= self._keepalive_at:
                    quic.send_ping(0)
                    self._keepalive_at = now + self._keepalive_interval()
        finally:
            self._sleep = None
            if not self._terminated:
                self._abort()
            self._finish()

    async def _send_backlog(self) -> None:
        while self._backlog:
            try:
                sent = self.udp.send_many(self._backlog)
            except OSError as exc:
                self._unreachable(exc)
                return
            del self._backlog[:sent]
            if self._backlog:
                await self.udp.wait_writable()

    async def receive_loop(self) -> None:
        """Client side: read the session's own connected socket."""
        udp = self.udp
        quic = self.quic
        addr = self.peer_addr
        buf = bytearray(65536)
        while not self._terminated:
            await trio.lowlevel.wait_readable(udp.sock)
            now = trio.current_time()
            count = 0
            while count < RECV_BATCH:  # datagrams, not syscalls: one may return many (GRO)
                try:
                    datagrams, _ = udp.receive(buf)
                except BlockingIOError:
                    break
                except OSError as exc:
                    self._unreachable(exc)
                    return
                count += len(datagrams)
                for data in datagrams:
                    if len(data) <= MAX_RESET_SIZE and is_stateless_reset(
                        data, quic.peer_reset_token
                    ):
                        why = "stateless reset: the peer restarted or lost the connection's state"
                        log.info("QUIC connection to %s: %s", self.name, why)
                        self._lost(why)
                        return
                    quic.receive_datagram(data, addr, now)
            self.after_receive(now)

    def after_receive(self, now: float) -> None:
        """After a batch of datagrams: dispatch events, wake writers, send the ACKs and
        whatever the ACKs let out."""
        self._dispatch()
        self.last_heard = now
        self._keepalive_at = now + self._keepalive_interval()
        self.flush()

    def silent_for(self, now: float) -> float:
        """How long the peer has left our packets unanswered: the time since it was last heard
        while something of ours awaits its acknowledgement (0 when nothing does).

        A live peer's QUIC stack acknowledges within a round trip even when its application
        is stalled, so a long silence means the peer or the path is gone - which QUIC (no RST)
        otherwise learns only at the idle timeout.
        """
        if self.quic.bytes_in_flight == 0:
            return 0.0
        return max(0.0, now - self.last_heard)

    def _keepalive_interval(self) -> float:
        """A third of the idle timeout both ends agreed on (the smaller of the two)."""
        remote = self.quic.remote_idle_timeout
        local = self.tuning.idle_timeout
        return (local if remote is None or remote <= 0 else min(local, remote)) / 3

    # -- events ------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        quic = self.quic
        while (event := quic.next_event()) is not None:
            if isinstance(event, qe.StreamDataReceived):
                self._on_data(event)
            elif isinstance(event, qe.HandshakeCompleted):
                self._on_handshake(event)
            elif isinstance(event, qe.StreamReset):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    why = "reset" if event.error_code != E_REFUSED else "refused"
                    stream._fail(
                        f"QUIC stream {event.stream_id} to {self.name}: the peer {why} it",
                        send=False,
                    )
            elif isinstance(event, qe.StopSendingReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream._fail(
                        f"QUIC stream {event.stream_id} to {self.name}: the peer stopped "
                        "reading it",
                        receive=False,
                    )
            elif isinstance(event, qe.ConnectionTerminated):
                self._on_terminated(event)
            elif isinstance(event, qe.ConnectionIdIssued):
                self.cids.add(event.connection_id)
                if self.on_cid is not None:
                    self.on_cid(self, event.connection_id, True)
            elif isinstance(event, qe.ConnectionIdRetired):
                self.cids.discard(event.connection_id)
                if self.on_cid is not None:
                    self.on_cid(self, event.connection_id, False)
        self._check_closing()
        if self._blocked_writers:
            low = self.tuning.send_buffer // 2
            for stream in list(self._blocked_writers):
                if (
                    stream.send_buffered <= low
                    or stream._send_error is not None
                    or stream._closed_by_app
                ):
                    self._blocked_writers.discard(stream)
                    stream._writers.unpark_all()

    def _on_data(self, event: qe.StreamDataReceived) -> None:
        sid = event.stream_id
        stream = self.streams.get(sid)
        if stream is None:
            peer_initiated = (sid & 1) == (1 if self.is_client else 0)
            if self.failure is not None or not peer_initiated or sid in self._closed_ids:
                return  # data for a stream we closed: aioquic counted it, credit is returned
            stream = QuicStreamTransport(self, sid)
            if self._on_stream is None or sid & 2 or not self._on_stream(stream):
                self._closed_ids.add(sid)
                self._refuse_stream(sid)
                return
            self.streams[sid] = stream
        stream._feed(event.data, event.end_stream)

    def _refuse_stream(self, sid: int) -> None:
        try:
            self.quic.stop_stream(sid, E_REFUSED)
            self.quic.reset_stream(sid, E_REFUSED)
        except (ValueError, RuntimeError):
            pass
        self.kick()

    def _on_handshake(self, event: qe.HandshakeCompleted) -> None:
        try:
            self.peer_node_id = peer_identity(self.quic, self._verify_cadata)
        except PeerRefused as exc:
            self.close(exc.error_code, exc.reason, transport=True)
            return
        self.established.set()

    def _check_closing(self) -> None:
        """Fail everything as soon as aioquic decides to close, not 3 PTOs later when the
        ``ConnectionTerminated`` event comes out of the closing/draining period."""
        if self.failure is None:
            event = self.quic.close_event
            if event is not None:
                self._on_close(event)

    def _on_close(self, event: qe.ConnectionTerminated) -> None:
        # DRAINING: the peer sent CONNECTION_CLOSE; otherwise we (or aioquic for us) closed.
        by_peer = self.quic.closed_by_peer
        self.failure, self.close_reason = close_failure(event, by_peer=by_peer)
        if self.failure is not None and not isinstance(self.failure, PeerUnreachable):
            log.debug("QUIC connection to %s closing: %s", self.name, self.close_reason)
        broken = f"QUIC connection to {self.name} closed: {self.close_reason}"
        for stream in list(self.streams.values()):
            stream._fail(broken)
        self._blocked_writers.clear()
        self.established.set()

    def _on_terminated(self, event: qe.ConnectionTerminated) -> None:
        if self.failure is None:
            self._on_close(event)
        self._terminated = True

    def _unreachable(self, exc: OSError) -> None:
        """The socket failed (ICMP port unreachable shows up as ECONNREFUSED on a connected
        UDP socket): nothing more can be sent or received."""
        if exc.errno == errno.ECONNREFUSED:
            why = f"nothing is listening for QUIC (UDP) at {self.name}: connection refused"
        else:
            why = (exc.strerror or str(exc)).lower()
        self._lost(why)

    def _lost(self, why: str) -> None:
        """The connection is gone without a CONNECTION_CLOSE: fail everything now."""
        if self.failure is None:
            self.failure = PeerUnreachable(why)
            self.close_reason = why
            broken = f"QUIC connection to {self.name}: {why}"
            for stream in list(self.streams.values()):
                stream._fail(broken)
            self.established.set()
        self._terminated = True
        self._wakeup.set()

    def _abort(self) -> None:
        """Cancelled: close now, without waiting for the closing period."""
        if self.quic.close_event is None:
            self.quic.close(error_code=E_NONE, reason_phrase="the node is shutting down")
        try:
            for data, addr in self.quic.datagrams_to_send(now=trio.current_time()):
                self.udp.send_nowait(data, addr)
        except Exception:  # best effort while being cancelled
            pass
        if self.failure is None:
            self.failure = PeerUnreachable("the connection was closed locally")
            self.close_reason = "closed locally"
        broken = f"QUIC connection to {self.name} closed locally"
        for stream in list(self.streams.values()):
            stream._fail(broken)
        self._terminated = True

    def _finish(self) -> None:
        self.established.set()
        self.hello_done.set()
        self.closed.set()
        if self.on_closed is not None:
            self.on_closed(self)

    # -- streams -----------------------------------------------------------------------------

    def _consumed(self, stream: QuicStreamTransport, n: int) -> None:
        """The reader took ``n`` bytes: extend the peer's credit in quarter-window steps."""
        window = self.tuning.stream_window
        if self.quic.consumed(stream.stream_id, n, stream._consumed, window, self._stream_step):
            self.flush()

    def _stream_closed(self, stream: QuicStreamTransport) -> None:
        sid = stream.stream_id
        self.streams.pop(sid, None)
        self._blocked_writers.discard(stream)
        if (sid & 1) == (1 if self.is_client else 0):
            self._closed_ids.add(sid)
            if len(self._closed_ids) > 64:  # forget the ones aioquic has discarded
                has_stream = self.quic.has_stream
                self._closed_ids = {i for i in self._closed_ids if has_stream(i)}
        if not self.streams and self.on_idle is not None:
            self.on_idle(self)
