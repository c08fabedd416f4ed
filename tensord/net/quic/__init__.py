"""QUIC transport: the chunk protocol over aioquic's sans-I/O ``QuicConnection``, driven by Trio.

Shape
-----
* **One QUIC connection per peer** (per peer address *and* local identity: two nodes in one
  process never share one). A :class:`QuicDialer` keeps the live connections; every
  :func:`dial_quic` opens a new bidirectional stream on the peer's connection.
* **One bidirectional stream per** :class:`~tensord.net.connection.Connection`. The pool checks
  Connections out exclusively, so parallel transfers run as parallel streams - no head-of-line
  blocking between them, one congestion controller for the peer.
* **The Hello runs once per QUIC connection, on its first stream** (with the cluster-secret
  challenge when a key is set). Later streams reuse that stream's ``Agreement``; a peer cannot
  even open them before the first stream's handshake succeeded (see "Before authentication").
* ALPN ``tensord/1``. QUIC is always TLS 1.3.

Driving aioquic from Trio
-------------------------
Per QUIC connection one *driver* task owns the output side: it asks ``datagrams_to_send()``,
writes them to the UDP socket, and then sleeps in a cancel scope whose deadline is
``get_timer()`` (loss detection, ACK delay, pacing, idle timeout) until either the deadline
passes (``handle_timer``) or something *kicks* it (a datagram arrived, the application wrote
data or consumed received data). A receive task per UDP socket feeds ``receive_datagram`` in
batches and dispatches the events to per-stream state; tasks park on ``trio.lowlevel.ParkingLot``
and are woken by the events. (Not a memory channel per stream: received data waits in a deque
counted in bytes, which is what flow control is granted in, and a channel would bound it in
items and add a hop per packet.) No polling loops, no sleeps. While streams are open, a PING
every third of the idle timeout keeps a live peer's connection up; when the peer stops
answering, the idle timeout ends the connection and every stream raises
``trio.BrokenResourceError``. Two ways to learn sooner: the dialer does not hand out a stream
on a connection whose peer has left our packets unacknowledged for ``connect_timeout``
(:meth:`QuicSession.silent_for`: the path went dark, a retry gets a new connection), and a
restarted listener answers its predecessor's connections with a stateless reset, which the
dialer recognises (``quic_reset.py``).

Flow control and back-pressure
------------------------------
*Sending.* ``QuicConnection.send_stream_data`` appends to the stream's send buffer without any
limit (``QuicStreamSender._buffer``, a ``bytearray`` that holds every byte until the peer
acknowledges it). :meth:`QuicStreamTransport.send_buffers` therefore hands aioquic at most
``QuicTuning.send_buffer`` unacknowledged bytes per stream - measured as
``sender._buffer_stop - sender._buffer_start`` - and parks until ACKs bring it below half of
that. Memory per sending stream is bounded; a slow receiver stalls its sender.

*Receiving.* aioquic hands stream data to the application as soon as it is in order, and it
raises a stream's (and the connection's) flow-control limit by *doubling* it whenever the peer
has used half of it (``_write_stream_limits`` / ``_write_connection_limits``): credit follows
what *arrived*, not what the application consumed, so a slow reader buffers without bound.
:class:`_FlowControlledConnection` overrides those two methods: the stream limit is
``consumed + stream_window`` (moved by the reader, in steps of a quarter window) and the
connection limit is ``received - still buffered + connection_window``. A peer that sends
beyond that gets aioquic's FLOW_CONTROL_ERROR. Per stream at most ``stream_window`` bytes wait
for the reader; per connection, unread plus in-flight bytes stay under ``connection_window``.

Security
--------
With ``tls`` (:class:`~tensord.config.TlsSettings`): both ends present their node certificate
and verify the other's against the cluster CA only, and the certificate's node id must be the
node id claimed in the Hello (a listener checks it as the Hello is read, before answering).
aioquic 1.7 does mutual TLS only halfway: its client answers a CertificateRequest, but its
server sends one only when the private ``tls.Context._request_client_certificate`` flag is set
("for test purposes only"), and then checks the client's CertificateVerify signature (proof
that it holds the key) but never the client's chain. So the listener sets the flag
(:meth:`_FlowControlledConnection._initialize`) and verifies the chain itself with aioquic's own
``tls.verify_certificate`` on ``HandshakeCompleted``, before any stream data of the connection
is looked at. A refused client has finished its side of the handshake by then (TLS 1.3), so it
learns from the CONNECTION_CLOSE (a CRYPTO_ERROR with the reason) that fails its first stream:
:class:`AuthenticationFailed` either way, within one round trip.

Without ``tls``: the listener uses an ephemeral self-signed certificate generated when it
starts, and the dialer verifies nothing. The connection is encrypted but not authenticated by
TLS; the cluster secret (``key``), if configured, still authenticates both peers inside the
first stream, exactly as over TCP.

Before authentication
---------------------
Without ``tls`` anyone completes the QUIC handshake, so a listener gives a connection next to
nothing until its first stream has passed the Hello exchange (with ``key``: the cluster-secret
proof; with ``tls``: the certificate's node id; with neither, any well-formed Hello):

* **Credit for a Hello, no more.** The transport parameters allow one bidirectional stream,
  no unidirectional one, and :data:`PRE_AUTH_WINDOW` (8 KiB) of MAX_DATA for the whole
  connection, which reading does not move (:class:`_FlowControlledConnection`). Per-stream
  credit is the configured ``stream_window`` from the start - the connection's credit bounds
  it, and a stream opened after the Hello then needs no MAX_STREAM_DATA round trip. A peer that
  opens a second stream or sends beyond 8 KiB anyway is closed by aioquic (STREAM_LIMIT_ERROR,
  FLOW_CONTROL_ERROR) before any of it is stored. What a stranger can make the node hold is
  therefore about 8 KiB of stream data plus aioquic's and TLS's per-connection state. Once
  the Hello is accepted, MAX_DATA follows the connection window and MAX_STREAMS goes to
  :data:`MAX_PEER_STREAMS` (128) - both with the reply's packet.
* **A deadline.** ``handshake_timeout`` runs from the connection's first packet to the
  accepted Hello (``QuicSession.auth_deadline``, kept by the driver); a connection that has
  not made it is dropped with CONNECTION_CLOSE (E_REFUSED, naming the setting).
* **Budgets.** ``max_connections`` counts QUIC connections, handshakes included (streams are
  bounded per connection by MAX_STREAMS); ``max_unauthenticated`` counts those before their
  Hello. A new connection that finds either full takes the place of the oldest one still
  before its Hello from the source address holding the most such (so a flood from one host
  evicts its own; sshd's ``MaxStartups`` idea; that one gets E_REFUSED, naming the
  setting), so strangers cannot lock members out; only when authenticated peers hold every
  slot is it refused, with a CONNECTION_CLOSE (CONNECTION_REFUSED, naming the setting) from a
  throwaway connection - at most ``_MAX_REFUSALS_PER_SECOND`` answered, the rest dropped
  unanswered (each answer costs a TLS handshake's CPU).
* **Error boundaries.** An unexpected exception while handling one datagram, one
  connection's events, its driver, or one stream's handler is logged with the peer's
  address, counted (:class:`ListenerStats` ``errors``) and closes that connection (or, for
  an authenticated connection's handler, that stream) only; the listener carries on.

Flooding the listener with Initial packets costs it a TLS handshake each (CPU, not memory:
evicted and refused connections are freed at once, without a closing period); QUIC's Retry
(address validation) is not used.

Performance (2-core VM, loopback, two processes, 256 MiB on one stream)
-----------------------------------------------------------------------
About 60-67 MB/s with 1452-byte datagrams, 270-285 MB/s with 8952 (jumbo frames) and 350-365
MB/s with 16000 (loopback only), against ~3.3 GB/s for tcp.py in the same setup; a ping-pong
takes ~0.43 ms (TCP: 0.13 ms), about 0.28 ms of CPU on each side. The sender is
CPU-bound in aioquic: its Python packet building and ACK handling take ~75 % of the sender's
time, AEAD and header protection ~13 %, this module with its socket syscalls under 10 %. The
cost is per packet, hence the datagram size. 16 parallel streams reach ~37 MB/s together:
aioquic walks every stream for every packet it builds. The windows hardly matter on loopback
beyond 1 MiB (the RTT is tiny); their defaults cover the CPU-bound rate over a WAN RTT
(8 MiB / 60 MB/s = 130 ms). Reno measured at least as fast as CUBIC, with and without loss.

With loss the congestion window is the limit, not the CPU (both ends ~0.4 cores). At 2 % random
loss Reno halves its window at nearly every loss (one per ~50 packets), so it averages ~9
packets per round trip (~1.3 ms through tests/support/udp_proxy.py): bench/quic.py measures
5.7-7.3 MB/s for 16 MiB through the proxy and 8.7-12 MB/s with the kernel's drop (no proxy),
where it was 3.4-3.8 and 3.5-4.3 before the two ACK changes below. CUBIC measured slower there
(6.0 against 7.2 MB/s). What the time went to, and was ours: aioquic acknowledges only when its
1 ms ACK timer fires, and a window that arrived as one batch got one ACK per round trip; losing
that ACK (2 % of them) left the sender idle until its probe timeout, which includes the peer's
``max_ack_delay`` - aioquic announces 25 ms, so ~29 ms per lost ACK, ~18 % of the transfer. Now
:meth:`_FlowControlledConnection.receive_datagram` acknowledges after the batch when two
packets are unacknowledged or one arrived out of order (RFC 9000 section 13.2; a lone request
still waits for the timer, so its ACK can ride on the answer), and both ends announce
``MAX_ACK_DELAY_MS`` (5 ms): a lost ACK costs ~8 ms, half as often, and a loss is acknowledged
past - hence detected - at once. Without loss the figures above did not move: a busy receiver
reads full batches and sent exactly as many ACKs as before (one per ~62 packets); through the
proxy it sends ~1.4x as many, and the shorter PTO fires spuriously a few times per 100 MB (each
resends one packet, without cutting the window).

Private aioquic API used (the tests check it exists): ``QuicStreamSender._buffer_start`` and
``_buffer_stop``, ``QuicConnection._streams``, ``_local_max_data`` (a ``Limit``: ``value``,
``sent``, ``used``), ``_local_max_streams_bidi`` and ``_local_max_streams_uni`` (``Limit``s,
set before the transport parameters are written), ``_is_client``, ``_close_event``,
``_state``, ``_loss._pacer``, ``_remote_max_idle_timeout``, ``_write_stream_limits``,
``_write_connection_limits``, ``_initialize``, ``_serialize_transport_parameters``,
``_spaces`` (a packet space's ``ack_at`` and ``largest_received_packet``),
``_max_datagram_size``, ``_host_cids`` and ``_replenish_connection_ids`` (reset tokens),
``_peer_cid.stateless_reset_token``, ``_loss.bytes_in_flight``, ``tls._request_client_certificate``,
``tls._peer_certificate(_chain)``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import re
import socket
import ssl
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from aioquic import tls as aioquic_tls
from aioquic._buffer import Buffer
from aioquic.quic import events as qe
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import (
    CONNECTION_LIMIT_FRAME_CAPACITY,
    MAX_STREAM_DATA_FRAME_CAPACITY,
    NetworkAddress,
    QuicConnection,
    QuicConnectionState,
)
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicHeader,
    QuicPacketType,
    pull_quic_header,
    pull_quic_transport_parameters,
    push_quic_transport_parameters,
)
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketPacer, QuicPacketSpace
from aioquic.quic.stream import QuicStream
from cryptography.hazmat.primitives import serialization

from ... import metrics
from ...config import HostPort, TlsSettings
from ...errors import AuthenticationFailed, PeerUnreachable, ProtocolError, TensorError
from ...wire.auth import ClusterKey
from ...wire.frames import FrameDecoder
from ...wire.handshake import Agreement
from ...wire.messages import Hello, Message
from ..connection import Connection, client_handshake, server_handshake
from ..stream import BufferLike, ByteTransport, ConnectionClosed, FramedStream
from .reset import MAX_RESET_SIZE, ResetTokens, is_stateless_reset, reset_key

log = logging.getLogger("tensord.net")

ALPN = "tensord/1"
MiB = 1 << 20

DecoderFactory = Callable[[], FrameDecoder]
Handler = Callable[[Connection], Awaitable[None]]

# Application error codes (CONNECTION_CLOSE, RESET_STREAM, STOP_SENDING).
E_NONE = 0x0  # closed on purpose: shutdown, stream done
E_AUTH = 0x1  # the peer failed authentication (cluster secret, node id)
E_PROTOCOL = 0x2  # the first stream's handshake failed otherwise
E_REFUSED = 0x3  # the listener is busy or shutting down
#: TLS alerts travel as QUIC transport error CRYPTO_ERROR + alert (RFC 9001 section 4.8).
_CRYPTO_FIRST, _CRYPTO_LAST = QuicErrorCode.CRYPTO_ERROR, QuicErrorCode.CRYPTO_ERROR + 0xFF
_ALERT_CERTIFICATE_REQUIRED = 116
_ALERT_NO_APPLICATION_PROTOCOL = 120

#: Datagrams read from a socket per scheduler pass, before the events are dispatched and the
#: driver is woken once (it then answers them all with one batch of ACKs).
_RECV_BATCH = 64
_CID_LENGTH = 8
#: aioquic writes a STREAM frame's length as a 2-byte varint (< 16384), so a bigger packet
#: would carry a corrupt frame (the peer closes with "Failed to parse frame").
MAX_DATAGRAM_SIZE = 16000

#: Receive credit (MAX_DATA) of a listener's connection before its first stream has completed
#: the authenticated Hello exchange, for all its streams together, and not moved by reading:
#: enough for the largest Hello the decoder accepts (~2.6 KiB: 64 features of 32 characters)
#: and the Auth after it (~50 bytes), nothing more (a test checks the sum).
PRE_AUTH_WINDOW = 8 * 1024
#: Bidirectional streams a peer may open before that: the first one, which carries the Hello.
PRE_AUTH_STREAMS = 1
#: Bidirectional streams an authenticated peer may have open at once (aioquic's default).
MAX_PEER_STREAMS = 128
#: New connections refused per second with a CONNECTION_CLOSE when ``max_connections`` is full
#: (each costs a TLS handshake's CPU); beyond that, their Initial packets are dropped unanswered.
_MAX_REFUSALS_PER_SECOND = 32


@dataclass(frozen=True)
class QuicTuning:
    """The knobs of the QUIC transport (defaults: see "Performance" in the module notes).

    ``stream_window`` / ``connection_window``: receive credit per stream and per connection -
    what a peer may send ahead of our reader, hence the most that waits in memory; a stream
    moves at most ``stream_window / RTT`` bytes per second. ``send_buffer``: unacknowledged
    bytes per stream handed to aioquic before ``send_buffers`` waits (also bounds in-flight
    data: keep it near the bandwidth-delay product). ``max_datagram_size``: UDP payload size;
    1452 fits a 1500-byte MTU over IPv6, and aioquic does no path MTU discovery, so raise it
    (8952) only on jumbo-frame networks - it is the biggest lever on throughput (about 4.5x).
    ``congestion_control``: ``"reno"`` or ``"cubic"``, the two aioquic has. ``idle_timeout``:
    a connection that has heard nothing from its peer for this long is closed; open streams
    keep a live peer's connection up with PINGs, so this is both the dead-peer detection and
    how long an unused connection lingers. ``socket_buffer``: SO_RCVBUF/SO_SNDBUF (capped by
    the kernel's ``net.core.rmem_max``/``wmem_max``).
    """

    stream_window: int = 8 * MiB
    connection_window: int = 32 * MiB
    send_buffer: int = 4 * MiB
    max_datagram_size: int = 1452
    congestion_control: str = "reno"
    idle_timeout: float = 30.0
    socket_buffer: int = 4 * MiB

    def __post_init__(self) -> None:
        for name in ("stream_window", "connection_window", "send_buffer"):
            value = getattr(self, name)
            if not 64 * 1024 <= value <= 1 << 32:
                raise ValueError(f"QuicTuning.{name} {value!r}: expected 64 KiB to 4 GiB")
        if self.connection_window < self.stream_window:
            raise ValueError("QuicTuning.connection_window must be at least stream_window")
        if not SMALLEST_MAX_DATAGRAM_SIZE <= self.max_datagram_size <= MAX_DATAGRAM_SIZE:
            raise ValueError(
                f"QuicTuning.max_datagram_size {self.max_datagram_size!r}: expected "
                f"{SMALLEST_MAX_DATAGRAM_SIZE} to {MAX_DATAGRAM_SIZE}"
            )
        if self.congestion_control not in ("reno", "cubic"):
            raise ValueError(
                f"QuicTuning.congestion_control {self.congestion_control!r}: expected "
                "'reno' or 'cubic'"
            )
        if not self.idle_timeout > 0:
            raise ValueError(f"QuicTuning.idle_timeout {self.idle_timeout!r}: expected > 0")


DEFAULT_TUNING = QuicTuning()


# --------------------------------------------------------------------------------------------
# aioquic with flow control that follows the reader, and a pacer for a 1 ms timer

#: What a Trio deadline can resolve: ``epoll_wait`` takes milliseconds, so a sleep for a
#: pacing gap of a few microseconds lasts about a millisecond.
_TIMER_GRANULARITY = 0.001


class _CoarsePacer(QuicPacketPacer):
    """aioquic's token-bucket pacer, with a bucket that holds two timer ticks of sending.

    aioquic caps the bucket at 16 packets' worth of time. Its driver then sleeps until the
    next packet is due - microseconds at LAN rates - but a Trio deadline wakes about 1 ms
    later, so at most 16 packets go out per millisecond: 23 MB/s with 1452-byte datagrams,
    whatever the congestion window says. With room for 2 ms the pacer still spreads a
    window over the RTT at millisecond granularity, and the rate is the congestion
    controller's again.
    """

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        super().update_rate(congestion_window, smoothed_rtt)
        self.bucket_max = max(self.bucket_max, 2 * _TIMER_GRANULARITY)


#: The ``max_ack_delay`` transport parameter we announce, in ms: the longest we hold back an
#: ACK, which the peer adds to every probe timeout (PTO). aioquic announces 25 ms, but it
#: acknowledges after 1 ms (``_ack_delay``), or at once (:meth:`_FlowControlledConnection.
#: receive_datagram`), and a Trio deadline wakes at most about a millisecond late; 5 ms leaves
#: room for a busy event loop. A PTO after a lost ACK then waits ~7 ms on loopback, not ~29.
MAX_ACK_DELAY_MS = 5


class _FlowControlledConnection(QuicConnection):
    """A ``QuicConnection`` whose receive credit is granted as the application consumes.

    ``app_buffered`` is kept by the session: bytes delivered by aioquic that the application
    has not read yet. Stream limits are moved by :meth:`QuicStreamTransport.recv_into`
    (``consumed + stream_window``); the two overrides below only stop aioquic's doubling and
    compute the connection limit.

    Peers may open bidirectional streams only towards a listener (a dialer's peer never has a
    reason to) and unidirectional ones never. A listener's connection starts
    ``authenticated=False``: one stream and :data:`PRE_AUTH_WINDOW` of connection credit
    (MAX_DATA), not moved by reading, until :meth:`authenticate` opens the connection window
    and :data:`MAX_PEER_STREAMS`. The per-stream credit is the configured one from the start
    (the connection's bounds what a stream may use, and a stream opened later then needs no
    MAX_STREAM_DATA round trip). A peer that opens more streams or sends beyond that is closed
    by aioquic itself (STREAM_LIMIT_ERROR, FLOW_CONTROL_ERROR): nothing of it is buffered.
    """

    def __init__(
        self,
        *,
        connection_window: int,
        request_client_certificate: bool,
        reset_tokens: ResetTokens | None = None,
        authenticated: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._reset_tokens = reset_tokens
        self._derive_reset_tokens()
        self._loss._pacer = _CoarsePacer(max_datagram_size=self._max_datagram_size)
        self.app_buffered = 0
        self.flow_window = connection_window
        self.flow_step = connection_window // 4
        self._request_client_cert = request_client_certificate
        self.authenticated = authenticated
        # Limits on what the peer opens; the transport parameters are written from these
        # when the handshake starts, after this constructor.
        bidi, uni = self._local_max_streams_bidi, self._local_max_streams_uni
        uni.value = uni.sent = 0
        if self._is_client:
            bidi.value = bidi.sent = 0
        elif not authenticated:
            bidi.value = bidi.sent = PRE_AUTH_STREAMS
            self._local_max_data.value = self._local_max_data.sent = PRE_AUTH_WINDOW

    def authenticate(self) -> None:
        """The peer passed the Hello exchange: open the connection window and the streams
        (MAX_DATA and MAX_STREAMS go out with the next packet)."""
        if not self.authenticated:
            self.authenticated = True
            self._local_max_streams_bidi.value += MAX_PEER_STREAMS - PRE_AUTH_STREAMS

    def _derive_reset_tokens(self) -> None:
        """A listener's connection ids get derived stateless reset tokens (see quic_reset)."""
        if self._reset_tokens is not None:
            for cid in self._host_cids:
                cid.stateless_reset_token = self._reset_tokens.token(cid.cid)

    def _replenish_connection_ids(self) -> None:
        super()._replenish_connection_ids()
        self._derive_reset_tokens()

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if self._request_client_cert:
            # aioquic's only switch for a server to send CertificateRequest (private, marked
            # "for test purposes only"). The client's chain is verified by the session.
            self.tls._request_client_certificate = True

    def receive_datagram(self, data: bytes, addr: NetworkAddress, now: float) -> None:
        """aioquic's, but acknowledging at once (RFC 9000 section 13.2) when a second packet
        arrives before the ACK for the first went out, and when a packet arrives out of order
        or after a gap - instead of always waiting for the 1 ms ACK timer.

        "At once" means after the batch: the session sends the ACKs when the receive loop has
        read what the kernel had (up to ``_RECV_BATCH`` datagrams), so a burst is still
        answered by one ACK; a lone packet (a request) still waits for the timer, so that
        the ACK can ride on the answer. With ACKs only per timer tick, a sender whose whole
        congestion window arrived within one tick got one ACK per round trip: losing that
        ACK stalled it for a PTO, and a loss was detected a tick later than it could be.
        """
        space = self._spaces.get(aioquic_tls.Epoch.ONE_RTT)
        if space is None:
            super().receive_datagram(data, addr, now)
            return
        pending = space.ack_at is not None
        largest = space.largest_received_packet
        super().receive_datagram(data, addr, now)
        ack_at = space.ack_at
        if (
            ack_at is not None
            and ack_at > now
            and (pending or space.largest_received_packet != largest + 1)
        ):
            # Due strictly before the flush: aioquic paces an ACK that is due "now" (it only
            # skips pacing for an overdue one), and a paced ACK due at the current instant
            # would make the driver spin until the clock moves (forever with a mock clock).
            space.ack_at = math.nextafter(now, -math.inf)

    def _serialize_transport_parameters(self) -> bytes:
        """aioquic's transport parameters with our ``max_ack_delay`` (it hard-codes 25 ms)."""
        params = pull_quic_transport_parameters(
            Buffer(data=super()._serialize_transport_parameters())
        )
        params.max_ack_delay = MAX_ACK_DELAY_MS
        buf = Buffer(capacity=3 * self._max_datagram_size)
        push_quic_transport_parameters(buf, params)
        return buf.data

    def _write_connection_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace) -> None:
        max_data = self._local_max_data
        if self.authenticated:  # before, the credit stays what the transport parameters said
            target = max_data.used - self.app_buffered + self.flow_window
            if target - max_data.value >= self.flow_step:
                max_data.value = target
        for limit in (max_data, self._local_max_streams_bidi, self._local_max_streams_uni):
            if limit is not max_data and limit.sent - limit.used >= limit.value - limit.sent:
                continue  # batch MAX_STREAMS like aioquic does
            if limit.value != limit.sent:
                buf = builder.start_frame(
                    limit.frame_type,
                    capacity=CONNECTION_LIMIT_FRAME_CAPACITY,
                    handler=self._on_connection_limit_delivery,
                    handler_args=(limit,),
                )
                buf.push_uint_var(limit.value)
                limit.sent = limit.value

    def _write_stream_limits(
        self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: QuicStream
    ) -> None:
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            assert stream.stream_id is not None
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local


