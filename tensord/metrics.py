"""Prometheus metrics: the gateway, transfers and downloads, under stable names.

One registry per process (not the library's global one), served as Prometheus text on the
gateway's ``GET /metrics`` and the control socket's ``GET /metrics``. The names are part of the
interface (dashboards depend on them): README lists them; change them only with a note.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

GATEWAY_REQUESTS = Counter(
    "tensord_gateway_requests",
    "Generation requests by endpoint, backend and outcome (ok, client_gone, cancelled, "
    "backend_error, no_backend, busy, bad_request)",
    ["endpoint", "backend", "outcome"],
    registry=REGISTRY,
)
GATEWAY_TTFT = Histogram(
    "tensord_gateway_time_to_first_token_seconds",
    "From the request to the first token relayed",
    ["endpoint"],
    buckets=_LATENCY,
    registry=REGISTRY,
)
GATEWAY_INTER_TOKEN = Histogram(
    "tensord_gateway_inter_token_seconds",
    "Gaps between consecutive relayed token chunks",
    ["endpoint"],
    buckets=_LATENCY,
    registry=REGISTRY,
)
GATEWAY_TOKENS = Counter(
    "tensord_gateway_tokens",
    "Token chunks relayed (for a whole reply, the completion tokens it reports)",
    ["backend"],
    registry=REGISTRY,
)
GATEWAY_IN_FLIGHT = Gauge(
    "tensord_gateway_in_flight", "Requests being relayed now", ["backend"], registry=REGISTRY
)
TRANSFERS = Counter(
    "tensord_transfers",
    "Tensor transfers finished, by direction (send, receive) and outcome (done, failed, "
    "interrupted)",
    ["direction", "outcome"],
    registry=REGISTRY,
)
TRANSFER_BYTES = Counter(
    "tensord_transfer_bytes",
    "Bytes of tensors transferred completely",
    ["direction"],
    registry=REGISTRY,
)
DOWNLOADS = Counter(
    "tensord_downloads",
    "Background downloads finished, by outcome (done, failed, cancelled)",
    ["outcome"],
    registry=REGISTRY,
)
DOWNLOAD_BYTES = Counter(
    "tensord_download_bytes", "Bytes of completed downloads", registry=REGISTRY
)
DOWNLOAD_SOURCE_BYTES = Counter(
    "tensord_download_source_bytes",
    "Blob bytes downloaded, by source (origin: the registry or URL; peer: another node of the "
    "cluster, peer-first downloads)",
    ["source"],
    registry=REGISTRY,
)
UNEXPECTED_ERRORS = Counter(
    "tensord_unexpected_errors",
    "Unexpected exceptions stopped at an error boundary, by boundary (peer, quic, control, "
    "gateway, download): each is a bug; only the connection or job it hit was closed",
    ["boundary"],
    registry=REGISTRY,
)
PEER_CONNECTIONS_DROPPED = Counter(
    "tensord_peer_connections_dropped",
    "Inbound peer connections closed before they authenticated, by reason (budget: the oldest "
    "unauthenticated one made room for a newer one; limit: max_connections was reached; "
    "deadline: no authenticated hello in transfer.handshake_timeout)",
    ["reason"],
    registry=REGISTRY,
)


def exposition() -> tuple[bytes, str]:
    """The metrics in Prometheus text format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


__all__ = [
    "DOWNLOADS",
    "DOWNLOAD_BYTES",
    "DOWNLOAD_SOURCE_BYTES",
    "GATEWAY_INTER_TOKEN",
    "GATEWAY_IN_FLIGHT",
    "GATEWAY_REQUESTS",
    "GATEWAY_TOKENS",
    "GATEWAY_TTFT",
    "PEER_CONNECTIONS_DROPPED",
    "REGISTRY",
    "TRANSFERS",
    "TRANSFER_BYTES",
    "UNEXPECTED_ERRORS",
    "exposition",
]
