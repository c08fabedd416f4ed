"""Mutual challenge-response with the cluster secret, inside the Hello exchange.

Three messages, one round trip for the dialer (it sends ``Auth`` together with its first request)::

    dialer   -> Hello{..., nonce: Nd}
    listener -> Hello{..., nonce: Nl, proof: HMAC(K, "listener" | T(dialer hello) | T(reply))}
    dialer   -> Auth{proof: HMAC(K, "dialer" | T(dialer hello) | T(reply))}

``T`` is a canonical encoding of a hello's negotiated fields *and its nonce*, so each proof binds
both fresh nonces, both node ids, and the versions and features both sides offered: a replayed
handshake fails (the other side's nonce is new), a peer cannot claim another node id without
recomputing the proof, and a man in the middle cannot strip a feature (say ``crc32c``) without
the secret. The listener reads nothing but ``Auth`` after its reply, so no tensor frame from an
unauthenticated peer is ever parsed. Proofs are compared in constant time.

The secret authenticates *membership of the cluster*: every member can compute every proof. Per-node
identity (a node that cannot impersonate another member) comes from TLS certificates.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field, replace

import msgpack

from ..errors import ProtocolError
from .messages import NONCE_LEN, Auth, Hello

MIN_SECRET_BYTES = 16
_CONTEXT = b"tensord-auth-v1\x00"


@dataclass(frozen=True)
class ClusterKey:
    """The cluster secret. Its ``repr`` never shows the bytes (reprs end up in logs)."""

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_SECRET_BYTES:
            raise ValueError(
                f"the cluster secret is {len(self.secret)} bytes; at least {MIN_SECRET_BYTES} "
                "are needed (e.g. `head -c 32 /dev/urandom | base64 > secret`)"
            )

    @classmethod
    def from_file_bytes(cls, data: bytes) -> ClusterKey:
        """A secret file's contents; surrounding whitespace (a final newline) is not part of it."""
        return cls(data.strip())

    def proof(self, role: bytes, dialer: Hello, reply: Hello) -> bytes:
        msg = _CONTEXT + role + b"\x00" + _transcript(dialer) + _transcript(reply)
        return hmac.new(self.secret, msg, hashlib.sha256).digest()


def _transcript(h: Hello) -> bytes:
    fields = [h.proto, list(h.versions), h.node, sorted(h.features), h.max_chunk, h.nonce]
    out: bytes = msgpack.packb(fields, use_bin_type=True)
    return out


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_LEN)


def with_challenge(hello: Hello) -> Hello:
    """The dialer's hello, carrying a fresh nonce."""
    return replace(hello, nonce=new_nonce(), proof=None)


def listener_reply(
    key: ClusterKey | None, dialer: Hello, reply: Hello
) -> tuple[Hello, bytes | None]:
    """Listener side: the reply to send, and the proof to expect in the dialer's ``Auth``.

    Without a key the reply carries no proof (a dialer that wants one will refuse it). With a key,
    a dialer that sent no challenge is refused: it is not configured with the cluster secret.
    """
    if key is None:
        return replace(reply, nonce=None, proof=None), None
    if dialer.nonce is None:
        raise ProtocolError(
            f"peer {dialer.node!r} did not authenticate, and this node requires the cluster "
            "secret (is security.secret_file set on that node?)",
            code="auth",
        )
    reply = replace(reply, nonce=new_nonce(), proof=None)
    proof = key.proof(b"listener", dialer, reply)
    return replace(reply, proof=proof), key.proof(b"dialer", dialer, reply)


def check_reply(key: ClusterKey | None, dialer: Hello, reply: Hello) -> Auth | None:
    """Dialer side: verify the listener's proof; the ``Auth`` to send back (``None``: no auth)."""
    if key is None:
        return None
    if reply.proof is None or reply.nonce is None:
        raise ProtocolError(
            f"peer {reply.node!r} did not prove it knows the cluster secret (it has none "
            "configured, or is not a member of this cluster)",
            code="auth",
        )
    unsigned = replace(reply, proof=None)
    if not hmac.compare_digest(key.proof(b"listener", dialer, unsigned), reply.proof):
        raise ProtocolError(
            f"peer {reply.node!r} failed the cluster-secret check: its secret differs from "
            "ours (or someone in between changed the handshake)",
            code="auth",
        )
    return Auth(key.proof(b"dialer", dialer, unsigned))


def check_auth(expected: bytes, auth: Auth, peer: str) -> None:
    """Listener side: the dialer's proof, compared in constant time."""
    if not hmac.compare_digest(expected, auth.proof):
        raise ProtocolError(
            f"peer {peer!r} failed the cluster-secret check: its secret differs from ours "
            "(or the handshake was replayed or altered)",
            code="auth",
        )


__all__ = [
    "MIN_SECRET_BYTES",
    "ClusterKey",
    "check_auth",
    "check_reply",
    "listener_reply",
    "new_nonce",
    "with_challenge",
]
