"""QUIC stateless reset (RFC 9000, section 10.3): how a restarted node tells a peer at once that
the connection it is still using is gone.

A node killed with ``kill -9`` sends no CONNECTION_CLOSE; when it comes back on the same port
its new listener receives packets for connection ids it never issued and, without this, drops
them: the peer hears nothing until its transfer's ``io_timeout`` or its idle timeout. With it,
the listener answers such a packet with a *stateless reset*, a datagram that looks like any
short-header packet and ends with a 16-byte token; the peer recognises the token it was given
for that connection id and drops the connection at once (the retry then dials a new one).

The token must be one the old process handed out, so it is derived, not drawn: an HMAC of the
connection id under a key that survives restarts - taken from the node's TLS private key (which
no other node has) or else from the cluster secret (which every node has: any member of the
cluster could then forge resets, as it could impersonate another member) and the node id.
Without either, the key is random per process and resets only work within its life. aioquic
sends the tokens (transport parameter, NEW_CONNECTION_ID) but neither derives them nor
recognises a reset: :class:`ResetTokens` and :func:`is_stateless_reset` are those two halves.
"""

from __future__ import annotations

import hashlib
import hmac
import os

#: The token's length, and the shortest reset: 5 unpredictable bytes before it.
TOKEN_LENGTH = 16
MIN_RESET_SIZE = 21
#: RFC 9000: a reset answering a packet of at most this size is one byte shorter than it
#: (so that two endpoints cannot reset each other forever); bigger packets get this size. So
#: no tensord reset is longer, and a receive loop looks for one only in datagrams this short.
MAX_RESET_SIZE = 43

_CONTEXT = b"tensord quic stateless reset\x00"


def reset_key(node_id: str, *, tls_key: bytes | None, secret: bytes | None) -> bytes:
    """The node's reset key: from its TLS private key, else the cluster secret, else random."""
    material = tls_key if tls_key is not None else secret
    if material is None:
        return os.urandom(32)
    return hmac.new(material, _CONTEXT + node_id.encode(), hashlib.sha256).digest()


class ResetTokens:
    """The listener's half: the token for each connection id it issues, and the reset it sends
    for a short-header packet whose connection id it does not know."""

    def __init__(self, key: bytes, cid_length: int) -> None:
        self._key = key
        self._cid_length = cid_length

    def token(self, cid: bytes) -> bytes:
        return hmac.new(self._key, cid, hashlib.sha256).digest()[:TOKEN_LENGTH]

    def reset_for(self, datagram: bytes) -> bytes | None:
        """The reset answering ``datagram`` (a short-header packet for an unknown connection),
        or None when it must not be answered (a long header, or too short: a reset of a reset
        shrinks by a byte each time until it is below the minimum)."""
        if len(datagram) <= MIN_RESET_SIZE or datagram[0] & 0x80:
            return None
        cid = datagram[1 : 1 + self._cid_length]
        size = min(len(datagram) - 1, MAX_RESET_SIZE)
        head = bytearray(os.urandom(size - TOKEN_LENGTH))
        head[0] = 0x40 | (head[0] & 0x3F)  # looks like a short-header packet
        return bytes(head) + self.token(cid)


def is_stateless_reset(datagram: bytes | memoryview, token: bytes | None) -> bool:
    """The dialer's half: ``datagram`` ends with the token the peer gave for our connection."""
    return (
        token is not None
        and len(datagram) >= MIN_RESET_SIZE
        and datagram[0] & 0xC0 == 0x40
        and datagram[-TOKEN_LENGTH:] == token
    )


__all__ = [
    "MAX_RESET_SIZE",
    "MIN_RESET_SIZE",
    "TOKEN_LENGTH",
    "ResetTokens",
    "is_stateless_reset",
    "reset_key",
]
