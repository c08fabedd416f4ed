"""Faults and bad input against real tensord nodes: the reliability report.

Usage (from the repository root; ``make chaos`` runs the full mode)::

    .venv/bin/python bench/chaos.py                 # every scenario at full size (~10 min)
    .venv/bin/python bench/chaos.py --quick         # the sizes of tests/test_reliability.py
    .venv/bin/python bench/chaos.py --only kills    # some scenarios (the report is not rewritten)

Both modes rewrite ``docs/RELIABILITY.md`` (``--output PATH`` elsewhere, ``--no-write`` not at
all). The exit status is 1 if a row failed (data lost, a duplicate, a check that did not hold, an
error), if a row marked as a known bug passed (fixed? then remove the mark, like a strict xfail),
or if a scenario was skipped under ``CI=true``.

Every scenario is an async function of this module, parametrised by size, count or duration,
that returns result rows: the fault, how many times it was tried, the outcome, the bytes re-sent,
data lost (must be 0), duplicates (must be 0). ``tests/test_reliability.py`` runs the same
functions with the ``QUICK`` parameters, so CI covers them; ``FULL`` are the report's.

The receivers are real ``tensord serve`` subprocesses (``tests/support/daemons.py``) with their on-disk
store, so "what the receiver stored" is read back from the store's files and compared by
SHA-256 with what was sent, and arrivals are counted in the daemon's own log ("tensor arrived:
'name'") to find duplicates. Faults come from the test-owned proxy ``tests/support/tcp_proxy.py`` (cuts at
byte offsets, flipped bytes inside chunk payloads, a lost ``Stored``, throttling), from
``kill -9``, from a tmpfs that fills up, and from network namespaces joined by a veth pair.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import platform
import random
import re
import secrets
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import trio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import tensord.node  # noqa: E402
from bench.attacks import attacks  # noqa: E402  (scenario 13, the attacks of issue 12)
from bench.rows import Row, fmt_bytes, junit_counts, vm_status, wait_log  # noqa: E402
from tensord.config import GiB, HostPort, KiB, MiB, SecuritySettings, StoreSettings  # noqa: E402
from tensord.control.client import AsyncClient  # noqa: E402
from tensord.errors import (  # noqa: E402
    AuthenticationFailed,
    TensorError,
    TensorNotFound,
    TransferFailed,
)
from tensord.events import TransferEvent  # noqa: E402
from tensord.net.security import PeerSecurity  # noqa: E402
from tensord.net.stream import ConnectionClosed  # noqa: E402
from tensord.net.tcp import dial  # noqa: E402
from tensord.node import TensorNode, TransferResult  # noqa: E402
from tensord.store import TensorStore  # noqa: E402
from tensord.wire.frames import FrameDecoder  # noqa: E402
from tensord.wire.handshake import ALL_FEATURES, make_hello  # noqa: E402
from tensord.wire.messages import Ping, Pong  # noqa: E402
from tests.support.daemons import Daemon, cluster_secret, daemon, free_port  # noqa: E402
from tests.support.helpers import IN_CI, LogWaiter, fast_settings  # noqa: E402
from tests.support.tcp_proxy import Fault, RandomFaults, proxied  # noqa: E402
from tests.support.udp_proxy import UdpFault, UdpProxy  # noqa: E402

DOC = ROOT / "docs" / "RELIABILITY.md"

#: Rows that show a bug found by this suite (each has a strict xfail test in
#: tests/test_reliability.py). Such a row is expected to fail its checks; if it passes, the bug
#: may be fixed and the mark should go.
BUG_LOST_STORED = (
    "a lost Stored makes the sender re-send the whole tensor and the receiver store and announce "
    "it twice (TensorNode._receive forgets a committed transfer at once)"
)
BUG_RETRY_BUDGET = (
    "the retry budget counts every failure of a transfer, even after attempts that made "
    "progress (TensorNode._send_job never resets `retries`)"
)
BUG_PARTIAL_SPACE = (
    "a restarted sender cannot re-send a tensor while the partial its previous process left "
    "holds the space: the store refuses it as full (a final error) until that partial expires "
    "(TensorNode._receive never drops or adopts the same peer's partial of the same tensor)"
)
BUG_IDLE_PARTIAL = (
    "a running node never removes a partial receive abandoned by its sender unless another "
    "receive arrives after the TTL (TensorNode._expire_partials runs only in _receive)"
)


# -- small helpers (Row, fmt_bytes, vm_status and wait_log are in bench/rows.py) ----------------


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


def cluster_file(path: Path, **transfer: Any) -> Path:
    path.write_text(json.dumps({"name": "chaos", "transfer": transfer}))
    return path


# -- 1. cuts and corrupted chunks ------------------------------------------------------------


async def cuts_and_corruption(
    *,
    transfers: int = 100,
    min_size: int = 1 * KiB,
    max_size: int = 64 * MiB,
    senders: int = 4,
    cut_rate: float = 0.2,
    corrupt_rate: float = 0.01,
    chunk_size: int = 256 * KiB,
    seed: int = 1,
) -> list[Row]:
    """``transfers`` tensors of random sizes (log-uniform, seeded) from ``senders`` library
    nodes to a daemon through a proxy that cuts ``cut_rate`` of the transfer attempts at a random
    byte and flips a byte inside ``corrupt_rate`` of the chunk payloads."""
    started = time.perf_counter()
    row = Row(
        "1. Cuts and corruption",
        f"proxy cuts {cut_rate:.0%} of transfer attempts at a random byte offset and flips one "
        f"byte inside {corrupt_rate:.0%} of chunk payloads",
    )
    rng = random.Random(seed)
    sizes = [log_uniform(rng, min_size, max_size) for _ in range(transfers)]
    names = [f"chaos/{i:03d}" for i in range(transfers)]
    total = sum(sizes)
    sent: dict[str, str] = {}
    results: list[TransferResult] = []
    failures: list[str] = []
    port = free_port()
    faults = RandomFaults(cut_rate=cut_rate, corrupt_rate=corrupt_rate, seed=seed)
    settings = fast_settings(chunk_size=chunk_size, max_retries=30)
    with tempfile.TemporaryDirectory(prefix="tensord-chaos-") as tmp:
        home = Path(tmp)
        async with receiver(home, port) as d, proxied(port, {}, random_faults=faults) as proxy:
            target = f"tensord://r@{proxy.addr}"

            async def sender(k: int) -> None:
                async with TensorNode(replace(settings, node_id=f"s{k}")) as node:
                    for i in range(k, transfers, senders):
                        data = random_bytes((seed, i), sizes[i])
                        want = digest(data)
                        try:
                            results.append(await node.send_tensor(target, names[i], data))
                            sent[names[i]] = want
                        except TensorError as exc:
                            failures.append(f"{names[i]}: {exc}")

            async with trio.open_nursery() as nursery:
                for k in range(senders):
                    nursery.start_soon(sender, k)
            await flush_arrivals(d, port)
            seen = arrivals(d.text)
        state = home / "state"
        got = stored_digests(state, names)
        leftovers = partial_files(state)
        extra = {i.name for i in TensorStore(state).list()} - set(names)
    wire = proxy.bytes_upstream
    resent_payload = sum(r.bytes_resent for r in results)
    nacks = sum(r.nacks for r in results)
    retries = sum(r.retries for r in results)
    row.lost = sum(1 for n, h in sent.items() if got[n] != h)
    row.duplicates = sum(max(0, seen[n] - 1) for n in names)
    row.check(not failures, f"{len(failures)} sends failed: {failures[:3]}")
    row.check(all(seen[n] == 1 for n in sent), "a confirmed tensor was not announced once")
    row.check(not leftovers, f"partial files left in the store: {leftovers[:5]}")
    row.check(all(n.startswith("sentinel/") for n in extra), f"unexpected tensors: {extra}")
    if cut_rate:
        row.check(proxy.cuts > 0, "the proxy cut nothing: the scenario tested no cut")
    if corrupt_rate * proxy.chunks >= 1:
        row.check(proxy.chunks_corrupted > 0, "the proxy corrupted no chunk")
    row.tried = (
        f"{transfers} transfers ({fmt_bytes(min_size)}-{fmt_bytes(max_size)}, "
        f"{fmt_bytes(total)}) by {senders} senders: {proxy.transfer_attempts} attempts on "
        f"{len(proxy.conns)} connections; {proxy.cuts} cut, {proxy.chunks_corrupted} of "
        f"{proxy.chunks} chunks corrupted"
    )
    exact = sum(1 for n, h in sent.items() if got[n] == h)
    row.outcome = (
        f"{exact}/{transfers} byte-exact (sha256 of the stored file), each announced once; "
        f"{retries} retries, {nacks} nacks; no partial files left"
    )
    row.resent = (
        f"{fmt_bytes(wire - total)} through the proxy beyond the tensors' bytes "
        f"({(wire - total) / total:.1%}: chunks re-sent after a nack or cut mid-way, headers); "
        f"the senders re-sent {fmt_bytes(resent_payload)} of chunk payload, counting what the "
        "cuts lost in socket buffers"
    )
    row.figures = {
        "transfers": transfers,
        "tensor_bytes": total,
        "attempts": proxy.transfer_attempts,
        "connections": len(proxy.conns),
        "cuts": proxy.cuts,
        "chunks": proxy.chunks,
        "chunks_corrupted": proxy.chunks_corrupted,
        "nacks": nacks,
        "retries": retries,
        "wire_bytes_upstream": wire,
        "resent_payload_bytes": resent_payload,
        "chunk_size": chunk_size,
    }
    row.seconds = time.perf_counter() - started
    return [row]


# -- 2. receiver killed with SIGKILL -----------------------------------------------------------

_ON_DISK = re.compile(r"partial receive \S+ of 'big': (\d+) of (\d+) bytes on disk")


async def receiver_kills(
    *,
    size: int = 1 * GiB,
    kills: int = 20,
    window: int = 4 * MiB,
    seed: int = 2,
    rate: float | None = None,
) -> list[Row]:
    """One ``size`` transfer to a daemon that is ``kill -9``'d ``kills`` times at random points
    and restarted. The link is throttled so that the transfer outlasts the kills: every
    incarnation first saves a checkpoint (so each kill can cost at most what arrived since),
    then dies at a random byte past it."""
    started = time.perf_counter()
    row = Row(
        "2. Receiver kill -9",
        f"receiver daemon SIGKILLed at random points of one {fmt_bytes(size)} transfer and "
        "restarted",
    )
    rng = random.Random(seed)
    checkpoint = tensord.node.CHECKPOINT_INTERVAL
    rate = rate or size / (kills * 1.6 + 3.0)
    fractions = sorted(rng.uniform(0.0, 0.85) for _ in range(kills))
    data = random_bytes(seed, size)
    want = digest(data)
    # No backoff: the proxy holds the retry's connection until the receiver is back.
    settings = replace(
        fast_settings(max_retries=4 * kills + 10, retry_base_delay=0).with_transfer(
            window_bytes=window
        ),
        node_id="s",
    )
    port = free_port()
    acked = Watermark()
    kill_points: list[tuple[int, int]] = []  # (bytes acked at the kill, last checkpoint seen)
    found: list[int] = []  # bytes each restart found on disk
    logs: list[str] = []
    results: list[TransferResult] = []
    failures: list[str] = []
    done = trio.Event()
    with tempfile.TemporaryDirectory(prefix="tensord-chaos-") as tmp:
        home = Path(tmp)
        async with (
            proxied(port, {}, rate=rate) as proxy,
            TensorNode(settings) as sender,
            trio.open_nursery() as outer,
        ):
            await outer.start(watch_sender, sender, acked)

            async def send() -> None:
                try:
                    results.append(
                        await sender.send_tensor(f"tensord://r@{proxy.addr}", "big", data)
                    )
                except TensorError as exc:
                    failures.append(str(exc))
                finally:
                    done.set()

            incarnation = 0
            while True:
                async with receiver(home, port) as d:

                    def let_the_transfer_in(first: bool = incarnation == 0) -> None:
                        if first:
                            outer.start_soon(send)
                        else:  # the sender's retry has been waiting in the proxy
                            assert proxy.hold_later is not None
                            proxy.hold_later.set()

                    if incarnation:
                        m = _ON_DISK.search(d.text)
                        found.append(int(m.group(1)) if m else 0)
                        acked.set(found[-1])  # what the resumed attempt starts from
                    if incarnation == kills:
                        let_the_transfer_in()
                        await done.wait()
                        if results:
                            await d.wait_for("tensor arrived: 'big'")
                        logs.append(d.text)
                        break
                    saved = Watermark()
                    async with trio.open_nursery() as watch:
                        await watch.start(watch_receives, d.socket, saved)
                        let_the_transfer_in()  # once no checkpoint event can be missed
                        floor = found[-1] if found else 0
                        await first_of(done.wait, partial(saved.wait_above, floor))
                        if not done.is_set():
                            # A random byte past the checkpoint (before the next one), or the
                            # planned fraction if later - never so late that the transfer ends.
                            room = size - window - saved.value
                            jitter = rng.uniform(0.05, 0.9) * min(rate * checkpoint, room)
                            target = max(fractions[incarnation] * size, saved.value + jitter)
                            target = min(target, saved.value + 0.9 * room)
                            await first_of(done.wait, partial(acked.wait_for, target))
                        if not done.is_set():
                            proxy.hold_later = trio.Event()  # the retry waits for the restart
                            kill_points.append((acked.value, saved.value))
                            d.proc.kill()
                            await d.proc.wait()
                        watch.cancel_scope.cancel()
                    logs.append(d.text)
                    if done.is_set():
                        if results:
                            await d.wait_for("tensor arrived: 'big'")
                            logs[-1] = d.text
                        break
                incarnation += 1
            outer.cancel_scope.cancel()
        state = home / "state"
        got = stored_digests(state, ["big"])["big"]
        leftovers = partial_files(state)
    result = results[0] if results else None
    seen = arrivals(*logs)
    row.check(not failures, f"the transfer failed: {failures}")
    row.check(len(kill_points) == kills, f"only {len(kill_points)} of {kills} kills happened")
    row.lost = 0 if got == want else 1
    row.duplicates = max(0, seen["big"] - 1)
    row.check(seen["big"] == 1, f"'big' announced {seen['big']} times")
    row.check(not leftovers, f"partial files left: {leftovers}")
    for k, ((_, ckpt), on_disk) in enumerate(zip(kill_points, found, strict=False)):
        row.check(
            on_disk >= ckpt,
            f"kill {k + 1}: restart found {on_disk} bytes, a checkpoint had saved {ckpt}",
        )
    row.check(found == sorted(found), f"progress on disk went backwards: {found}")
    bound = sum(
        max(0, a + window + settings.tensor_protocol.chunk_size - f)
        for (a, _), f in zip(kill_points, found, strict=False)
    )
    resent = result.bytes_resent if result else 0
    if result is not None:
        row.check(
            resent <= bound,
            f"re-sent {resent} bytes, more than was unsaved at the kills ({bound})",
        )
    lost_at_kills = [max(0, a - f) for (a, _), f in zip(kill_points, found, strict=False)]
    row.tried = (
        f"{len(kill_points)} kills during one {fmt_bytes(size)} transfer ({rate / 1e6:.0f} MB/s)"
    )
    row.outcome = (
        f"{'byte-exact' if got == want else 'CORRUPT or missing'} after "
        f"{result.retries if result else '?'} retries, announced {seen['big']}x; every restart "
        "found at least the last checkpoint on disk"
    )
    per_kill = max(1, len(kill_points))
    row.resent = (
        f"{fmt_bytes(resent)} ({resent / size:.1%} of the tensor): {fmt_bytes(resent / per_kill)}"
        " per kill, of which "
        f"{fmt_bytes(statistics.mean(lost_at_kills) if lost_at_kills else 0)} acknowledged but "
        "not yet checkpointed"
    )
    row.notes = (
        "re-sent = chunks acknowledged but not yet checkpointed at the kill (checkpoints every "
        f"{checkpoint:g} s) plus the window in flight; bound checked per kill"
    )
    row.figures = {
        "size": size,
        "kills": len(kill_points),
        "rate_bytes_per_s": rate,
        "retries": result.retries if result else None,
        "bytes_resent": resent,
        "resend_bound": bound,
        "found_on_disk": found,
        "acked_at_kills": [a for a, _ in kill_points],
        "wire_bytes_upstream": proxy.bytes_upstream,
    }
    row.seconds = time.perf_counter() - started
    return [row]


# -- 3. sender restarted mid-transfer ----------------------------------------------------------


async def sender_restart(
    *, size: int = 256 * MiB, ttl: float = 2.0, running_expiry: bool = False, seed: int = 3
) -> list[Row]:
    """A sender daemon ``kill -9``'d mid-transfer and restarted; the send issued again. The
    receiver's partial is either resumed or expires after ``partial_ttl_seconds`` = ``ttl``:
    with ``running_expiry``, in the running receiver (after another receive and a store sweep,
    up to a minute); always, at the receiver's next start. No partial file may be left."""
    started = time.perf_counter()
    row = Row(
        "3. Sender restart", "sender daemon SIGKILLed mid-transfer, restarted, send re-issued"
    )
    data = random_bytes(seed, size)
    want = digest(data)
    rate = size / 5.0
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tensord-chaos-") as tmp:
        work = Path(tmp)
        np.save(work / "big.npy", data)
        cluster = cluster_file(work / "r.json", partial_ttl_seconds=ttl)
        r_home, s_home = work / "r", work / "s"
        r_home.mkdir()
        s_home.mkdir()
        r_port, s_port = free_port(), free_port()
        state = r_home / "state"
        s_env = {"TENSORD_NODE_ID": "s", "TENSORD_LISTEN": f"127.0.0.1:{s_port}"}
        logs: list[str] = []
        async with (
            receiver(r_home, r_port, "--cluster", str(cluster)) as r,
            proxied(r_port, {}, rate=rate) as proxy,
        ):
            target = f"tensord://r@{proxy.addr}"
            saved = Watermark()
            async with trio.open_nursery() as watch:
                await watch.start(watch_receives, r.socket, saved)
                async with daemon(s_env, home=s_home) as s1:
                    await s1.wait_for("listening on")
                    async with AsyncClient(s1.socket) as client:
                        await client.put("big", work / "big.npy")

                    async def doomed_send() -> None:
                        with contextlib.suppress(TensorError):
                            async with AsyncClient(s1.socket) as client:
                                await client.send(target, name="big")

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(doomed_send)
                        await saved.wait_above(0)
                        s1.proc.kill()
                        await s1.proc.wait()
                held = TensorStore(state).partials()
                row.check(len(held) == 1, f"expected one partial after the kill, found {held}")
                held_bytes = held[0].bytes_have if held else 0
                async with daemon(s_env, home=s_home) as s2:
                    await s2.wait_for("listening on")
                    async with AsyncClient(s2.socket) as client:
                        transfers = await client.send(target, name="big")
                    await r.wait_for("tensor arrived: 'big'")
                watch.cancel_scope.cancel()
            sent = transfers[0]
            resumed = "resuming 'big'" in r.text or "from before a restart" in r.text
            left = TensorStore(state).partials()
            if left:
                held_bytes = max(held_bytes, left[0].bytes_have)  # saved when the cut was seen
            if running_expiry and left:
                # The TTL runs from the partial's last write; then another receive lets the
                # node drop it and the store's sweep (every minute) removes the files.
                newest = max(p.updated for p in left)
                await trio.sleep(max(0.0, newest + ttl + 0.1 - time.time()))
                at = len(r.log)
                t0 = time.monotonic()
                await flush_arrivals(r, r_port)
                await wait_log(
                    r, "expired partial receive", at, limit=tensord.node.SWEEP_INTERVAL + 15
                )
                row.figures["running_expiry_seconds"] = time.monotonic() - t0
                notes.append(
                    f"the running receiver removed it {time.monotonic() - t0:.0f} s after the "
                    "next receive (its sweep runs every "
                    f"{tensord.node.SWEEP_INTERVAL:g} s)"
                )
                row.check(not partial_files(state), f"partial files left: {partial_files(state)}")
            await flush_arrivals(r, r_port)
            logs.append(r.text)
        left = TensorStore(state).partials()
        if left:
            # Expiry at the next start: the sweep removes what is older than the TTL.
            newest = max(p.updated for p in left)
            await trio.sleep(max(0.0, newest + ttl + 0.1 - time.time()))
            async with receiver(r_home, r_port, "--cluster", str(cluster)) as r2:
                await r2.wait_for("expired partial receive")
                logs.append(r2.text)
            notes.append("the receiver's next start removed it (older than the TTL)")
        leftovers = partial_files(state)
        got = stored_digests(state, ["big"])["big"]
    seen = arrivals(*logs)
    row.lost = 0 if got == want else 1
    row.duplicates = max(0, seen["big"] - 1)
    row.check(sent.get("nbytes") == size, f"unexpected transfer record {sent}")
    row.check(not leftovers, f"partial files leaked: {leftovers}")
    bytes_sent = int(sent.get("bytes_sent") or size)
    row.tried = f"1 kill of the sender during a {fmt_bytes(size)} transfer"
    row.outcome = (
        f"{'byte-exact' if got == want else 'CORRUPT or missing'}; the receiver's partial "
        f"({fmt_bytes(held_bytes)} on disk) was "
        + (
            "resumed"
            if resumed
            else "not resumed (a new sender process uses new transfer ids) and expired"
        )
        + "; no partial files left"
    )
    row.resent = f"{fmt_bytes(max(0, bytes_sent - (size - held_bytes)))} (what the partial held)"
    row.notes = "; ".join([f"partial_ttl_seconds = {ttl:g}", *notes])
    row.figures |= {"size": size, "partial_bytes": held_bytes, "bytes_sent": bytes_sent}
    row.seconds = time.perf_counter() - started
    return [row]


