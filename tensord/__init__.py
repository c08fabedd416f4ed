"""tensord: moves tensors between the machines of an LLM cluster."""

from ._version import __version__
from .config import Settings, load_settings
from .errors import (
    BadAddress,
    ConfigError,
    NodeClosed,
    PeerUnreachable,
    ProtocolError,
    TensorError,
    TensorNotFound,
    TransferFailed,
)

__all__ = [
    "BadAddress",
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
