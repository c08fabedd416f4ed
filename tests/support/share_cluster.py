"""Three real daemons in one cluster, each with every peer up, and the small model they pull
from the CNCF registry: shared by the peer-first download tests (test_share) and the remote
pull tests (test_remote_pull)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import trio

from .cluster import write_cluster_file
from .control_api import events, http, ready
from .counting_proxy import CountingProxy
from .daemons import Daemon, daemon, free_port

MiB = 1 << 20
NODES = ("a", "b", "c")


def layers() -> list[bytes]:
    rng = np.random.default_rng(14)
    return [rng.integers(0, 255, n * MiB, dtype=np.uint8).tobytes() for n in (20, 16, 12)]


@asynccontextmanager
async def three_nodes(tmp: Path, **downloads: Any) -> AsyncIterator[dict[str, Daemon]]:
    """a, b and c in one cluster, each with every peer up."""
    ports = {n: free_port() for n in NODES}
    cluster = write_cluster_file(
        tmp / "cluster.json",
        ports,
        name="share",
        transfer={"peer_check_interval": 0.2},
        downloads={"piece_size": 256 * 1024, "connections": 4, **downloads},
    )
    async with AsyncExitStack() as stack:
        nodes: dict[str, Daemon] = {}
        for n in NODES:
            home = tmp / n
            home.mkdir()
            env = {"TENSORD_NODE_ID": n, "TENSORD_LISTEN": f"127.0.0.1:{ports[n]}"}
            nodes[n] = await stack.enter_async_context(
                daemon(env, "--cluster", str(cluster), home=home)
            )
        for n, d in nodes.items():
            await ready(d)
            for peer in NODES:
                if peer != n:
                    await d.wait_for(f"peer {peer} is up")
        yield nodes


async def pull(d: Daemon, model: str) -> dict[str, Any]:
    """Pull ``model`` on ``d`` through its control API; returns the finished job."""
    async with http(d) as c, events(d) as seen:
        r = await c.post("/v1/downloads", json={"model": model})
        assert r.status_code == 202, r.text
        job = r.json()
        with trio.fail_after(120):
            async for _, ev in seen:
                mine = ev["kind"] == "download" and ev["id"] == job["id"]
                if mine and ev["state"] in ("done", "failed", "cancelled"):
                    assert ev["state"] == "done", ev
                    break
        got = (await c.get(f"/v1/downloads/{job['id']}")).json()
    assert got["state"] == "done", got
    return got  # type: ignore[no-any-return]


async def pull_all(nodes: dict[str, Daemon], model: str) -> dict[str, dict[str, Any]]:
    jobs: dict[str, dict[str, Any]] = {}

    async def one(n: str) -> None:
        jobs[n] = await pull(nodes[n], model)

    async with trio.open_nursery() as nursery:
        for n in nodes:
            nursery.start_soon(one, n)
    return jobs


def assert_blobs_exact(d: Daemon, data: list[bytes]) -> None:
    blobs = d.home / "state" / "models" / "blobs"
    for content in data:
        path = blobs / ("sha256-" + hashlib.sha256(content).hexdigest())
        assert path.read_bytes() == content
    assert not list(blobs.glob("*.incomplete*"))


def origin_bytes(job: dict[str, Any]) -> int:
    return sum(by.get("origin", 0) for by in job["sources"].values())


def peer_bytes(job: dict[str, Any]) -> int:
    return sum(n for by in job["sources"].values() for s, n in by.items() if s != "origin")


def registry_model(proxy: CountingProxy, reg_push: Any, data: list[bytes]) -> str:
    """Push the model; its reference through the counting proxy."""
    reg_push("models/shared", "v1", data)
    return f"http://{proxy.host}/models/shared:v1"
