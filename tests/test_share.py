"""Peer-first downloads between three real daemons on loopback, pulling from the CNCF registry
behind an nginx that counts what it served: nodes that pull together read each blob from the
registry about once; a node that has the model serves the others; with sharing off each node
pulls everything itself (the behaviour before issue 14)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import httpx
import numpy as np
import pytest

from tensord.cluster.holdings import Holdings
from tensord.cluster.sharing import Sharing
from tensord.download.fetch import FetchConfig
from tensord.download.shared_fetch import SharedBlobFetch
from tensord.wire.messages import BlobEntry

from .support.control_api import http
from .support.counting_proxy import counting_proxy
from .support.nginx import nginx
from .support.registry import registry
from .support.share_cluster import (
    MiB,
    assert_blobs_exact,
    layers,
    origin_bytes,
    peer_bytes,
    pull,
    pull_all,
    registry_model,
    three_nodes,
)


async def test_nodes_pulling_together_read_each_blob_from_the_registry_about_once(
    tmp_path: Path,
) -> None:
    data = layers()
    total = sum(map(len, data))
    with registry(tmp_path) as reg, counting_proxy(tmp_path, reg.host) as proxy:
        model = registry_model(proxy, reg.push_model, data)
        async with three_nodes(tmp_path) as nodes:
            jobs = await pull_all(nodes, model)
            for d in nodes.values():
                assert_blobs_exact(d, data)
            # What the nodes said about their peers, for the message of a failure below.
            said = [ln for d in nodes.values() for ln in d.text.splitlines() if " share " in ln]
            async with http(nodes["a"]) as c:
                text = (await c.get("/metrics")).text
            found = re.search(r'tensord_download_source_bytes_total\{source="peer"\} (\S+)', text)
            assert found and float(found[1]) == peer_bytes(jobs["a"]) > 0
        served = proxy.blob_bytes()
        sources = {n: j["sources"] for n, j in jobs.items()}
        # Independent pulls read 3x. A piece whose owner looks slow (a loaded machine) is
        # re-read from the registry by design, so the bound is one no healthy run can miss;
        # the figure against the 1.05x target is bench/cluster.py's.
        assert served <= 1.5 * total, (served, total, sources, said)
        # Every byte is accounted to its source, and the nodes did share.
        assert sum(origin_bytes(j) for j in jobs.values()) <= 1.5 * total
        assert sum(peer_bytes(j) for j in jobs.values()) >= total


async def test_a_node_that_has_the_model_serves_it_the_registry_only_manifests(
    tmp_path: Path,
) -> None:
    data = layers()
    with registry(tmp_path) as reg, counting_proxy(tmp_path, reg.host) as proxy:
        model = registry_model(proxy, reg.push_model, data)
        async with three_nodes(tmp_path) as nodes:
            first = await pull(nodes["a"], model)
            assert origin_bytes(first) == first["bytes_total"]
            before = len(proxy.log())
            jobs = await pull_all({n: nodes[n] for n in ("b", "c")}, model)
            for d in nodes.values():
                assert_blobs_exact(d, data)
        later = proxy.log()[before:]
        assert later and all("/manifests/" in s.uri for s in later), [s.uri for s in later][:5]
        for job in jobs.values():
            assert origin_bytes(job) == 0 and peer_bytes(job) == job["bytes_total"], job


async def test_with_sharing_off_each_node_pulls_everything_itself(tmp_path: Path) -> None:
    data = layers()
    total = sum(map(len, data))
    with registry(tmp_path) as reg, counting_proxy(tmp_path, reg.host) as proxy:
        model = registry_model(proxy, reg.push_model, data)
        async with three_nodes(tmp_path, share=False) as nodes:
            jobs = await pull_all(nodes, model)
            for d in nodes.values():
                assert_blobs_exact(d, data)
        assert proxy.blob_bytes() >= 3 * total
        for job in jobs.values():
            assert peer_bytes(job) == 0 and origin_bytes(job) == job["bytes_total"], job


# -- one fetch against fake peers: failures are re-planned, nothing corrupt is committed ------

PIECE = 256 * 1024


class FakePeers:
    """Peers as the sharing code sees them (:class:`PieceNetwork`): each holds the whole blob
    and serves it well (``good``), flipped (``corrupt``) or not at all (``dead``)."""

    def __init__(self, blob: bytes, peers: dict[str, str]) -> None:
        self.node_id = "me"
        self.holdings = Holdings(None, PIECE)
        self.io_timeout = 5.0
        self.blob = blob
        self.peers = peers
        self.digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        self.served: dict[str, int] = {p: 0 for p in peers}

    def _reach(self, peer: str) -> None:
        if self.peers[peer] == "dead":
            raise OSError(f"connection to {peer} refused")

    async def query(self, peer: str, digest: str) -> BlobEntry | None:
        self._reach(peer)
        return BlobEntry.whole(digest, len(self.blob), PIECE) if digest == self.digest else None

    async def announce(self, peer: str, entry: BlobEntry) -> None:
        self._reach(peer)

    async def fetch_range(self, peer: str, digest: str, offset: int, into: memoryview) -> None:
        self._reach(peer)
        data = self.blob[offset : offset + len(into)]
        if self.peers[peer] == "corrupt":
            data = bytes(b ^ 0xFF for b in data[:16]) + data[16:]
        into[:] = data
        self.served[peer] += len(into)


async def fetch_with(tmp: Path, peers: dict[str, str]) -> tuple[FakePeers, SharedBlobFetch, int]:
    """Fetch a 3 MiB blob from nginx with ``peers``; returns the fakes, the fetch and the bytes
    nginx served."""
    blob = np.random.default_rng(7).integers(0, 255, 3 * MiB, dtype=np.uint8).tobytes()
    net = FakePeers(blob, peers)
    sharing = Sharing(net, lambda: list(peers), lambda: None, PIECE)
    with nginx(tmp) as web:
        (web.root / "blob").write_bytes(blob)
        async with httpx.AsyncClient() as client:
            fetch = SharedBlobFetch(
                client,
                web.url("files", "blob"),
                tmp / "out",
                size=len(blob),
                sha256=net.digest.removeprefix("sha256:"),
                config=FetchConfig(connections=3, min_piece=PIECE),
                peers=sharing,
            )
            await fetch.run()
        origin = sum(x.sent for x in web.log() if x.uri.endswith("/blob"))
    assert (tmp / "out").read_bytes() == blob
    assert net.holdings.in_flight(net.digest) is None  # finished or abandoned, never left over
    return net, fetch, origin


async def test_pieces_come_from_a_live_peer_and_a_dead_one_is_skipped(tmp_path: Path) -> None:
    net, fetch, origin = await fetch_with(tmp_path, {"dead": "dead", "good": "good"})
    assert origin == 0
    assert fetch.sources == {"good": 3 * MiB}
    assert net.holdings.source(net.digest) is not None  # served as a complete blob from now on


async def test_a_corrupt_peer_is_caught_by_the_digest_and_the_blob_refetched_from_the_origin(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    net, fetch, origin = await fetch_with(tmp_path, {"liar": "corrupt"})
    assert net.served["liar"] == 3 * MiB  # the first attempt took all of it from the liar ...
    assert origin >= 3 * MiB  # ... the second, from the origin alone
    assert fetch.sources["origin"] == 3 * MiB
    assert "pieces from liar fails its digest" in caplog.text


async def test_with_sharing_off_the_fetch_is_the_plain_one(tmp_path: Path) -> None:
    blob = b"x" * (PIECE + 5)
    net = FakePeers(blob, {"good": "good"})
    sharing = Sharing(net, lambda: ["good"], lambda: False, PIECE)
    assert not sharing.available()
    with nginx(tmp_path) as web:
        (web.root / "blob").write_bytes(blob)
        async with httpx.AsyncClient() as client:
            fetch = SharedBlobFetch(
                client,
                web.url("files", "blob"),
                tmp_path / "out",
                sha256=net.digest.removeprefix("sha256:"),
                peers=sharing,
            )
            await fetch.run()
    assert fetch.sources == {"origin": len(blob)} and net.served["good"] == 0
