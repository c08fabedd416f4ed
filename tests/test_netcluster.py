"""Separate hosts on one machine (tests/support/netcluster.py): the harness itself, and a model
pulled by every node of a cluster through a slow registry uplink (issue 14).

Each host is a network namespace with a shaped link, running a real ``tensord serve``; the
registry (Debian ``docker-registry``) is behind nginx in its own namespace, whose access log says
what it served. Needs root (CI runs as root: there a missing part fails, never skips).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import trio

from .support.cli import CliResult, run
from .support.helpers import require
from .support.netcluster import (
    NETNS_DIR,
    PREFIX,
    Model,
    NetCluster,
    delete_namespace,
    netcluster,
    netns_unavailable,
    qdisc,
    rate_bytes,
    remove_stale_namespaces,
)

MiB = 1 << 20
#: A small model (the test's time is the registry's uplink: 4 x 28 MiB at 10 MB/s, ~12 s).
SIZES = (8 * MiB, 8 * MiB, 12 * MiB)


def namespace_names(c: NetCluster) -> list[str]:
    return [c.bridge_ns, c.registry.ns, *(h.ns for h in c.hosts)]


async def test_four_hosts_and_a_registry_host_up_shaped_and_gone_afterwards(
    tmp_path: Path,
) -> None:
    async with netcluster(tmp_path, 4) as c:
        made = namespace_names(c)
        assert all((NETNS_DIR / ns).exists() for ns in made)
        for h in c.hosts:
            # The CLI reaches each daemon through its socket file, from the root namespace.
            code, out, err = await run("status", "--json", socket=h.socket)
            assert code == 0, err
            st = json.loads(out)
            assert st["node_id"] == h.name
            peers = {p["id"]: p["state"] for p in st["peers"]}
            assert peers == {o.name: "up" for o in c.hosts if o is not h}
            assert "tbf" in qdisc(h.ns) and "rate 200Mbit" in qdisc(h.ns)
            assert h.tx_bytes() > 0  # the peer checks went over its link
        assert "tbf" in qdisc(c.registry.ns) and "rate 80Mbit" in qdisc(c.registry.ns)
        # A crash and a restart: the others see the host go and come back.
        h3 = c["h3"]
        before = h3.daemon
        assert await c.restart(h3) is not before and before is not None
        assert before.proc.returncode == -9
        with trio.fail_after(60):
            await c.wait_peers_up(h3)
            await c.wait_peers_up(c["h0"], [h3])
        # SIGHUP: h0 rereads the cluster file, which no longer names h3.
        h0 = c["h0"]
        assert h0.daemon is not None
        c.write_cluster_file([h for h in c.hosts if h is not h3])
        c.reload(h0)
        await h0.daemon.wait_for("reload: 2 peers")
        code, out, _ = await run("peers", "--json", socket=h0.socket)
        assert code == 0 and sorted(p["id"] for p in json.loads(out)) == ["h1", "h2"]
    assert not any((NETNS_DIR / ns).exists() for ns in made)


async def test_a_failing_test_leaves_no_namespace_and_no_daemon(tmp_path: Path) -> None:
    made: list[str] = []
    daemons = []
    with pytest.raises(BaseExceptionGroup) as failed:  # the cluster's nursery wraps it
        async with netcluster(tmp_path, 2) as c:
            made = namespace_names(c)
            daemons = [h.daemon for h in c.hosts]
            raise RuntimeError("the test failed")
    assert failed.group_contains(RuntimeError, match="the test failed")
    assert made and not any((NETNS_DIR / ns).exists() for ns in made)
    assert all(d is not None and d.proc.returncode is not None for d in daemons)


def test_namespaces_of_a_run_that_died_are_removed() -> None:
    """A killed test run leaves its namespaces: the next cluster removes them."""
    reason = netns_unavailable()
    require(reason is None, reason or "")
    dead = 4_194_000  # above any pid this machine has handed out (pid_max is 4194304 at most)
    name = f"{PREFIX}{dead}x00-h0"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in remove_stale_namespaces()
        assert not (NETNS_DIR / name).exists()
    finally:
        delete_namespace(name)


async def pull_everywhere(c: NetCluster, model: Model) -> list[CliResult]:
    """Every host pulls ``model`` at the same moment; their CLI results."""
    results: dict[str, CliResult] = {}

    async def pull(name: str) -> None:
        results[name] = await run("pull-model", model.ref, socket=c[name].socket)

    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            for h in c.hosts:
                nursery.start_soon(pull, h.name)
    return [results[h.name] for h in c.hosts]


def assert_exact_everywhere(c: NetCluster, model: Model) -> None:
    for h in c.hosts:
        for digest in model.blobs:
            assert h.blob_sha256(digest) == digest, (h.name, digest)


async def test_independent_pulls_each_read_the_whole_model_from_the_registry(
    tmp_path: Path,
) -> None:
    """Today's baseline (``downloads.share`` off): N nodes read N times the model."""
    async with netcluster(tmp_path, 4, sections={"downloads": {"share": False}}) as c:
        model = c.registry.push_model("models/netc", "v1", SIZES)
        for result in await pull_everywhere(c, model):
            assert result.code == 0, result
        assert_exact_everywhere(c, model)
        served = c.registry.bytes_served(blobs_only=True)
        # Every node needs every byte; a connection replaced for being slow re-reads a little
        # (the uplink is shared, so some look slow), never a whole extra copy.
        assert 4 * model.size <= served < 5 * model.size, served / model.size


async def test_shared_pulls_read_the_model_from_the_registry_about_once(tmp_path: Path) -> None:
    """With ``downloads.share`` on, nodes that start the same pull together fetch each piece
    from the registry once and take the rest from each other. (How long the last node takes
    against one node alone is a bench figure, bench/cluster.py: printed here, not asserted.)"""
    async with netcluster(tmp_path, 4, sections={"downloads": {"share": True}}) as c:
        model = c.registry.push_model("models/netc", "v1", SIZES)
        t0 = trio.current_time()
        for result in await pull_everywhere(c, model):
            assert result.code == 0, result
        alone = model.size / rate_bytes(c.uplink_rate)
        took = trio.current_time() - t0
        print(f"4 shared pulls: {took:.1f} s, {took / alone:.2f} x one copy over the uplink")
        assert_exact_everywhere(c, model)
        served = c.registry.bytes_served(blobs_only=True)
        print(f"registry served {served / model.size:.3f} x the model")
        # Independent pulls read it 4x. A piece whose owner looks slow (a loaded machine) is
        # re-read from the registry by design, so the test bound is one no healthy run can
        # miss; the figure against the 1.05x target is bench/cluster.py's.
        assert served <= 1.5 * model.size, served / model.size
