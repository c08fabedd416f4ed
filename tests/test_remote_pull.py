"""``tensord pull-model NAME --on all|b,c``: a node asks its peers to pull a model over the peer
protocol (feature ``remote_pull``) and they share the pieces. Three real daemons and the CNCF
registry; library nodes for the peers that cannot (an older tensord, a node without a download
manager, a hostile reply); the wire message's bounds; the CLI's progress text of sources."""

from __future__ import annotations

import signal
import time
from contextlib import AsyncExitStack
from dataclasses import replace
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
from .support.cluster import write_cluster_file
from .support.control_api import events, http, ready
from .support.counting_proxy import counting_proxy
from .support.daemons import Daemon, daemon, free_port
from .support.helpers import fast_settings, running
from .support.registry import registry
from .support.share_cluster import (
    MiB,
    assert_blobs_exact,
    layers,
    registry_model,
    three_nodes,
)
from .support.strict_peer import silent_peer

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


async def test_a_peer_that_takes_the_request_and_never_answers_times_out_alone() -> None:
    """A peer that handshakes, reads the request and never answers (a hung process): asked
    beside a healthy peer, it ends in a RemotePullError naming it after ``io_timeout``, and the
    healthy one's job id comes back regardless."""
    base = fast_settings()
    quick = replace(base, transfer=replace(base.transfer, io_timeout=1.0, connect_timeout=1.0))
    async with (
        running(quick) as asker,
        running() as other,
        silent_peer("hung") as hung,
    ):
        other.on_pull_request = lambda peer, ref: "00c0ffee00c0"
        out: dict[str, object] = {}

        async def ask(peer: str) -> None:
            started = time.monotonic()
            try:
                out[peer] = await request_pull(asker, peer, "models/x:v1")
            except RemotePullError as exc:
                out[peer] = exc
            out[peer + " seconds"] = time.monotonic() - started

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for peer in (hung.ticket, other.addr):
                    nursery.start_soon(ask, peer)
        assert out[other.addr] == "00c0ffee00c0"
        err = out[hung.ticket]
        assert isinstance(err, RemotePullError) and err.code == "timeout", err
        assert err.peer == hung.ticket and hung.ticket in str(err)
        assert "did not answer the pull request within 1 s" in str(err)
        assert hung.heard >= 1  # it did get the request
        assert 1.0 <= out[hung.ticket + " seconds"] < 5  # type: ignore[operator]
        # The silent connection was not pooled: the next request dials afresh, and times out
        # the same way rather than reading a stale reply.
        with pytest.raises(RemotePullError, match="did not answer"):
            await request_pull(asker, hung.ticket, "models/x:v1")
        assert hung.heard >= 2


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


async def test_pull_model_on_all_with_a_hung_node_names_it_and_the_others_complete(
    tmp_path: Path,
) -> None:
    """c is stopped with SIGSTOP (its connections stay open, its kernel still accepts, nothing
    answers): ``pull-model --on all`` reports c failed with a reason that names it, after a
    bounded wait, and a and b pull the model byte-exact."""
    data = layers()[1:]
    io_timeout, connect_timeout = 3.0, 2.0
    with registry(tmp_path) as reg, counting_proxy(tmp_path, reg.host) as proxy:
        model = registry_model(proxy, reg.push_model, data)
        ports = {n: free_port() for n in ("a", "b", "c")}
        cluster = write_cluster_file(
            tmp_path / "cluster.json",
            ports,
            name="hung",
            transfer={
                "peer_check_interval": 0.2,
                "io_timeout": io_timeout,
                "connect_timeout": connect_timeout,
            },
            downloads={"piece_size": 256 * 1024, "connections": 4},
        )
        async with AsyncExitStack() as stack:
            nodes: dict[str, Daemon] = {}
            for n, port in ports.items():
                env = {"TENSORD_NODE_ID": n, "TENSORD_LISTEN": f"127.0.0.1:{port}"}
                nodes[n] = await stack.enter_async_context(
                    daemon(env, "--cluster", str(cluster), home=tmp_path / n)
                )
            for n, d in nodes.items():
                await ready(d)
                for peer in ports:
                    if peer != n:
                        await d.wait_for(f"peer {peer} is up")
            a, c = nodes["a"], nodes["c"]
            c.proc.send_signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                result = await run("pull-model", model, "--on", "all", socket=a.socket)
                seconds = time.monotonic() - started
                jobs = dict(
                    line.split(": started download ")
                    for line in result.out.splitlines()
                    if ": started download " in line
                )
                assert sorted(jobs) == ["a", "b"], result.out
                assert result.code == 1, result
                (failed,) = [line for line in result.out.splitlines() if line.startswith("c: ")]
                # Its pooled connection gets the request and no answer (io_timeout), or a
                # dial gets no handshake (connect_timeout): either way c is named, and why.
                assert failed.startswith("c: failed: peer c "), failed
                assert "io_timeout" in failed or "connect_timeout" in failed, failed
                assert seconds < 120, seconds
                await wait_done(nodes["b"], jobs["b"])
                for n in ("a", "b"):
                    assert_blobs_exact(nodes[n], data)
            finally:
                c.proc.send_signal(signal.SIGCONT)  # so that it can be stopped as usual


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
