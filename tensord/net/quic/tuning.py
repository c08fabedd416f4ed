"""The QUIC transport's knobs (:class:`QuicTuning`) and the limits it fixes for every peer.

Plain values, no I/O: the engine (:mod:`._aioquic`), the sessions and the listener all read
them from here. What each figure buys is measured in docs/QUIC.md ("Performance").
"""

from __future__ import annotations

from dataclasses import dataclass

from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE

MiB = 1 << 20

#: Datagrams read from a socket per scheduler pass, before the events are dispatched and the
#: driver is woken once (it then answers them all with one batch of ACKs).
RECV_BATCH = 64
#: Length of the connection ids we issue (a listener routes short headers by them).
CID_LENGTH = 8
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
#: The ``max_ack_delay`` transport parameter we announce, in ms: the longest we hold back an
#: ACK, which the peer adds to every probe timeout (PTO). aioquic announces 25 ms, but it
#: acknowledges after 1 ms (``_ack_delay``), or at once (:meth:`FlowControlledConnection.
#: receive_datagram`), and a Trio deadline wakes at most about a millisecond late; 5 ms leaves
#: room for a busy event loop. A PTO after a lost ACK then waits ~7 ms on loopback, not ~29.
MAX_ACK_DELAY_MS = 5


@dataclass(frozen=True)
class QuicTuning:
    """The knobs of the QUIC transport (defaults: see "Performance" in docs/QUIC.md).

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
    the kernel's ``net.core.rmem_max``/``wmem_max``). ``udp_offload``: UDP GSO/GRO where the kernel
    has them (:class:`~tensord.net.quic.udp.UdpSocket`).
    """

    stream_window: int = 8 * MiB
    connection_window: int = 32 * MiB
    send_buffer: int = 4 * MiB
    max_datagram_size: int = 1452
    congestion_control: str = "reno"
    idle_timeout: float = 30.0
    socket_buffer: int = 4 * MiB
    udp_offload: bool = True

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
