"""The fetch's writer and hasher are apart: a long SHA-256 catch-up holds back neither the
writes nor the resume records (reads queued behind it were what a ``kill -9`` then lost), and
what waits for the hasher stays bounded."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import trio

from tensord.download import fetch
from tensord.download.fetch import BlobFetch, FetchConfig, Progress
from tensord.download.partial_blob import PartialBlob

from .support.nginx import nginx

MiB = 1 << 20


async def test_a_held_up_hash_holds_back_no_write_and_the_digest_is_still_right(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = 24 * MiB + 777
    data = np.random.default_rng(7).integers(0, 255, size=size, dtype=np.uint8).tobytes()
    digest = hashlib.sha256(data).hexdigest()
    # Past 1 MiB waiting for the hasher, batches are let go and read back from the file.
    monkeypatch.setattr(fetch, "HASH_BACKLOG", 1 * MiB)
    release = threading.Event()
    hash_calls: list[int] = []
    real_hash = PartialBlob.hash

    def held_hash(self: PartialBlob, batch: list[tuple[int, memoryview]], prefix: int) -> None:
        hash_calls.append(prefix)
        release.wait(60)  # the first trip holds the hasher's thread until every byte is written
        real_hash(self, batch, prefix)

    monkeypatch.setattr(PartialBlob, "hash", held_hash)
    all_written = trio.Event()
    backlog_seen: list[int] = []

    def progress(p: Progress) -> None:
        backlog_seen.append(f._hash_backlog)
        if p.done == size:
            all_written.set()

    with nginx(tmp_path) as web:
        (web.root / "b").write_bytes(data)
        dest = tmp_path / "out" / "b"
        cfg = FetchConfig(connections=4, min_piece=2 * MiB, checkpoint_seconds=0.05)
        async with httpx.AsyncClient() as client:
            f = BlobFetch(
                client, web.url("files", "b"), dest, sha256=digest, config=cfg, progress=progress
            )
            async with trio.open_nursery() as nursery:
                result: list[Path] = []

                async def run() -> None:
                    result.append(await f.run())

                nursery.start_soon(run)
                with trio.fail_after(60):
                    await all_written.wait()
                # Every byte is in the file while the hasher is still stuck in its first trip.
                assert len(hash_calls) == 1 and not result
                assert f.done.total == size
                assert max(backlog_seen) <= 1 * MiB + max(cfg.chunk, 1 * MiB) * fetch.WRITE_BATCH
                release.set()
    assert result == [dest]
    assert dest.read_bytes() == data  # and the digest, fed partly by read-back, matched
    assert f.sha256 == digest
