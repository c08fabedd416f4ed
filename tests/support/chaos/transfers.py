"""Chaos scenarios about transfers: cuts and corrupted chunks (1), a receiver killed with SIGKILL
again and again (2), a sender restarted (3), a lost ``Stored`` (8), the retry budget (9), an
abandoned partial on an idle node (10), a restarted sender short of space (11).
"""

from __future__ import annotations

import contextlib
import random
import re
import statistics
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import trio

import tensord.node
from tensord.config import GiB, KiB, MiB, StoreSettings
from tensord.control.client import AsyncClient
from tensord.errors import (
    TensorError,
    TransferFailed,
)
from tensord.node import TensorNode, TransferResult
from tensord.store import TensorStore

from ..cluster import write_cluster_file
from ..daemons import daemon, free_port
from ..helpers import LogWaiter, fast_settings
from ..tcp_proxy import Fault, RandomFaults, proxied
from .common import (
    Watermark,
    arrivals,
    digest,
    first_of,
    flush_arrivals,
    log_uniform,
    partial_files,
    random_bytes,
    receiver,
    stored_digests,
    watch_receives,
    watch_sender,
)
from .rows import Row, fmt_bytes, wait_log

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

ON_DISK = re.compile(r"partial receive \S+ of 'big': (\d+) of (\d+) bytes on disk")


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
                        m = ON_DISK.search(d.text)
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
        cluster = write_cluster_file(
            work / "r.json", name="chaos", transfer={"partial_ttl_seconds": ttl}
        )
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


# -- 8.-11. the bugs this suite found (now fixed; ordinary checks) ----------------------------


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
