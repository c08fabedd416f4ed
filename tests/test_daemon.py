"""``tensord serve`` as a real subprocess: sd_notify, SIGTERM drain, SIGHUP reload."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import trio

from tensord.events import TransferEvent

from .helpers import fast_settings, running


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """A running ``tensord serve`` whose stderr the test can wait on."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.log = bytearray()
        self.eof = False
        self.terminated = False
        self._grew = trio.Event()

    async def pump(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.receive_some(65536):
            self.log += chunk
            self._grew.set()
            self._grew = trio.Event()
        self.eof = True
        self._grew.set()

    async def wait_for(self, needle: str, after: int = 0) -> int:
        """Wait until ``needle`` appears in the log after offset ``after``; return its end."""
        data = needle.encode()
        with trio.fail_after(30):
            while (i := self.log.find(data, after)) < 0:
                if self.eof:
                    raise AssertionError(f"daemon exited before {needle!r}:\n{self.text}")
                await self._grew.wait()
        return i + len(data)

    def terminate(self) -> None:
        self.terminated = True
        self.proc.send_signal(signal.SIGTERM)

    @property
    def text(self) -> str:
        return self.log.decode(errors="replace")


@asynccontextmanager
async def daemon(env: dict[str, str], *args: str) -> AsyncIterator[Daemon]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("TENSORD_", "OLLAMA_"))}
    full.pop("NOTIFY_SOCKET", None)
    full |= env
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tensord", "serve", *args], stderr=subprocess.PIPE, env=full
    )
    d = Daemon(proc)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(d.pump)
            yield d
            if proc.returncode is None and not d.terminated:
                d.terminate()
            with trio.fail_after(30):
                await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def cluster_file(path: Path, nodes: dict[str, int], **extra: object) -> Path:
    doc = {
        "name": "test",
        "nodes": [{"id": k, "addr": f"127.0.0.1:{p}"} for k, p in nodes.items()],
        "transfer": {"peer_check_interval": 0.2, "drain_timeout": 30},
        **extra,
    }
    path.write_text(json.dumps(doc))
    return path


async def test_sd_notify_ready_status_watchdog_stopping_in_order(tmp_path: Path) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(str(tmp_path / "notify"))
    port = _free_port()
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
    port = _free_port()
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
    me = _free_port()
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
    me, dead = _free_port(), _free_port()
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

    port = _free_port()
    env = {
        "TENSORD_LISTEN": f"127.0.0.1:{port}",
        "TENSORD_NODE_ID": "n1",
        "TENSORD_DRAIN_TIMEOUT": "600",
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
