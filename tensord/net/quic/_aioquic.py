r"""The one module that knows aioquic's private API: the engine subclass and its accessors.

aioquic is pinned to ``>=1.7,<1.8`` (pyproject.toml) because of what this module relies on;
everything else in :mod:`tensord.net.quic` goes through the typed methods and functions here
(``tests/test_quic_layering.py`` fails if another module of the package touches an aioquic
underscore name, and ``tests/test_quic.py`` has a test that fails on an aioquic that lacks
what is listed below). An upgrade of aioquic is a review of this file.

:class:`FlowControlledConnection` is aioquic's sans-I/O ``QuicConnection`` with receive credit
that follows the reader, the pre-authentication limits of a listener's connection, derived
stateless reset tokens, immediate ACKs after a batch, a shorter ``max_ack_delay`` and a pacer
for a 1 ms timer (why, with measurements: docs/QUIC.md). It knows nothing of Trio.

Relied on, by aioquic 1.7 name:

* overridden ``QuicConnection`` methods: ``_initialize``, ``_replenish_connection_ids``,
  ``_serialize_transport_parameters``, ``_write_connection_limits``, ``_write_stream_limits``
  (and the public ``receive_datagram``, which reads ``_spaces``); called from them:
  ``_on_connection_limit_delivery``, ``_on_max_stream_data_delivery``;
* ``QuicConnection`` attributes: ``_streams``, ``_local_max_data`` (a ``Limit``: ``value``,
  ``sent``, ``used``), ``_local_max_streams_bidi`` and ``_local_max_streams_uni`` (``Limit``\ s,
  set before the transport parameters are written), ``_is_client``, ``_close_event``,
  ``_state``, ``_loss._pacer``, ``_loss.bytes_in_flight``, ``_remote_max_idle_timeout``,
  ``_spaces`` (a packet space's ``ack_at`` and ``largest_received_packet``),
  ``_max_datagram_size``, ``_host_cids`` (reset tokens), ``_peer_cid.stateless_reset_token``;
* ``QuicStreamSender._buffer_start`` and ``_buffer_stop`` (unacknowledged bytes of a stream);
* ``tls.Context._request_client_certificate`` (the server's only switch to ask for a client
  certificate), ``_peer_certificate`` and ``_peer_certificate_chain``;
* ``aioquic._buffer.Buffer``, to parse packet headers and transport parameters.
"""

from __future__ import annotations

import math
from typing import Any

from aioquic import tls
from aioquic._buffer import Buffer
from aioquic.quic import events as qe
from aioquic.quic.connection import (
    CONNECTION_LIMIT_FRAME_CAPACITY,
    MAX_STREAM_DATA_FRAME_CAPACITY,
    NetworkAddress,
    QuicConnection,
    QuicConnectionState,
)
from aioquic.quic.packet import (
    QuicFrameType,
    QuicHeader,
    pull_quic_header,
    pull_quic_transport_parameters,
    push_quic_transport_parameters,
)
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketPacer, QuicPacketSpace
from aioquic.quic.stream import QuicStream
from cryptography import x509

from .reset import ResetTokens
from .tuning import MAX_ACK_DELAY_MS, MAX_PEER_STREAMS, PRE_AUTH_STREAMS, PRE_AUTH_WINDOW

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


class FlowControlledConnection(QuicConnection):
    """A ``QuicConnection`` whose receive credit is granted as the application consumes.

    ``app_buffered`` is kept by the session: bytes delivered by aioquic that the application
    has not read yet. Stream limits are moved as the reader consumes (:meth:`consumed`, from
    ``QuicStreamTransport.recv_into``: ``consumed + stream_window``); the two overrides below
    only stop aioquic's doubling and compute the connection limit.

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
        """A listener's connection ids get derived stateless reset tokens (see :mod:`.reset`)."""
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
        read what the kernel had (up to ``RECV_BATCH`` datagrams), so a burst is still
        answered by one ACK; a lone packet (a request) still waits for the timer, so that
        the ACK can ride on the answer. With ACKs only per timer tick, a sender whose whole
        congestion window arrived within one tick got one ACK per round trip: losing that
        ACK stalled it for a PTO, and a loss was detected a tick later than it could be.
        """
        space = self._spaces.get(tls.Epoch.ONE_RTT)
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

    # -- read by the Trio layer, which touches no private name of aioquic -------------------

    def send_buffered(self, stream_id: int) -> int:
        """Bytes of the stream handed to aioquic and not yet acknowledged by the peer."""
        qs = self._streams.get(stream_id)
        if qs is None:
            return 0
        return qs.sender._buffer_stop - qs.sender._buffer_start

    def has_stream(self, stream_id: int) -> bool:
        """aioquic still tracks the stream (it has not discarded it)."""
        return stream_id in self._streams

    def consumed(self, stream_id: int, n: int, total: int, window: int, step: int) -> bool:
        """The application read ``n`` more bytes of the stream (``total`` so far): extend the
        stream's credit to ``total + window`` once that moves it by ``step``. True when there is
        new credit (stream or connection) to announce, i.e. a flush is due."""
        self.app_buffered -= n
        qs = self._streams.get(stream_id)
        if qs is not None and not qs.receiver.is_finished:
            target = total + window
            if target - qs.max_stream_data_local >= step:
                qs.max_stream_data_local = target
                return True
        limit = self._local_max_data
        return limit.used - self.app_buffered + self.flow_window - limit.value >= self.flow_step

    @property
    def peer_reset_token(self) -> bytes:
        """The stateless reset token the peer gave for the connection id we send to."""
        return self._peer_cid.stateless_reset_token

    @property
    def bytes_in_flight(self) -> int:
        """Bytes sent and not yet acknowledged or declared lost."""
        return self._loss.bytes_in_flight

    @property
    def remote_idle_timeout(self) -> float | None:
        """The peer's ``max_idle_timeout`` in seconds (None or 0: it announced none)."""
        return self._remote_max_idle_timeout

    @property
    def close_event(self) -> qe.ConnectionTerminated | None:
        """Set as soon as the connection starts closing (before ``ConnectionTerminated`` comes
        out of the closing or draining period)."""
        return self._close_event

    @property
    def closed_by_peer(self) -> bool:
        """Draining: the peer sent CONNECTION_CLOSE (otherwise we, or aioquic for us, closed)."""
        return self._state is QuicConnectionState.DRAINING

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        """The peer's TLS certificate, once the handshake has received it."""
        return self.tls._peer_certificate

    @property
    def peer_certificate_chain(self) -> list[x509.Certificate]:
        return self.tls._peer_certificate_chain


def parse_header(data: bytes, cid_length: int) -> QuicHeader | None:
    """The header of a datagram's first packet, or None if it does not parse."""
    try:
        return pull_quic_header(Buffer(data=data), host_cid_length=cid_length)
    except ValueError:
        return None
