"""Faults between the fetcher and a real nginx: a test-owned proxy cuts, corrupts and stalls
replies; a raw server sends a wrong Content-Range; a small tmpfs fills up; four connections are
open at once (counted by the server; the speed-up itself is measured by bench/downloads.py)."""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import trio

from tensord.download.fetch import BlobFetch, DiskFull, DownloadError, FetchConfig

from .support.helpers import require
from .support.lying_http import honest, lying_servers
from .support.nginx import Nginx, nginx
from .support.tcp_proxy import Fault, proxied

MiB = 1 << 20


@pytest.fixture
def web(tmp_path: Path):  # type: ignore[no-untyped-def]
    with nginx(tmp_path) as n:
        yield n


def blob(web: Nginx, name: str, size: int) -> tuple[bytes, str]:
    data = np.random.default_rng(size).integers(0, 255, size=size, dtype=np.uint8).tobytes()
    (web.root / name).write_bytes(data)
    return data, hashlib.sha256(data).hexdigest()


@asynccontextmanager
async def small_tmpfs(mnt: Path, size: str) -> AsyncIterator[Path]:
    """A tmpfs of ``size`` at ``mnt`` (a disk that fills up), unmounted after."""
    require(os.geteuid() == 0, "needs root to mount a small tmpfs")
    os.mkdir(mnt)
    await trio.run_process(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)])
    try:
        yield mnt
    finally:
        await trio.run_process(["umount", str(mnt)])


def cfg(**kw: object) -> FetchConfig:
    base = {"connections": 4, "min_piece": 2 * MiB, "backoff_base": 0.01, "checkpoint_seconds": 0.2}
    return FetchConfig(**(base | kw))  # type: ignore[arg-type]


async def fetch(url: str, dest: Path, digest: str, conf: FetchConfig) -> BlobFetch:
    async with httpx.AsyncClient() as client:
        f = BlobFetch(client, url, dest, sha256=digest, config=conf)
        await f.run()
    return f


async def test_replies_cut_mid_piece_are_retried(web: Nginx, tmp_path: Path) -> None:
    data, digest = blob(web, "cut", 16 * MiB)
    # Inside the first piece each connection reads (pieces are at least min_piece, 2 MiB).
    faults = {0: Fault(down_cut_after=1 * MiB + 17), 2: Fault(down_cut_after=3 * MiB // 2)}
    async with proxied(web.port, faults) as proxy:
        f = await fetch(f"http://{proxy.addr}/files/cut", tmp_path / "b", digest, cfg())
    assert (tmp_path / "b").read_bytes() == data
    assert f.retries >= 1 and proxy.conns[0].cut and proxy.conns[2].cut


async def test_corrupted_bytes_fail_the_digest_and_the_blob_is_fetched_again(
    web: Nginx, tmp_path: Path
) -> None:
    data, digest = blob(web, "bad", 8 * MiB)
    async with proxied(web.port, {1: Fault(down_corrupt_at=2 * MiB + 5)}) as proxy:
        await fetch(f"http://{proxy.addr}/files/bad", tmp_path / "b", digest, cfg())
    assert (tmp_path / "b").read_bytes() == data
    assert proxy.conns[1].corrupted


async def test_a_stalled_connection_is_replaced(web: Nginx, tmp_path: Path) -> None:
    data, digest = blob(web, "stall", 12 * MiB)
    conf = cfg(stall_seconds=1.0)
    async with proxied(web.port, {0: Fault(down_stall_after=512 * 1024)}) as proxy:
        with trio.fail_after(20):
            await fetch(f"http://{proxy.addr}/files/stall", tmp_path / "b", digest, conf)
    assert (tmp_path / "b").read_bytes() == data
    assert proxy.conns[0].cut  # it did stall, and the fetch finished anyway


async def test_four_connections_are_open_at_once(tmp_path: Path) -> None:
    """Four connections configured, four open at once, counted on the server: it holds every
    body until four connections are open, so a fetcher that opened fewer would never finish
    (the deadline fails it). The speed-up this buys is a measurement, not a test: bench/
    downloads.py prints it (one vs four throttled connections)."""
    data = np.random.default_rng(4).integers(0, 255, size=16 * MiB, dtype=np.uint8).tobytes()
    digest = hashlib.sha256(data).hexdigest()
    async with lying_servers(honest(data)) as (server,):
        server.hold_bodies_until_open = 4
        with trio.fail_after(60):
            await fetch(server.url("/b"), tmp_path / "b", digest, cfg(min_piece=4 * MiB))
    assert (tmp_path / "b").read_bytes() == data
    assert server.most_open >= 4
    assert sum(1 for r in server.requests if r.range is not None) >= 4


async def test_a_wrong_content_range_is_an_error_for_the_piece(tmp_path: Path) -> None:
    """A server answering every range with bytes from elsewhere: never written, clear error."""

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            while await stream.receive_some(65536):
                body = b"x" * 16
                await stream.send_all(
                    b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 100-115/1000\r\n"
                    b"Content-Length: 16\r\n\r\n" + body
                )

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, host="127.0.0.1"), serve, 0
        )
        (listener,) = listeners
        port = listener.socket.getsockname()[1]
        with pytest.raises(DownloadError, match=r"asked for bytes 0-, got Content-Range"):
            await fetch(f"http://127.0.0.1:{port}/x", tmp_path / "b", "0" * 64, cfg(retries=1))
        nursery.cancel_scope.cancel()
    assert not (tmp_path / "b").exists()


async def test_disk_full_stops_with_a_clear_error_and_harms_nothing(
    web: Nginx, tmp_path: Path
) -> None:
    _, digest = blob(web, "big", 24 * MiB)
    async with small_tmpfs(tmp_path / "small", "8m") as mnt:
        (mnt / "kept").write_bytes(b"precious")
        with pytest.raises(DiskFull, match="do not fit on the disk"):
            await fetch(web.url("files", "big"), mnt / "b", digest, cfg())
        assert (mnt / "kept").read_bytes() == b"precious"


async def test_a_disk_that_fills_up_midway_stops_with_a_clear_error(
    web: Nginx, tmp_path: Path
) -> None:
    """Two downloads that each fit, but not together: the one that hits ENOSPC says so."""
    _, digest = blob(web, "ten", 10 * MiB)
    errors: list[BaseException] = []
    async with small_tmpfs(tmp_path / "small", "16m") as mnt:
        (mnt / "kept").write_bytes(b"precious")

        async def one(i: int) -> None:
            try:
                await fetch(web.url("throttled", "ten"), mnt / f"b{i}", digest, cfg())
            except DiskFull as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, 1)
            nursery.start_soon(one, 2)
        assert errors and all("filled up" in str(e) for e in errors), errors
        assert (mnt / "kept").read_bytes() == b"precious"
