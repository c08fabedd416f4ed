"""tensord: moves tensors between the machines of an LLM cluster."""

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .config import Settings, load_settings
from .errors import (
    AuthenticationFailed,
    BadAddress,
    ConfigError,
    NodeClosed,
    PeerUnreachable,
    ProtocolError,
    TensorError,
    TensorNotFound,
    TransferFailed,
)

if TYPE_CHECKING:
    from .control.client import AsyncClient, Client


def __getattr__(name: str) -> Any:
    """``tensord.Client``/``AsyncClient``, imported on first use so that ``import tensord``
    stays light (no httpx) for the daemon and for library nodes."""
    if name in ("Client", "AsyncClient"):
        from .control import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AsyncClient",
    "AuthenticationFailed",
    "BadAddress",
    "Client",
    "ConfigError",
    "NodeClosed",
    "PeerUnreachable",
    "ProtocolError",
    "Settings",
    "TensorError",
    "TensorNotFound",
    "TransferFailed",
    "__version__",
    "load_settings",
]
