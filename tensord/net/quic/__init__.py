"""QUIC transport: the chunk protocol over aioquic's sans-I/O ``QuicConnection``, driven by Trio.

One QUIC connection per peer (:class:`QuicDialer`), one bidirectional stream per
:class:`~tensord.net.connection.Connection` (:func:`dial_quic`, :func:`serve_quic`), the Hello
once per connection on its first stream. Protocol logic that does not know Trio (``tuning``,
``codes``, ``reset``, ``tls`` and the engine in ``_aioquic``, the only module that touches
aioquic's private API) is fed by a thin Trio layer (``udp``, ``streams``, ``session``,
``dial``, ``listen``).

Design, security rules and performance measurements: docs/QUIC.md.
"""

from __future__ import annotations

from .codes import ALPN, E_AUTH, E_NONE, E_PROTOCOL, E_REFUSED
from .dial import DialerStats, QuicDialer, default_dialer, dial_quic
from .listen import ListenerStats, serve_quic
from .session import QuicSession, QuicStreamTransport
from .tuning import (
    DEFAULT_TUNING,
    MAX_ACK_DELAY_MS,
    MAX_DATAGRAM_SIZE,
    MAX_PEER_STREAMS,
    PRE_AUTH_STREAMS,
    PRE_AUTH_WINDOW,
    QuicTuning,
)
from .udp import open_quic_socket

__all__ = [
    "ALPN",
    "DEFAULT_TUNING",
    "E_AUTH",
    "E_NONE",
    "E_PROTOCOL",
    "E_REFUSED",
    "MAX_ACK_DELAY_MS",
    "MAX_DATAGRAM_SIZE",
    "MAX_PEER_STREAMS",
    "PRE_AUTH_STREAMS",
    "PRE_AUTH_WINDOW",
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
