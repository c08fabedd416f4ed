"""The daemon under attack in the attack rows (scenario 13): a real ``tensord serve``, its memory
and writes read from /proc, and the checks every attack row ends with (alive, peak RSS growth
under 64 MiB, a legitimate peer served).
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import trio

from tensord.config import MiB, Settings
from tensord.node import TensorNode

from ..cluster import write_cluster_file
from ..daemons import Daemon, daemon, free_port
from ..helpers import fast_settings
from .rows import Row, fmt_bytes, vm_status

SCENARIO = "13. Attacks (issue 12)"
#: What an attack may add to the daemon's peak RSS (issue 12: "RSS growth < 64 MiB").
RSS_LIMIT = 64 * MiB


#: The rows' faults (the "Fault or bad input" column).
NAMES = (
    "a `request` for `layers//0`, `a/../b`, `/etc/passwd`, a NUL, a 4 KiB name (no secret: "
    "anyone on the port)"
)
MC = "a Hello with max chunk `mc=1`, then a pull of a 4 MiB tensor"
IDLE = "idle TCP connections from one host, more than transfer.max_connections"
QUIC_PUSH = "QUIC: unauthenticated connections open streams and push data"
QUIC_CAP = "QUIC: more strangers than transfer.max_connections"
LIES = (
    "download servers that lie: more bytes than the manifest's size, a 200 to a range, a "
    "Content-Range past the total, a URL over downloads.max_bytes"
)
REDIRECT = "a registry redirects to another host that asks for credentials"
FIFO = "control requests naming a FIFO, more than trio's worker threads"
DEPUTY = "a group member (another uid) asks the daemon for a root-only file"
SLOW = "slow request bodies to the control socket and the gateway"
OFF_LOOPBACK = "a peer listener off loopback without authentication"


# -- the daemon under attack -----------------------------------------------------------------


@dataclass
class Target:
    """A running daemon, its peer port, and the settings of a legitimate peer of it."""

    d: Daemon
    port: int
    peer: Settings
    home: Path
    legit: int = 0

    @property
    def pid(self) -> int:
        return int(self.d.proc.pid)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.d.proc.returncode is None

    def tail(self, n: int = 8) -> str:
        return " / ".join(self.d.text.strip().splitlines()[-n:])


@asynccontextmanager
async def target(
    home: Path,
    *,
    secret: bool = True,
    transport: str = "tcp",
    cluster: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Target]:
    """``tensord serve`` on a loopback port, state in ``home``, ready (a legitimate transfer
    done, so that its lazy imports and pools are warm) when it yields."""
    port = free_port()
    full = {"TENSORD_NODE_ID": "victim", "TENSORD_LISTEN": f"127.0.0.1:{port}"}
    if not secret:
        full["TENSORD_CLUSTER_SECRET_FILE"] = ""  # hand-written peers do not authenticate
    if transport != "tcp":
        full["TENSORD_TRANSPORT"] = transport
    full |= env or {}
    args: list[str] = []
    if cluster is not None:
        path = write_cluster_file(home / "cluster.json", name="attacks", **cluster)
        args = ["--cluster", str(path)]
    peer = replace(fast_settings(authenticated=secret, max_retries=10), transport=transport)
    async with daemon(full, *args, home=home) as d:
        await d.wait_for("control socket")
        t = Target(d, port, peer, home)
        problem = await legit_round_trip(t, "warm-up")
        if problem:
            raise RuntimeError(f"the daemon under attack did not serve a peer at all: {problem}")
        yield t


def reset_peak(pid: int) -> dict[str, int]:
    """Reset the kernel's peak RSS of ``pid`` (``5 > clear_refs``) and return its memory now."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    return vm_status(pid)


def written(pid: int) -> int:
    """Bytes ``pid`` has written (``wchar`` of /proc/PID/io: files, pipes and sockets)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return 0


async def legit_round_trip(t: Target, tag: str) -> str | None:
    """A legitimate peer sends a tensor and pulls it back; None if that worked, else why not."""
    t.legit += 1
    name = f"legit/{tag}-{t.legit}"
    data = np.arange(4096, dtype=np.float32) + t.legit
    try:
        async with TensorNode(replace(t.peer, node_id=f"legit-{t.legit}")) as node:
            with trio.fail_after(60):
                await node.send_tensor(t.addr, name, data)
                back = await node.pull_tensor(t.addr, name)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if np.array_equal(back, data) else "the tensor pulled back differs"


async def survived(row: Row, t: Target, before: dict[str, int], tag: str) -> str:
    """The checks every attack row ends with: alive, peak RSS growth < 64 MiB, a legitimate
    peer served. Returns the words the outcome ends with."""
    after = vm_status(t.pid) if t.alive else {}
    growth = after.get("VmHWM", 0) - before.get("VmRSS", 0)
    row.figures.update(
        rss_before=before.get("VmRSS", 0),
        rss_peak_during=after.get("VmHWM", 0),
        rss_after=after.get("VmRSS", 0),
        rss_growth=growth,
    )
    if not row.check(t.alive, f"the daemon exited with status {t.d.proc.returncode}: {t.tail()}"):
        return "the daemon DIED"
    row.check(growth < RSS_LIMIT, f"peak RSS grew by {fmt_bytes(growth)} (limit 64 MiB)")
    problem = await legit_round_trip(t, tag)
    row.check(problem is None, f"a legitimate peer was not served afterwards: {problem}")
    return (
        f"daemon alive, peak RSS +{fmt_bytes(max(growth, 0))} "
        f"({fmt_bytes(before.get('VmRSS', 0))} before); a legitimate send and pull "
        + ("served" if problem is None else "FAILED")
    )


async def attempt(rows: list[Row], fault: str, body: Callable[[Row], Awaitable[None]]) -> Row:
    """Run one row; an exception is that row's failure, and the next row still runs."""
    row = Row(SCENARIO, fault)
    started = time.perf_counter()
    try:
        await body(row)
    except Exception as exc:
        traceback.print_exc()
        row.check(False, f"{type(exc).__name__}: {exc}")
        if not row.outcome:
            row.outcome = f"error: {type(exc).__name__}: {exc}"
    row.seconds = time.perf_counter() - started
    rows.append(row)
    return row


async def closed_by_peer(stream: trio.SocketStream) -> None:
    """Until the other end closes ``stream`` (anything it sends is dropped)."""
    try:
        while await stream.receive_some(65536):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def metric(t: Target, name: str, labels: str = "") -> float:
    """One sample of the daemon's /metrics (0 if absent)."""
    async with control(t) as c:
        text = (await c.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}} " if labels else f"{name} "):
            return float(line.split()[-1])
    return 0.0


def control(t: Target) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(t.d.socket)),
        base_url="http://tensord",
        timeout=httpx.Timeout(60, connect=5),
    )