# -- 4. disk full ------------------------------------------------------------------------------


def tmpfs_missing() -> str | None:
    """Why a tmpfs cannot be mounted here (None: it can)."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "no mount/umount command"
    with tempfile.TemporaryDirectory(prefix="tensord-probe-") as tmp:
        p = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", tmp], capture_output=True, text=True
        )
        if p.returncode != 0:
            return f"mount -t tmpfs failed: {p.stderr.strip()}"
        subprocess.run(["umount", tmp], check=False)
    return None


@contextlib.contextmanager
def tmpfs(size: int) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tensord-tmpfs-") as tmp:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", tmp],
            check=True,
            capture_output=True,
        )
        try:
            yield Path(tmp)
        finally:
            if subprocess.run(["umount", tmp], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", tmp], check=False)


def _fill(path: Path) -> int:
    """Write zeros to ``path`` until the disk is full; the bytes written."""
    written = 0
    block = bytes(1 << 20)
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                written += f.write(block)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            while True:
                written += f.write(block[:4096])
    return written


async def disk_full(
    *, tensor: int = 6 * MiB, keep: int = 3, use_tmpfs: bool = True, seed: int = 4
) -> list[Row]:
    """The receiver's store runs out of room three ways: its size cap
    (``TENSORD_STORE_MAX_BYTES``), a small tmpfs as its state dir, and a tmpfs filled by
    another writer in the middle of a transfer. The sender must get a clear error, earlier
    tensors must stay intact and nothing half-written may be visible."""
    rows = [await store_quota(tensor=tensor, keep=keep, seed=seed)]
    if use_tmpfs:
        reason = tmpfs_missing()
        if reason is not None:
            for what in ("small tmpfs", "tmpfs filled mid-transfer"):
                rows.append(Row("4. Disk full", what, skipped=reason))
        else:
            rows.append(await small_disk(tensor=tensor, keep=keep, seed=seed))
            rows.append(await disk_filled_midway(tensor=tensor, seed=seed))
    return rows


async def _keep_tensors(
    node: TensorNode, addr: str, tensor: int, keep: int, seed: int
) -> dict[str, str]:
    out = {}
    for i in range(keep):
        data = random_bytes((seed, i), tensor)
        await node.send_tensor(addr, f"keep/{i}", data)
        out[f"keep/{i}"] = digest(data)
    return out


def _intact(row: Row, state: Path, kept: dict[str, str], allowed: set[str]) -> None:
    got = stored_digests(state, list(kept))
    row.lost = sum(1 for n, h in kept.items() if got[n] != h)
    names = {i.name for i in TensorStore(state).list()}
    row.check(
        names <= set(kept) | allowed, f"unexpected tensors visible: {names - set(kept) - allowed}"
    )
    row.check(not partial_files(state), f"partial files left: {partial_files(state)}")
    npy = [p.name for p in (state / "tensors").glob("*.npy")]
    row.check(len(npy) == len(names), f"{len(npy)} data files for {len(names)} tensors: {npy}")


async def store_quota(*, tensor: int = 6 * MiB, keep: int = 3, seed: int = 4) -> Row:
    """The store's size cap refuses a tensor; the earlier ones stay intact."""
    started = time.perf_counter()
    cap = keep * tensor + tensor // 2
    row = Row(
        "4. Disk full",
        f"store quota: TENSORD_STORE_MAX_BYTES = {fmt_bytes(cap)}, {keep} tensors of "
        f"{fmt_bytes(tensor)} stored, then one more",
    )
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="tensord-chaos-") as tmp:
        home = Path(tmp)
        async with (
            receiver(home, port, TENSORD_STORE_MAX_BYTES=str(cap)),
            TensorNode(fast_settings()) as node,
        ):
            addr = f"127.0.0.1:{port}"
            kept = await _keep_tensors(node, addr, tensor, keep, seed)
            t0 = time.perf_counter()
            error = await _expect_refusal(row, node, addr, random_bytes(seed, tensor))
            took = time.perf_counter() - t0
            row.check("cap" in error and "tensord rm" in error, f"unclear error: {error!r}")
        _intact(row, home / "state", kept, set())
    row.tried = "1 tensor over the cap"
    row.outcome = f"refused in {took * 1e3:.0f} ms: {error!r}; the {keep} earlier tensors intact"
    row.seconds = time.perf_counter() - started
    return row