# --------------------------------------------------------------------------------------------
# One bidirectional stream: the ByteTransport


class QuicStreamTransport:
    """One bidirectional QUIC stream as a :class:`~tensord.net.stream.ByteTransport`.

    ``recv_into`` copies from the packets aioquic delivered into the caller's buffer (aioquic
    decrypts into new ``bytes`` per packet, so one copy is unavoidable); ``send_buffers``
    copies into aioquic's send buffer, bounded as described in the module notes. ``fileno``
    is -1: there is no descriptor per stream.
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
        self._closed = False
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
        qs = self._session.quic._streams.get(self.stream_id)
        if qs is None:
            return 0
        return qs.sender._buffer_stop - qs.sender._buffer_start

    # -- ByteTransport -----------------------------------------------------------------------

    async def recv_into(self, buf: memoryview, nbytes: int) -> int:
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._chunks:
            if self._closed:
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
            not self._closed
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
        if self._closed or self._fin_sent:
            raise trio.ClosedResourceError("the stream was closed")
        if self._send_error is not None:
            raise trio.BrokenResourceError(self._send_error)

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
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


# --------------------------------------------------------------------------------------------
# One QUIC connection


class _UdpSocket:
    """A non-blocking UDP socket shared by the tasks that send on it.

    Several drivers send on a listener's socket; only one task at a time may wait for it to
    become writable, hence the lock (taken only when the kernel says EAGAIN).
    """

    def __init__(self, sock: socket.socket, *, connected: bool) -> None:
        self.sock = sock
        self.connected = connected
        self._write_lock = trio.Lock()

    def send_many(self, datagrams: list[tuple[bytes, NetworkAddress]]) -> int:
        """Send in order until the kernel says EAGAIN; how many were sent. Other errors
        (ECONNREFUSED from an ICMP port unreachable) raise ``OSError``."""
        sock = self.sock
        connected = self.connected
        sent = 0
        try:
            for data, addr in datagrams:
                if connected:
                    sock.send(data)
                else:
                    sock.sendto(data, addr)
                sent += 1
        except BlockingIOError:
            pass
        return sent

    async def wait_writable(self) -> None:
        async with self._write_lock:
            await trio.lowlevel.wait_writable(self.sock)

    def send_nowait(self, data: bytes, addr: NetworkAddress) -> None:
        """Best effort, for the CONNECTION_CLOSE sent while a driver is being cancelled."""
        try:
            if self.connected:
                self.sock.send(data)
            else:
                self.sock.sendto(data, addr)
        except OSError:
            pass

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()


class QuicSession:
    """One QUIC connection to a peer and the Trio tasks that drive it.

    Created by :class:`QuicDialer` (client) or by :func:`serve_quic` (server). Its
    ``failure`` is set as soon as the connection starts closing, for whatever reason; from then
    on every stream raises ``trio.BrokenResourceError`` (data already received can still be
    read) and a dialer waiting on it gets the typed error.
    """

    def __init__(
        self,
        quic: _FlowControlledConnection,
        udp: _UdpSocket,
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
        sock = self.udp.sock
        quic = self.quic
        addr = self.peer_addr
        buf = bytearray(65536)
        view = memoryview(buf)
        while not self._terminated:
            await trio.lowlevel.wait_readable(sock)
            now = trio.current_time()
            for _ in range(_RECV_BATCH):
                try:
                    n = sock.recv_into(buf)
                except BlockingIOError:
                    break
                except OSError as exc:
                    self._unreachable(exc)
                    return
                if n <= MAX_RESET_SIZE and is_stateless_reset(
                    view[:n], quic._peer_cid.stateless_reset_token
                ):
                    why = "stateless reset: the peer restarted or lost the connection's state"
                    log.info("QUIC connection to %s: %s", self.name, why)
                    self._lost(why)
                    return
                quic.receive_datagram(bytes(view[:n]), addr, now)
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
        if self.quic._loss.bytes_in_flight == 0:
            return 0.0
        return max(0.0, now - self.last_heard)

    def _keepalive_interval(self) -> float:
        """A third of the idle timeout both ends agreed on (the smaller of the two)."""
        remote = self.quic._remote_max_idle_timeout
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
                if stream.send_buffered <= low or stream._send_error is not None or stream._closed:
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
        tls = self.quic.tls
        if self._verify_cadata is not None or self.is_client:
            cert = tls._peer_certificate
            if self._verify_cadata is not None and not self.is_client:
                # aioquic checked the client's CertificateVerify signature, not its chain.
                if cert is None:
                    self.close(
                        QuicErrorCode.CRYPTO_ERROR + _ALERT_CERTIFICATE_REQUIRED,
                        "this node requires a client certificate from the cluster CA "
                        "(security.tls); the peer presented none",
                        transport=True,
                    )
                    return
                try:
                    aioquic_tls.verify_certificate(
                        certificate=cert,
                        chain=tls._peer_certificate_chain,
                        cadata=self._verify_cadata,
                    )
                except aioquic_tls.Alert as exc:
                    self.close(
                        QuicErrorCode.CRYPTO_ERROR + exc.description,
                        f"client certificate refused: {_explain_verify(str(exc))}",
                        transport=True,
                    )
                    return
            if cert is not None:
                from ...certs import node_id_of

                self.peer_node_id = node_id_of(cert.public_bytes(serialization.Encoding.DER))
        self.established.set()

    def _check_closing(self) -> None:
        """Fail everything as soon as aioquic decides to close, not 3 PTOs later when the
        ``ConnectionTerminated`` event comes out of the closing/draining period."""
        if self.failure is None:
            event = self.quic._close_event
            if event is not None:
                self._on_close(event)

    def _on_close(self, event: qe.ConnectionTerminated) -> None:
        # DRAINING: the peer sent CONNECTION_CLOSE; otherwise we (or aioquic for us) closed.
        by_peer = self.quic._state is QuicConnectionState.DRAINING
        self.failure, self.close_reason = _close_failure(event, by_peer=by_peer)
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
        if self.quic._close_event is None:
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
        quic = self.quic
        quic.app_buffered -= n
        qs = quic._streams.get(stream.stream_id)
        if qs is not None and not qs.receiver.is_finished:
            target = stream._consumed + self.tuning.stream_window
            if target - qs.max_stream_data_local >= self._stream_step:
                qs.max_stream_data_local = target
                self.flush()
                return
        limit = quic._local_max_data
        if limit.used - quic.app_buffered + quic.flow_window - limit.value >= quic.flow_step:
            self.flush()

    def _stream_closed(self, stream: QuicStreamTransport) -> None:
        sid = stream.stream_id
        self.streams.pop(sid, None)
        self._blocked_writers.discard(stream)
        if (sid & 1) == (1 if self.is_client else 0):
            self._closed_ids.add(sid)
            if len(self._closed_ids) > 64:  # forget the ones aioquic has discarded
                live = self.quic._streams
                self._closed_ids = {i for i in self._closed_ids if i in live}
        if not self.streams and self.on_idle is not None:
            self.on_idle(self)


def _close_failure(event: qe.ConnectionTerminated, *, by_peer: bool) -> tuple[TensorError, str]:
    """The typed error a dialer raises for a connection that ended with ``event``."""
    code, reason = event.error_code, event.reason_phrase
    if event.frame_type is not None and _CRYPTO_FIRST <= code <= _CRYPTO_LAST:
        alert = code - _CRYPTO_FIRST
        if alert == _ALERT_NO_APPLICATION_PROTOCOL:
            why = f"the peer does not speak {ALPN} over QUIC"
            return ProtocolError(why, code="bad_protocol"), why
        if by_peer:
            why = f"TLS: the peer refused our certificate: {reason or f'alert {alert}'}"
        else:
            why = f"TLS: the peer's certificate was refused: {_explain_verify(reason)}"
        return AuthenticationFailed(why), why
    if event.frame_type is None:  # an application close: ours or the peer's tensord
        if code == E_AUTH:
            why = reason or "authentication failed"
            return AuthenticationFailed(f"the peer refused us: {why}" if by_peer else why), why
        if code == E_PROTOCOL:
            # "[code] message": the Error frame's code survives even if the frame was lost.
            found = re.fullmatch(r"\[([a-z_]{1,32})\] (.*)", reason, re.DOTALL)
            err_code, why = found.groups() if found else ("protocol", reason or "handshake failed")
            return ProtocolError(why, code=err_code), why
        if code == E_REFUSED:
            why = f"the peer refused the connection: {reason or 'busy'}"
            return PeerUnreachable(why), why
        why = f"closed by the peer: {reason}" if by_peer else f"closed: {reason or 'done'}"
        return PeerUnreachable(why), why
    if code == QuicErrorCode.CONNECTION_REFUSED:  # a listener with max_connections full
        why = f"the peer refused the connection: {reason or 'busy'}"
        return PeerUnreachable(why), why
    if reason == "Idle timeout":
        why = "no packet from the peer within the idle timeout (gone, or idle too long)"
        return PeerUnreachable(why), why
    why = f"QUIC error 0x{code:x}{': ' + reason if reason else ''}"
    return PeerUnreachable(why), why


def _explain_verify(reason: str) -> str:
    low = reason.lower()
    if "cluster's ca" in low or "renew it" in low or "clocks" in low:
        return reason  # explained already (a reason phrase we wrote)
    if "issuer" in low or "self-signed" in low or "self signed" in low:
        return (
            f"{reason}: it was not issued by this cluster's CA (a node of another cluster, a "
            "certificate from another CA directory, or a peer without security.tls)"
        )
    if "no longer valid" in low or "expired" in low:
        return f"{reason}: it has expired (renew it with `tensord certs issue`)"
    if "not valid yet" in low:
        return f"{reason}: check both machines' clocks"
    return reason


# --------------------------------------------------------------------------------------------
# Configuration and certificates


def _base_config(tuning: QuicTuning, *, is_client: bool) -> QuicConfiguration:
    return QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        congestion_control_algorithm=tuning.congestion_control,
        idle_timeout=tuning.idle_timeout,
        max_data=tuning.connection_window,
        max_stream_data=tuning.stream_window,
        max_datagram_size=tuning.max_datagram_size,
        connection_id_length=_CID_LENGTH,
    )


def _read_ca(tls: TlsSettings) -> bytes:
    from ...certs import client_context

    client_context(tls)  # the three files, checked with one clear line per mistake
    return tls.ca.read_bytes()


def _client_config(tls: TlsSettings | None, tuning: QuicTuning) -> QuicConfiguration:
    cfg = _base_config(tuning, is_client=True)
    if tls is None:
        cfg.verify_mode = ssl.CERT_NONE
        return cfg
    cfg.load_verify_locations(cadata=_read_ca(tls))
    cfg.load_cert_chain(tls.cert, tls.key)
    cfg.verify_mode = ssl.CERT_REQUIRED
    # No server_name: the identity is the node id in the certificate, checked after the Hello.
    return cfg


def _server_config(tls: TlsSettings | None, tuning: QuicTuning) -> tuple[QuicConfiguration, bytes]:
    """The listener's configuration and the CA (empty without TLS) to verify clients with."""
    cfg = _base_config(tuning, is_client=False)
    if tls is None:
        from ...certs import ephemeral_certificate

        cert, key = ephemeral_certificate()
        cfg.certificate, cfg.private_key = cert, key
        return cfg, b""
    cadata = _read_ca(tls)
    cfg.load_verify_locations(cadata=cadata)
    cfg.load_cert_chain(tls.cert, tls.key)
    return cfg, cadata


