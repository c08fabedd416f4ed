"""Chaos scenario 5: many peers sending to one daemon at once; errors, duplicates and peak RSS."""

from __future__ import annotations

import random
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import trio

from tensord.config import KiB, MiB
from tensord.errors import (
    TensorError,
)
from tensord.node import TensorNode

from ..daemons import free_port
from ..helpers import fast_settings
from .common import (
    Watermark,
    arrivals,
    digest,
    flush_arrivals,
    log_uniform,
    random_bytes,
    receiver,
    stored_digests,
)
from .rows import Row, fmt_bytes, vm_status

# -- 5. load ---------------------------------------------------------------------------------


async def load(
    *,
    peers: int = 50,
    seconds: float = 60.0,
    min_size: int = 4 * KiB,
    max_size: int = 4 * MiB,
    slots: int = 2,
    seed: int = 5,
) -> list[Row]:
    """``peers`` library nodes (one process, one connection each) send tensors of random sizes
    to one daemon for ``seconds``, each to ``slots`` names it overwrites (so the store's size
    stays bounded). No errors, every arrival once, the last version of every name byte-exact,
    and the daemon's peak RSS bounded by what is in flight, not by what went through."""
    started = time.perf_counter()
    row = Row(
        "5. Load",
        f"{peers} peers (library nodes, one connection each) sending concurrently to one daemon "
        f"for {seconds:g} s",
    )
    pool = random_bytes(seed, 2 * max_size)
    port = free_port()
    sends: Counter[str] = Counter()
    last: dict[str, tuple[int, int]] = {}
    errors: list[str] = []
    latencies: list[float] = []
    total = [0, 0]  # bytes, retries
    peak_rss = Watermark()
    with tempfile.TemporaryDirectory(prefix="tensord-chaos-") as tmp:
        home = Path(tmp)
        async with receiver(home, port) as d:
            pid = d.proc.pid
            base = vm_status(pid)
            deadline = trio.current_time() + seconds

            async def peer(p: int) -> None:
                rng = random.Random(seed * 1000 + p)
                settings = replace(fast_settings(), node_id=f"load-{p:02d}")
                async with TensorNode(settings) as node:
                    k = 0
                    while trio.current_time() < deadline:
                        n = log_uniform(rng, min_size, max_size)
                        off = rng.randrange(0, len(pool) - n)
                        name = f"load/{p:02d}/{k % slots}"
                        k += 1
                        t0 = time.perf_counter()
                        try:
                            r = await node.send_tensor(
                                f"127.0.0.1:{port}", name, pool[off : off + n]
                            )
                        except TensorError as exc:
                            errors.append(f"{name}: {exc}")
                            continue
                        latencies.append(time.perf_counter() - t0)
                        sends[name] += 1
                        last[name] = (off, n)
                        total[0] += n
                        total[1] += r.retries

            async def sample() -> None:
                while True:  # a measurement, not a synchronisation
                    peak_rss.update(vm_status(pid).get("VmRSS", 0))
                    await trio.sleep(0.2)

            t0 = time.perf_counter()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample)
                async with trio.open_nursery() as senders:
                    for p in range(peers):
                        senders.start_soon(peer, p)
                nursery.cancel_scope.cancel()
            elapsed = time.perf_counter() - t0
            end = vm_status(pid)
            await flush_arrivals(d, port)
            seen = arrivals(d.text)
            warnings = [ln for ln in d.text.splitlines() if " WARNING " in ln or " ERROR " in ln]
        got = stored_digests(home / "state", list(last))
    transfers = sum(sends.values())
    row.lost = sum(1 for n, (o, k) in last.items() if got[n] != digest(pool[o : o + k]))
    row.duplicates = sum(max(0, seen[n] - sends[n]) for n in sends)
    row.check(not errors, f"{len(errors)} sends failed: {errors[:3]}")
    row.check(all(seen[n] == sends[n] for n in sends), "arrivals do not match confirmed sends")
    row.check(not warnings, f"{len(warnings)} warnings in the daemon's log: {warnings[:3]}")
    hwm = end.get("VmHWM", 0)
    bound = base.get("VmRSS", 0) + 2 * peers * max_size + 256 * MiB
    row.check(0 < hwm <= bound, f"peak RSS {fmt_bytes(hwm)} over the bound {fmt_bytes(bound)}")
    rate = total[0] / elapsed
    lat = sorted(latencies)
    p50 = lat[len(lat) // 2] if lat else 0.0
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else 0.0
    row.tried = (
        f"{transfers} transfers ({fmt_bytes(min_size)}-{fmt_bytes(max_size)}), "
        f"{fmt_bytes(total[0])} in {elapsed:.0f} s"
    )
    row.outcome = (
        f"no errors, {total[1]} retries; {rate / 1e6:.0f} MB/s, {transfers / elapsed:.0f} "
        f"transfers/s, latency p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms; receiver peak "
        f"RSS {fmt_bytes(hwm)} (idle {fmt_bytes(base.get('VmRSS', 0))})"
        if not errors
        else f"{len(errors)} errors"
    )
    row.notes = (
        f"memory bound checked: idle RSS + 2 x peers x max size + 256 MiB = {fmt_bytes(bound)}; "
        "RSS counts the store's mapped files being received"
    )
    row.figures = {
        "peers": peers,
        "seconds": elapsed,
        "transfers": transfers,
        "bytes": total[0],
        "retries": total[1],
        "throughput_bytes_per_s": rate,
        "latency_p50_s": p50,
        "latency_p99_s": p99,
        "rss_idle": base.get("VmRSS", 0),
        "rss_peak_vmhwm": hwm,
        "rss_peak_sampled": peak_rss.value,
        "rss_end": end.get("VmRSS", 0),
        "rss_anon_end": end.get("RssAnon", 0),
    }
    row.seconds = time.perf_counter() - started
    return [row]
