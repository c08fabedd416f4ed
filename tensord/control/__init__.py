"""The control API: HTTP/JSON over a local Unix socket (docs/CONTROL.md).

``server`` serves it from the daemon (hypercorn, peers vetted with ``SO_PEERCRED``), ``app`` is
the ASGI application; the client side is ``tensord.Client`` / ``tensord.AsyncClient``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import AsyncClient, Client, ControlError, DaemonNotRunning

_CLIENT_EXPORTS = ("AsyncClient", "Client", "ControlError", "DaemonNotRunning")


def __getattr__(name: str) -> Any:
    """The client, imported on first use: the daemon imports this package for its server and
    needs none of httpx."""
    if name in _CLIENT_EXPORTS:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AsyncClient", "Client", "ControlError", "DaemonNotRunning"]
