"""``tensord pull-model NAME --on all|b,c``: a node asks its peers to pull a model over the peer
protocol (feature ``remote_pull``) and they share the pieces. Three real daemons and the CNCF
registry; library nodes for the peers that cannot (an older tensord, a node without a download
manager, a hostile reply); the wire message's bounds; the CLI's progress text of sources."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from tensord.cli.progress import download_info
from tensord.cli.render import sources_summary
from tensord.cluster.remote_pull import RemotePullError, RemotePullUnsupported, request_pull
from tensord.errors import DownloadError, ProtocolError
from tensord.wire.handshake import ALL_FEATURES
from tensord.wire.messages import PullModel, PullStarted, from_header, to_header

from .support.cli import run
from .support.control_api import events, http
from .support.counting_proxy import counting_proxy
from .support.helpers import running
from .support.registry import registry
from .support.share_cluster import (
    MiB,
    assert_blobs_exact,
    layers,
    registry_model,
    three_nodes,
)

# -- the wire message ----------------------------------------------------------------------------


def test_pull_model_round_trips_and_is_bounded() -> None:
    for msg in (PullModel("http://[::1]:5000/models/x:v1"), PullStarted("0123456789ab")):
        assert from_header(to_header(msg), 1 << 20) == msg
    for bad in ("", "a" * 513, "x y", "x\n", "-x", 7, None):
        with pytest.raises(ProtocolError):
            from_header({"t": "pullmodel", "m": bad}, 1 << 20)
    with pytest.raises(ProtocolError):
        from_header({"t": "pullstarted", "j": "../../etc"}, 1 << 20)


# -- library nodes: who cannot or will not pull -----------------------------------------------


async def test_a_peer_without_the_feature_is_refused_at_once() -> None:
    async with running(features=ALL_FEATURES - {"remote_pull"}) as old, running() as new:
        with pytest.raises(RemotePullUnsupported, match="older tensord"):
            await request_pull(new, old.addr, "models/x:v1")
        assert await new.ping(old.addr) >= 0  # the connection is still fine


async def test_a_node_without_a_download_manager_says_so_and_a_hook_starts_the_job() -> None:
    async with running() as asker, running() as other:
        with pytest.raises(RemotePullUnsupported, match="takes no pull requests"):
            await request_pull(asker, other.addr, "models/x:v1")
        asked: list[tuple[str, str]] = []

        def hook(peer: str, ref: str) -> str:
            if ref.startswith("bad"):
                raise DownloadError(f"bad model reference {ref!r}")
            asked.append((peer, ref))
            return "00c0ffee00c0"

        other.on_pull_request = hook
        assert await request_pull(asker, other.addr, "models/x:v1") == "00c0ffee00c0"
        assert asked == [(asker.node_id, "models/x:v1")]
        with pytest.raises(RemotePullError, match="bad model reference") as err:
            await request_pull(asker, other.addr, "bad:")
        assert err.value.code == "download"
        # The refusal left the connection usable.
        assert await request_pull(asker, other.addr, "models/y") == "00c0ffee00c0"


async def test_a_peer_failing_on_the_request_is_an_error_and_the_asker_carries_on() -> None:
    async with running() as asker, running() as other:

        def hook(peer: str, ref: str) -> str:
            raise RuntimeError("a bug in the peer")

        other.on_pull_request = hook
        with pytest.raises(RemotePullError, match="internal error") as err:
            await request_pull(asker, other.addr, "models/x:v1")
        assert err.value.code == "internal"
        assert await asker.ping(other.addr) >= 0


# -- three daemons ---------------------------------------------------------------------------------


async def job_states(node: Any) -> dict[str, str]:
    async with http(node) as c:
        jobs = (await c.get("/v1/downloads")).json()["downloads"]
    return {j["id"]: j["state"] for j in jobs}


async def wait_done(node: Any, job_id: str) -> dict[str, Any]:
    """Follow ``job_id`` on ``node``'s events until it ends; the job as it ended."""
    async with http(node) as c, events(node) as seen:
        job = (await c.get(f"/v1/downloads/{job_id}")).json()
        if job["state"] not in ("done", "failed", "cancelled"):
            with trio.fail_after(120):
                async for _, ev in seen:
                    if (
                        ev["kind"] == "download"
                        and ev["id"] == job_id
                        and ev["state"]
                        in (
                            "done",
                            "failed",
                            "cancelled",
                        )
                    ):
                        break
        job = (await c.get(f"/v1/downloads/{job_id}")).json()
    assert job["state"] == "done", job
    return job  # type: ignore[no-any-return]


async def test_pull_model_on_all_pulls_on_every_node_and_they_share(tmp_path: Path) -> None:
    data = layers()
    with registry(tmp_path) as reg, counting_proxy(tmp_path, reg.host) as proxy:
        model = registry_model(proxy, reg.push_model, data)
        async with three_nodes(tmp_path) as nodes:
            a = nodes["a"]
            result = await run("pull-model", model, "--on", "all", socket=a.socket)
            assert result.code == 0, result
            started = dict(
                line.split(": started download ") for line in result.out.splitlines()[:3]
            )
            assert sorted(started) == ["a", "b", "c"], result.out
            assert "from the origin" in result.out.splitlines()[-1], result.out
            for n in ("b", "c"):
                await wait_done(nodes[n], started[n])
            for d in nodes.values():
                assert_blobs_exact(d, data)
        total = sum(map(len, data))
        # They shared: independent pulls read 3x (the exact figure is bench/cluster.py's).
        assert proxy.blob_bytes() <= 1.5 * total


async def test_pull_model_on_one_peer_pulls_there_only_and_unknown_nodes_are_refused(
    tmp_path: Path,
) -> None:
    data = layers()[2:]
    with registry(tmp_path) as reg, counting_proxy(tmp_path, reg.host) as proxy:
        model = registry_model(proxy, reg.push_model, data)
        async with three_nodes(tmp_path) as nodes:
            a = nodes["a"]
            refused = await run("pull-model", model, "--on", "b,zz", socket=a.socket)
            assert refused.code == 1 and "unknown node 'zz'" in refused.err, refused
            assert "nothing was started" in refused.err
            result = await run("pull-model", model, "--on", "b", socket=a.socket)
            assert result.code == 0, result
            (line,) = result.out.splitlines()
            job = line.split(": started download ")[1]
            await wait_done(nodes["b"], job)
            assert_blobs_exact(nodes["b"], data)
            assert await job_states(a) == {} and await job_states(nodes["c"]) == {}
            assert not list((a.home / "state" / "models" / "blobs").glob("sha256-*"))


# -- the CLI's progress text -------------------------------------------------------------------


def test_download_progress_names_the_bytes_from_each_source() -> None:
    ev = {
        "connections": 3,
        "retries": 1,
        "sources": [
            ["sha256:aa", "origin", 12 * MiB],
            ["sha256:aa", "gpu-2", 30 * MiB],
            ["sha256:bb", "gpu-2", 10 * MiB],
            ["sha256:bb", "gpu-3", 0],
        ],
    }
    assert download_info(ev) == "3 connections, 1 retries; origin 12.0 MiB, gpu-2 40.0 MiB"
    assert download_info({"connections": 2}) == "2 connections, 0 retries"
    job_sources = {"sha256:aa": {"origin": 12 * MiB, "gpu-2": 30 * MiB}, "sha256:bb": {"c": MiB}}
    assert sources_summary(job_sources) == (
        "12.0 MiB from the origin, 31.0 MiB from peers (gpu-2 30.0 MiB, c 1.0 MiB)"
    )
    assert sources_summary({}) == ""
