"""Chaos scenario 7: two daemons in separate network namespaces joined by a shaped veth pair, whose
link goes down mid-transfer.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import subprocess
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


def netns_missing() -> str | None:
    """Why two network namespaces with a veth pair and tbf cannot be set up (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"no {tool} command (iproute2)"
    name = f"tdprobe{os.getpid()}"
    p = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if p.returncode != 0:
        return f"ip netns add failed: {p.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], check=False)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.contextmanager
def veth_pair(rate: str) -> Iterator[tuple[str, str, str, str, str]]:
    """Namespaces A and B joined by a veth pair, each end shaped by ``tbf rate``: yields
    (ns A, ns B, address in A, address in B, A's device)."""
    tag = f"{os.getpid() % 100000}{secrets.token_hex(1)}"
    ns_a, ns_b = f"tdc{tag}a", f"tdc{tag}b"
    dev_a, dev_b = f"tdc{tag}a"[:15], f"tdc{tag}b"[:15]
    net = f"10.{random.randrange(200, 250)}.{random.randrange(0, 250)}"
    ip_a, ip_b = f"{net}.1", f"{net}.2"
    try:
        _ip("netns", "add", ns_a)
        _ip("netns", "add", ns_b)
        _ip("link", "add", dev_a, "type", "veth", "peer", "name", dev_b)
        _ip("link", "set", dev_a, "netns", ns_a)
        _ip("link", "set", dev_b, "netns", ns_b)
        for ns, dev, ip in ((ns_a, dev_a, ip_a), (ns_b, dev_b, ip_b)):
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    dev,
                    "root",
                    "tbf",
                    "rate",
                    rate,
                    "burst",
                    "32kbit",
                    "latency",
                    "50ms",
                ],
                check=True,
                capture_output=True,
            )
        yield ns_a, ns_b, ip_a, ip_b, dev_a
    finally:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


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
                _ip("-n", ns_a, "link", "set", dev_a, "down")
                await trio.sleep(down_seconds)  # the fault itself: the link stays down this long
                _ip("-n", ns_a, "link", "set", dev_a, "up")
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
