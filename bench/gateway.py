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
* 200 concurrent streams through the gateway at 20 ms between tokens: tokens/s and errors.

Targets (issue 5): added p99 per token <= 2 ms, added TTFT <= 5 ms, 200 streams with no error.
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
sys.path.insert(0, str(ROOT))

QUICK = bool(os.environ.get("QUICK"))
STREAMS = int(os.environ.get("GW_STREAMS", 50 if QUICK else 200))
REPS = int(os.environ.get("GW_REPS", 3 if QUICK else 10))


def _backend(port_q: Any, interval: float, n_tokens: int) -> None:
    from tests.support.ollama_backend import BackendConfig, OllamaBackend

    async def main() -> None:
        b = OllamaBackend(BackendConfig(n_tokens=n_tokens, interval=interval))
        async with trio.open_nursery() as nursery:
            await nursery.start(b.run)
            port_q.put(b.url)

    trio.run(main)


def _gateway(url_q: Any, backend_url: str) -> None:
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
    async with httpx.AsyncClient(timeout=60) as client:
        rates = []
        for base in (direct, gw):
            await one_stream(client, base)
            best = []
            for _ in range(REPS):
                t = await one_stream(client, base)
                best.append(len(t) / t[-1])
            rates.append(statistics.median(best))
    return rates[0], rates[1]


async def concurrent(gw: str) -> tuple[float, int, float]:
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
    return tokens / took, errors, took


def start(target: Any, *args: Any) -> tuple[Any, str]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(q, *args), daemon=True)
    p.start()
    return p, q.get(timeout=30)


def main() -> int:
    procs = []
    try:
        p, paced = start(_backend, 0.02, 50)
        procs.append(p)
        p, paced_gw = start(_gateway, paced)
        procs.append(p)
        p, quick = start(_backend, 0.0, 2000)
        procs.append(p)
        p, quick_gw = start(_gateway, quick)
        procs.append(p)
        lat = trio.run(compare, paced, paced_gw)
        d_rate, g_rate = trio.run(fast, quick, quick_gw)
        d_many, d_errors, d_took = trio.run(concurrent, paced)
        rate, errors, took = trio.run(concurrent, paced_gw)
    finally:
        for p in procs:
            p.terminate()
    print(f"gateway: {REPS} streams of 50 tokens at 20 ms, then 2000 tokens as fast as possible")
    print(f"  added latency per token   p50 {lat['p50']:6.2f} ms   p99 {lat['p99']:6.2f} ms"
          f"   target p99 <= 2 ms: {'PASS' if lat['p99'] <= 2 else 'MISS'}")  # fmt: skip
    print(f"  added time to first token     {lat['ttft']:6.2f} ms"
          f"   target <= 5 ms: {'PASS' if lat['ttft'] <= 5 else 'MISS'}")  # fmt: skip
    print(f"  tokens/s, one stream as fast as possible: direct {d_rate:8.0f}, "
          f"through the gateway {g_rate:8.0f} ({g_rate / d_rate:.2f} x)")  # fmt: skip
    print(f"  {STREAMS} concurrent streams, direct:            {d_many:8.0f} tokens/s, "
          f"{d_errors} errors, {d_took:.2f} s")  # fmt: skip
    print(f"  {STREAMS} concurrent streams, through the gateway: {rate:8.0f} tokens/s, "
          f"{errors} errors, {took:.2f} s ({rate / d_many:.2f} x)"
          f"   target 0 errors: {'PASS' if errors == 0 else 'MISS'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
