"""Serving the gateway on ``gateway.listen``: its own HTTP/1.1 server, the relay thread and the
backends from the cluster, as one task of the daemon.

The gateway runs in the daemon's nursery when the cluster file names at least one Ollama node
(``"ollama": "http://host:11434"`` on a node entry). Bound to a non-loopback address it requires
API keys (``gateway.api_keys_file``, one key per line, ``#`` comments): an open token endpoint on
the network is a hole in the cluster, so without keys it refuses to start.

Connections are served by :class:`~.http_server.GatewayHTTP` (WebSocket upgrades are handed to
hypercorn through tensord/control/serving.py), so that ``gateway.max_connections`` caps them (a
newcomer displaces the longest-idle connection; when every one is busy relaying it gets a 503)
and ``gateway.read_timeout`` bounds how long a request's head and body may take to arrive (a
slow or stalled body is answered 408 and closed). A reply being relayed is never cut by either:
a client may read a long token stream in silence. Streamed replies, once started, are relayed
by :class:`~.relay.Relay`'s thread.
"""

from __future__ import annotations

import logging

import httpx
import trio
from hypercorn.config import Config

from ..asgi import load_api_keys as read_api_keys
from ..config import Settings
from ..control.serving import HTTPConnections, open_http_listeners
from .app import MAX_BODY, GatewayApp
from .backends import Backends
from .http_server import GatewayHTTP
from .relay import Relay

log = logging.getLogger("tensord.gateway")


def backend_entries(settings: Settings) -> list[tuple[str, str]]:
    return [(n.id, n.ollama) for n in settings.nodes if n.ollama]


def load_api_keys(settings: Settings) -> set[str] | None:
    """The API keys clients must present, or None when the gateway is open (loopback only)."""
    g = settings.gateway
    return read_api_keys(g.api_keys_file, g.listen, "gateway")


class Gateway:
    """The gateway's backends and HTTP server, as one task of the daemon."""

    def __init__(self, settings: Settings, *, backend_limit: int = 4) -> None:
        self.settings = settings
        #: Requests one backend takes at once (Ollama's OLLAMA_NUM_PARALLEL defaults to 4).
        self.backend_limit = backend_limit
        self.api_keys = load_api_keys(settings)
        self.backends: Backends | None = None
        self.relay: Relay | None = None
        self.url = ""

    def reconfigure(self, settings: Settings) -> None:
        self.settings = settings
        if self.backends is not None:
            self.backends.update(backend_entries(settings))

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        g = self.settings.gateway
        timeout = httpx.Timeout(None, connect=5.0)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            self.backends = Backends(
                client, backend_entries(self.settings), limit=self.backend_limit
            )
            self.relay = relay = Relay()
            app = GatewayApp(
                self.backends,
                keepalive_seconds=g.keepalive_seconds,
                api_keys=self.api_keys,
                relay=relay,
            )
            config = Config()
            config.accesslog = None
            config.errorlog = logging.getLogger("tensord.gateway.http")
            config.graceful_timeout = 1.0
            # WebSocket pings as often as SSE keep-alive comments: proxies see a live socket.
            config.websocket_ping_interval = g.keepalive_seconds
            upgrades = HTTPConnections(
                app,
                config,
                max_connections=g.max_connections,
                read_timeout=g.read_timeout,
                what="gateway",
            )
            server = GatewayHTTP(
                app,
                upgrades,
                read_timeout=g.read_timeout,
                max_body=MAX_BODY,
                error_document=app.error_document,
            )
            listeners, self.url = await open_http_listeners(g.listen)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.backends.run)
                    await nursery.start(relay.run)
                    await nursery.start(trio.serve_listeners, server.serve, listeners)
                    log.info("gateway on %s, %d backends", self.url, len(self.backends.backends))
                    task_status.started(self.url)
            finally:
                self.backends.upstream.close()


__all__ = ["Gateway", "backend_entries", "load_api_keys"]
