"""tensord: moves tensors between the machines of an LLM cluster.

The public API is this namespace::

    from tensord import TensorNode, TransferResult, Arrival   # a library node (numpy, trio)
    from tensord import Client, AsyncClient                   # a local daemon's control socket
    from tensord import Settings, load_settings, errors       # configuration, typed errors
    from tensord import TensorError, TransferFailed, ...      # every public error, also here

Everything else (``tensord.node``, ``tensord.net``, ``tensord.wire`` ...) is the implementation:
importable, but free to change between releases. ``import tensord`` stays light: the node
(numpy), the async client (httpx) and even the settings (their specs) are imported on first use
of their names, as trio re-exports its private modules without paying for what a program does
not use: the ``tensord`` command imports this package before anything, at every start.
"""

from typing import TYPE_CHECKING, Any

from . import errors
from ._version import __version__
from .errors import (
    AuthenticationFailed,
    BadAddress,
    BadTensor,
    ConfigError,
    ControlError,
    DaemonNotRunning,
    DestinationMismatch,
    DownloadError,
    DownloadNotFound,
    NodeClosed,
    PeerUnreachable,
    ProtocolError,
    StoreFull,
    TensorError,
    TensorNotFound,
    TransferFailed,
)

if TYPE_CHECKING:
    from .config import Settings, load_settings
    from .control.blocking import Client
    from .control.client import AsyncClient
    from .node import Arrival, TensorNode, TransferResult

#: Public names imported on first use, and the module each comes from.
_LAZY = {
    "TensorNode": "tensord.node",
    "TransferResult": "tensord.node",
    "Arrival": "tensord.node",
    "Client": "tensord.control.blocking",
    "AsyncClient": "tensord.control.client",
    "Settings": "tensord.config",
    "load_settings": "tensord.config",
}


def __getattr__(name: str) -> Any:
    """Import the heavy public names (numpy for the node, httpx for the async client, the
    settings' specs) on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute read
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "Arrival",
    "AsyncClient",
    "AuthenticationFailed",
    "BadAddress",
    "BadTensor",
    "Client",
    "ConfigError",
    "ControlError",
    "DaemonNotRunning",
    "DestinationMismatch",
    "DownloadError",
    "DownloadNotFound",
    "NodeClosed",
    "PeerUnreachable",
    "ProtocolError",
    "Settings",
    "StoreFull",
    "TensorError",
    "TensorNode",
    "TensorNotFound",
    "TransferFailed",
    "TransferResult",
    "__version__",
    "errors",
    "load_settings",
]