async def _expect_refusal(row: Row, node: TensorNode, addr: str, data: Any) -> str:
    """Send ``data`` as ``over``; the refusal's message ('' and a problem if it was stored)."""
    try:
        result = await node.send_tensor(addr, "over", data)
    except TransferFailed as exc:
        row.check(exc.code == "quota", f"error code {exc.code!r}, expected 'quota'")
        return str(exc)
    row.check(False, f"a tensor over the limit was stored: {result}")
    return ""


async def small_disk(*, tensor: int = 6 * MiB, keep: int = 3, seed: int = 4) -> Row:
    """A tmpfs state dir too small for one more tensor: refused before anything is written."""
    started = time.perf_counter()
    size = keep * tensor + tensor // 2 + 2 * MiB
    row = Row(
        "4. Disk full",
        f"small disk: a {fmt_bytes(size)} tmpfs as the receiver's state dir, tensors of "
        f"{fmt_bytes(tensor)} until it is full",
    )
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="tensord-chaos-") as tmp, tmpfs(size) as mnt:
        async with (
            receiver(Path(tmp), port, TENSORD_STATE_DIR=str(mnt)),
            TensorNode(fast_settings()) as node,
        ):
            addr = f"127.0.0.1:{port}"
            kept = await _keep_tensors(node, addr, tensor, keep, seed)
            error = await _expect_refusal(row, node, addr, random_bytes(seed, tensor))
            row.check("free" in error and "tensord rm" in error, f"unclear error: {error!r}")
        _intact(row, mnt, kept, set())
    row.tried = f"{keep + 1} tensors, the last one past the free space"
    row.outcome = f"refused: {error!r}; the {keep} earlier tensors intact"
    row.seconds = time.perf_counter() - started
    return row


