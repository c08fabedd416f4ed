"""A model onto a cluster through a rate-limited uplink, and a tensor to many peers (issue 14).

Usage (``make bench`` runs it last; needs root: the hosts are network namespaces)::

    .venv/bin/python bench/cluster.py          # a 1 GiB model onto 4 nodes, a 256 MiB tensor
    QUICK=1 .venv/bin/python bench/cluster.py  # 64 MiB model, 32 MiB tensor

The cluster is tests/support/netcluster.py: each node a network namespace whose link sends at
``CL_LINK`` MB/s (``tbf``), running a real ``tensord serve``; the registry (Debian
``docker-registry`` behind nginx, whose access log gives the bytes it served) in its own
namespace behind an uplink of ``CL_UPLINK`` MB/s. Each row starts a fresh cluster (empty stores).

Rows:

* model pulls: one node alone (the reference), every node at once with ``downloads.share``
  off (independent pulls: the registry serves N copies), and with it on (the registry should
  serve the model once, each node finishing within 1.3x the lone pull). The shared row says
  "not available" while sharing has no effect (the registry served more than 1.5 copies).
* tensor sends from one node to ``CL_NODES`` others: one send (the reference), sequential sends
  to each, and a broadcast (``tensord send FILE --to a,b,c``, when ``TensorNode.broadcast_tensor``
  exists; else "not available"), against the pipelined-chain bound ``S/B + (N-1)·chunk/B``.

Bytes each host sent come from its link's counters. Figures go to ``bench/results/cluster.json``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tensord.config import Settings  # noqa: E402
from tensord.node import TensorNode  # noqa: E402
from tests.support.cli import run  # noqa: E402
from tests.support.netcluster import MB, netcluster, netns_unavailable  # noqa: E402

MiB = 1 << 20
QUICK = bool(os.environ.get("QUICK"))
MODEL = int(os.environ.get("CL_MODEL", 64 * MiB if QUICK else 1024 * MiB))
BLOBS = int(os.environ.get("CL_BLOBS", 4))
TENSOR = int(os.environ.get("CL_TENSOR", 32 * MiB if QUICK else 256 * MiB))
NODES = int(os.environ.get("CL_NODES", 4))
LINK = int(float(os.environ.get("CL_LINK", 25)) * MB)
UPLINK = int(float(os.environ.get("CL_UPLINK", 20)) * MB)
CHUNK = Settings().tensor_protocol.chunk_size


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg": os.getloadavg(),
    }


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


async def pulls(tmp: Path, nodes: int, share: bool, seed: int) -> dict[str, Any]:
    """``nodes`` nodes pull one model at the same moment: registry bytes, each node's time."""
    async with netcluster(
        tmp, nodes, link_rate=LINK, uplink_rate=UPLINK, sections={"downloads": {"share": share}}
    ) as c:
        sizes = [MODEL // BLOBS] * (BLOBS - 1) + [MODEL - MODEL // BLOBS * (BLOBS - 1)]
        model = c.registry.push_model("bench/model", "v1", sizes, seed=seed)
        done: dict[str, float] = {}
        t0 = time.perf_counter()

        async def pull(name: str) -> None:
            code, _, err = await run("pull-model", model.ref, socket=c[name].socket)
            if code != 0:
                raise RuntimeError(f"{name}: pull-model failed: {err.strip()}")
            done[name] = time.perf_counter() - t0

        async with trio.open_nursery() as nursery:
            for h in c.hosts:
                nursery.start_soon(pull, h.name)
        exact = all(h.blob_sha256(d) == d for h in c.hosts for d in model.blobs)
        return {
            "nodes": nodes,
            "share": share,
            "model_bytes": model.size,
            "registry_bytes": c.registry.bytes_served(),
            "seconds": max(done.values()),
            "per_node_seconds": done,
            "exact": exact,
            "tx_bytes": c.total_tx(),
        }


async def sends(tmp: Path) -> dict[str, Any]:
    """From h0 to ``NODES`` others: one send, sequential sends, a broadcast if there is one."""
    out: dict[str, Any] = {}
    async with netcluster(tmp, NODES + 1, link_rate=LINK, uplink_rate=UPLINK) as c:
        src = tmp / "tensor.npy"
        np.save(src, np.random.default_rng(1).integers(0, 255, TENSOR, dtype=np.uint8))
        sender, receivers = c.hosts[0], c.hosts[1:]

        async def send(to: list[str], name: str) -> float:
            before = sender.tx_bytes()
            t0 = time.perf_counter()
            code, _, err = await run(
                "send", str(src), "--to", ",".join(to), "--name", name, socket=sender.socket
            )
            if code != 0:
                raise RuntimeError(f"send --to {','.join(to)} failed: {err.strip()}")
            out.setdefault("sender_tx", {})[name] = sender.tx_bytes() - before
            return time.perf_counter() - t0

        out["single"] = await send([receivers[0].name], "single")
        t0 = time.perf_counter()
        for r in receivers:
            await send([r.name], f"seq-{r.name}")
        out["sequential"] = time.perf_counter() - t0
        out["broadcast"] = None
        if not hasattr(TensorNode, "broadcast_tensor"):
            out["broadcast_missing"] = "no TensorNode.broadcast_tensor yet"
            return out
        try:
            out["broadcast"] = await send([r.name for r in receivers], "bcast")
        except RuntimeError as e:  # the CLI or daemon side is not there yet
            out["broadcast_missing"] = str(e)
        out["broadcast_tx"] = {r.name: r.tx_bytes() for r in c.hosts}
    return out


def report_pulls(rows: dict[str, dict[str, Any]]) -> None:
    alone = rows["alone"]["seconds"]
    print(f"\nmodel pulls: {mb(MODEL)} in {BLOBS} blobs onto {NODES} nodes")
    for key, label in (
        ("alone", "one node alone"),
        ("independent", f"{NODES} nodes, share off"),
        ("shared", f"{NODES} nodes, share on"),
    ):
        r = rows[key]
        ratio = r["registry_bytes"] / r["model_bytes"]
        figures = (
            f"{r['seconds']:7.1f} s ({r['seconds'] / alone:4.2f} x alone)  "
            f"registry {mb(r['registry_bytes'])} ({ratio:4.2f} x the model)"
            f"{'' if r['exact'] else '  NOT SHA-256 EXACT'}"
        )
        if key == "shared" and ratio > 1.5:
            print(f"  {label:<22} not available (downloads.share had no effect: {figures.strip()})")
        else:
            print(f"  {label:<22} {figures}")
        if key == "shared" and ratio <= 1.5:
            ok = ratio <= 1.05 and r["seconds"] <= 1.3 * alone
            print(f"  target: registry <= 1.05 x, time <= 1.3 x alone: {'PASS' if ok else 'MISS'}")


def report_sends(s: dict[str, Any]) -> None:
    n = NODES
    bound = TENSOR / LINK + (n - 1) * CHUNK / LINK
    print(f"\ntensor sends: {mb(TENSOR)} from one node to {n} others")
    print(f"  one send               {s['single']:7.1f} s ({TENSOR / s['single'] / 1e6:.1f} MB/s)")
    seq = s["sequential"]
    print(f"  sequential, {n} sends    {seq:7.1f} s ({seq / s['single']:4.2f} x one send)")
    if s["broadcast"] is None:
        print(f"  broadcast              not available ({s['broadcast_missing']})")
    else:
        b = s["broadcast"]
        print(f"  broadcast              {b:7.1f} s ({b / s['single']:4.2f} x one send)")
        verdict = "PASS" if b <= 1.25 * s["single"] else "MISS"
        print(f"  target broadcast <= 1.25 x one send: {verdict}")
    print(f"  bound S/B + (N-1)·chunk/B = {bound:.1f} s (chunk {CHUNK // 1024} KiB); "
          f"star N·S/B = {n * TENSOR / LINK:.1f} s")  # fmt: skip


def main() -> int:
    reason = netns_unavailable()
    if reason is not None:
        print(f"cluster bench: not available ({reason})")
        return 0
    m = machine()
    print(f"cluster: {m['cpu']}, {m['cores']} cores, {m['kernel']}, load {m['loadavg'][0]:.2f}")
    link, uplink = f"{LINK / 1e6:.0f} MB/s", f"{UPLINK / 1e6:.0f} MB/s"
    print(f"links: {link} ({LINK * 8 // 10**6} mbit) per node, registry uplink {uplink} "
          f"({UPLINK * 8 // 10**6} mbit), tbf in network namespaces")  # fmt: skip
    results: dict[str, Any] = {"machine": m, "link": LINK, "uplink": UPLINK, "chunk": CHUNK}

    async def all_rows() -> None:
        rows: dict[str, dict[str, Any]] = {}
        for key, nodes, share, seed in (
            ("alone", 1, False, 11),
            ("independent", NODES, False, 12),
            ("shared", NODES, True, 13),
        ):
            with tempfile.TemporaryDirectory(prefix="tensord-bench-cluster-") as tmp:
                rows[key] = await pulls(Path(tmp), nodes, share, seed)
        results["pulls"] = rows
        report_pulls(rows)
        with tempfile.TemporaryDirectory(prefix="tensord-bench-cluster-") as tmp:
            results["sends"] = await sends(Path(tmp))
        report_sends(results["sends"])

    trio.run(all_rows)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "cluster.json").write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
