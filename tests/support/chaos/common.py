"""What every chaos scenario shares: seeded random data and its digest, what a receiver stored and
announced (read back from its store and its log), watermarks to wait on progress, and a
``tensord serve`` receiver.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import trio

from tensord.control.client import AsyncClient
from tensord.errors import (
    TensorError,
    TensorNotFound,
)
from tensord.events import TransferEvent
from tensord.node import TensorNode
from tensord.store import TensorStore

from ..daemons import Daemon, daemon
from ..helpers import fast_settings

#: The repository (scenarios run pytest and find test files from here).
ROOT = Path(__file__).resolve().parents[3]


def random_bytes(seed: object, n: int) -> np.ndarray[Any, Any]:
    """``n`` random bytes as a uint8 array (read-only; nothing writes to what it sends)."""
    rng = np.random.default_rng(seed if not isinstance(seed, tuple) else list(seed))
    return np.frombuffer(rng.bytes(n), dtype=np.uint8)


def digest(array: np.ndarray[Any, Any]) -> str:
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return hashlib.sha256(memoryview(flat)).hexdigest()


def log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


_ARRIVED = re.compile(r"tensor arrived: '((?:[^'\\]|\\.)*)'")


def arrivals(*logs: str) -> Counter[str]:
    """How often each tensor was announced as arrived in daemon logs."""
    return Counter(m.group(1) for text in logs for m in _ARRIVED.finditer(text))


def partial_files(state: Path) -> list[str]:
    d = state / "partial"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def stored_digests(state: Path, names: list[str]) -> dict[str, str | None]:
    store = TensorStore(state)
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = digest(store.load(name))
        except TensorNotFound:
            out[name] = None
    return out


class Watermark:
    """A number that only grows, and waits until it passes a value (progress, checkpoints)."""

    def __init__(self) -> None:
        self.value = 0
        self.updates = 0
        self._changed = trio.Event()

    def update(self, value: int) -> None:
        """Raise the mark to ``value`` (never lowers it)."""
        self.set(max(self.value, value))

    def set(self, value: int) -> None:
        """Set the mark (a sender's acknowledged bytes drop back after a receiver restart)."""
        self.updates += 1
        self.value = value
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, value: float) -> None:
        while self.value < value:
            await self._changed.wait()

    async def wait_above(self, value: float) -> None:
        while self.value <= value:
            await self._changed.wait()


async def first_of(*waits: Callable[[], Awaitable[object]]) -> int:
    """Run the waits concurrently; return the index of the first to finish (others cancelled)."""
    winner: list[int] = []
    async with trio.open_nursery() as nursery:
        for i, wait in enumerate(waits):

            async def run(i: int = i, wait: Callable[[], Awaitable[object]] = wait) -> None:
                await wait()
                if not winner:
                    winner.append(i)
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)
    return winner[0]


async def watch_sender(
    node: TensorNode,
    acked: Watermark,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Follow a library node's sends: bytes the receiver acknowledged, on the live connection
    (``retry`` events repeat what the sender knew before the failure: ignored)."""
    async with node.events.subscribe() as events:
        task_status.started()
        async for event in events:
            if (
                isinstance(event, TransferEvent)
                and event.direction == "send"
                and event.state == "progress"
            ):
                acked.set(event.bytes_done)


async def watch_receives(
    socket: Path,
    checkpoints: Watermark,
    progress: Watermark | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Follow a daemon's receives on its events stream: bytes saved by checkpoints (what a
    ``kill -9`` cannot lose) and bytes received. Ends quietly when the daemon goes away."""
    try:
        async with AsyncClient(socket) as client, client.events() as events:
            task_status.started()
            async for event in events:
                if event.get("kind") != "transfer" or event.get("direction") != "receive":
                    continue
                if event.get("state") == "checkpoint":
                    checkpoints.update(int(event["bytes_done"]))
                elif progress is not None and event.get("state") == "progress":
                    progress.update(int(event["bytes_done"]))
    except TensorError:
        return


@asynccontextmanager
async def receiver(
    home: Path, port: int, *args: str, node_id: str = "r", **env: str
) -> AsyncIterator[Daemon]:
    """A ``tensord serve`` listening on ``port``, state in ``home``, ready when it yields."""
    full = {"TENSORD_NODE_ID": node_id, "TENSORD_LISTEN": f"127.0.0.1:{port}", **env}
    async with daemon(full, *args, home=home) as d:
        await d.wait_for("listening on")
        yield d


async def flush_arrivals(d: Daemon, port: int, host: str = "127.0.0.1") -> None:
    """Send a sentinel tensor and wait for its arrival in ``d``'s log: arrivals are logged in
    order, so every earlier arrival (a duplicate included) is in the log by then."""
    name = f"sentinel/{secrets.token_hex(4)}"
    async with TensorNode(fast_settings()) as node:
        await node.send_tensor(f"{host}:{port}", name, np.zeros(1, np.uint8))
    await d.wait_for(f"tensor arrived: {name!r}")
