"""One retry policy: exponential backoff with jitter, for transfers, peer supervision and
downloads alike (they used to write it three times, with three different jitters).

The n-th consecutive failure waits ``base * 2**(n-1)``, capped at ``cap``, times a uniform
factor in ``[1 - jitter, 1 + jitter]`` so that peers retrying together spread out. Time is
trio's, so tests run the policy under ``autojump_clock`` in milliseconds of real time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import trio

#: The doubling stops here (2**40 times any base is past every cap): no float overflow.
_MAX_DOUBLINGS = 40


@dataclass(frozen=True)
class Backoff:
    """Delays for consecutive failures: ``Backoff(base=0.5, cap=5.0).delay(3)`` is ~2 s."""

    base: float  # seconds before the first retry
    cap: float  # the longest wait
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.base < 0 or self.cap < 0 or not 0 <= self.jitter < 1:
            raise ValueError(f"bad backoff: {self}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after the ``attempt``-th consecutive failure (1 is the first)."""
        doublings = min(max(attempt, 1) - 1, _MAX_DOUBLINGS)
        plain: float = min(self.base * 2.0**doublings, self.cap)
        return plain * float(random.uniform(1 - self.jitter, 1 + self.jitter))

    async def sleep(self, attempt: int) -> None:
        await trio.sleep(self.delay(attempt))


__all__ = ["Backoff"]