def _check_identity(session: QuicSession, claimed: str, tls: TlsSettings | None) -> None:
    if tls is not None and session.peer_node_id != claimed:
        raise AuthenticationFailed(
            f"the peer claims to be node {claimed!r} but its certificate is for "
            f"{session.peer_node_id!r}"
        )


def _tune_socket(sock: socket.socket, tuning: QuicTuning) -> None:
    sock.setblocking(False)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, tuning.socket_buffer)


# --------------------------------------------------------------------------------------------
# Dialing


@dataclass
class DialerStats:
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
            session = await self._connect(ident, addr, tls)
        await session.established.wait()
        if session.failure is not None:
            raise _copy(session.failure)
        return session

    async def _connect(
        self, ident: tuple[Any, ...], addr: HostPort, tls: TlsSettings | None
    ) -> QuicSession:
        if self._nursery is None:
            raise RuntimeError("QuicDialer.run() is not running")
        cfg = self._configs.get(tls)
        if cfg is None:
            cfg = self._configs[tls] = _client_config(tls, self.tuning)
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
            _tune_socket(sock, self.tuning)
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            raise PeerUnreachable(f"{addr}: {(exc.strerror or str(exc)).lower()}") from None
        quic = _FlowControlledConnection(
            configuration=cfg,
            connection_window=self.tuning.connection_window,
            request_client_certificate=False,
        )
        session = QuicSession(
            quic, _UdpSocket(sock, connected=True), sockaddr, name=str(addr), tuning=self.tuning
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
                _check_identity(session, conn.peer_id, tls)
            except AuthenticationFailed as exc:
                await conn.send_error("auth", str(exc))
                raise
        except BaseException as exc:
            failure = _hello_failure(session, exc)
            session.hello_failure = failure
            session.close(*_close_args(failure))
            stream._close()
            session.hello_done.set()
            raise
        session.agreement = conn.agreement
        session.hello_done.set()
        return conn


def _close_args(failure: TensorError) -> tuple[int, str]:
    """The CONNECTION_CLOSE that tells the peer why its first stream's handshake failed."""
    if isinstance(failure, AuthenticationFailed):
        return E_AUTH, str(failure)
    code = failure.code if isinstance(failure, ProtocolError) else "protocol"
    return E_PROTOCOL, f"[{code}] {failure}"


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


# --------------------------------------------------------------------------------------------
# Serving


async def open_quic_socket(addr: HostPort, tuning: QuicTuning = DEFAULT_TUNING) -> socket.socket:
    """Bind the listener's UDP socket (port 0 picks a free port; ``::`` also takes IPv4)."""
    host = None if addr.host in ("0.0.0.0", "::", "") else addr.host
    if addr.host == "::":
        family = socket.AF_INET6
    elif host is None:
        family = socket.AF_INET
    else:
        infos = await trio.socket.getaddrinfo(
            host, addr.port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
        )
        family = infos[0][0]
        host = str(infos[0][4][0])
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6 and host is None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        _tune_socket(sock, tuning)
        sock.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), addr.port))
    except OSError:
        sock.close()
        raise
    return sock


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

    Admission (module notes, "Before authentication"): at most ``max_connections`` QUIC
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
        self.udp = _UdpSocket(sock, connected=False)
        self.hello = hello
        self.decoder = decoder
        self.handler = handler
        self.handshake_timeout = handshake_timeout
        self.key = key
        self.tls = tls
        self.max_connections = max_connections
        self.max_unauthenticated = max_unauthenticated
        self.tuning = tuning
        self.stats = stats
        self.config, cadata = _server_config(tls, tuning)
        self.cadata = cadata or None
        key_material = reset_key(
            hello.node,
            tls_key=tls.key.read_bytes() if tls is not None else None,
            secret=key.secret if key is not None else None,
        )
        self.reset_tokens = ResetTokens(key_material, _CID_LENGTH)
        self.routes: dict[bytes, QuicSession] = {}
        self.sessions: set[QuicSession] = set()  # until their driver ends
        # Counted against max_connections (a dropped one stops counting at once, before its
        # driver has ended), and those not authenticated yet, oldest first.
        self.admitted: set[QuicSession] = set()
        self.unauthenticated: dict[QuicSession, None] = {}
        self.accepting = True
        self._warned_at = -1e9
        self._refusals_at = -1e9
        self._refusals = 0
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
        self.stats.open = len(self.admitted)
        self.stats.unauthenticated = len(self.unauthenticated)
        self.stats.connection_ids = len(self.routes)

    async def _receive_loop(self) -> None:
        sock = self.udp.sock
        routes = self.routes
        touched: set[QuicSession] = set()
        # recvfrom(65536) would allocate (and shrink) 64 KiB per datagram: receive into one
        # buffer and copy out the datagram.
        buf = bytearray(65536)
        view = memoryview(buf)
        while True:
            await trio.lowlevel.wait_readable(sock)
            now = trio.current_time()
            for _ in range(_RECV_BATCH):
                try:
                    n, addr = sock.recvfrom_into(buf)
                except BlockingIOError:
                    break
                except OSError:
                    continue  # an ICMP error for some earlier datagram: not fatal here
                data = bytes(view[:n])
                # Short header (all packets after the handshake): the destination connection
                # id sits right after the first byte; only long headers need parsing.
                session = routes.get(data[1 : 1 + _CID_LENGTH]) if n and data[0] < 0x80 else None
                try:
                    if session is None:
                        session = self._route(data, addr, now)
                        if session is None:
                            continue
                    if session.terminated:
                        continue  # dropped: its driver has yet to end
                    session.quic.receive_datagram(data, addr, now)
                except Exception:
                    self._failed(session, addr, "a datagram")
                    continue
                touched.add(session)
            for session in touched:
                try:
                    session.after_receive(now)
                except Exception:
                    self._failed(session, session.peer_addr, "its events")
            touched.clear()

    def _route(self, data: bytes, addr: NetworkAddress, now: float) -> QuicSession | None:
        """The connection of a datagram the short-header fast path did not find: a known one
        (a long header, routed by its destination id: the client's first one stays routed), a
        new one (an Initial, if admitted), or none (dropped, or answered with a stateless
        reset)."""
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=_CID_LENGTH)
        except ValueError:
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
        full = self.max_connections is not None and len(self.admitted) >= self.max_connections
        if self.unauthenticated and (full or len(self.unauthenticated) >= self.max_unauthenticated):
            self._evict(self._stranger_to_drop(), addr, full=full)
        elif full:
            self._refuse(dcid, data, addr, now)
            return None
        quic = _FlowControlledConnection(
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
        self.admitted.add(session)
        self.unauthenticated[session] = None
        self.stats.connections += 1
        for cid in session.cids:
            self.routes[cid] = session
        self._update_gauges()
        self._nursery.start_soon(self._drive, session, name=f"quic-server {session.name}")
        return session

    def _forget(self, session: QuicSession) -> None:
        """``session`` no longer counts against the limits (it is being dropped or is gone)."""
        self.admitted.discard(session)
        self.unauthenticated.pop(session, None)
        self._update_gauges()

    def _stranger_to_drop(self) -> QuicSession:
        """The oldest unauthenticated connection of the source address holding the most (as
        the TCP listener): a flood from one host evicts its own, not a member mid-handshake."""
        per_source = Counter(_host_of(s.peer_addr) for s in self.unauthenticated)
        busiest = max(per_source, key=per_source.__getitem__)
        return next(s for s in self.unauthenticated if _host_of(s.peer_addr) == busiest)

    def _evict(self, session: QuicSession, newcomer: NetworkAddress, *, full: bool) -> None:
        """sshd's MaxStartups: a connection still in its handshake makes room."""
        self.stats.evicted += 1
        metrics.PEER_CONNECTIONS_DROPPED.labels("budget").inc()
        if full:
            why = (
                f"all {len(self.admitted)} peer connections are taken (transfer.max_connections) "
                "and this was the oldest still in its handshake from the address holding the most "
                "(transfer.max_unauthenticated)"
            )
        else:
            why = (
                f"{len(self.unauthenticated)} connections are in their handshake "
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
        if now - self._warned_at > 10:  # one line per 10 s, not one per attempt
            self._warned_at = now
            log.warning(
                "peer connection from %s refused: %d QUIC connections open "
                "(transfer.max_connections)",
                _addr_name(addr),
                len(self.admitted),
            )
        if now - self._refusals_at >= 1:
            self._refusals_at, self._refusals = now, 0
        if self._refusals >= _MAX_REFUSALS_PER_SECOND:
            return  # unanswered: the dialer times out
        self._refusals += 1
        quic = QuicConnection(configuration=self.config, original_destination_connection_id=dcid)
        quic.receive_datagram(data, addr, now)
        quic.close(
            error_code=QuicErrorCode.CONNECTION_REFUSED,
            frame_type=QuicFrameType.PADDING,
            reason_phrase=(
                f"the node has {len(self.admitted)} peer connections open "
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
        self.unauthenticated.pop(session, None)
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
                session.close(*_close_args(session.hello_failure))
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
            _check_identity(self._session, msg.node, tls)
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
    connection's first packet (see "Before authentication" in the module notes). ``stats``,
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


__all__ = [
    "ALPN",
    "DEFAULT_TUNING",
    "DialerStats",
    "ListenerStats",
    "QuicDialer",
    "QuicSession",
    "QuicStreamTransport",
    "QuicTuning",
    "default_dialer",
    "dial_quic",
    "open_quic_socket",
    "serve_quic",
]
