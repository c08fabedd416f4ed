"""Serving the mirror: hypercorn's trio worker on ``mirror.listen``, over the model directory.

Started by the daemon when ``mirror.listen`` is set. Bound to a non-loopback address it needs
API keys (``mirror.api_keys_file``): a registry anyone on the network can read is a way to make
the cluster download whatever they name, so without keys it refuses to start (exit 78, like the
gateway). Connections go through the same cap and request deadline as the gateway's
(:class:`~tensord.control.serving.HTTPConnections`): ``mirror.max_connections``,
``mirror.read_timeout``.
"""

from __future__ import annotations

import logging

import httpx
import trio
from hypercorn.config import Config

from ..asgi import load_api_keys
from ..config import Settings
from ..control.serving import HTTPConnections, open_http_listeners
from ..download.manager import DownloadManager
from ..events import EventBus
from .app import MirrorApp
from .misses import Misses
from .store import ModelDir

log = logging.getLogger("tensord.mirror")


class Mirror:
    """The OCI mirror's HTTP server, as one task of the daemon."""

    def __init__(self, settings: Settings, downloads: DownloadManager, events: EventBus) -> None:
        m = settings.mirror
        assert m.listen is not None, "the daemon starts the mirror only when it has a listener"
        self.settings = settings
        self.downloads = downloads
        self.events = events
        self.api_keys = load_api_keys(m.api_keys_file, m.listen, "mirror")
        self.url = ""

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        m = self.settings.mirror
        assert m.listen is not None
        models = ModelDir(self.downloads.root)
        timeout = httpx.Timeout(30.0, connect=10.0)
        async with httpx.AsyncClient(timeout=timeout) as client:
            misses = Misses(
                models,
                self.downloads,
                self.events,
                client,
                credentials_file=self.settings.downloads.credentials_file,
                max_bytes=self.settings.downloads.max_bytes,
            )
            app = MirrorApp(models, misses, upstream=m.upstream, api_keys=self.api_keys)
            config = Config()
            config.accesslog = None
            config.errorlog = logging.getLogger("tensord.mirror.http")
            config.graceful_timeout = 1.0
            server = HTTPConnections(
                app,
                config,
                max_connections=m.max_connections,
                read_timeout=m.read_timeout,
                what="mirror",
            )
            listeners, self.url = await open_http_listeners(m.listen)
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, server.serve, listeners)
                log.info(
                    "mirror on %s (upstream %s)%s",
                    self.url,
                    m.upstream or "the client's ns, else registry.ollama.ai",
                    ", API keys required" if self.api_keys is not None else "",
                )
                task_status.started(self.url)


__all__ = ["Mirror"]
