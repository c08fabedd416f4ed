"""QUIC's TLS: the aioquic configurations of a dialer and a listener, and who the peer is.

Sans-I/O. QUIC is always TLS 1.3 with ALPN ``tensord/1``. With ``security.tls`` both ends
present their node certificate and verify the other's against the cluster CA only; aioquic 1.7
does mutual TLS only halfway, so a listener verifies the client's chain itself
(:func:`peer_identity`), and the certificate's node id must be the one claimed in the Hello
(:func:`check_identity`). Without it a listener uses an ephemeral self-signed certificate and
the dialer verifies nothing (see "Security" in docs/QUIC.md).
"""

from __future__ import annotations

import ssl

from aioquic import tls as aioquic_tls
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicErrorCode
from cryptography.hazmat.primitives import serialization

from ...config import TlsSettings
from ...errors import AuthenticationFailed
from ._aioquic import FlowControlledConnection
from .codes import ALERT_CERTIFICATE_REQUIRED, ALPN, explain_verify
from .tuning import CID_LENGTH, QuicTuning


def _base_config(tuning: QuicTuning, *, is_client: bool) -> QuicConfiguration:
    return QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        congestion_control_algorithm=tuning.congestion_control,
        idle_timeout=tuning.idle_timeout,
        max_data=tuning.connection_window,
        max_stream_data=tuning.stream_window,
        max_datagram_size=tuning.max_datagram_size,
        connection_id_length=CID_LENGTH,
    )


def _read_ca(tls: TlsSettings) -> bytes:
    from ...certs import client_context

    client_context(tls)  # the three files, checked with one clear line per mistake
    return tls.ca.read_bytes()


def client_config(tls: TlsSettings | None, tuning: QuicTuning) -> QuicConfiguration:
    cfg = _base_config(tuning, is_client=True)
    if tls is None:
        cfg.verify_mode = ssl.CERT_NONE
        return cfg
    cfg.load_verify_locations(cadata=_read_ca(tls))
    cfg.load_cert_chain(tls.cert, tls.key)
    cfg.verify_mode = ssl.CERT_REQUIRED
    # No server_name: the identity is the node id in the certificate, checked after the Hello.
    return cfg


def server_config(tls: TlsSettings | None, tuning: QuicTuning) -> tuple[QuicConfiguration, bytes]:
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


def check_identity(peer_node_id: str | None, claimed: str, tls: TlsSettings | None) -> None:
    """With TLS, the node id a peer claims in its Hello must be its certificate's."""
    if tls is not None and peer_node_id != claimed:
        raise AuthenticationFailed(
            f"the peer claims to be node {claimed!r} but its certificate is for {peer_node_id!r}"
        )


class PeerRefused(Exception):
    """The peer's certificate is refused: close with ``error_code`` and ``reason``."""

    def __init__(self, error_code: int, reason: str) -> None:
        super().__init__(reason)
        self.error_code = error_code
        self.reason = reason


def peer_identity(quic: FlowControlledConnection, verify_cadata: bytes | None) -> str | None:
    """After the TLS handshake: the node id in the peer's certificate (None without one).

    A listener with ``verify_cadata`` verifies the client's chain itself - aioquic checked the
    client's CertificateVerify signature, not its chain - and raises :class:`PeerRefused`
    (a CRYPTO_ERROR with the TLS alert) for a client without a certificate from that CA.
    """
    is_client = quic.configuration.is_client
    if verify_cadata is None and not is_client:
        return None
    cert = quic.peer_certificate
    if verify_cadata is not None and not is_client:
        if cert is None:
            raise PeerRefused(
                QuicErrorCode.CRYPTO_ERROR + ALERT_CERTIFICATE_REQUIRED,
                "this node requires a client certificate from the cluster CA "
                "(security.tls); the peer presented none",
            )
        try:
            aioquic_tls.verify_certificate(
                certificate=cert, chain=quic.peer_certificate_chain, cadata=verify_cadata
            )
        except aioquic_tls.Alert as exc:
            raise PeerRefused(
                QuicErrorCode.CRYPTO_ERROR + exc.description,
                f"client certificate refused: {explain_verify(str(exc))}",
            ) from None
    if cert is None:
        return None
    from ...certs import node_id_of

    return node_id_of(cert.public_bytes(serialization.Encoding.DER))