async def disk_filled_midway(*, tensor: int = 6 * MiB, seed: int = 4) -> Row:
    """Another writer fills the receiver's tmpfs while a tensor arrives."""
    started = time.perf_counter()
    big = 4 * tensor
    size = tensor + big + 8 * MiB
    row = Row(
        "4. Disk full",
        f"disk filled mid-transfer: another writer fills the receiver's {fmt_bytes(size)} tmpfs "
        f"while a {fmt_bytes(big)} tensor arrives",
    )
    port = free_port()
    data = random_bytes((seed, 99), big)
    want = digest(data)
    outcome = ""
    with tempfile.TemporaryDirectory(prefix="tensord-chaos-") as tmp, tmpfs(size) as mnt:
        async with (
            receiver(Path(tmp), port, TENSORD_STATE_DIR=str(mnt)) as d,
            TensorNode(fast_settings()) as node,
            proxied(port, {}, rate=big / 2.0) as proxy,
        ):
            kept = await _keep_tensors(node, f"127.0.0.1:{port}", tensor, 1, seed)
            acked = Watermark()
            errors: list[TransferFailed] = []
            filled = 0
            async with trio.open_nursery() as nursery:
                await nursery.start(watch_sender, node, acked)

                async def send() -> None:
                    try:
                        await node.send_tensor(f"tensord://r@{proxy.addr}", "big", data)
                    except TransferFailed as exc:
                        errors.append(exc)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(send)
                await acked.wait_for(big // 4)
                filled = await trio.to_thread.run_sync(_fill, mnt / "filler")
            stored = "big" in {i.name for i in TensorStore(mnt).list()}
            if errors:
                err = errors[0]
                row.check(err.code == "quota", f"error code {err.code!r}, expected 'quota'")
                row.check(
                    "free disk space" in str(err) or "tensord rm" in str(err),
                    f"unclear error: {err}",
                )
                row.check(not stored, "the failed tensor is visible in the store")
                outcome = f"refused at commit: {str(err)!r}"
            else:
                got = stored_digests(mnt, ["big"])["big"]
                row.lost += got != want
                outcome = "completed byte-exact (its space was reserved at the start)"
            warnings = d.text.count("cannot save progress")
            _intact(row, mnt, kept, {"big"} if not errors else set())
            # Room again: the same tensor goes through.
            (mnt / "filler").unlink()
            await node.send_tensor(f"127.0.0.1:{port}", "big", data)
            row.lost += stored_digests(mnt, ["big"])["big"] != want
    row.tried = f"1 transfer, {fmt_bytes(filled)} written by the other writer"
    row.outcome = (
        f"{outcome}; {warnings} checkpoints could not be saved (logged); the earlier tensor "
        "intact; after freeing space the same send succeeded byte-exact"
    )
    row.seconds = time.perf_counter() - started
    return row


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


# -- 6. bad input ----------------------------------------------------------------------------

SUITE_FILES = {
    "tests/test_hostile.py": "hostile frames against a live node (garbage msgpack, huge lengths, "
    "bad begins, path traversal names, chunks out of place, bad lz4) and a slowloris handshake",
    "tests/test_wire_fuzz.py": "hypothesis fuzzing of the frame decoder and the transfer state "
    "machines (mutated streams, msgpack token soup, wrong field types, deep nesting)",
    "tests/test_tls.py": "TLS refusals: another CA, expired certificates, a certificate for "
    "another node id, plaintext to a TLS listener and TLS to a plaintext one",
    "tests/test_auth.py": "cluster-secret refusals: wrong secret, none on either side, a "
    "replayed handshake, altered replies, a Begin before authenticating",
}


async def _closed_after(stream: trio.SocketStream, limit: float) -> float | None:
    """Seconds until the node closes ``stream`` (anything it sends is dropped); None if not
    within ``limit``."""
    t0 = trio.current_time()
    with trio.move_on_after(limit):
        try:
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, OSError):
            pass
        return trio.current_time() - t0
    return None


