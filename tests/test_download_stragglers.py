"""Which download connections are replaced: rates measured right, stragglers caught, no churn.

The judgement (``BlobFetch._stragglers``) is tested on tasks with made-up progress at made-up
times; tests/test_download_fetch.py replaces a crawling connection against a real nginx.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from tensord.download.fetch import SAMPLE_STEP, BlobFetch, FetchConfig, _Task

MB = 1_000_000
KiB = 1 << 10


def reading(rate: float, *, read: int, seconds: float, start: float = 0.0) -> _Task:
    """A task that read ``rate`` bytes/s in reads of ``read`` bytes from ``start`` for
    ``seconds``."""
    task = _Task(0, 0, 1 << 40, started=start)
    n = int(rate * seconds / read)
    for k in range(1, n + 1):
        task.note(start + k * read / rate, read)
    return task


async def test_many_small_reads_are_measured_at_their_rate() -> None:
    # 20 MB/s in 16 KiB TLS records: ~1,800 reads in the 1.5 s window. (A log of the last 64
    # reads measured this connection at 0.7 MB/s, and a connection that slow is replaced.)
    task = reading(20 * MB, read=16 * KiB, seconds=3.0)
    rate = task.rate(3.0, 1.5)
    assert rate is not None and abs(rate - 20 * MB) < 20 * MB * 2 * SAMPLE_STEP / 1.5
    assert len(task.samples) <= 3.0 / SAMPLE_STEP + 2  # sampled, not one entry per read
    reads = task.read // (16 * KiB)
    assert task.samples[-1] == (reads * 16 * KiB / (20 * MB), task.read)  # the newest read


async def test_a_rate_counts_only_the_window() -> None:
    task = reading(50 * MB, read=64 * KiB, seconds=2.0)  # fast at first...
    for k in range(1, 11):  # ...then 1 MB/s for 2 s
        task.note(2.0 + k * 0.2, 200_000)
    rate = task.rate(4.0, 1.5)
    assert rate is not None and 0.9 * MB <= rate <= 1.2 * MB
    assert task.rate(1.0, 1.5) is None  # younger than the window: not judged yet


async def test_a_task_that_restarts_is_measured_afresh() -> None:
    task = reading(50 * MB, read=64 * KiB, seconds=1.0)
    task.restart()
    assert task.read == 0 and not task.samples


def fetch(tmp_path: Path, tasks: list[_Task], **cfg: float) -> BlobFetch:
    f = BlobFetch(
        httpx.AsyncClient(), "http://127.0.0.1:9/blob", tmp_path / "b", config=FetchConfig(**cfg)
    )
    f._tasks = dict(enumerate(tasks))
    return f


async def test_a_connection_at_a_tenth_of_its_siblings_is_replaced(tmp_path: Path) -> None:
    fast = [reading(25 * MB, read=64 * KiB, seconds=2.0) for _ in range(3)]
    slow = reading(2.5 * MB, read=16 * KiB, seconds=2.0)
    f = fetch(tmp_path, [*fast, slow])
    (found,) = f._stragglers(2.0)
    assert found[0] is slow and found[1].startswith("slow (2.")


async def test_the_connection_taking_over_a_replaced_range_gets_a_second_chance(
    tmp_path: Path,
) -> None:
    """A new connection ramping up on a long-RTT link reads at, say, 15 % of the warm ones: it
    is not replaced again (which would repeat forever), unless it crawls under half the ratio."""
    fast = [reading(25 * MB, read=64 * KiB, seconds=2.0) for _ in range(3)]
    ramping = reading(3.75 * MB, read=16 * KiB, seconds=2.0)
    assert [t for t, _ in fetch(tmp_path, [*fast, ramping])._stragglers(2.0)] == [ramping]
    ramping.replacing = True
    assert fetch(tmp_path, [*fast, ramping])._stragglers(2.0) == []
    crawling = reading(2 * MB, read=16 * KiB, seconds=2.0)
    crawling.replacing = True
    assert [t for t, _ in fetch(tmp_path, [*fast, crawling])._stragglers(2.0)] == [crawling]


async def test_equal_connections_are_left_alone_and_a_stalled_one_is_not(tmp_path: Path) -> None:
    tasks = [reading(25 * MB, read=16 * KiB, seconds=3.0) for _ in range(4)]
    assert fetch(tmp_path, tasks)._stragglers(3.0) == []
    stalled = reading(25 * MB, read=64 * KiB, seconds=1.0)  # nothing since t = 1 s
    f = fetch(tmp_path, [*tasks, stalled], stall_seconds=1.5)
    assert [(t, why) for t, why in f._stragglers(3.0)] == [(stalled, "stalled")]
