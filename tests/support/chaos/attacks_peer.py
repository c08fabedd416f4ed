"""Attack rows on the peer port (scenario 13): requests for bad names (a), a one-byte max chunk
(b), idle strangers (c), unauthenticated QUIC (d), a listener off loopback without
authentication (j).
"""

from __future__ import annotations

import contextlib
import socket
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import trio

from tensord.config import KiB
from tensord.node import TensorNode
from tensord.wire import Error, Hello

from ..daemons import daemon, free_port
from ..quic_client import raw_client
from ..raw_peer import RawPeer, header
from .attacks_target import (
    QUIC_CAP,
    QUIC_PUSH,
    Target,
    attempt,
    closed_by_peer,
    metric,
    reset_peak,
    survived,
    target,
)
from .rows import Row, fmt_bytes

#: What a QUIC connection may get the daemon to take before its Hello (a Hello's worth).
HELLO_CREDIT = 64 * KiB
#: The names whose ``request`` made a serving daemon exit 1 (tests/test_peer_boundary.py).
BAD_NAMES = ["layers//0", "a/../b", "/etc/passwd", "nul\x00", "x" * 4096]


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
