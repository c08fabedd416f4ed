"""Scenario 13 of ``bench/chaos.py``: the attacks of issue 12 against real ``tensord serve``
daemons, each a row of docs/RELIABILITY.md saying what the attacker gets now.

Every row attacks a real daemon subprocess (``tests/support/daemons.py``) and then checks the three
things the issue promises: the daemon is still alive, its peak RSS grew by less than 64 MiB
during the attack (the kernel's peak is reset first, ``/proc/PID/clear_refs``, so VmHWM is the
attack's own peak), and a legitimate peer still sends a tensor and pulls it back. The attacks
come from the suite's own hostile clients: ``RawPeer`` (tests/test_hostile.py) for frames,
aioquic's raw client (tests/test_quic_hostile.py) for QUIC, the lying HTTP server
(tests/test_download_hostile.py) for downloads and registries, and the control client run as
another uid (tests/test_control_hostile.py). With ``fuzz`` (the full mode), the stateful
fuzzers of issue 12 run again for longer (``TENSORD_FUZZ_LONG=1``), one row per file.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import trio

from bench.rows import Row, fmt_bytes, junit_counts, vm_status, wait_log
from tensord.config import KiB, MiB, Settings
from tensord.node import TensorNode
from tensord.wire import Error, Hello
from tests.support.daemons import Daemon, daemon, free_port
from tests.support.helpers import IN_CI, fast_settings
from tests.support.raw_peer import RawPeer, header

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = "13. Attacks (issue 12)"
#: What an attack may add to the daemon's peak RSS (issue 12: "RSS growth < 64 MiB").
RSS_LIMIT = 64 * MiB
#: What a QUIC connection may get the daemon to take before its Hello (a Hello's worth).
HELLO_CREDIT = 64 * KiB
#: The names whose ``request`` made a serving daemon exit 1 (tests/test_peer_boundary.py).
BAD_NAMES = ["layers//0", "a/../b", "/etc/passwd", "nul\x00", "x" * 4096]

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
        path = home / "cluster.json"
        path.write_text(json.dumps({"name": "attacks", **cluster}))
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


# -- a. requests for bad names, b. a one-byte max chunk ---------------------------------------


async def bad_names(row: Row, t: Target, rounds: int) -> None:
    before = reset_peak(t.pid)
    answers: Counter[str] = Counter()
    closed = 0
    for _ in range(rounds):
        for name in BAD_NAMES:
            peer = await RawPeer.connect(t.port)
            async with peer.stream:
                await peer.stream.send_all(header({"t": "request", "name": name}))
                with trio.fail_after(15):
                    msg = await peer.next_message()
                    eof = msg is not None and await peer.next_message() is None
            answers[msg.code if isinstance(msg, Error) else repr(msg)[:40]] += 1
            closed += eof
    n = rounds * len(BAD_NAMES)
    row.check(answers == {"bad_name": n}, f"answers {dict(answers)}, expected bad_name only")
    row.check(closed == n, f"{n - closed} connections were not closed after the error")
    row.tried = f"{n} requests ({', '.join(repr(x[:12]) for x in BAD_NAMES)})"
    tail = await survived(row, t, before, "names")
    row.outcome = (
        f"{answers['bad_name']}/{n} answered `bad_name` and closed (a `layers//0` request "
        f"used to make the daemon exit 1); {tail}"
    )
    row.figures["bad_name_errors"] = answers["bad_name"]


async def one_byte_chunks(row: Row, t: Target, attempts: int, tensor: int) -> None:
    name = "attack/big"
    async with TensorNode(replace(t.peer, node_id="seeder")) as node:
        await node.send_tensor(t.addr, name, np.zeros(tensor, np.uint8))
    before = reset_peak(t.pid)
    refused = served = 0
    messages: set[str] = set()
    for _ in range(attempts):
        peer = await RawPeer.connect(t.port, hello=False)
        async with peer.stream:
            hello = {"t": "hello", "proto": "tensord", "v": [1], "node": "tiny", "f": [], "mc": 1}
            await peer.stream.send_all(header(hello))
            with trio.fail_after(15):
                # The node's answer to the Hello first: a pull sent in the same breath would
                # race the close (unread bytes make the kernel reset the connection, and the
                # refusal could be lost before we read it).
                first = await peer.next_message()
                if isinstance(first, Hello):  # accepted: now the pull that used to balloon
                    await peer.stream.send_all(header({"t": "request", "name": name}))
                msg: object = first
                while msg is not None:
                    if isinstance(msg, Error):
                        refused += 1
                        messages.add(msg.message)
                    elif not isinstance(msg, Hello):
                        served += 1  # a Begin: the tensor was being sent in one-byte chunks
                    msg = await peer.next_message()
    row.check(refused == attempts, f"{refused} of {attempts} Hellos refused")
    row.check(not served, f"{served} pulls were served at mc=1")
    row.check(all("'mc'" in m for m in messages), f"the refusal does not name 'mc': {messages}")
    row.tried = (
        f"{attempts} Hellos with mc=1, each followed by a pull of a {fmt_bytes(tensor)} tensor"
    )
    tail = await survived(row, t, before, "mc")
    row.outcome = (
        f"{refused}/{attempts} Hellos refused ({next(iter(messages), '')!r}), nothing sent in "
        f"one-byte chunks (it used to cost the owner ~330 MiB of RSS); {tail}"
    )


# -- c. idle strangers -------------------------------------------------------------------------


async def idle_strangers(row: Row, t: Target, n: int, limit: int, budget: int) -> None:
    before = reset_peak(t.pid)
    dropped0 = await metric(t, "tensord_peer_connections_dropped_total", 'reason="budget"')
    idle = [await trio.open_tcp_stream("127.0.0.1", t.port) for _ in range(n)]
    try:
        member = replace(t.peer, node_id="member")
        async with TensorNode(member) as node:
            data = np.ones(1024, np.float32)
            with trio.fail_after(60):
                await node.send_tensor(t.addr, "member/1", data)
            # More strangers while the member's pooled connection idles: not a stranger.
            more = [await trio.open_tcp_stream("127.0.0.1", t.port) for _ in range(n)]
            idle += more
            with trio.fail_after(60):
                await node.send_tensor(t.addr, "member/2", data)
            dials = sum(p["dials"] for p in node.pool_stats().values())
        dropped = int(
            await metric(t, "tensord_peer_connections_dropped_total", 'reason="budget"') - dropped0
        )
        # Exactly those the daemon counted as dropped see their connection closed.
        seen = 0
        with trio.move_on_after(30):
            async with trio.open_nursery() as nursery:

                async def watch(s: trio.SocketStream) -> None:
                    nonlocal seen
                    await closed_by_peer(s)
                    seen += 1
                    if seen >= dropped:
                        nursery.cancel_scope.cancel()

                for s in idle:
                    nursery.start_soon(watch, s)
    finally:
        for s in idle:
            await s.aclose()
    total = 2 * n
    row.check(dials == 1, f"the member dialled {dials} times: its pooled connection was dropped")
    row.check(seen == dropped, f"{dropped} strangers counted as dropped, {seen} closed")
    # Each newcomer over the budget drops the oldest; the member's own dial was a newcomer too.
    row.check(dropped >= total - budget, f"only {dropped} of {total} strangers were dropped")
    row.tried = (
        f"{total} idle connections from one host (transfer.max_connections = {limit}, "
        f"max_unauthenticated = {budget}, handshake_timeout 60 s)"
    )
    tail = await survived(row, t, before, "idle")
    row.outcome = (
        f"{dropped} oldest strangers dropped for newcomers, {total - dropped} left idling; "
        f"an authenticated member sent twice over one pooled connection, which the strangers "
        f"never displaced (idle connections used to lock members out); {tail}"
    )
    row.figures.update(strangers=total, dropped=dropped, member_dials=dials)


# -- d. unauthenticated QUIC -------------------------------------------------------------------


async def quic_strangers(
    rows: list[Row], home: Path, clients: int, streams: int, per_stream: int, limit: int, more: int
) -> None:
    from tests.test_quic_hostile import raw_client

    # Long handshake deadlines: the strangers must be dropped by the caps, not by time.
    deadlines = {"handshake_timeout": 60.0, "connect_timeout": 60.0}
    cluster = {"transfer": {"max_connections": limit, **deadlines}}
    async with (
        target(home, transport="quic", cluster=cluster) as t,
        AsyncExitStack() as stack,
    ):
        flooders = []

        async def push(row: Row) -> None:
            before = reset_peak(t.pid)
            for _ in range(clients):
                c = await stack.enter_async_context(raw_client(t.port))
                with trio.fail_after(20):
                    await c.established.wait()
                c.push(streams=streams, per_stream=per_stream)
                flooders.append(c)
            with trio.fail_after(60):
                for c in flooders:
                    await c.settled()
            accepted = [c.accepted for c in flooders]
            granted = {(c.quic._remote_max_streams_bidi, c.quic._remote_max_data) for c in flooders}
            row.check(
                not any(c.terminated.is_set() for c in flooders),
                "a pushing client was closed (expected: held to its credit, not refused)",
            )
            row.check(
                max(accepted) <= HELLO_CREDIT,
                f"the daemon accepted {max(accepted)} bytes from a client before its Hello",
            )
            row.check(
                all(n == 1 and credit <= HELLO_CREDIT for n, credit in granted),
                f"granted (streams, bytes of credit): {granted}",
            )
            offered = clients * streams * per_stream
            row.tried = (
                f"{clients} QUIC connections without a Hello, each opening {streams} streams "
                f"and pushing {fmt_bytes(streams * per_stream)} ({fmt_bytes(offered)} in all)"
            )
            tail = await survived(row, t, before, "quic-push")
            row.outcome = (
                f"each was granted at most {max(n for n, _ in granted)} stream(s) and "
                f"{fmt_bytes(max(c for _, c in granted))} of credit; the daemon took "
                f"{fmt_bytes(sum(accepted))} of {fmt_bytes(offered)} (it used to buffer ~25 MiB "
                f"per connection, +78 MiB RSS for 3); {tail}"
            )
            row.figures.update(offered=offered, accepted=sum(accepted))

        async def cap(row: Row) -> None:
            before = reset_peak(t.pid)
            for _ in range(more):
                c = await stack.enter_async_context(raw_client(t.port))
                with trio.fail_after(20):
                    await c.established.wait()
                flooders.append(c)
            # The pushers, the newcomers and the legitimate dial of survived() (one more
            # stranger until its Hello) against `limit` slots: the oldest strangers make room.
            tail = await survived(row, t, before, "quic-cap")
            expected = len(flooders) + 1 - limit
            evicted: list[str] = []
            with trio.move_on_after(30):
                async with trio.open_nursery() as nursery:

                    async def watch(c: Any) -> None:
                        await c.terminated.wait()
                        evicted.append(getattr(c.close_event, "reason_phrase", "?"))
                        if len(evicted) >= expected:
                            nursery.cancel_scope.cancel()

                    for c in flooders:
                        nursery.start_soon(watch, c)
            named = sum("max_unauthenticated" in r for r in evicted)
            row.check(len(evicted) >= expected, f"{len(evicted)} closed, expected {expected}")
            row.check(named == len(evicted), f"reasons: {Counter(evicted)}")
            row.tried = (
                f"{len(flooders)} unauthenticated QUIC connections, then a member "
                f"(transfer.max_connections = {limit})"
            )
            row.outcome = (
                f"{len(evicted)} oldest strangers closed with a reason naming "
                f"transfer.max_unauthenticated, never more than {limit} connections admitted "
                f"(streams used to be counted, not connections); the member got in: {tail}"
            )
            row.figures.update(connections=len(flooders), evicted=len(evicted))

        await attempt(rows, QUIC_PUSH, push)
        await attempt(rows, QUIC_CAP, cap)


# -- e, f. downloads and registries that lie --------------------------------------------------

LAYER = os.urandom(1000)
LAYER_DIGEST = "sha256:" + hashlib.sha256(LAYER).hexdigest()
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"


def manifest(data: bytes) -> bytes:
    layer = {
        "mediaType": "x",
        "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }
    doc = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "layers": [layer]}
    return json.dumps(doc).encode()


def cause(error: str) -> str:
    """The end of an error message (its start names the URL), for the report."""
    return error if len(error) <= 160 else "..." + error[-157:]


async def finished(t: Target, job: dict[str, Any], after: int) -> dict[str, Any]:
    """The job once it has ended (each state change is a log line of the daemon)."""
    async with control(t) as c:
        while True:
            after = await wait_log(t.d, f"download {job['id']}: ", after, limit=60)
            got: dict[str, Any] = (await c.get(f"/v1/downloads/{job['id']}")).json()
            if got["state"] in ("done", "failed", "cancelled"):
                return got


async def start_download(t: Target, body: dict[str, str]) -> tuple[dict[str, Any], int]:
    at = len(t.d.log)
    async with control(t) as c:
        r = await c.post("/v1/downloads", json=body)
    if r.status_code != 202:
        raise RuntimeError(f"the daemon did not take the download: {r.status_code} {r.text}")
    return r.json(), at


async def lying_downloads(row: Row, t: Target, big: int, ceiling: int) -> None:
    from tests.test_download_hostile import Reply, Request, honest, lying_servers

    def registry(blob: Callable[[Request], Reply], data: bytes = LAYER) -> Any:
        doc = manifest(data)

        def handler(req: Request) -> Reply:
            if "/manifests/" in req.path:
                headers = [("Content-Type", MANIFEST_TYPE), ("Content-Length", str(len(doc)))]
                return Reply(200, headers, doc)
            return blob(req)

        return handler

    lies = {
        "206 with a Content-Range past the total": lambda req: Reply(
            206, [("Content-Range", f"bytes 0-{big - 1}/1000")], LAYER, extra=big - 1000
        ),
        "200 to a range": lambda req: Reply(
            200, [("Content-Length", str(big))], LAYER, extra=big - 1000
        ),
        "200 without a length": lambda req: Reply(200, [], LAYER, extra=big - 1000),
    }
    blobs = t.home / "state" / "models" / "blobs"
    before = reset_peak(t.pid)
    outcomes: list[str] = []
    worst_write = 0
    servers = [registry(h) for h in lies.values()]
    url_server = lambda req: Reply(200, [("Content-Length", str(big))], extra=big)  # noqa: E731
    good = os.urandom(512 * KiB)  # under downloads.max_bytes
    async with lying_servers(*servers, url_server, registry(honest(good), good)) as running:
        for what, server in zip(lies, running[:3], strict=True):
            wrote = written(t.pid)
            job, at = await start_download(t, {"model": f"http://{server.host}/m/x:v1"})
            job = await finished(t, job, at)
            delta = written(t.pid) - wrote
            worst_write = max(worst_write, delta)
            left = sorted(p.name for p in blobs.iterdir()) if blobs.exists() else []
            row.check(job["state"] == "failed", f"{what}: the download ended {job['state']}")
            row.check(not left, f"{what}: files left behind: {left}")
            row.check(delta < 256 * KiB, f"{what}: the daemon wrote {fmt_bytes(delta)}")
            outcomes.append(f"{what}: refused ({cause(job['error'])})")
        # A plain URL: no promised size, downloads.max_bytes is the ceiling.
        wrote = written(t.pid)
        sha = "0" * 64
        job, at = await start_download(t, {"url": running[3].url("/big"), "sha256": sha})
        job = await finished(t, job, at)
        delta = written(t.pid) - wrote
        worst_write = max(worst_write, delta)
        row.check(job["state"] == "failed", f"plain URL: the download ended {job['state']}")
        row.check("downloads.max_bytes" in job["error"], f"plain URL: {job['error']!r}")
        row.check(delta < 256 * KiB, f"plain URL: the daemon wrote {fmt_bytes(delta)}")
        outcomes.append(f"a {fmt_bytes(big)} URL over downloads.max_bytes: refused unread")
        # An honest registry is still served.
        job, at = await start_download(t, {"model": f"http://{running[4].host}/m/x:v1"})
        job = await finished(t, job, at)
        row.check(job["state"] == "done", f"an honest model pull ended {job['state']}")
        sent = sum(s.bytes_sent for s in running[:4])
    row.tried = (
        f"{len(lies)} lying registries serving a 1000-byte layer with {fmt_bytes(big)}, and a "
        f"{fmt_bytes(big)} plain URL (downloads.max_bytes = {fmt_bytes(ceiling)})"
    )
    tail = await survived(row, t, before, "downloads")
    row.outcome = (
        "; ".join(outcomes)
        + f". The daemon wrote at most {fmt_bytes(worst_write)} per attempt (all files, logs "
        f"included), left no .incomplete (it used to write 40 MiB and keep it); the liars got "
        f"{fmt_bytes(sent)} onto the wire before it hung up; an honest pull then completed; " + tail
    )
    row.figures.update(worst_write=worst_write, liar_bytes_sent=sent)


async def redirected_credentials(row: Row, t: Target, creds_file: Path) -> None:
    from tests.test_download_hostile import Reply, Request, evil_host, lying_servers

    seen: list[str] = []
    evil = evil_host(seen)
    where: dict[str, str] = {}

    def registry(req: Request) -> Reply:
        return Reply(302, [("Location", where["evil"] + req.path), ("Content-Length", "0")])

    before = reset_peak(t.pid)
    async with lying_servers(registry, evil) as (reg, bad):
        evil.holder["port"] = bad.port  # type: ignore[attr-defined]
        where["evil"] = f"http://{bad.host}"
        creds = {"registries": {reg.host: {"username": "alice", "password": "s3cret"}}}
        await trio.Path(creds_file).write_text(json.dumps(creds))
        job, at = await start_download(t, {"model": f"http://{reg.host}/m/x:v1"})
        job = await finished(t, job, at)
        token_asked = any(r.path.startswith("/token") for r in bad.requests)
    leaked = [h for h in seen if h != "-"]
    basic = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    row.check(bool(seen), "the evil host was never asked: the redirect was not followed")
    row.check(not leaked, f"the evil host received Authorization headers: {leaked}")
    row.check(not token_asked, "the daemon asked the evil host's token endpoint")
    row.check(job["state"] == "failed", f"the pull ended {job['state']}")
    row.check("credentials only to" in job["error"], f"the error: {job['error']!r}")
    row.tried = (
        "a registry with credentials redirects the manifest to another host, whose 401 asks "
        "for a Bearer token"
    )
    tail = await survived(row, t, before, "redirect")
    row.outcome = (
        f"the other host saw {len(seen)} requests, none with an Authorization header "
        f"({'' if basic not in seen else 'Basic LEAKED; '}the registry's Basic credentials used "
        f"to go to the realm it named); the pull failed: {cause(job['error'])!r}; {tail}"
    )


# -- g. FIFOs, h. a group member, i. slow bodies ----------------------------------------------


async def fifo_flood(row: Row, t: Target, requests: int) -> None:
    fifo = t.home / "pipe.npy"
    os.mkfifo(fifo)
    before = reset_peak(t.pid)
    codes: Counter[int] = Counter()
    named = 0

    async def put(i: int) -> None:
        nonlocal named
        async with control(t) as c:
            r = await c.put(f"/v1/tensors/f{i}", json={"path": str(fifo)})
        codes[r.status_code] += 1
        named += r.status_code == 400 and "FIFO" in r.json()["error"]["message"]

    with trio.fail_after(120):  # healthy daemons answer in milliseconds
        async with trio.open_nursery() as nursery:
            for i in range(requests):
                nursery.start_soon(put, i)
    with trio.fail_after(60):
        ls = await trio.run_process(
            [sys.executable, "-m", "tensord", "--socket", str(t.d.socket), "ls"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    row.check(codes == {400: requests}, f"answers {dict(codes)}")
    row.check(named == requests, f"{requests - named} refusals do not name the FIFO")
    row.check(ls.returncode == 0, f"tensord ls exited {ls.returncode}: {ls.stderr.decode()}")
    row.tried = f"{requests} concurrent control requests naming a FIFO (trio has 40 worker threads)"
    tail = await survived(row, t, before, "fifo")
    t.d.terminate()
    with trio.fail_after(60):
        await t.d.proc.wait()
    row.check(t.d.proc.returncode == 0, f"SIGTERM: exit status {t.d.proc.returncode}")
    row.outcome = (
        f"{codes[400]}/{requests} refused at once with a 400 naming the FIFO; `tensord ls` "
        f"answered; {tail}; SIGTERM then stopped it (status {t.d.proc.returncode}) - 40 such "
        "requests used to wedge it for good"
    )


async def confused_deputy(row: Row, t: Target) -> None:
    from tests.test_control_hostile import CLIENT, _as_group_member

    python = "/usr/bin/python3"
    files = t.home / "files"
    files.mkdir(mode=0o755)
    for name, mode in [("secret", 0o600), ("world", 0o644)]:
        np.save(files / f"{name}.npy", np.full(4, mode, dtype=np.int32))
        os.chmod(files / f"{name}.npy", mode)
    calls = [
        ["PUT", "/v1/tensors/stolen", {"path": str(files / "secret.npy")}],
        ["POST", "/v1/send", {"peer": "elsewhere", "path": str(files / "secret.npy")}],
        ["PUT", "/v1/tensors/mine", {"path": str(files / "world.npy")}],
        ["GET", "/v1/tensors", {}],
    ]
    before = reset_peak(t.pid)
    out = await trio.to_thread.run_sync(
        lambda: subprocess.run(
            [python, "-c", CLIENT, str(t.d.socket), json.dumps(calls)],
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=_as_group_member,
        )
    )
    if not row.check(out.returncode == 0, f"the client as uid 65534 failed: {out.stderr}"):
        return
    replies = json.loads(out.stdout)
    statuses = [r[0] for r in replies]
    stored = sorted(x["name"] for x in replies[3][1]["tensors"])
    row.check(statuses[:2] == [403, 403], f"a root-only file: {replies[:2]}")
    row.check(statuses[2] == 201, f"a world-readable file: {replies[2]}")
    row.check("stolen" not in stored, f"the root-only file was stored: {stored}")
    row.tried = (
        "uid 65534 in the socket's group asks the daemon (root) to load and to send a 0600 "
        "root-owned file, then a world-readable one"
    )
    tail = await survived(row, t, before, "deputy")
    message = replies[0][1]["error"]["message"] if statuses[0] == 403 else ""
    row.outcome = (
        f"403 for both ({message[:80]!r}); its own readable file was stored (201); the daemon "
        f"used to read anything it could for any group member; {tail}"
    )


async def slow_bodies(row: Row, t: Target, gateway: str, slow: int, deadline: float) -> None:
    head = (
        b"PUT /v1/tensors/x HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        b"content-length: 100\r\n\r\n"
    )
    ghead = (
        b"POST /api/chat HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        b"content-length: 200\r\n\r\n"
    )
    ghost, gport = gateway.removeprefix("http://").rsplit(":", 1)
    before = reset_peak(t.pid)
    replies: dict[str, list[bytes]] = {"control": [], "gateway": []}
    waited: list[float] = []

    async def stalled(where: str) -> None:
        if where == "control":
            stream: trio.abc.Stream = await trio.open_unix_socket(str(t.d.socket))
            first = head + b'{"path": '
        else:
            stream = await trio.open_tcp_stream(ghost, int(gport))
            first = ghead + b'{"model": '
        t0 = trio.current_time()
        reply = b""
        async with stream:
            await stream.send_all(first)
            with trio.fail_after(deadline + 30), contextlib.suppress(trio.BrokenResourceError):
                while data := await stream.receive_some(65536):
                    reply += data
        waited.append(trio.current_time() - t0)
        replies[where].append(reply)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for i in range(slow):
                nursery.start_soon(stalled, "control" if i % 2 == 0 else "gateway")
    statuses = Counter(
        f"{where} {r.split(b' ', 2)[1].decode() if r.startswith(b'HTTP/') else 'closed'}"
        for where, rs in replies.items()
        for r in rs
    )
    answered = sum(v for k, v in statuses.items() if k.endswith(" 408"))
    # Over a cap a newcomer may displace a stalled connection (closed) or be refused (503).
    row.check(all(k.endswith((" 408", " 503", " closed")) for k in statuses), f"answers {statuses}")
    row.check(answered >= min(slow, 8), f"only {answered} of {slow} answered 408")
    # Caps: more idle connections than control.max_connections still let a client in.
    idle = [await trio.open_unix_socket(str(t.d.socket)) for _ in range(8)]
    try:
        async with control(t) as c:
            status = (await c.get("/v1/status")).status_code
        with trio.fail_after(30):
            await closed_by_peer(idle[0])  # the longest idle made room
    finally:
        for s in idle:
            await s.aclose()
    async with httpx.AsyncClient(timeout=30) as client:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
        chat = await client.post(f"{gateway}/api/chat", json=body)
    row.check(status == 200, f"a control client behind 8 idle connections got {status}")
    row.check(chat.status_code == 200, f"a gateway chat afterwards got {chat.status_code}")
    row.tried = (
        f"{slow} stalled request bodies, half to the control socket, half to the gateway "
        f"(read_timeout {deadline:g} s), then 8 idle control connections (max_connections 4)"
    )
    tail = await survived(row, t, before, "slow")
    row.outcome = (
        f"all closed after at most {max(waited):.1f} s: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))
        + "; the longest idle connection made room for a real client, a chat was relayed "
        f"(bodies never timed out and connections were uncapped before); {tail}"
    )
    row.figures.update(slowest_close_s=max(waited), answers=dict(statuses))


# -- j. off loopback without authentication ---------------------------------------------------


async def off_loopback(row: Row) -> None:
    port = free_port()
    env = {"TENSORD_LISTEN": f"0.0.0.0:{port}", "TENSORD_CLUSTER_SECRET_FILE": ""}
    async with daemon(env) as d:
        with trio.fail_after(60):
            await d.proc.wait()
        with contextlib.suppress(AssertionError):
            await d.wait_for("there is no peer authentication")
    text = d.text.strip()
    line = next((x for x in text.splitlines() if "no peer authentication" in x), text[-200:])
    with socket.socket() as s:
        reachable = s.connect_ex(("127.0.0.1", port)) == 0
    row.check(d.proc.returncode == 78, f"exit status {d.proc.returncode}: {text[-300:]}")
    row.check("security.insecure: true" in line, f"the error gives no remedy: {line!r}")
    row.check(not reachable, "something listens on the port")
    row.tried = "tensord serve with TENSORD_LISTEN=0.0.0.0:PORT and no secret nor TLS"
    row.outcome = (
        f"exit {d.proc.returncode} before listening: {line.split(': ', 1)[-1][:160]!r} (it used "
        "to run unauthenticated, without a warning)"
    )


# -- the stateful fuzzers, run longer --------------------------------------------------------


def fuzz_files() -> list[str]:
    """The stateful hostile fuzzers that exist in tests/ (each file holds a state machine)."""
    out = []
    for path in sorted((ROOT / "tests").glob("test_*hostile*.py")):
        if "RuleBasedStateMachine" in path.read_text():
            out.append(str(path.relative_to(ROOT)))
    return out


async def fuzz_row(row: Row, path: str, limit: float) -> None:
    """Run one fuzzer file under pytest with ``TENSORD_FUZZ_LONG=1``; count its tests and, from
    hypothesis's observations (one JSON line per example run), its examples."""
    with tempfile.TemporaryDirectory(prefix="tensord-chaos-") as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path]
        env = {
            **os.environ,
            "TENSORD_FUZZ_LONG": "1",
            # Examples are counted from hypothesis's observations, kept apart from the
            # repository's .hypothesis (without the coverage tracing they could bring).
            "HYPOTHESIS_STORAGE_DIRECTORY": str(Path(tmp) / "hypothesis"),
            "HYPOTHESIS_EXPERIMENTAL_OBSERVABILITY_NOCOVER": "1",
        }
        with trio.move_on_after(limit) as scope:
            proc = await trio.run_process(
                [*cmd, f"--junitxml={xml}"],
                cwd=ROOT,
                env=env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        if scope.cancelled_caught:
            row.check(False, f"pytest ran past {limit:g} s and was stopped")
            row.outcome = f"stopped after {limit:g} s"
            return
        counts = junit_counts(xml)
        examples: Counter[str] = Counter()
        for observed in (Path(tmp) / "hypothesis" / "observed").glob("*testcases.jsonl"):
            for line in observed.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    doc = json.loads(line)
                    if doc.get("type") == "test_case":
                        examples[str(doc.get("status"))] += 1
    out = proc.stdout.decode(errors="replace").strip()
    row.check(proc.returncode == 0, f"pytest exited {proc.returncode}: {out.splitlines()[-1:]}")
    row.check(counts["passed"] > 0, "no test passed")
    row.check(not examples["failed"], f"{examples['failed']} failing examples")
    if counts["skipped"] and IN_CI:
        row.check(False, f"{counts['skipped']} skipped under CI")
    row.tried = f"{sum(counts.values())} tests, {sum(examples.values())} examples"
    row.outcome = (
        ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        + "; examples: "
        + ", ".join(f"{v} {k}" for k, v in sorted(examples.items()))
    )
    row.figures.update(examples=dict(examples), tests=dict(counts))


# -- the scenario ----------------------------------------------------------------------------


async def attacks(
    *,
    name_rounds: int = 20,
    mc_attempts: int = 5,
    tensor: int = 4 * MiB,
    strangers: int = 64,
    max_connections: int = 48,
    max_unauthenticated: int = 16,
    quic_clients: int = 3,
    quic_streams: int = 64,
    quic_per_stream: int = 512 * KiB,
    quic_limit: int = 8,
    quic_more: int = 12,
    lie_bytes: int = 40 * MiB,
    fifo_requests: int = 64,
    slow_bodies_n: int = 24,
    read_timeout: float = 1.0,
    fuzz: bool = False,
    fuzz_limit: float = 1800.0,
) -> list[Row]:
    """Issue 12's attacks, each against a real ``tensord serve``, and what the attacker gets
    now: requests for bad names, a one-byte max chunk, idle strangers holding every slot,
    unauthenticated QUIC connections pushing data, downloads and registries that lie (40 MiB
    for a 1000-byte layer, a redirect asking for credentials), control requests naming a
    FIFO, a group member asking for a root-only file, slow bodies, a listener off loopback
    without a secret. After each the daemon must be alive, its peak RSS within 64 MiB of
    before, and a legitimate peer served. With ``fuzz``, the stateful hostile fuzzers run
    with ``TENSORD_FUZZ_LONG=1``."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="tensord-attacks-") as tmp:
        root = Path(tmp)
        os.chmod(root, 0o755)  # the group member of row h reaches its daemon's socket

        def home(name: str) -> Path:
            path = root / name
            path.mkdir(mode=0o755)
            return path

        async def open_node() -> None:
            async with target(home("open"), secret=False) as t:
                await attempt(rows, NAMES, lambda row: bad_names(row, t, name_rounds))
                await attempt(rows, MC, lambda row: one_byte_chunks(row, t, mc_attempts, tensor))

        async def idle() -> None:
            caps = {
                "max_connections": max_connections,
                "max_unauthenticated": max_unauthenticated,
                "handshake_timeout": 60.0,
            }
            async with target(home("idle"), cluster={"transfer": caps}) as t:
                await attempt(
                    rows,
                    IDLE,
                    lambda row: idle_strangers(
                        row, t, strangers, max_connections, max_unauthenticated
                    ),
                )

        async def quic() -> None:
            await quic_strangers(
                rows,
                home("quic"),
                quic_clients,
                quic_streams,
                quic_per_stream,
                quic_limit,
                quic_more,
            )

        async def downloads() -> None:
            dl = home("downloads")
            creds = dl / "credentials.json"
            creds.write_text('{"registries": {}}')
            async with target(
                dl,
                cluster={"downloads": {"credentials_file": str(creds)}},
                env={"TENSORD_DOWNLOAD_MAX_BYTES": str(MiB)},
            ) as t:
                await attempt(rows, LIES, lambda row: lying_downloads(row, t, lie_bytes, MiB))
                await attempt(rows, REDIRECT, lambda row: redirected_credentials(row, t, creds))

        async def fifo() -> None:
            async with target(home("fifo")) as t:
                await attempt(rows, FIFO, lambda row: fifo_flood(row, t, fifo_requests))

        async def deputy() -> None:
            if os.geteuid() != 0 or not os.access("/usr/bin/python3", os.X_OK):
                reason = "needs root (a client run as uid 65534) and /usr/bin/python3"
                rows.append(Row(SCENARIO, DEPUTY, skipped=reason))
                return
            async with target(home("deputy")) as t:
                await attempt(rows, DEPUTY, lambda row: confused_deputy(row, t))

        async def slow() -> None:
            from tests.support.ollama_backend import BackendConfig, ollama_backend

            async with ollama_backend(BackendConfig(models=["tiny:latest"], interval=0.0)) as b:
                port = free_port()
                cluster = {
                    "nodes": [
                        {"id": "victim", "addr": f"127.0.0.1:{port}"},
                        {"id": "gpu", "addr": f"127.0.0.1:{free_port()}", "ollama": b.url},
                    ],
                    "transfer": {"peer_check_interval": 60},
                    "control": {"read_timeout": read_timeout, "max_connections": 4},
                    "gateway": {"read_timeout": read_timeout, "max_connections": 4},
                }
                async with _gateway_target(home("slow"), port, cluster) as (t, url):
                    await attempt(
                        rows,
                        SLOW,
                        lambda row: slow_bodies(row, t, url, slow_bodies_n, read_timeout),
                    )

        async def exposed() -> None:
            await attempt(rows, OFF_LOOPBACK, off_loopback)

        await guarded(rows, [NAMES, MC], open_node)
        await guarded(rows, [IDLE], idle)
        await guarded(rows, [QUIC_PUSH, QUIC_CAP], quic)
        await guarded(rows, [LIES, REDIRECT], downloads)
        await guarded(rows, [FIFO], fifo)
        await guarded(rows, [DEPUTY], deputy)
        await guarded(rows, [SLOW], slow)
        await guarded(rows, [OFF_LOOPBACK], exposed)
    if fuzz:
        for path in fuzz_files():
            await attempt(
                rows,
                f"{path}: the stateful fuzzer, run longer (TENSORD_FUZZ_LONG=1)",
                lambda row, path=path: fuzz_row(row, path, fuzz_limit),  # type: ignore[misc]
            )
    return rows


async def guarded(rows: list[Row], faults: list[str], group: Callable[[], Awaitable[None]]) -> None:
    """Run a group of rows sharing a daemon; if the group itself fails (the daemon did not
    start, say), each of its rows that did not report is a failed row - the next group runs."""
    first = len(rows)
    try:
        await group()
    except Exception as exc:
        traceback.print_exc()
        done = {r.fault for r in rows[first:]}
        why = f"{type(exc).__name__}: {exc}"
        for fault in faults:
            if fault not in done:
                rows.append(Row(SCENARIO, fault, outcome=f"error: {why}", problems=[why]))


@asynccontextmanager
async def _gateway_target(
    home: Path, port: int, cluster: dict[str, Any]
) -> AsyncIterator[tuple[Target, str]]:
    """A daemon of a two-node cluster file whose second node is an Ollama backend: it runs
    the gateway too. Yields it and the gateway's URL."""
    path = home / "cluster.json"
    path.write_text(json.dumps(cluster))
    async with daemon({"TENSORD_NODE_ID": "victim"}, "--cluster", str(path), home=home) as d:
        end = await d.wait_for("gateway on http://")
        await d.wait_for("control socket")
        url = d.text[end - len("http://") :].split(",")[0].strip()
        t = Target(d, port, fast_settings(max_retries=10), home)
        problem = await legit_round_trip(t, "warm-up")
        if problem:
            raise RuntimeError(f"the daemon under attack did not serve a peer at all: {problem}")
        yield t, url


__all__ = ["SCENARIO", "attacks", "fuzz_files"]
