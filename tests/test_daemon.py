"""``tensord serve`` as a real subprocess: sd_notify, SIGTERM drain, SIGHUP reload."""

from __future__ import annotations

import signal
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import trio

from tensord.events import TransferEvent
from tensord.store import TensorStore

from .support.cluster import write_cluster_file
from .support.daemons import daemon, free_port
from .support.helpers import fast_settings, running
from .support.tcp_proxy import proxied

#: Peers checked often, so that a reload's joins and leaves show within the test.
TRANSFER = {"peer_check_interval": 0.2, "drain_timeout": 30}


def cluster_file(path: Path, nodes: dict[str, int]) -> Path:
    """A cluster file of ``nodes`` (id -> port on 127.0.0.1) with fast peer checks."""
    return write_cluster_file(path, nodes, name="test", transfer=TRANSFER)


async def test_sd_notify_ready_status_watchdog_stopping_in_order(tmp_path: Path) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(str(tmp_path / "notify"))
    port = free_port()
    env = {
        "NOTIFY_SOCKET": str(tmp_path / "notify"),
        "WATCHDOG_USEC": "200000",
        "TENSORD_LISTEN": f"127.0.0.1:{port}",
        "TENSORD_NODE_ID": "n1",
    }
    messages: list[str] = []
    async with daemon(env) as d:
        with trio.fail_after(30):
            while not messages or "READY=1" not in messages[-1]:
                messages.append((await sock.recv(4096)).decode())
            # READY only once the peer listener is bound: it accepts right away.
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.aclose()
            while sum("WATCHDOG=1" in m for m in messages) < 2:
                messages.append((await sock.recv(4096)).decode())
            d.terminate()
            while "STOPPING=1" not in messages[-1]:
                messages.append((await sock.recv(4096)).decode())
    assert d.proc.returncode == 0
    ready = next(i for i, m in enumerate(messages) if "READY=1" in m)
    status = next(i for i, m in enumerate(messages) if m.startswith("STATUS="))
    stopping = next(i for i, m in enumerate(messages) if "STOPPING=1" in m)
    assert ready < stopping and status < stopping
    assert any("0/0 peers up" in m for m in messages if m.startswith("STATUS="))
    watchdogs = [i for i, m in enumerate(messages) if "WATCHDOG=1" in m]
    assert len(watchdogs) >= 2 and watchdogs[-1] < stopping
    sock.close()


async def test_sigterm_mid_transfer_drains_then_exits_0(tmp_path: Path) -> None:
    port = free_port()
    env = {"TENSORD_LISTEN": f"127.0.0.1:{port}", "TENSORD_NODE_ID": "n1"}
    big = np.random.default_rng(0).standard_normal(32 << 20).astype(np.float32)  # 128 MiB
    async with daemon(env) as d, running() as sender:
        await d.wait_for("listening on")
        async with sender.events.subscribe() as events, trio.open_nursery() as nursery:
            results = []

            async def send() -> None:
                results.append(await sender.send_tensor(f"127.0.0.1:{port}", "big", big))

            nursery.start_soon(send)
            async for event in events:
                if isinstance(event, TransferEvent) and event.state == "progress":
                    break
            d.terminate()
        assert results[0].nbytes == big.nbytes and results[0].retries == 0
        await d.wait_for("tensor arrived: 'big'")
        await d.wait_for("drain complete: 1 transfers were in flight")
        with trio.fail_after(30):
            assert await d.proc.wait() == 0


async def test_sighup_adds_and_removes_peers_and_rejects_a_bad_file(tmp_path: Path) -> None:
    me = free_port()
    named = {n: replace(fast_settings(), node_id=n) for n in ("b", "c")}
    async with running(named["b"]) as b, running(named["c"]) as c:
        path = cluster_file(tmp_path / "cluster.json", {"a": me, "b": b.port})
        async with daemon({"TENSORD_NODE_ID": "a"}, "--cluster", str(path)) as d:
            at = await d.wait_for("peer b is up")
            cluster_file(path, {"a": me, "c": c.port})
            d.proc.send_signal(signal.SIGHUP)
            await d.wait_for("reload: peer b left the cluster", at)
            at = await d.wait_for("peer c is up", at)
            path.write_text('{"nodes": [ broken')
            d.proc.send_signal(signal.SIGHUP)
            at = await d.wait_for("reload rejected, keeping the running configuration", at)
            assert "invalid JSON" in d.text
            # still serving, with the old configuration
            await c.send_tensor(f"127.0.0.1:{me}", "after-reload", np.ones(3))
            await d.wait_for("tensor arrived: 'after-reload'", at)
        assert d.proc.returncode == 0


