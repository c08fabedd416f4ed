"""The one retry policy (tensord/backoff.py), tested in trio time with the autojump clock."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from tensord.backoff import Backoff
from tensord.node import retry_backoff
from tensord.peer_health import PEER_BACKOFF


def test_delays_double_then_cap_within_the_jitter() -> None:
    b = Backoff(base=0.5, cap=5.0, jitter=0.2)
    random.seed(1)
    for attempt, plain in [(0, 0.5), (1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 5.0), (99, 5.0)]:
        for _ in range(50):
            assert plain * 0.8 <= b.delay(attempt) <= plain * 1.2
    assert Backoff(base=1.0, cap=1e9).delay(10_000) <= 1.2e9  # no overflow, capped


def test_the_three_users_share_it() -> None:
    assert retry_backoff(500) == Backoff(base=0.5, cap=5.0)  # tensor_protocol.retry_base_delay
    assert Backoff(base=1.0, cap=30.0) == PEER_BACKOFF


@pytest.mark.parametrize("bad", [{"base": -1.0}, {"cap": -1.0}, {"jitter": 1.0}])
def test_a_bad_policy_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="bad backoff"):
        Backoff(**{"base": 1.0, "cap": 2.0, **bad})


async def test_sleep_waits_that_long_in_trio_time(autojump_clock: trio.testing.MockClock) -> None:
    b = Backoff(base=2.0, cap=60.0, jitter=0.0)
    start = trio.current_time()
    for attempt in (1, 2, 3, 4):
        await b.sleep(attempt)
    assert trio.current_time() - start == pytest.approx(2 + 4 + 8 + 16)
