"""BlobFetch against a real nginx: parallel ranges, resume, redirects, servers that ignore Range,
digest mismatches, slow connections."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import trio

from tensord.download.fetch import BlobFetch, DownloadError, FetchConfig, Progress

from .support.nginx import Nginx, nginx

MiB = 1 << 20


@pytest.fixture
def web(tmp_path: Path):  # type: ignore[no-untyped-def]
    with nginx(tmp_path) as n:
        yield n


def blob(web: Nginx, name: str, size: int, seed: int = 0) -> tuple[bytes, str]:
    data = np.random.default_rng(seed).integers(0, 255, size=size, dtype=np.uint8).tobytes()
    (web.root / name).write_bytes(data)
    return data, hashlib.sha256(data).hexdigest()


def cfg(**kw: object) -> FetchConfig:
    base = {"connections": 4, "min_piece": 4 * MiB, "backoff_base": 0.01, "checkpoint_seconds": 0.1}
    return FetchConfig(**(base | kw))  # type: ignore[arg-type]


async def test_parallel_ranges_byte_exact_and_verified(web: Nginx, tmp_path: Path) -> None:
    data, digest = blob(web, "b1", 48 * MiB + 12345)
    dest = tmp_path / "out" / "blob"
    async with httpx.AsyncClient() as client:
        f = BlobFetch(client, web.url("files", "b1"), dest, sha256=digest, config=cfg())
        assert await f.run() == dest
    assert dest.read_bytes() == data
    assert not f.partial.exists() and not f.control.exists()
    ranged = [x for x in web.log() if x.range]
    assert len(ranged) >= 4 and all(x.status == 206 for x in ranged)
    assert f.bytes_fetched == len(data)  # every byte written exactly once
    # What nginx sent beyond that is what stolen-from replies had in flight when they stopped.
    assert len(data) <= sum(x.sent for x in web.log()) <= len(data) + 3 * 8 * MiB


async def test_resume_after_a_stop_fetches_only_the_missing_ranges(
    web: Nginx, tmp_path: Path
) -> None:
    size = 40 * MiB
    data, digest = blob(web, "b2", size, seed=2)
    dest = tmp_path / "blob"
    url = web.url("throttled", "b2")
    async with httpx.AsyncClient() as client:
        first = BlobFetch(client, url, dest, sha256=digest, config=cfg(connections=2))
        with trio.CancelScope() as scope:

            def stop_halfway(p: Progress) -> None:
                if p.done > size // 2:
                    scope.cancel()

            first.on_progress = stop_halfway
            await first.run()
        assert not dest.exists() and first.partial.exists() and first.control.exists()
        saved = first.done.total
        second = BlobFetch(client, url, dest, sha256=digest, config=cfg(connections=2))
        await second.run()
    assert dest.read_bytes() == data
    assert second.bytes_fetched == size - saved  # only what was missing travelled again


async def test_a_server_that_ignores_range_gets_one_stream(web: Nginx, tmp_path: Path) -> None:
    data, digest = blob(web, "b3", 9 * MiB, seed=3)
    dest = tmp_path / "blob"
    async with httpx.AsyncClient() as client:
        await BlobFetch(client, web.url("norange", "b3"), dest, sha256=digest, config=cfg()).run()
    assert dest.read_bytes() == data
    (line,) = web.log()
    assert line.status == 200 and line.sent == len(data)


async def test_redirect_keeps_range_and_drops_authorization_on_another_host(
    web: Nginx, tmp_path: Path
) -> None:
    data, digest = blob(web, "b4", 10 * MiB, seed=4)
    dest = tmp_path / "blob"

    async def auth(url: str, challenge: str | None) -> dict[str, str]:
        return {"Authorization": "Bearer secret-token"}

    async with httpx.AsyncClient() as client:
        f = BlobFetch(
            client, web.url("redirect", "b4"), dest, sha256=digest, auth=auth, config=cfg()
        )
        await f.run()
    assert dest.read_bytes() == data
    log = web.log()
    hops = [x for x in log if x.port == web.port]
    finals = [x for x in log if x.port == web.port2]
    assert hops and all(x.status == 302 and x.authorization == "Bearer secret-token" for x in hops)
    assert finals and all(x.range.startswith("bytes=") for x in finals)
    assert all(x.authorization == "-" for x in finals)  # never sent to the other host


async def test_digest_mismatch_refetches_once_then_fails_clearly(
    web: Nginx, tmp_path: Path
) -> None:
    data, _ = blob(web, "b5", 5 * MiB, seed=5)
    dest = tmp_path / "blob"
    wrong = "0" * 64
    async with httpx.AsyncClient() as client:
        with pytest.raises(DownloadError, match="sha256 mismatch"):
            await BlobFetch(client, web.url("files", "b5"), dest, sha256=wrong, config=cfg()).run()
    assert not dest.exists()
    assert 2 * len(data) <= sum(x.sent for x in web.log()) <= 2 * len(data) + 6 * 8 * MiB


async def test_a_missing_blob_names_url_and_status(web: Nginx, tmp_path: Path) -> None:
    async with httpx.AsyncClient() as client:
        with pytest.raises(DownloadError, match=r"/files/absent.*HTTP 404"):
            await BlobFetch(client, web.url("files", "absent"), tmp_path / "x", config=cfg()).run()


async def test_a_crawling_connection_is_replaced(web: Nginx, tmp_path: Path) -> None:
    data, digest = blob(web, "b6", 24 * MiB, seed=6)
    dest = tmp_path / "blob"
    conf = cfg(slow_seconds=0.5, min_piece=2 * MiB)
    async with httpx.AsyncClient() as client:
        with trio.fail_after(30):  # the crawling first piece alone would take 30 s
            await BlobFetch(
                client, web.url("slowfirst", "b6"), dest, sha256=digest, config=conf
            ).run()
    assert dest.read_bytes() == data


async def test_an_empty_blob(web: Nginx, tmp_path: Path) -> None:
    (web.root / "empty").write_bytes(b"")
    digest = hashlib.sha256(b"").hexdigest()
    async with httpx.AsyncClient() as client:
        f = BlobFetch(client, web.url("files", "empty"), tmp_path / "e", sha256=digest)
        assert (await f.run()).read_bytes() == b""


async def test_a_partial_the_server_refuses_416_is_discarded_and_fetched_again(
    web: Nginx, tmp_path: Path
) -> None:
    data, digest = blob(web, "b7", 4 * MiB, seed=7)
    dest = tmp_path / "blob"
    # A partial left by a run that saw a bigger blob: its missing range is past the end now.
    (tmp_path / "blob.incomplete").write_bytes(b"\0" * 8 * MiB)
    (tmp_path / "blob.incomplete.json").write_text(
        json.dumps({"size": 8 * MiB, "sha256": None, "done": [[0, 4 * MiB]]})
    )
    async with httpx.AsyncClient() as client:
        await BlobFetch(client, web.url("files", "b7"), dest, config=cfg()).run()
    assert dest.read_bytes() == data
    assert any(x.status == 416 for x in web.log())
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == digest
