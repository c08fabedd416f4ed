"""Chaos scenario 7: two daemons in separate network namespaces joined by a shaped veth pair, whose
link goes down mid-transfer.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import trio

from tensord.config import MiB
from tensord.control.client import AsyncClient

from ..daemons import daemon
from ..netcluster import DEV, SUBNET, address, ip, link, namespaces, netns_unavailable, shape
from .common import (
    Watermark,
    arrivals,
    digest,
    random_bytes,
    stored_digests,
    watch_receives,
)
from .rows import Row, fmt_bytes

# -- 7. separate network namespaces ------------------------------------------------------------


#: Why two network namespaces with a veth pair and tbf cannot be set up (None: they can).
netns_missing = netns_unavailable


@contextlib.contextmanager
def veth_pair(rate: str) -> Iterator[tuple[str, str, str, str, str]]:
    """Namespaces A and B joined by a veth pair, each end shaped by ``tbf rate``: yields
    (ns A, ns B, address in A, address in B, A's device). The namespaces, links and shaping are
    those of the cluster harness (tests/support/netcluster.py)."""
    ip_a, ip_b = f"{SUBNET}.1", f"{SUBNET}.2"
    with namespaces("a", "b") as ns:
        link(ns["a"], DEV, ns["b"], DEV)
        for role, addr in (("a", ip_a), ("b", ip_b)):
            address(ns[role], DEV, addr)
            shape(ns[role], DEV, rate)
        yield ns["a"], ns["b"], ip_a, ip_b, DEV


async def netns_link_flap(
    *, size: int = 256 * MiB, down_seconds: float = 2.0, rate: str = "200mbit", seed: int = 7
) -> list[Row]:
    """Two daemons in separate network namespaces (a veth pair shaped with ``tbf``): one sends
    ``size`` to the other through the control API, and the link goes down for ``down_seconds``
    in the middle. The tensor must arrive byte-exact."""
    started = time.perf_counter()
    row = Row(
        "7. Separate hosts",
        f"two daemons in separate network namespaces, veth + tbf {rate}; the link down for "
        f"{down_seconds:g} s mid-transfer",
    )
    reason = netns_missing()
    if reason is not None:
        row.skipped = reason
        return [row]
    data = random_bytes(seed, size)
    want = digest(data)
    sent: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tensord-chaos-") as tmp, veth_pair(rate) as net:
        ns_a, ns_b, ip_a, ip_b, dev_a = net
        work = Path(tmp)
        np.save(work / "big.npy", data)
        homes = {n: work / n for n in ("s", "r")}
        for h in homes.values():
            h.mkdir()
        envs = {
            "s": {"TENSORD_NODE_ID": "s", "TENSORD_LISTEN": f"{ip_a}:7070"},
            "r": {"TENSORD_NODE_ID": "r", "TENSORD_LISTEN": f"{ip_b}:7070"},
        }
        async with (
            daemon(envs["r"], home=homes["r"], wrapper=("ip", "netns", "exec", ns_b)) as r,
            daemon(envs["s"], home=homes["s"], wrapper=("ip", "netns", "exec", ns_a)) as s,
        ):
            await r.wait_for("listening on")
            await s.wait_for("listening on")
            async with AsyncClient(s.socket) as client:
                await client.put("big", work / "big.npy")
            received = Watermark()
            saved = Watermark()
            t0 = time.perf_counter()
            down_at = 0.0
            async with trio.open_nursery() as nursery:
                await nursery.start(watch_receives, r.socket, saved, received)

                async def send() -> None:
                    async with AsyncClient(s.socket) as client:
                        sent.extend(await client.send(f"tensord://r@{ip_b}:7070", name="big"))
                    nursery.cancel_scope.cancel()

                nursery.start_soon(send)
                await received.wait_for(size * 0.4)
                down_at = received.value
                ip("-n", ns_a, "link", "set", dev_a, "down")
                await trio.sleep(down_seconds)  # the fault itself: the link stays down this long
                ip("-n", ns_a, "link", "set", dev_a, "up")
                await trio.sleep_forever()
            elapsed = time.perf_counter() - t0
            await r.wait_for("tensor arrived: 'big'")
            seen = arrivals(r.text)
        got = stored_digests(homes["r"] / "state", ["big"])["big"]
    result = sent[0] if sent else {}
    row.lost = 0 if got == want else 1
    row.duplicates = max(0, seen["big"] - 1)
    row.tried = f"1 transfer of {fmt_bytes(size)}, link down at {fmt_bytes(down_at)}"
    row.outcome = (
        f"{'byte-exact' if got == want else 'CORRUPT or missing'} in {elapsed:.1f} s "
        f"({size / elapsed / 1e6:.1f} MB/s overall), {result.get('retries', '?')} retries"
    )
    row.resent = fmt_bytes(int(result.get("bytes_resent") or 0))
    row.figures = {"size": size, "seconds": elapsed, "retries": result.get("retries")}
    row.seconds = time.perf_counter() - started
    return [row]
