"""The tensord rows: a sender process and a receiver ``TensorNode`` in another process.

These are *push* rows timed on the *sender's* clock, the way an application sees them: the clock
starts when ``send_tensor`` is called and stops when it returns, which is when the receiver has
confirmed (``Stored``) that it holds and verified the whole tensor. So each timing includes, on
top of moving the bytes: the ``Begin`` frame, per-chunk crc32c on both sides, the adaptive
compression trials, acks, the ``End`` frame with the whole-tensor crc32c (combined from the chunk
crcs) and the ``Stored`` round trip. Where the receiver's memory comes from is the row's
``mode`` (``MODES``): by default the node's pool of freed receive buffers (the application drops
each arrival, so from the second tensor on the memory is resident, like the plain-socket
baseline's one warm buffer); the "fresh" rows pay first touch per tensor, like the plain
socket's fresh-buffer row; the "into" row receives into one array of the application's.

The receiver consumes arrivals as an application would: ``await node.receive_tensor()`` in a
loop, then ``node.delete_tensor(name)`` so that neither the arrival queue nor the node's store
keeps the arrays (otherwise 256 MiB tensors accumulate and later reps pay for memory pressure).
Every send uses a new tensor name, and every row runs a warm-up first (the connection is dialled
and handshaken there, and it is then reused from the pool by the timed sends).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import trio
from harness import Children, Reporter, make_tensor, memory_status

from tensord.config import HostPort, Settings
from tensord.errors import TensorNotFound
from tensord.node import TensorNode, TransferResult


def node_settings(compression: bool) -> Settings:
    settings = Settings.for_library(listen=HostPort("127.0.0.1", 0))
    return settings if compression else settings.with_protocol(enable_compression=False)


# -- the two processes -----------------------------------------------------------------------


#: How the receiver's arrivals get their memory (issue 15's like-for-like rows):
#: "pool" - the default: freed receive buffers reused, new ones faulted in ahead of the socket;
#: "fresh" - a new ``np.empty`` per arrival (the behaviour before the pool);
#: "populate" - new memory per arrival, faulted in ahead of the socket by a worker thread;
#: "into" - ``receive_tensor(into=buf)``, one array of the application's, reused.
MODES = ("pool", "fresh", "populate", "into")


def receiver(
    out: Reporter, compression: bool, report_arrivals: bool, mode: str = "pool", size: int = 0
) -> None:
    """Serve until terminated: report the port, then consume and drop every arrival."""

    async def main() -> None:
        async with TensorNode(node_settings(compression)) as node:
            if mode in ("fresh", "populate"):
                node.receive_buffers.max_bytes = 0
                node.receive_buffers.populate = mode == "populate"
            into = make_tensor(size) if mode == "into" else None
            out.send({"port": node.port, **memory_status()})
            while True:
                arrival = await node.receive_tensor(into=into)
                with contextlib.suppress(TensorNotFound):
                    node.delete_tensor(arrival.name)
                nbytes = arrival.array.nbytes
                del arrival
                if report_arrivals:
                    out.send({"nbytes": nbytes, **memory_status()})

    trio.run(main)


def _peer(port: int) -> str:
    return f"127.0.0.1:{port}"


def throughput_sender(
    out: Reporter, port: int, size: int, reps: int, compression: bool
) -> dict[str, Any]:
    """One warm-up send and ``reps`` timed sends of the ``size``-byte tensor."""
    data = make_tensor(size)

    async def main() -> dict[str, Any]:
        times: list[float] = []
        results: list[TransferResult] = []
        async with TensorNode(node_settings(compression)) as node:
            for i in range(reps + 1):
                t = time.perf_counter()
                result = await node.send_tensor(_peer(port), f"bulk-{i}", data)
                dt = time.perf_counter() - t
                if i:
                    times.append(dt)
                    results.append(result)
        return {
            "seconds": times,
            "retries": sum(r.retries for r in results),
            "chunks_compressed": sum(r.chunks_compressed for r in results),
            "wire_ratio": sum(r.bytes_sent for r in results) / max(1, size * len(results)),
        }

    return trio.run(main)


def latency_sender(out: Reporter, port: int, nbytes: int, n: int, warmup: int) -> list[float]:
    """Seconds of each of ``n`` sequential sends of a small tensor on the pooled connection."""
    data = make_tensor(nbytes)

    async def main() -> list[float]:
        times: list[float] = []
        async with TensorNode(node_settings(True)) as node:
            for i in range(warmup):
                await node.send_tensor(_peer(port), f"warm-{i}", data)
            for i in range(n):
                t = time.perf_counter()
                await node.send_tensor(_peer(port), f"lat-{i}", data)
                times.append(time.perf_counter() - t)
        return times

    return trio.run(main)


def rate_sender(out: Reporter, port: int, nbytes: int, n: int, tasks: int, warmup: int) -> float:
    """Seconds for ``n`` sends of a small tensor issued by ``tasks`` concurrent tasks."""
    data = make_tensor(nbytes)

    async def burst(node: TensorNode, prefix: str, count: int) -> float:
        issued = 0

        async def worker() -> None:
            nonlocal issued
            while issued < count:
                i = issued
                issued += 1
                await node.send_tensor(_peer(port), f"{prefix}-{i}", data)

        t = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(worker)
        return time.perf_counter() - t

    async def main() -> float:
        async with TensorNode(node_settings(True)) as node:
            await burst(node, "warm", warmup)  # also opens the pool's connections
            return await burst(node, "rate", n)

    return trio.run(main)


def big_sender(out: Reporter, port: int, size: int) -> float:
    """Seconds for one send of a ``size``-byte tensor (no warm-up: one fresh receiver)."""
    data = make_tensor(size)

    async def main() -> float:
        async with TensorNode(node_settings(True)) as node:
            t = time.perf_counter()
            await node.send_tensor(_peer(port), "big", data)
            return time.perf_counter() - t

    return trio.run(main)


# -- rows, as run by the runner ----------------------------------------------------------------


def run_throughput(
    size: int, reps: int, timeout: float, compression: bool, mode: str = "pool"
) -> dict[str, Any]:
    with Children() as kids:
        rx = kids.start("tensord receiver", receiver, compression, False, mode, size)
        port = rx.recv(timeout=30)["port"]
        tx = kids.start("tensord sender", throughput_sender, port, size, reps, compression)
        result: dict[str, Any] = tx.recv(timeout)
        return result


def run_latency(nbytes: int, n: int, warmup: int, timeout: float) -> list[float]:
    with Children() as kids:
        rx = kids.start("tensord receiver", receiver, True, False)
        port = rx.recv(timeout=30)["port"]
        tx = kids.start("tensord sender", latency_sender, port, nbytes, n, warmup)
        times: list[float] = tx.recv(timeout)
        return times


def run_rate(nbytes: int, n: int, tasks: int, warmup: int, timeout: float) -> float:
    with Children() as kids:
        rx = kids.start("tensord receiver", receiver, True, False)
        port = rx.recv(timeout=30)["port"]
        tx = kids.start("tensord sender", rate_sender, port, nbytes, n, tasks, warmup)
        seconds: float = tx.recv(timeout)
        return seconds


def run_peak_rss(size: int, timeout: float) -> dict[str, float]:
    """The receiver's memory when idle (node started) and after it received one ``size`` tensor.

    ``maxrss`` is ``getrusage(RUSAGE_SELF).ru_maxrss`` read in the receiver after the transfer;
    ``hwm`` (``VmHWM``) is the same peak without what Linux carries over from the parent.
    """
    with Children() as kids:
        rx = kids.start("tensord receiver", receiver, True, True)
        ready = rx.recv(timeout=30)
        tx = kids.start("tensord sender", big_sender, ready["port"], size)
        seconds: float = tx.recv(timeout)
        arrived = rx.recv(timeout=30)
        if arrived["nbytes"] != size:
            raise ValueError(f"receiver got {arrived['nbytes']} bytes, expected {size}")
        return {
            "seconds": seconds,
            "idle_rss": float(ready["rss"]),
            "maxrss": float(arrived["maxrss"]),
            "hwm": float(arrived["hwm"]),
        }


__all__ = ["run_latency", "run_peak_rss", "run_rate", "run_throughput"]
