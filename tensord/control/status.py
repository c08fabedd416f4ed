"""The JSON of ``GET /v1/status`` and ``GET /v1/peers``, built from the daemon's services.

Built on the event loop: the peer table, the node's pools and the transfer table are the loop's,
mutated by its tasks, and a worker thread iterating them races those tasks ("dictionary changed
size during iteration"). Only the store scan, which reads the disk and nothing of the loop's, runs
in a thread.
"""

from __future__ import annotations

import time
from typing import Any

import trio

from .._version import __version__
from .service import DaemonServices


def peer_list(services: DaemonServices) -> list[dict[str, Any]]:
    """The configured peers with their health and connection pool."""
    pools = services.node.pool_stats()
    out = []
    for peer_id, h in sorted(services.peers.items()):
        pool = pools.get(peer_id, {})
        out.append(
            {
                "id": peer_id,
                "addr": str(h.entry.addr),
                "state": h.state,
                "rtt_ms": None if h.rtt is None else h.rtt * 1e3,
                "failures": h.failures,
                "last_error": h.last_error,
                "pool": {k: pool.get(k, 0) for k in ("size", "idle", "in_use")},
            }
        )
    return out


async def status(services: DaemonServices) -> dict[str, Any]:
    """The node, its peers, the transfers in flight and the store's use."""
    node = services.node
    doc: dict[str, Any] = {
        "node_id": node.node_id,
        "version": __version__,
        "uptime": time.time() - services.started_at,
        "listen": node.addr,
        "cluster": services.settings.cluster_name,
        "peers": peer_list(services),
        "transfers": services.transfers.in_flight(),
    }
    store = services.store
    tensors, used = await trio.to_thread.run_sync(lambda: (len(store.list()), store.used_bytes()))
    doc["store"] = {
        "root": str(store.root),
        "tensors": tensors,
        "used_bytes": used,
        "max_bytes": store.max_bytes,
    }
    return doc
