"""The token gateway's cost: clients reading a backend directly vs through the gateway.

Usage (``make bench`` runs it after the other rows)::

    .venv/bin/python bench/gateway.py
    QUICK=1 .venv/bin/python bench/gateway.py

Three processes: the in-repo Ollama-compatible backend (tests/support/ollama_backend.py), the
gateway (tensord.gateway.server.Gateway), and this one, the client. A stream's tokens leave the
backend on a fixed schedule from the request (``interval`` apart), so the k-th token's arrival
time, measured from the request, through the gateway minus directly is what the gateway added
to that token. Rows:

* added time to first token, and per-token added latency (p50, p99) at 20 ms between tokens:
  each later token's arrival relative to the first, through the gateway minus directly (the
  constant cost of forwarding the request is in the added TTFT);
* the same with tokens as fast as the backend makes them (a throughput view: tokens/s);
* 200 concurrent streams through the gateway at 20 ms between tokens: tokens/s, errors, and the
  gateway process's CPU-seconds (user + system, from /proc) over the tokens it relayed.

Targets (issue 5): added p99 per token <= 2 ms, added TTFT <= 5 ms, 200 streams with no error;
(issue 15): <= 30 us of gateway CPU per relayed token with 200 streams, one stream as fast as
possible >= 0.9x direct. Each is printed as ``target: <what> <figure> PASS|MISS``.

``GW_BASELINE=/path/to/an/older/tree`` (e.g. a ``git worktree`` of the previous commit) runs a
second gateway from that tree beside this one and measures both in the same run, alternating,
so a change is judged against its baseline under the same machine load.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support; a baseline tree goes ahead of it

QUICK = bool(os.environ.get("QUICK"))
STREAMS = int(os.environ.get("GW_STREAMS", 50 if QUICK else 200))
REPS = int(os.environ.get("GW_REPS", 3 if QUICK else 10))
BASELINE = os.environ.get("GW_BASELINE", "")
CPU_REPS = int(os.environ.get("GW_CPU_REPS", 3))
CPU_TARGET_US = 30.0
RATIO_TARGET = 0.9
TICK = os.sysconf("SC_CLK_TCK")


def _backend(port_q: Any, interval: float, n_tokens: int) -> None:
    from tests.support.ollama_backend import BackendConfig, OllamaBackend

    async def main() -> None:
        b = OllamaBackend(BackendConfig(n_tokens=n_tokens, interval=interval))
        async with trio.open_nursery() as nursery:
            await nursery.start(b.run)
            port_q.put(b.url)

    trio.run(main)


def _gateway(url_q: Any, backend_url: str, tree: str = "") -> None:
    if tree:  # the baseline's tensord, ahead of this tree's
        sys.path.insert(0, tree)
    from dataclasses import replace

    from tensord.config import GatewaySettings, HostPort, NodeEntry, Settings
    from tensord.gateway.server import Gateway

    settings = replace(
        Settings.for_library(),
        nodes=(NodeEntry("gpu-0", HostPort("127.0.0.1", 7070), backend_url),),
        gateway=GatewaySettings(listen=HostPort("127.0.0.1", 0)),
    )

    async def main() -> None:
        g = Gateway(settings, backend_limit=STREAMS + 8)
        async with trio.open_nursery() as nursery:
            url_q.put(await nursery.start(g.run))

    trio.run(main)


async def one_stream(client: httpx.AsyncClient, base: str) -> list[float]:
    """Arrival times (from the request) of each token line of one /api/chat stream."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "bench"}]}
    start = time.perf_counter()
    times = []
    async with client.stream("POST", f"{base}/api/chat", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.strip():
                times.append(time.perf_counter() - start)
    return times[:-1]  # the last line is the final metrics object


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def compare(direct: str, gw: str) -> dict[str, float]:
    added: list[float] = []
    ttft: list[float] = []
    async with httpx.AsyncClient(timeout=60) as client:
        for base in (direct, gw):  # warm both paths
            await one_stream(client, base)
        for _ in range(REPS):
            d = await one_stream(client, direct)
            g = await one_stream(client, gw)
            # The first token carries the constant cost (forwarding the request, a fresh
            # upstream stream): that is the added TTFT. Every later token's arrival, relative to
            # the first, shows what relaying adds per token (delays, bursts).
            added += [(b - g[0]) - (a - d[0]) for a, b in zip(d[1:], g[1:], strict=False)]
            ttft.append(g[0] - d[0])
    return {
        "p50": statistics.median(added) * 1e3,
        "p99": pct(added, 0.99) * 1e3,
        "ttft": statistics.median(ttft) * 1e3,
    }


async def fast(direct: str, gw: str) -> tuple[float, float]:
    """Tokens/s of one stream as fast as the backend makes them, directly and through the
    gateway, alternating rep by rep (load changes hit both alike): the medians."""
    async with httpx.AsyncClient(timeout=60) as client:
        rates: tuple[list[float], list[float]] = ([], [])
        for base in (direct, gw):
            await one_stream(client, base)
        for _ in range(REPS):
            for rate, base in zip(rates, (direct, gw), strict=True):
                t = await one_stream(client, base)
                rate.append(len(t) / t[-1])
    return statistics.median(rates[0]), statistics.median(rates[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU-seconds of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def concurrent(gw: str) -> tuple[float, int, float, int]:
    errors = 0
    tokens = 0
    limits = httpx.Limits(max_connections=STREAMS + 10)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        start = time.perf_counter()

        async def one() -> None:
            nonlocal errors, tokens
            try:
                got = len(await one_stream(client, gw))
            except (httpx.HTTPError, ValueError):
                errors += 1
            else:
                tokens += got

        async with trio.open_nursery() as nursery:
            for _ in range(STREAMS):
                nursery.start_soon(one)
        took = time.perf_counter() - start
    return tokens / took, errors, took, tokens


def cpu_per_token(gw: str, pid: int) -> tuple[float, float, int]:
    """``STREAMS`` concurrent streams through one gateway: its CPU-microseconds per relayed
    token, the tokens/s, and the errors."""
    before = cpu_seconds(pid)
    rate, errors, _took, tokens = trio.run(concurrent, gw)
    used = cpu_seconds(pid) - before
    return used / max(tokens, 1) * 1e6, rate, errors


def target(what: str, figure: str, ok: bool) -> None:
    print(f"target: {what} {figure} {'PASS' if ok else 'MISS'}")


def start(target: Any, *args: Any) -> tuple[Any, str]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(q, *args), daemon=True)
    p.start()
    return p, q.get(timeout=30)


def main() -> int:
    procs = []
    trees = {"this tree": ""} | ({"baseline": BASELINE} if BASELINE else {})
    try:
        p, paced = start(_backend, 0.02, 50)
        procs.append(p)
        p, quick = start(_backend, 0.0, 2000)
        procs.append(p)
        paced_gw: dict[str, tuple[Any, str]] = {}
        quick_gw: dict[str, str] = {}
        for name, tree in trees.items():
            paced_gw[name] = start(_gateway, paced, tree)
            p, quick_gw[name] = start(_gateway, quick, tree)
            procs += [paced_gw[name][0], p]
        lat = {n: trio.run(compare, paced, gw) for n, (_, gw) in paced_gw.items()}
        rates = {n: trio.run(fast, quick, gw) for n, gw in quick_gw.items()}
        d_many, d_errors, d_took, _ = trio.run(concurrent, paced)
        cpu: dict[str, list[float]] = {n: [] for n in trees}
        many: dict[str, list[float]] = {n: [] for n in trees}
        errors = dict.fromkeys(trees, 0)
        for _ in range(CPU_REPS):  # alternating, so load changes hit both alike
            for n, (proc, gw) in paced_gw.items():
                us, rate, errs = cpu_per_token(gw, proc.pid)
                cpu[n].append(us)
                many[n].append(rate)
                errors[n] += errs
    finally:
        for p in procs:
            p.terminate()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"gateway: {REPS} streams of 50 tokens at 20 ms, then 2000 tokens as fast as possible;"
          f" {STREAMS} concurrent streams x {CPU_REPS}; load average now {load}")  # fmt: skip
    print(f"  {STREAMS} concurrent streams, direct: {d_many:8.0f} tokens/s, {d_errors} errors,"
          f" {d_took:.2f} s")  # fmt: skip
    for n in trees:
        d_rate, g_rate = rates[n]
        us = statistics.median(cpu[n])
        print(f"  [{n}] added latency per token p50 {lat[n]['p50']:6.2f} ms, p99"
              f" {lat[n]['p99']:6.2f} ms; added TTFT {lat[n]['ttft']:6.2f} ms")  # fmt: skip
        print(f"  [{n}] one stream: direct {d_rate:8.0f} tokens/s, through the gateway"
              f" {g_rate:8.0f} ({g_rate / d_rate:.2f} x)")  # fmt: skip
        print(f"  [{n}] {STREAMS} streams: {statistics.median(many[n]):8.0f} tokens/s,"
              f" {errors[n]} errors; gateway CPU per token"
              f" {', '.join(f'{x:.1f}' for x in cpu[n])} us (median {us:.1f})")  # fmt: skip
    if BASELINE:
        base, now = statistics.median(cpu["baseline"]), statistics.median(cpu["this tree"])
        ratio_b = rates["baseline"][1] / rates["baseline"][0]
        ratio_n = rates["this tree"][1] / rates["this tree"][0]
        print(f"  this tree vs baseline: CPU per token {now / base:.2f} x,"
              f" one-stream ratio {ratio_n:.2f} vs {ratio_b:.2f}")  # fmt: skip
    lat_n, (d_rate, g_rate) = lat["this tree"], rates["this tree"]
    us = statistics.median(cpu["this tree"])
    target("added latency per token p99 <= 2 ms", f"{lat_n['p99']:.2f} ms", lat_n["p99"] <= 2)
    target("added time to first token <= 5 ms", f"{lat_n['ttft']:.2f} ms", lat_n["ttft"] <= 5)
    target(f"{STREAMS} concurrent streams with 0 errors", f"{errors['this tree']} errors",
           errors["this tree"] == 0)  # fmt: skip
    target(f"gateway CPU per relayed token ({STREAMS} streams) <= {CPU_TARGET_US:.0f} us",
           f"{us:.1f} us", us <= CPU_TARGET_US)  # fmt: skip
    ratio = g_rate / d_rate
    figure = f"{ratio:.2f} x ({g_rate:.0f} / {d_rate:.0f} tokens/s)"
    target(
        f"one stream through the gateway >= {RATIO_TARGET} x direct", figure, ratio >= RATIO_TARGET
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
