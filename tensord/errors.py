"""Typed errors. Every message a user sees names the cause and, where there is one, the remedy.

Each class states, once, how the control API answers it (``http_status`` and ``http_code``,
docs/CONTROL.md's table): the server turns any of them into that reply, and the client turns
the reply back into the same class (:func:`error_for_code`), instead of two hand-written tables
that could drift (httpx's ``_exceptions.py`` is the model).
"""

from __future__ import annotations

from typing import ClassVar


class TensorError(Exception):
    """Base class of every error tensord raises on purpose."""

    http_status: ClassVar[int] = 400
    http_code: ClassVar[str] = "bad_request"

    def http(self) -> tuple[int, str]:
        """The control API's status and code for this error."""
        return self.http_status, self.http_code


class ConfigError(TensorError):
    """The configuration is invalid. The CLI turns it into one line and exit status 78."""

    exit_code = 78  # EX_CONFIG from sysexits.h
    http_code = "config"


class BadAddress(TensorError):
    """A peer address or ticket could not be parsed, or names no known node."""

    http_status = 404
    http_code = "unknown_peer"


class PeerUnreachable(TensorError):
    """Every attempt to connect to a peer failed (refused, timed out, or handshake refused)."""

    http_status = 502
    http_code = "peer_unreachable"


class ProtocolError(TensorError):
    """A peer sent bytes that break the protocol: bad frame, unknown message, wrong state."""

    def __init__(self, message: str, code: str = "protocol") -> None:
        super().__init__(message)
        self.code = code


class TensorNotFound(TensorError):
    """A pulled tensor does not exist on the peer."""

    http_status = 404
    http_code = "not_found"


class TransferFailed(TensorError):
    """A transfer could not be completed after all retries, or the peer refused it."""

    http_status = 502
    http_code = "transfer_failed"

    def __init__(self, message: str, code: str = "failed") -> None:
        super().__init__(message)
        self.code = code

    def http(self) -> tuple[int, str]:
        # A receiver that ran out of space answers ``quota``: the store's own error, not a fault.
        return (
            (StoreFull.http_status, StoreFull.http_code)
            if self.code == "quota"
            else (
                self.http_status,
                self.http_code,
            )
        )


class AuthenticationFailed(TransferFailed):
    """A peer could not prove it belongs to the cluster (cluster secret, TLS certificate), or
    refused our proof. Never retried: the same keys would fail the same way."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="auth")


class BadTensor(TensorError, ValueError):
    """A tensor given to tensord cannot be sent: bad name, unsupported dtype, wrong size."""


class DestinationMismatch(TensorError, ValueError):
    """The array given to receive into (``receive_tensor(into=...)``, ``pull_tensor(out=...)``)
    cannot hold the tensor: another shape or dtype, not C-contiguous, or read-only. Raised
    before any byte of the tensor lands in it, so the caller's array is untouched."""

    code = "destination_mismatch"
    http_code = "destination_mismatch"


class NodeClosed(TensorError):
    """The node was shut down (or never started) when the call was made or while it ran."""

    http_status = 503
    http_code = "node_closed"


class StoreFull(TensorError):
    """The store's size cap or the disk would be exceeded: the tensor was not stored.

    ``code`` is the protocol error code a receiver answers with (``quota``).
    """

    code = "quota"
    http_status = 507
    http_code = "quota"


class DownloadError(TensorError):
    """A blob could not be downloaded: the message names the URL, status and range."""

    http_code = "download"


class DownloadNotFound(DownloadError):
    """No download job has that id."""

    http_status = 404


class ControlError(TensorError):
    """The daemon refused a request with a code no class above stands for (``code`` and HTTP
    ``status`` as it answered them), or could not be talked to at all (``status`` 0).

    Raised by the control client (:mod:`tensord.control.client`), never by the daemon: should
    one reach the control server it is answered with its own code, and 502 when it carries no
    status of its own (an upstream failure, as a proxy would say).
    """

    http_status = 502
    http_code = "error"

    def __init__(self, message: str, *, code: str | None = None, status: int = 0) -> None:
        super().__init__(message)
        self.code = self.http_code if code is None else code
        self.status = status

    def http(self) -> tuple[int, str]:
        return self.status or self.http_status, self.code


class DaemonNotRunning(ControlError):
    """Nothing listens on the control socket: the message says where it looked and how to start
    the daemon. The CLI exits 69 (EX_UNAVAILABLE) on it."""

    http_status = 503
    http_code = "not_running"

    def __init__(self, message: str) -> None:
        super().__init__(message)


#: Control API codes the client turns back into these classes (constructed from the message).
_BY_CODE: dict[str, type[TensorError]] = {
    cls.http_code: cls
    for cls in (TensorNotFound, PeerUnreachable, BadAddress, StoreFull, ConfigError)
}


def error_for_code(code: str, message: str) -> TensorError | None:
    """The typed error a control API reply's ``code`` stands for, or None for other codes."""
    if code == TransferFailed.http_code:
        return TransferFailed(message, code=code)
    cls = _BY_CODE.get(code)
    return cls(message) if cls is not None else None
