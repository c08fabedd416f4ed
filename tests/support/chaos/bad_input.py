"""Chaos scenario 6: bad input against a live daemon (slowloris, silence, garbage, TLS to a
plaintext port, a greedy peer, a connection flood, wrong secrets) and, in full mode, the suite's
own hostile-input test files run and counted.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import trio

from tensord.config import HostPort, SecuritySettings
from tensord.errors import (
    AuthenticationFailed,
    TensorError,
)
from tensord.net.security import PeerSecurity
from tensord.net.stream import ConnectionClosed
from tensord.net.tcp import dial
from tensord.node import TensorNode
from tensord.store import TensorStore
from tensord.wire.frames import FrameDecoder
from tensord.wire.handshake import ALL_FEATURES, make_hello
from tensord.wire.messages import Ping, Pong

from ..cluster import write_cluster_file
from ..daemons import Daemon, cluster_secret, free_port
from ..helpers import fast_settings
from .common import (
    ROOT,
    arrivals,
    flush_arrivals,
    random_bytes,
    receiver,
)
from .rows import Row, junit_counts

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
        transfer = {
            "handshake_timeout": handshake_timeout,
            "max_peer_connections": per_peer_limit,
            "max_connections": max_connections,
            "max_unauthenticated": max_unauthenticated,
        }
        cluster = write_cluster_file(home / "cluster.json", name="chaos", transfer=transfer)
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
