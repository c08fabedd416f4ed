"""Who may talk to this node: the cluster secret and mutual TLS, applied to one TCP connection.

Two independent layers, either or both configured (``security`` in the cluster file):

* **TLS** (``security.tls``): the stream is wrapped in ``trio.SSLStream`` with a context that
  demands a certificate from the cluster CA on both sides; after the Hello the certificate's node
  id must equal the node id the peer claims.
* **Cluster secret** (``security.secret_file``): the HMAC challenge-response of
  :mod:`tensord.wire.auth`, inside the Hello exchange, on any transport.

A listener peeks at the first byte of a new connection before anything else: a TLS ClientHello
starts with ``0x16`` and a tensord frame with ``0x00`` (a big-endian length under 16 MiB), so a
plaintext peer dialing a TLS listener (or the reverse) gets a clear refusal in both logs instead
of a garbled frame or a hang.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Any

import trio

from ..config import SecuritySettings
from ..errors import AuthenticationFailed, ConfigError
from ..wire.auth import ClusterKey
from ..wire.frames import encode
from ..wire.messages import Error

log = logging.getLogger("tensord.net")

TLS_RECORD_HANDSHAKE = 0x16


@dataclass(frozen=True)
class PeerSecurity:
    """What this node demands of its peers; built once from the settings."""

    key: ClusterKey | None = None
    server_ssl: ssl.SSLContext | None = None
    client_ssl: ssl.SSLContext | None = None

    @property
    def tls(self) -> bool:
        return self.server_ssl is not None

    @property
    def enabled(self) -> bool:
        return self.key is not None or self.tls

    @classmethod
    def from_settings(cls, sec: SecuritySettings) -> PeerSecurity:
        key = None
        if sec.secret_file is not None:
            try:
                data = sec.secret_file.read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"security.secret_file {sec.secret_file}: cannot read it: {exc.strerror}"
                ) from None
            try:
                key = ClusterKey.from_file_bytes(data)
            except ValueError as exc:
                raise ConfigError(f"security.secret_file {sec.secret_file}: {exc}") from None
        server_ssl = client_ssl = None
        if sec.tls is not None:
            from ..certs import client_context, server_context

            server_ssl = server_context(sec.tls)
            client_ssl = client_context(sec.tls)
        return cls(key, server_ssl, client_ssl)

    def describe(self) -> str:
        parts = [p for p, on in (("mutual TLS", self.tls), ("cluster secret", self.key)) if on]
        return " + ".join(parts) if parts else "none"


async def client_tls(stream: trio.SocketStream, ctx: ssl.SSLContext) -> trio.SSLStream[Any]:
    """Wrap a dialed stream in TLS and complete the handshake; :class:`AuthenticationFailed` if
    either side refuses the other's certificate (or the listener does not speak TLS)."""
    return await _handshake(trio.SSLStream(stream, ctx, server_hostname=None))


async def server_tls(stream: trio.SocketStream, ctx: ssl.SSLContext) -> trio.SSLStream[Any]:
    """The listener side of :func:`client_tls`; a plaintext tensord peer is told to use TLS."""
    if await _first_byte(stream) != TLS_RECORD_HANDSHAKE:
        why = "this node requires TLS (security.tls in the cluster file), the peer sent plaintext"
        await _tell(stream, why)
        raise AuthenticationFailed(why)
    return await _handshake(trio.SSLStream(stream, ctx, server_side=True))


async def _handshake(tls: trio.SSLStream[Any]) -> trio.SSLStream[Any]:
    from ..certs import describe_tls_error

    try:
        await tls.do_handshake()
    except (trio.BrokenResourceError, ssl.SSLError) as exc:
        raise AuthenticationFailed(f"TLS handshake failed: {describe_tls_error(exc)}") from None
    return tls


async def refuse_unexpected_tls(stream: trio.SocketStream) -> None:
    """A plaintext listener: refuse a peer that opens with a TLS ClientHello, saying why."""
    if await _first_byte(stream) == TLS_RECORD_HANDSHAKE:
        raise AuthenticationFailed(
            "the peer speaks TLS but this node has no security.tls configured"
        )


def check_identity(tls: trio.SSLStream[Any], claimed: str) -> None:
    """The certificate's node id must be the node id the peer claimed in its Hello."""
    from ..certs import peer_node_id

    cert_id = peer_node_id(tls)
    if cert_id != claimed:
        raise AuthenticationFailed(
            f"the peer claims to be node {claimed!r} but its certificate is for {cert_id!r}"
        )


async def _first_byte(stream: trio.SocketStream) -> int | None:
    data = await stream.socket.recv(1, socket.MSG_PEEK)
    return data[0] if data else None


async def _tell(stream: trio.SocketStream, why: str) -> None:
    """A plaintext protocol error for a plaintext peer, best effort."""
    with (
        trio.move_on_after(1),
        contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await stream.send_all(encode(Error("auth", why)))


__all__ = [
    "PeerSecurity",
    "check_identity",
    "client_tls",
    "refuse_unexpected_tls",
    "server_tls",
]