async def test_a_down_peer_never_stops_the_daemon(tmp_path: Path) -> None:
    me, dead = free_port(), free_port()
    path = cluster_file(tmp_path / "cluster.json", {"a": me, "dead": dead})
    async with daemon({"TENSORD_NODE_ID": "a"}, "--cluster", str(path)) as d, running() as s:
        await d.wait_for("peer dead is down")
        await s.send_tensor(f"127.0.0.1:{me}", "x", np.arange(4))
        await d.wait_for("tensor arrived: 'x'")
    assert d.proc.returncode == 0


async def test_second_signal_exits_at_once_while_draining(tmp_path: Path) -> None:
    """A transfer that stalls mid-way keeps the drain waiting; a second SIGTERM ends it now."""
    from tensord.wire import Ack, Begin, Chunk, FrameDecoder, encode, make_hello
    from tensord.wire.crc import crc32c
    from tensord.wire.handshake import ALL_FEATURES
    from tensord.wire.meta import TensorMeta

    port = free_port()
    env = {
        "TENSORD_LISTEN": f"127.0.0.1:{port}",
        "TENSORD_NODE_ID": "n1",
        "TENSORD_DRAIN_TIMEOUT": "600",
        "TENSORD_CLUSTER_SECRET_FILE": "",  # the staller below is written by hand: no auth
    }
    async with daemon(env) as d:
        await d.wait_for("listening on")
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        meta = TensorMeta("stalled", "|u1", (8192,), 8192)
        chunk = bytes(4096)
        await stream.send_all(
            encode(make_hello("staller", ALL_FEATURES, 1 << 26))
            + encode(Begin("ab" * 8, meta, 4096, 4))
            + encode(Chunk("ab" * 8, 0, 0, 4096, 4096, crc32c(chunk)))
            + chunk
        )  # ...and never the second chunk
        decoder = FrameDecoder()
        seen: list[object] = []
        with trio.fail_after(10):  # hello, then the ack of chunk 0: the transfer is in flight
            while not any(isinstance(m, Ack) for m in seen):
                decoder.feed(await stream.receive_some(4096))
                while (m := decoder.next_message()) is not None:
                    seen.append(m)
        at = len(d.log)
        d.terminate()
        await d.wait_for("draining", at)
        d.proc.send_signal(signal.SIGTERM)
        await d.wait_for("again: exiting now", at)
        with trio.fail_after(10):
            assert await d.proc.wait() == 0
        await stream.aclose()


async def test_sigterm_past_the_drain_timeout_persists_the_partial_for_a_resume(
    tmp_path: Path,
) -> None:
    port = free_port()
    env = {
        "TENSORD_LISTEN": f"127.0.0.1:{port}",
        "TENSORD_NODE_ID": "n1",
        "TENSORD_DRAIN_TIMEOUT": "0.2",
    }
    size = 48 << 20
    big = np.random.default_rng(5).integers(0, 255, size=size, dtype=np.uint8)
    home = tmp_path / "home"
    home.mkdir()
    sender_settings = fast_settings(retry_base_delay=100, max_retries=10, chunk_size=1 << 20)
    async with running(sender_settings) as sender, proxied(port, {}, rate=32e6) as link:
        async with trio.open_nursery() as nursery:
            results = []
            sent = trio.Event()

            async def send() -> None:
                results.append(await sender.send_tensor(f"tensord://n1@{link.addr}", "big", big))
                sent.set()

            async with daemon(env, home=home) as d1:
                await d1.wait_for("listening on")
                async with sender.events.subscribe() as events:
                    nursery.start_soon(send)
                    async for event in events:
                        if isinstance(event, TransferEvent) and event.bytes_done > size // 4:
                            break
                d1.terminate()
                with trio.fail_after(30):
                    assert await d1.proc.wait() == 0
                await d1.wait_for("drain timed out: 1 transfers were in flight")
            # What had arrived is on disk, with its progress, for the sender's retry.
            (partial,) = TensorStore(home / "state").partials()
            assert partial.meta.name == "big" and partial.bytes_have >= size // 8
            async with daemon(env, home=home) as d2:
                await d2.wait_for("on disk from before a restart")
                with trio.fail_after(60):
                    await sent.wait()
                await d2.wait_for("tensor arrived: 'big'")
        result = results[0]
        assert result.retries >= 1
        assert result.bytes_resent <= size - partial.bytes_have
        assert TensorStore(home / "state").partials() == []
        assert np.array_equal(TensorStore(home / "state").load("big"), big)
