"""Serving the mirror: hypercorn's trio worker on ``mirror.listen``, over the model directory.

Started by the daemon when ``mirror.listen`` is set. Bound to a non-loopback address it needs
its clients authenticated - API keys (``mirror.api_keys_file``) or TLS client certificates
(``mirror.tls.client_ca``): a registry anyone on the network can read is a way to make the
cluster download whatever they name, so without either it refuses to start (exit 78, like the
gateway; the check is the gateway's, :func:`tensord.asgi.load_api_keys`). With ``mirror.tls``
each accepted connection is wrapped in TLS here, before hypercorn sees it (hypercorn's
``TCPServer`` does the handshake and serves a TLS stream as ``https``); the context is built at
start-up, so a missing or unreadable certificate is a configuration error, not a failing
connection. Connections go through the same cap and request deadline as the gateway's
(:class:`~tensord.control.serving.HTTPConnections`): ``mirror.max_connections``,
``mirror.read_timeout``.
"""

from __future__ import annotations

import logging
import ssl
from typing import cast

import httpx
import trio
from hypercorn.config import Config

from ..asgi import load_api_keys
from ..config import Settings
from ..config.settings import ServerTlsSettings
from ..control.serving import HTTPConnections, open_http_listeners
from ..download.manager import DownloadManager
from ..errors import ConfigError
from ..events import EventBus
from .app import MirrorApp
from .misses import Misses
from .reply import ABORT
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
        self.api_keys = load_api_keys(
            m.api_keys_file, m.listen, "mirror", client_certs=client_certs(m.tls)
        )
        self.tls = server_tls_context(m.tls, "mirror") if m.tls is not None else None
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
            config.ssl_handshake_timeout = m.read_timeout
            server = HTTPConnections(
                app,
                config,
                max_connections=m.max_connections,
                read_timeout=m.read_timeout,
                what="mirror",
            )
            listeners, url = await open_http_listeners(m.listen)
            self.url = url if self.tls is None else "https://" + url.removeprefix("http://")
            tls = self.tls

            async def serve(stream: trio.SocketStream) -> None:
                # HTTPConnections and hypercorn take any stream; TCPServer sees the TLS one.
                wrapped = stream if tls is None else trio.SSLStream(stream, tls, server_side=True)
                with trio.CancelScope() as connection:
                    # A reply cut short drops the connection (see .reply): the serve ends and
                    # HTTPConnections closes the stream.
                    extensions = {ABORT: connection.cancel}
                    await server.serve(cast(trio.SocketStream, wrapped), extensions)

            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, serve, listeners)
                log.info(
                    "mirror on %s (upstream %s)%s%s",
                    self.url,
                    m.upstream or "the client's ns, else registry.ollama.ai",
                    ", API keys required" if self.api_keys is not None else "",
                    ", client certificates required" if client_certs(m.tls) else "",
                )
                task_status.started(self.url)


def client_certs(tls: ServerTlsSettings | None) -> bool:
    return tls is not None and tls.client_ca is not None


def server_tls_context(tls: ServerTlsSettings, section: str) -> ssl.SSLContext:
    """The server side of TLS for an HTTP listener: TLS 1.2 or later, HTTP/1.1 by ALPN, and
    with ``client_ca`` a certificate required of every client. Unreadable files are a
    :class:`ConfigError` naming the setting."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{section}.tls: cannot load the certificate {tls.cert} with the key {tls.key}: "
            f"{exc}; check both paths and that the key matches the certificate"
        ) from None
    if tls.client_ca is not None:
        try:
            ctx.load_verify_locations(tls.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"{section}.tls.client_ca: cannot load {tls.client_ca}: {exc}; give the PEM "
                "file of the CA that signs client certificates"
            ) from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


__all__ = ["Mirror", "server_tls_context"]
