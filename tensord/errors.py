"""Typed errors. Every message a user sees names the cause and, where there is one, the remedy."""

from __future__ import annotations


class TensorError(Exception):
    """Base class of every error tensord raises on purpose."""


class ConfigError(TensorError):
    """The configuration is invalid. The CLI turns it into one line and exit status 78."""

    exit_code = 78  # EX_CONFIG from sysexits.h


class BadAddress(TensorError):
    """A peer address or ticket could not be parsed, or names no known node."""


class PeerUnreachable(TensorError):
    """Every attempt to connect to a peer failed (refused, timed out, or handshake refused)."""


class ProtocolError(TensorError):
    """A peer sent bytes that break the protocol: bad frame, unknown message, wrong state."""

    def __init__(self, message: str, code: str = "protocol") -> None:
        super().__init__(message)
        self.code = code


class TensorNotFound(TensorError):
    """A pulled tensor does not exist on the peer."""


class TransferFailed(TensorError):
    """A transfer could not be completed after all retries, or the peer refused it."""

    def __init__(self, message: str, code: str = "failed") -> None:
        super().__init__(message)
        self.code = code


class AuthenticationFailed(TransferFailed):
    """A peer could not prove it belongs to the cluster (cluster secret, TLS certificate), or
    refused our proof. Never retried: the same keys would fail the same way."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="auth")


class BadTensor(TensorError, ValueError):
    """A tensor given to tensord cannot be sent: bad name, unsupported dtype, wrong size."""


class NodeClosed(TensorError):
    """The node was shut down (or never started) when the call was made or while it ran."""
