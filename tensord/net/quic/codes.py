"""What a QUIC connection's close codes mean: ours (application codes), TLS alerts, aioquic's.

Sans-I/O: :func:`close_failure` turns a ``ConnectionTerminated`` into the typed error a dialer
raises, :func:`close_args` a failed first-stream handshake into the CONNECTION_CLOSE that tells
the peer why.
"""

from __future__ import annotations

import re

from aioquic.quic import events as qe
from aioquic.quic.packet import QuicErrorCode

from ...errors import AuthenticationFailed, PeerUnreachable, ProtocolError, TensorError

ALPN = "tensord/1"

# Application error codes (CONNECTION_CLOSE, RESET_STREAM, STOP_SENDING).
E_NONE = 0x0  # closed on purpose: shutdown, stream done
E_AUTH = 0x1  # the peer failed authentication (cluster secret, node id)
E_PROTOCOL = 0x2  # the first stream's handshake failed otherwise
E_REFUSED = 0x3  # the listener is busy or shutting down
#: TLS alerts travel as QUIC transport error CRYPTO_ERROR + alert (RFC 9001 section 4.8).
CRYPTO_FIRST, CRYPTO_LAST = QuicErrorCode.CRYPTO_ERROR, QuicErrorCode.CRYPTO_ERROR + 0xFF
ALERT_CERTIFICATE_REQUIRED = 116
ALERT_NO_APPLICATION_PROTOCOL = 120


def close_failure(event: qe.ConnectionTerminated, *, by_peer: bool) -> tuple[TensorError, str]:
    """The typed error a dialer raises for a connection that ended with ``event``."""
    code, reason = event.error_code, event.reason_phrase
    if event.frame_type is not None and CRYPTO_FIRST <= code <= CRYPTO_LAST:
        alert = code - CRYPTO_FIRST
        if alert == ALERT_NO_APPLICATION_PROTOCOL:
            why = f"the peer does not speak {ALPN} over QUIC"
            return ProtocolError(why, code="bad_protocol"), why
        if by_peer:
            why = f"TLS: the peer refused our certificate: {reason or f'alert {alert}'}"
        else:
            why = f"TLS: the peer's certificate was refused: {explain_verify(reason)}"
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


def explain_verify(reason: str) -> str:
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


def close_args(failure: TensorError) -> tuple[int, str]:
    """The CONNECTION_CLOSE that tells the peer why its first stream's handshake failed."""
    if isinstance(failure, AuthenticationFailed):
        return E_AUTH, str(failure)
    code = failure.code if isinstance(failure, ProtocolError) else "protocol"
    return E_PROTOCOL, f"[{code}] {failure}"
