"""An in-process token gateway in front of in-repo Ollama-compatible backends, for the gateway
tests (SSE, WebSocket, logs and metrics): :func:`gateway` starts one backend per
:class:`BackendConfig` and a :class:`Gateway` that routes to them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace

import trio

from tensord.config import GatewaySettings, HostPort, NodeEntry, Settings
from tensord.gateway.server import Gateway

from .ollama_backend import BackendConfig, OllamaBackend, ollama_backend

#: What the backends generate unless a test says otherwise, and a one-message chat.
TOKENS = [f"tok{i} " for i in range(20)]
MSG = [{"role": "user", "content": "hi"}]


def gateway_settings(backends: list[OllamaBackend], **gateway: object) -> Settings:
    """Library settings whose nodes are ``backends`` (gpu-0, gpu-1...), gateway on any port."""
    nodes = tuple(
        NodeEntry(f"gpu-{i}", HostPort("127.0.0.1", 7070 + i), b.url)
        for i, b in enumerate(backends)
    )
    g = replace(GatewaySettings(listen=HostPort("127.0.0.1", 0)), **gateway)  # type: ignore[arg-type]
    return replace(Settings.for_library(), nodes=nodes, gateway=g)


@asynccontextmanager
async def gateway(
    *configs: BackendConfig, **gw: object
) -> AsyncIterator[tuple[Gateway, list[OllamaBackend]]]:
    """A running gateway (``gw``: its settings) in front of one backend per config."""
    async with AsyncExitStack() as stack:
        backends = [await stack.enter_async_context(ollama_backend(c)) for c in configs]
        g = Gateway(gateway_settings(backends, **gw))
        nursery = await stack.enter_async_context(trio.open_nursery())
        await nursery.start(g.run)
        yield g, backends
        nursery.cancel_scope.cancel()


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes the connection (or resets it)."""
    out = b""
    while True:
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return out
        if not data:
            return out
        out += data