def _client_hello() -> bytes:
    """The first flight of a real TLS client."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="tensord")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def bad_input(
    *,
    connections: int = 50,
    attempts: int = 10,
    greedy: int = 40,
    per_peer_limit: int = 16,
    flood: int = 100,
    max_connections: int = 64,
    max_unauthenticated: int = 32,
    handshake_timeout: float = 1.0,
    run_suite: bool = False,
) -> list[Row]:
    """Bad input against a live daemon (plus, with ``run_suite``, the suite's own hostile-input
    tests, run and counted): slowloris and silent connections, garbage, TLS to a plaintext
    listener, a peer that opens many connections, a connection flood, wrong or no cluster
    secret. After each, a well-behaved peer must still be served and nothing stray stored."""
    rows: list[Row] = []
    port = free_port()
    addr = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="tensord-chaos-") as tmp:
        home = Path(tmp)
        cluster = cluster_file(
            home / "cluster.json",
            handshake_timeout=handshake_timeout,
            max_peer_connections=per_peer_limit,
            max_connections=max_connections,
            max_unauthenticated=max_unauthenticated,
        )
        async with (
            receiver(home, port, "--cluster", str(cluster)) as d,
            TensorNode(replace(fast_settings(max_retries=10), node_id="good")) as good,
        ):
            good_sent: list[str] = []

            async def served(tag: str) -> bool:
                name = f"good/{tag}"
                await good.send_tensor(addr, name, np.arange(1024, dtype=np.float32))
                good_sent.append(name)
                return True

            async def raw_closes(tag: str, fault: str, payload: bytes, n: int) -> None:
                started = time.perf_counter()
                row = Row("6. Bad input", fault)
                closes: list[float | None] = []
                ok: list[bool] = []

                async def one() -> None:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                    async with stream:
                        if payload:
                            with contextlib.suppress(trio.BrokenResourceError, OSError):
                                await stream.send_all(payload)
                        closes.append(await _closed_after(stream, handshake_timeout + 10))

                async def good_peer() -> None:
                    ok.append(await served(tag))

                async with trio.open_nursery() as nursery:
                    for _ in range(n):
                        nursery.start_soon(one)
                    nursery.start_soon(good_peer)
                closed = [c for c in closes if c is not None]
                row.check(len(closed) == n, f"{n - len(closed)} connections were never closed")
                row.check(ok == [True], "a well-behaved peer was not served meanwhile")
                row.tried = f"{n} connections"
                slowest = max(closed, default=0.0)
                row.outcome = (
                    f"{len(closed)}/{n} closed by the node (slowest after {slowest:.2f} s; "
                    f"handshake timeout {handshake_timeout:g} s); a transfer meanwhile succeeded"
                )
                row.seconds = time.perf_counter() - started
                rows.append(row)

            await raw_closes(
                "slowloris",
                "slowloris: half a length prefix, then nothing",
                b"\x00\x00",
                connections,
            )
            await raw_closes(
                "silent", "silent connections: connect, send nothing", b"", connections
            )
            await raw_closes(
                "http",
                "an HTTP request to the peer port",
                b"GET / HTTP/1.1\r\nHost: tensord\r\n\r\n",
                attempts,
            )
            await raw_closes(
                "garbage", "4 KiB of random bytes", random_bytes(6, 4096).tobytes(), attempts
            )
            await raw_closes(
                "tls", "a TLS ClientHello to the plaintext listener", _client_hello(), attempts
            )
            rows.append(await _greedy_peer(addr, greedy, per_peer_limit, d, served))
            rows.append(
                await _flood(
                    d, port, flood, max_connections, max_unauthenticated, handshake_timeout, served
                )
            )
            rows.append(await _bad_secrets(addr, attempts, d, served))
            await flush_arrivals(d, port)
            seen = arrivals(d.text)
        names = {i.name for i in TensorStore(home / "state").list()}
        stray = {n for n in names if not n.startswith(("good/", "sentinel/"))}
        for row in rows:
            row.check(not stray, f"stray tensors stored: {stray}")
        dup = sum(max(0, seen[n] - 1) for n in good_sent)
        rows[-1].duplicates = dup
    if run_suite:
        rows.extend(await trio.to_thread.run_sync(_suite_rows))
    return rows


async def _greedy_peer(
    addr: str, n: int, limit: int, d: Daemon, served: Callable[[str], Awaitable[bool]]
) -> Row:
    started = time.perf_counter()
    row = Row(
        "6. Bad input", f"one peer opens {n} connections (transfer.max_peer_connections = {limit})"
    )
    security = PeerSecurity.from_settings(SecuritySettings(secret_file=cluster_secret()))
    hello = make_hello("greedy", ALL_FEATURES, 1 << 26)
    host, _, p = addr.rpartition(":")
    at = len(d.log)
    conns = []
    accepted = refused = unreachable = 0
    try:
        for _ in range(n):
            try:
                conns.append(
                    await dial(
                        HostPort(host, int(p)),
                        hello,
                        FrameDecoder,
                        connect_timeout=10,
                        security=security,
                    )
                )
            except TensorError:
                unreachable += 1
        for seq, conn in enumerate(conns):
            reply: object = None
            try:
                await conn.stream.send(Ping(seq))
                with trio.fail_after(10):
                    reply = await conn.stream.receive()
            except (
                TensorError,
                ConnectionClosed,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                OSError,
            ):
                pass  # closed by the node: refused
            if isinstance(reply, Pong):
                accepted += 1
            else:
                refused += 1
        ok = await served("greedy")
    finally:
        for conn in conns:
            with contextlib.suppress(Exception):
                await conn.aclose()
    logged = d.text[at:].count("peer connection refused: peer greedy")
    row.check(accepted == limit, f"{accepted} connections served, the limit is {limit}")
    row.check(refused == n - limit, f"{refused} refused, expected {n - limit}")
    row.check(logged == refused, f"{logged} refusals logged for {refused}")
    row.check(ok, "a well-behaved peer was not served meanwhile")
    row.check(not unreachable, f"{unreachable} connections failed their handshake")
    row.tried = f"{n} authenticated connections from one node id"
    row.outcome = (
        f"{accepted} served, {refused} refused with a 'busy' error (each logged); other peers "
        "served"
    )
    row.seconds = time.perf_counter() - started
    return row


async def _dropped_for_newcomers(d: Daemon) -> float:
    """The daemon's count of strangers dropped for newer ones (its /metrics)."""
    transport = httpx.AsyncHTTPTransport(uds=str(d.socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://tensord") as client:
        text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith('tensord_peer_connections_dropped_total{reason="budget"} '):
            return float(line.split()[-1])
    return 0.0


async def _flood(
    d: Daemon,
    port: int,
    n: int,
    limit: int,
    budget: int,
    handshake: float,
    served: Callable[[str], Awaitable[bool]],
) -> Row:
    """``n`` silent connections at once. They are strangers (not authenticated): they share
    ``transfer.max_unauthenticated`` slots, and each newcomer over it (or over
    ``max_connections``) drops the oldest stranger (sshd's MaxStartups), so the newest
    ``budget`` wait out ``transfer.handshake_timeout`` and the rest are closed at once."""
    started = time.perf_counter()
    row = Row(
        "6. Bad input",
        f"connection flood: {n} silent connections at once (transfer.max_unauthenticated = "
        f"{budget}, max_connections = {limit})",
    )
    dropped_before = await _dropped_for_newcomers(d)
    streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(n)]
    closes: list[float | None] = [None] * n

    async def watch(i: int) -> None:
        closes[i] = await _closed_after(streams[i], handshake + 10)

    ok: list[bool] = []

    good_after = 0.0

    async def good_peer() -> None:
        nonlocal good_after
        t0 = time.perf_counter()
        ok.append(await served("flood"))
        good_after = time.perf_counter() - t0

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(watch, i)
        nursery.start_soon(good_peer)
    for s in streams:
        await s.aclose()
    dropped = int(await _dropped_for_newcomers(d) - dropped_before)
    fast = sum(1 for c in closes if c is not None and c < handshake / 2)
    slow = sum(1 for c in closes if c is not None and c >= handshake / 2)
    kept = min(budget, limit)
    row.check(all(c is not None for c in closes), "some connections were never closed")
    row.check(fast >= n - kept, f"only {fast} closed at once, {n - kept} over the budget")
    row.check(slow <= kept, f"{slow} waited for the handshake timeout, the budget is {kept}")
    row.check(dropped >= n - kept, f"the daemon counted {dropped} strangers dropped for newer")
    row.check(ok == [True], "a well-behaved peer was not served after the flood")
    row.tried = f"{n} connections"
    row.outcome = (
        f"{fast} oldest strangers dropped at once for newer ones ({dropped} counted in "
        f"tensord_peer_connections_dropped{{reason=budget}}), the newest {slow} closed at the "
        f"handshake timeout ({handshake:g} s); a peer with an open pooled connection was "
        f"served meanwhile ({good_after * 1e3:.0f} ms)"
    )
    row.figures = {"closed_at_once": fast, "closed_at_timeout": slow, "dropped_metric": dropped}
    row.seconds = time.perf_counter() - started
    return row


async def _bad_secrets(
    addr: str, n: int, d: Daemon, served: Callable[[str], Awaitable[bool]]
) -> Row:
    started = time.perf_counter()
    row = Row("6. Bad input", "wrong cluster secret, and no secret at all")
    at = len(d.log)
    refused: list[float] = []
    with tempfile.TemporaryDirectory(prefix="tensord-chaos-") as tmp:
        wrong = Path(tmp) / "wrong.secret"
        wrong.write_text(os.urandom(32).hex() + "\n")
        variants = [
            replace(fast_settings(), security=SecuritySettings(secret_file=wrong)),
            fast_settings(authenticated=False),
        ]
        for i in range(n):
            async with TensorNode(variants[i % 2]) as node:
                t0 = time.perf_counter()
                try:
                    with trio.fail_after(10):
                        await node.send_tensor(addr, "intruder", np.ones(16))
                    row.check(False, "a peer without the cluster secret stored a tensor")
                except AuthenticationFailed:
                    refused.append(time.perf_counter() - t0)
                except TensorError as exc:
                    row.check(False, f"not an authentication error: {exc!r}")
    logged = d.text[at:].count("refused")
    row.check(len(refused) == n, f"{len(refused)} of {n} refused")
    row.check(logged >= n, f"only {logged} refusals in the node's log for {n} attempts")
    row.check(await served("secrets"), "a well-behaved peer was not served")
    row.tried = f"{n} sends ({n - n // 2} wrong secret, {n // 2} none)"
    row.outcome = (
        f"{len(refused)} refused with AuthenticationFailed in at most "
        f"{max(refused, default=0) * 1e3:.0f} ms, no retry; each refusal logged by the node"
    )
    row.seconds = time.perf_counter() - started
    return row


def _suite_rows() -> list[Row]:
    """Run the suite's hostile-input test files and count their cases."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="tensord-chaos-") as tmp:
        for path, what in SUITE_FILES.items():
            started = time.perf_counter()
            xml = Path(tmp) / "junit.xml"
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    path,
                    f"--junitxml={xml}",
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            row = Row("6. Bad input", f"{path}: {what}")
            counts = junit_counts(xml)
            cases = sum(counts.values())
            row.check(
                proc.returncode == 0,
                f"pytest exited {proc.returncode}: {proc.stdout.strip().splitlines()[-1:]}",
            )
            row.check(cases > 0, "no test ran")
            row.tried = f"{cases} test cases"
            row.outcome = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
            row.seconds = time.perf_counter() - started
            rows.append(row)
    return rows


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


# -- known bugs, each also a strict xfail test --------------------------------------------------


async def lost_confirmation(*, size: int = 8 * MiB, seed: int = 8) -> list[Row]:
    """The receiver stores a tensor but its ``Stored`` never reaches the sender (the connection
    is cut just before it): the sender retries. Expected: no second copy, little re-sent."""
    started = time.perf_counter()
    row = Row(
        "8. Lost confirmation",
        "the connection is cut just before the receiver's Stored reaches the sender",
    )
    port = free_port()
    data = random_bytes(seed, size)
    with tempfile.TemporaryDirectory(prefix="tensord-chaos-") as tmp:
        home = Path(tmp)
        async with (
            receiver(home, port) as d,
            proxied(port, {0: Fault(cut_before_down="stored")}) as proxy,
            TensorNode(fast_settings()) as node,
        ):
            result = await node.send_tensor(f"tensord://r@{proxy.addr}", "x", data)
            await flush_arrivals(d, port)
            seen = arrivals(d.text)
        got = stored_digests(home / "state", ["x"])["x"]
    row.lost = 0 if got == digest(data) else 1
    row.duplicates = max(0, seen["x"] - 1)
    row.check(proxy.conns[0].cut, "the proxy did not cut before Stored")
    row.check(
        result.bytes_resent < size // 2,
        f"the sender re-sent {fmt_bytes(result.bytes_resent)} of a tensor already stored",
    )
    row.figures = {
        "cut_before_stored": proxy.conns[0].cut,
        "arrivals": seen["x"],
        "retries": result.retries,
        "bytes_resent": result.bytes_resent,
        "size": size,
    }
    row.tried = "1 transfer"
    row.outcome = f"stored byte-exact, announced {seen['x']}x; {result.retries} retry"
    row.resent = f"{fmt_bytes(result.bytes_resent)} ({result.bytes_resent / size:.0%})"
    row.seconds = time.perf_counter() - started
    return [row]


async def retry_budget(*, size: int = 16 * MiB, cuts: int = 4, max_retries: int = 3) -> list[Row]:
    """A transfer cut ``cuts`` times, each attempt getting further than the last (resume works),
    with ``max_retries`` (3, the default) below ``cuts``. Expected: it completes, since no
    attempt failed without progress."""
    started = time.perf_counter()
    row = Row(
        "9. Retry budget",
        f"{cuts} cuts, each after the attempt made progress, with max_retries = {max_retries}",
    )
    data = random_bytes(9, size)
    settings = fast_settings(max_retries=max_retries, chunk_size=256 * KiB)
    async with TensorNode(settings) as a, TensorNode(fast_settings()) as b:
        faults = {i: Fault(cut_in_transfer=0.5) for i in range(cuts)}
        async with proxied(b.port, faults) as proxy:
            error = ""
            try:
                await a.send_tensor(f"tensord://{b.node_id}@{proxy.addr}", "x", data)
            except TransferFailed as exc:
                error = str(exc)
        progress = [c.upstream for c in proxy.conns]
    row.check(not error, f"failed: {error}")
    row.check(sum(c.cut for c in proxy.conns) == cuts, "the proxy did not cut as planned")
    row.figures = {
        "cuts": sum(c.cut for c in proxy.conns),
        "attempt_bytes": progress,
        "failed": bool(error),
        "max_retries": max_retries,
    }
    row.tried = f"1 transfer of {fmt_bytes(size)}"
    row.outcome = (
        f"failed: {error!r} (attempts carried {', '.join(fmt_bytes(p) for p in progress)})"
        if error
        else "completed"
    )
    row.seconds = time.perf_counter() - started
    return [row]


async def idle_partial_expiry(
    *, size: int = 8 * MiB, ttl: float = 0.3, sweep: float = 0.1, wait: float = 5.0
) -> list[Row]:
    """A sender gives up mid-transfer and nothing else arrives: the receiver's partial should
    be removed once ``ttl`` has passed. A library node with a store, its sweep made to run every
    ``sweep`` s; the removal is waited for on the store's log (up to ``wait`` s)."""
    started = time.perf_counter()
    row = Row(
        "10. Idle partial expiry",
        f"sender gives up mid-transfer, then no traffic (partial_ttl_seconds = {ttl:g}, store "
        f"sweep every {sweep:g} s)",
    )
    old_sweep = tensord.node.SWEEP_INTERVAL
    tensord.node.SWEEP_INTERVAL = sweep
    expired = None
    waiter = LogWaiter(lambda message: "expired partial receive" in message)
    try:
        with (
            waiter.watching("tensord.store"),
            tempfile.TemporaryDirectory(prefix="tensord-chaos-") as tmp,
        ):
            state = Path(tmp)
            settings = replace(
                fast_settings().with_transfer(partial_ttl_seconds=ttl), state_dir=state
            )
            async with TensorNode(settings) as b:
                async with (
                    TensorNode(fast_settings(max_retries=0, chunk_size=256 * KiB)) as a,
                    proxied(b.port, {0: Fault(cut_in_transfer=0.5)}) as proxy,
                ):
                    with contextlib.suppress(TransferFailed):
                        await a.send_tensor(
                            f"tensord://{b.node_id}@{proxy.addr}", "x", random_bytes(10, size)
                        )
                held = partial_files(state)
                t0 = time.perf_counter()
                with trio.move_on_after(wait):
                    await waiter.event.wait()
                    expired = time.perf_counter() - t0
                left = partial_files(state)
    finally:
        tensord.node.SWEEP_INTERVAL = old_sweep
    row.figures = {"held": bool(held), "expired_after_s": expired, "files_left": len(left)}
    row.check(bool(held), "the cut left no partial to expire")
    row.check(expired is not None, f"not expired {wait:g} s after the TTL: {left}")
    row.check(not left, f"partial files leaked: {left}")
    row.tried = "1 abandoned transfer"
    row.outcome = (
        f"expired after {expired:.2f} s"
        if expired is not None
        else f"still on disk {wait:g} s later ({fmt_bytes(size)} reserved): {len(left)} files"
    )
    row.seconds = time.perf_counter() - started
    return [row]


async def restarted_sender_space(*, size: int = 16 * MiB, cap: float = 1.5) -> list[Row]:
    """A sender restarted mid-transfer re-sends the same tensor to a receiver whose store cap
    is ``cap`` times the tensor: room for one copy, not for the copy plus the abandoned
    partial. Expected: the re-send succeeds (the old partial is dropped or resumed)."""
    started = time.perf_counter()
    row = Row(
        "11. Sender restart, tight space",
        f"sender restarted mid-transfer re-sends a {fmt_bytes(size)} tensor to a store capped "
        f"at {cap:g}x its size",
    )
    data = random_bytes(11, size)
    error = ""
    with tempfile.TemporaryDirectory(prefix="tensord-chaos-") as tmp:
        state = Path(tmp)
        settings = replace(
            fast_settings(),
            node_id="r",
            state_dir=state,
            store=StoreSettings(max_bytes=int(size * cap)),
        )
        async with TensorNode(settings) as b:
            first = replace(fast_settings(max_retries=0, chunk_size=256 * KiB), node_id="s")
            async with (
                TensorNode(first) as a1,
                proxied(b.port, {0: Fault(cut_in_transfer=0.5)}) as proxy,
            ):
                with contextlib.suppress(TransferFailed):
                    await a1.send_tensor(f"tensord://r@{proxy.addr}", "w", data)
            held = TensorStore(state).partials()
            async with TensorNode(replace(fast_settings(), node_id="s")) as a2:  # restarted
                try:
                    await a2.send_tensor(b.addr, "w", data)
                except TensorError as exc:
                    error = str(exc)
            stored = stored_digests(state, ["w"])["w"]
    row.figures = {"held": len(held), "failed": bool(error), "stored": stored is not None}
    row.check(len(held) == 1, f"expected one abandoned partial, found {held}")
    row.check(not error, f"the re-send failed: {error}")
    if not error:
        row.lost = 0 if stored == digest(data) else 1
    row.tried = "1 restart"
    row.outcome = f"refused: {error!r}" if error else "re-sent byte-exact"
    row.seconds = time.perf_counter() - started
    return [row]


# -- the runner ------------------------------------------------------------------------------

# -- 12. QUIC: a lossy path that goes dark, a rebinding, a restarted receiver ----------------


async def quic_path_faults(
    *,
    transfers: int = 40,
    max_size: int = 32 * MiB,
    cuts: int = 6,
    loss: float = 0.01,
    seed: int = 12,
) -> list[Row]:
    """Transfers over QUIC to a daemon through the UDP proxy (``tests/support/udp_proxy.py``): every
    datagram may be lost or reordered, ``cuts`` connections have their path go dark for good at
    a random byte (QUIC has no RST: the sender learns it from silence), one gets a corrupted
    datagram, one a NAT rebinding. Then the receiver is killed with SIGKILL and restarted on
    the same port, and one more transfer goes over the connection the sender still holds."""
    started = time.perf_counter()
    row = Row(
        "12. QUIC path faults",
        f"QUIC through a UDP proxy losing {loss:.0%} and reordering {loss:.0%} of datagrams; "
        f"{cuts} connections go dark at a random byte, one corrupted datagram, one NAT "
        "rebinding; then the receiver is SIGKILLed and restarted",
    )
    rng = random.Random(seed)
    sizes = [log_uniform(rng, 1 * KiB, max_size) for _ in range(transfers)]
    total = sum(sizes)
    # Connection i goes dark after a random share of what an even split would carry, so that
    # every cut happens; the first surviving connection gets the corruption and the rebinding.
    spans = [int(rng.uniform(0.2, 1.0) * total / (cuts + 1)) for _ in range(cuts)]
    faults = {i: UdpFault(cut_after=span) for i, span in enumerate(spans)}
    faults[cuts] = UdpFault(corrupt_at=total // (4 * (cuts + 1)), rebind_after=total // (cuts + 1))
    settings = replace(
        fast_settings(max_retries=3 * cuts + 5),
        node_id="s",
        transport="quic",
    ).with_transfer(connect_timeout=1.0, io_timeout=1.5)
    port = free_port()
    datas = [random_bytes((seed, i), n) for i, n in enumerate(sizes)]
    results: list[TransferResult] = []
    failures: list[str] = []
    resets = LogWaiter(lambda message: "stateless reset" in message)
    with (
        resets.watching("tensord.net"),
        tempfile.TemporaryDirectory(prefix="tensord-chaos-") as tmp,
    ):
        home = Path(tmp)
        async with TensorNode(settings) as node, trio.open_nursery() as nursery:
            proxy = UdpProxy(("127.0.0.1", port), loss=loss, reorder=loss, seed=seed, faults=faults)
            await nursery.start(proxy.run)
            addr = f"tensord://r@{proxy.addr}"
            async with receiver(home, port, TENSORD_TRANSPORT="quic") as d:
                for i, data in enumerate(datas):
                    try:
                        results.append(await node.send_tensor(addr, f"t{i}", data))
                    except TensorError as exc:
                        failures.append(f"t{i}: {exc}")
                await flush_arrivals(d, port)
                logs = [d.text]
                d.proc.kill()
                await d.proc.wait()
            last = random_bytes((seed, transfers), 1 * MiB)
            async with receiver(home, port, TENSORD_TRANSPORT="quic") as d:
                try:
                    with trio.fail_after(10):  # well below io_timeout + idle timeout
                        after = await node.send_tensor(addr, "last", last)
                except (TensorError, trio.TooSlowError) as exc:
                    failures.append(f"after the restart: {exc!r}")
                    after = None
                if after is not None:
                    await d.wait_for("tensor arrived: 'last'")
                logs.append(d.text)
            nursery.cancel_scope.cancel()
        names = [f"t{i}" for i in range(transfers)]
        stored = stored_digests(home / "state", [*names, "last"])
        leftovers = partial_files(home / "state")
    seen = arrivals(*logs)
    bad = [n for n, data in zip(names, datas, strict=True) if stored[n] != digest(data)]
    if stored["last"] != digest(last):
        bad.append("last")
    row.lost = len(bad)
    row.duplicates = sum(max(0, seen[n] - 1) for n in [*names, "last"])
    row.check(not failures, f"transfers failed: {failures}")
    row.check(not bad, f"not stored byte-exact: {bad}")
    dark = sum(c.cut for c in proxy.conns)
    row.check(dark == cuts, f"{dark} of {cuts} paths went dark")
    row.check(proxy.stats.rebound == 1, "the NAT rebinding did not happen")
    row.check(proxy.conns[cuts].corrupted, "no datagram was corrupted")
    row.check(resets.count >= 1, "the restarted receiver's stateless reset was not seen")
    row.check(after is not None and after.retries <= 1, f"after the restart: {after}")
    row.check(not leftovers, f"partial files left: {leftovers}")
    retries = sum(r.retries for r in results)
    resent = sum(r.bytes_resent for r in results)
    row.tried = (
        f"{transfers} transfers ({fmt_bytes(min(sizes))}-{fmt_bytes(max(sizes))}, "
        f"{fmt_bytes(total)}) on {len(proxy.conns)} QUIC connections; "
        f"{proxy.stats.dropped} datagrams dropped, {proxy.stats.reordered} reordered; "
        f"1 kill -9 of the receiver"
    )
    row.outcome = (
        f"{transfers - len([b for b in bad if b != 'last'])}/{transfers} byte-exact, each "
        f"announced once; {retries} retries for {dark} dark paths (each noticed at io_timeout, "
        "the retry on a new connection); the rebinding cost no retry; after the restart the "
        f"old connection was reset at once ({after.retries if after else '?'} retry)"
    )
    row.resent = f"{fmt_bytes(resent)} ({resent / total:.1%} of the tensors' bytes)"
    row.figures = {
        "transfers": transfers,
        "tensor_bytes": total,
        "connections": len(proxy.conns),
        "dark_paths": dark,
        "retries": retries,
        "bytes_resent": resent,
        "datagrams_dropped": proxy.stats.dropped,
        "datagrams_reordered": proxy.stats.reordered,
        "stateless_resets": resets.count,
    }
    row.seconds = time.perf_counter() - started
    return [row]


Scenario = Callable[..., Awaitable[list[Row]]]

SCENARIOS: dict[str, Scenario] = {
    "cuts": cuts_and_corruption,
    "kills": receiver_kills,
    "sender": sender_restart,
    "disk": disk_full,
    "load": load,
    "bad": bad_input,
    "netns": netns_link_flap,
    "lost-stored": lost_confirmation,
    "retries": retry_budget,
    "idle-partial": idle_partial_expiry,
    "partial-space": restarted_sender_space,
    "quic": quic_path_faults,
    "attacks": attacks,
}

FULL: dict[str, dict[str, Any]] = {
    "cuts": {"transfers": 100, "max_size": 64 * MiB, "senders": 4, "chunk_size": 256 * KiB},
    "kills": {"size": 1 * GiB, "kills": 20},
    "sender": {"size": 256 * MiB, "ttl": 5.0, "running_expiry": True},
    "disk": {"tensor": 16 * MiB},
    "load": {"peers": 50, "seconds": 60.0},
    "bad": {"run_suite": True},
    "netns": {"size": 256 * MiB, "down_seconds": 2.0},
    "lost-stored": {"size": 64 * MiB},
    "retries": {"size": 64 * MiB},
    "idle-partial": {"size": 64 * MiB},
    "partial-space": {"size": 64 * MiB},
    "quic": {},
    "attacks": {"fuzz": True},
}

#: The shortened form tests/test_reliability.py runs (well under 90 s in all on 2 cores).
QUICK: dict[str, dict[str, Any]] = {
    "cuts": {
        "transfers": 20,
        "max_size": 4 * MiB,
        "senders": 2,
        "chunk_size": 64 * KiB,
        "corrupt_rate": 0.02,
    },
    "kills": {"size": 64 * MiB, "kills": 3},
    "sender": {"size": 32 * MiB, "ttl": 0.5},
    "disk": {"tensor": 4 * MiB},
    "load": {"peers": 10, "seconds": 5.0, "max_size": 1 * MiB},
    "bad": {
        "connections": 20,
        "attempts": 4,
        "greedy": 24,
        "per_peer_limit": 8,
        "flood": 48,
        "max_connections": 32,
        "max_unauthenticated": 16,
    },
    "netns": {"size": 32 * MiB, "down_seconds": 1.0},
    "lost-stored": {},
    "retries": {},
    "idle-partial": {"wait": 2.0},
    "partial-space": {},
    "quic": {"transfers": 10, "max_size": 4 * MiB, "cuts": 2},
    "attacks": {
        "name_rounds": 1,
        "mc_attempts": 2,
        "strangers": 24,
        "max_connections": 16,
        "max_unauthenticated": 8,
        "quic_more": 6,
        "quic_limit": 6,
        "lie_bytes": 8 * MiB,
        "fifo_requests": 48,
        "slow_bodies_n": 8,
        "read_timeout": 0.5,
    },
}

#: Seconds a scenario may run (full mode; half that in quick mode). The attacks run the stateful
#: fuzzers for long in full mode (the peer fuzzer alone takes ~8 min on 2 cores).
LIMITS = {"kills": 600.0, "load": 300.0, "sender": 300.0, "attacks": 4000.0}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * KiB
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "tensord"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram": ram,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "git": f"{commit or 'unknown'}{' with uncommitted changes in tensord/' if dirty else ''}",
        "root": os.geteuid() == 0,
        "loadavg": os.getloadavg(),
    }


async def run_all(names: list[str], quick: bool) -> list[Row]:
    rows: list[Row] = []
    params = QUICK if quick else FULL
    for name in names:
        fn = SCENARIOS[name]
        print(f"== {name}: {fn.__name__}({params[name]})", flush=True)
        started = time.perf_counter()
        try:
            with trio.fail_after(LIMITS.get(name, 300.0) * (0.5 if quick else 1.0)):
                got = await fn(**params[name])
        except Exception as exc:  # one scenario's failure is a row; the others still run
            traceback.print_exc()
            got = [
                Row(
                    name,
                    fn.__doc__.strip().splitlines()[0] if fn.__doc__ else name,
                    outcome=f"error: {type(exc).__name__}: {exc}",
                    problems=[f"{type(exc).__name__}: {exc}"],
                    known_bug=BUG_NAMES.get(name, ""),
                )
            ]
        for row in got:
            print(f"   [{row.status}] {row.fault}: {row.tried}: {row.outcome}", flush=True)
            if row.resent != "-":
                print(f"      re-sent: {row.resent}", flush=True)
            if row.figures:
                print(f"      {json.dumps(row.figures, default=_num)}", flush=True)
            for p in row.problems:
                print(f"      problem: {p}", flush=True)
        print(f"   ({time.perf_counter() - started:.1f} s)", flush=True)
        rows.extend(got)
    return rows


#: No row is a known bug now: the four this suite found (FOUND_AND_FIXED) are fixed, and their
#: rows are ordinary checks.
BUG_NAMES: dict[str, str] = {}
FOUND_AND_FIXED = (BUG_LOST_STORED, BUG_RETRY_BUDGET, BUG_IDLE_PARTIAL, BUG_PARTIAL_SPACE)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(rows: list[Row], m: dict[str, Any], quick: bool, seconds: float) -> str:
    mode = "quick (shortened: `--quick`)" if quick else "full (`make chaos`)"
    out = [
        "# Reliability: faults and bad input, with nothing lost",
        "",
        "<!-- Generated by bench/chaos.py; edit that file, not this one. -->",
        "",
        "tensord moves tensors over a chunk protocol with a crc32c per chunk, acknowledgements,",
        "retries with backoff and resume from the last good chunk, also across restarts of the",
        "receiver (its store checkpoints progress to disk). This report is what happens when",
        "things go wrong on purpose: connections cut at random bytes, chunk payloads corrupted, a",
        "receiver killed with SIGKILL again and again, a sender restarted, the disk filling up,",
        "fifty peers at once, hostile and unauthenticated peers, two hosts (network",
        "namespaces) whose link goes down, QUIC paths that lose datagrams, go dark and",
        "rebind, and the attacks of issue 12 (hostile peers, registries, download servers and",
        "local clients: after each the daemon must live on, its peak RSS within 64 MiB of",
        "before, and serve a legitimate peer). Receivers are real `tensord serve` processes; what",
        "they stored is read back from their store and compared by SHA-256 with what was sent,",
        "and duplicates are counted from the arrivals in their logs. **Data lost must be 0.**",
        "",
        "Regenerate with `make chaos` (full sizes, several minutes; `bench/chaos.py --quick` for",
        "the shortened form). CI runs every scenario in the shortened form as",
        "`tests/test_reliability.py`. Faults come from the test-owned proxies `tests/support/tcp_proxy.py`",
        "(TCP) and `tests/support/udp_proxy.py` (QUIC).",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram'] / GiB:.1f} GiB RAM, {m['kernel']},",
        f"  Python {m['python']}{', as root' if m['root'] else ''}",
        f"- Date: {m['date']}; code: {m['git']}",
        f"- Mode: {mode}; the run took {seconds / 60:.1f} min; load average at the start "
        + ", ".join(f"{x:.2f}" for x in m["loadavg"])
        + " (throughput and timings vary with what else the machine runs)",
        "",
        "## Every fault and bad input tried",
        "",
        "| Scenario | Fault or bad input | Tried | Outcome | Bytes re-sent | Data lost | "
        "Dupl. | Status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        outcome = r.outcome if not r.skipped else f"skipped: {r.skipped}"
        if r.problems and r.status != "known bug":
            outcome += " **Problems:** " + "; ".join(r.problems)
        out.append(
            "| "
            + " | ".join(
                _cell(x)
                for x in (
                    r.scenario,
                    r.fault,
                    r.tried,
                    outcome,
                    r.resent,
                    r.lost,
                    r.duplicates,
                    f"**{r.status}**" if r.status != "pass" else r.status,
                )
            )
            + " |"
        )
    lost = sum(r.lost for r in rows)
    out += ["", f"Data lost over the whole run: **{lost}**.", ""]
    out += ["## Figures", "", *figure_lines(rows), ""]
    out += ["<details><summary>Every row's raw figures and run time</summary>", ""]
    for r in rows:
        line = f"- {r.scenario}, {r.fault} ({r.seconds:.1f} s)"
        if r.notes:
            line += f": {r.notes}"
        if r.figures:
            line += " `" + json.dumps(r.figures, default=_num) + "`"
        out.append(line)
    out += ["", "</details>", ""]
    bugs = [r for r in rows if r.known_bug]
    if bugs:
        out += [
            "",
            "## Known bugs found by this suite",
            "",
            "Each has a strict `xfail` test in `tests/test_reliability.py` that starts passing",
            "when the bug is fixed (then remove the mark; this report would show **FIXED?**).",
            "",
        ]
        for r in bugs:
            out.append(f"- **{r.scenario}** [{r.status}]: {r.known_bug}. Observed: {r.outcome}.")
    out += [
        "",
        "## Bugs this suite found, now fixed",
        "",
        "Each scenario below is an ordinary check now (a row above and a test in",
        "`tests/test_reliability.py`):",
        "",
        *(f"- {bug}." for bug in FOUND_AND_FIXED),
    ]
    out += [
        "",
        "## How each scenario works",
        "",
    ]
    for name, fn in SCENARIOS.items():
        doc = " ".join((fn.__doc__ or "").split())
        out.append(f"- `{fn.__name__}` ({name}): {doc}")
    out.append("")
    return "\n".join(out)


def figure_lines(rows: list[Row]) -> list[str]:
    """The headline figures, readable: bytes re-sent, load throughput and memory."""
    out: list[str] = []

    def find(prefix: str) -> Row | None:
        return next((r for r in rows if r.scenario.startswith(prefix) and r.figures), None)

    if (r := find("1.")) is not None:
        f = r.figures
        extra = f["wire_bytes_upstream"] - f["tensor_bytes"]
        out.append(
            f"- **Bytes re-sent under cuts and corruption**: {fmt_bytes(extra)} through the "
            f"proxy beyond {fmt_bytes(f['tensor_bytes'])} of tensors "
            f"({extra / f['tensor_bytes']:.2%}) for {f['cuts']} cuts and "
            f"{f['chunks_corrupted']} corrupted chunks of {fmt_bytes(f['chunk_size'])}; the "
            f"senders re-sent {fmt_bytes(f['resent_payload_bytes'])} of chunk payload."
        )
    if (r := find("2.")) is not None:
        f = r.figures
        kills = max(1, f["kills"])
        out.append(
            f"- **Bytes re-sent after kill -9**: {fmt_bytes(f['bytes_resent'])} over "
            f"{f['kills']} kills of a {fmt_bytes(f['size'])} transfer "
            f"({fmt_bytes(f['bytes_resent'] / kills)} per kill; the bound - acknowledged but "
            f"not yet checkpointed, plus the window in flight - was "
            f"{fmt_bytes(f['resend_bound'])})."
        )
    if (r := find("3.")) is not None:
        f = r.figures
        out.append(
            f"- **Sender restart**: the abandoned partial held {fmt_bytes(f['partial_bytes'])}; "
            "those bytes were sent again by the restarted sender."
            + (
                f" The running receiver removed it {f['running_expiry_seconds']:.0f} s after "
                "the next receive."
                if "running_expiry_seconds" in f
                else ""
            )
        )
    if (r := find("5.")) is not None:
        f = r.figures
        out.append(
            f"- **Load**: {f['peers']} peers, {f['transfers']} transfers, "
            f"{fmt_bytes(f['bytes'])} in {f['seconds']:.0f} s: "
            f"{f['throughput_bytes_per_s'] / 1e6:.0f} MB/s, "
            f"{f['transfers'] / f['seconds']:.0f} transfers/s, latency p50 "
            f"{f['latency_p50_s'] * 1e3:.0f} ms / p99 {f['latency_p99_s'] * 1e3:.0f} ms, "
            f"{f['retries']} retries. Every receive is committed to disk (fsync) before the "
            "sender hears Stored."
        )
        out.append(
            f"- **Receiver memory under load**: peak RSS (VmHWM) {fmt_bytes(f['rss_peak_vmhwm'])}"
            f", idle {fmt_bytes(f['rss_idle'])}, at the end {fmt_bytes(f['rss_end'])} "
            f"(anonymous {fmt_bytes(f['rss_anon_end'])}; the rest is the store's mapped files)."
        )
    if (r := find("7.")) is not None:
        f = r.figures
        out.append(
            f"- **Separate hosts**: {fmt_bytes(f['size'])} in {f['seconds']:.1f} s "
            f"({f['size'] / f['seconds'] / 1e6:.1f} MB/s including the outage), "
            f"{f['retries']} retries."
        )
    attacked = [r for r in rows if r.scenario.startswith("13.") and "rss_growth" in r.figures]
    if attacked:
        worst = max(attacked, key=lambda r: r.figures["rss_growth"])
        out.append(
            f"- **Daemon memory under the attacks of issue 12**: peak RSS grew by at most "
            f"{fmt_bytes(max(worst.figures['rss_growth'], 0))} during any of {len(attacked)} "
            f"attacks (the limit is 64 MiB; the largest was: {worst.fault}), from "
            f"{fmt_bytes(worst.figures['rss_before'])}."
        )
    return out


def _num(x: Any) -> Any:
    return float(x) if isinstance(x, np.floating | np.integer) else str(x)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the shortened sizes of the tests")
    parser.add_argument(
        "--only", default="", help="comma-separated scenarios: " + ", ".join(SCENARIOS)
    )
    parser.add_argument("--output", type=Path, default=DOC, help="the report (docs/RELIABILITY.md)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tensord").setLevel(logging.ERROR)  # the faults make senders warn a lot
    names = [n for n in args.only.split(",") if n] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}: choose from {', '.join(SCENARIOS)}")
    m = machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['kernel']}; {m['date']}", flush=True)
    started = time.perf_counter()
    rows = trio.run(run_all, names, args.quick)
    seconds = time.perf_counter() - started
    if not args.no_write and not args.only:
        args.output.write_text(render(rows, m, args.quick, seconds))
        print(f"wrote {args.output}")
    bad = [r for r in rows if r.status in ("FAIL", "FIXED?") or (r.skipped and IN_CI)]
    print(
        f"{len(rows)} rows in {seconds / 60:.1f} min: "
        + ", ".join(f"{v} {k}" for k, v in Counter(r.status for r in rows).items())
        + f"; data lost: {sum(r.lost for r in rows)}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
