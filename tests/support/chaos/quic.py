"""Chaos scenario 12: QUIC through a lossy UDP proxy, paths that go dark, a NAT rebinding, and a
receiver restarted under a live connection.
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import trio

from tensord.config import KiB, MiB
from tensord.errors import (
    TensorError,
)
from tensord.node import TensorNode, TransferResult

from ..daemons import free_port
from ..helpers import LogWaiter, fast_settings
from ..udp_proxy import UdpFault, UdpProxy
from .common import (
    arrivals,
    digest,
    flush_arrivals,
    log_uniform,
    partial_files,
    random_bytes,
    receiver,
    stored_digests,
)
from .rows import Row, fmt_bytes

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
