"""The chaos scenarios by name, with their parameters: ``FULL`` for the report (``make chaos``)
and ``QUICK`` for tests/test_reliability.py and ``bench/chaos.py --quick``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from tensord.config import GiB, KiB, MiB

from .attacks import attacks
from .bad_input import bad_input
from .disks import disk_full
from .load import load
from .netns import netns_link_flap
from .quic import quic_path_faults
from .rows import Row
from .transfers import (
    cuts_and_corruption,
    idle_partial_expiry,
    lost_confirmation,
    receiver_kills,
    restarted_sender_space,
    retry_budget,
    sender_restart,
)

#: The bugs this suite found. Each was a strict xfail test while it was open; all are fixed, and
#: their scenarios (lost-stored, retries, idle-partial, partial-space) are ordinary checks now.
BUG_LOST_STORED = (
    "a lost Stored makes the sender re-send the whole tensor and the receiver store and announce "
    "it twice (Receiver._receive forgets a committed transfer at once)"
)
BUG_RETRY_BUDGET = (
    "the retry budget counts every failure of a transfer, even after attempts that made "
    "progress (RetryBudget.run never resets `retries`)"
)
BUG_PARTIAL_SPACE = (
    "a restarted sender cannot re-send a tensor while the partial its previous process left "
    "holds the space: the store refuses it as full (a final error) until that partial expires "
    "(Receiver._receive never drops or adopts the same peer's partial of the same tensor)"
)
BUG_IDLE_PARTIAL = (
    "a running node never removes a partial receive abandoned by its sender unless another "
    "receive arrives after the TTL (Receiver.expire runs only in Receiver._receive)"
)

#: Scenarios whose rows show a known bug (expected to fail their checks; a pass shows as
#: "FIXED?" in the report). None now: the four above are fixed.
BUG_NAMES: dict[str, str] = {}
FOUND_AND_FIXED = (BUG_LOST_STORED, BUG_RETRY_BUDGET, BUG_IDLE_PARTIAL, BUG_PARTIAL_SPACE)


Scenario = Callable[..., Awaitable[list[Row]]]

SCENARIOS: dict[str, Scenario] = {
    "cuts": cuts_and_corruption,
    "kills": receiver_kills,
    "sender": sender_restart,
    "disk": disk_full,
    "load": load,
    "bad": bad_input,
    "netns": netns_link_flap,
    "lost-stored": lost_confirmation,
    "retries": retry_budget,
    "idle-partial": idle_partial_expiry,
    "partial-space": restarted_sender_space,
    "quic": quic_path_faults,
    "attacks": attacks,
}

FULL: dict[str, dict[str, Any]] = {
    "cuts": {"transfers": 100, "max_size": 64 * MiB, "senders": 4, "chunk_size": 256 * KiB},
    "kills": {"size": 1 * GiB, "kills": 20},
    "sender": {"size": 256 * MiB, "ttl": 5.0, "running_expiry": True},
    "disk": {"tensor": 16 * MiB},
    "load": {"peers": 50, "seconds": 60.0},
    "bad": {"run_suite": True},
    "netns": {"size": 256 * MiB, "down_seconds": 2.0},
    "lost-stored": {"size": 64 * MiB},
    "retries": {"size": 64 * MiB},
    "idle-partial": {"size": 64 * MiB},
    "partial-space": {"size": 64 * MiB},
    "quic": {},
    "attacks": {"fuzz": True},
}

#: The shortened form tests/test_reliability.py runs (well under 90 s in all on 2 cores).
QUICK: dict[str, dict[str, Any]] = {
    "cuts": {
        "transfers": 20,
        "max_size": 4 * MiB,
        "senders": 2,
        "chunk_size": 64 * KiB,
        "corrupt_rate": 0.02,
    },
    "kills": {"size": 64 * MiB, "kills": 3},
    "sender": {"size": 32 * MiB, "ttl": 0.5},
    "disk": {"tensor": 4 * MiB},
    "load": {"peers": 10, "seconds": 5.0, "max_size": 1 * MiB},
    "bad": {
        "connections": 20,
        "attempts": 4,
        "greedy": 24,
        "per_peer_limit": 8,
        "flood": 48,
        "max_connections": 32,
        "max_unauthenticated": 16,
    },
    "netns": {"size": 32 * MiB, "down_seconds": 1.0},
    "lost-stored": {},
    "retries": {},
    "idle-partial": {"wait": 2.0},
    "partial-space": {},
    "quic": {"transfers": 10, "max_size": 4 * MiB, "cuts": 2},
    "attacks": {
        "name_rounds": 1,
        "mc_attempts": 2,
        "strangers": 24,
        "max_connections": 16,
        "max_unauthenticated": 8,
        "quic_more": 6,
        "quic_limit": 6,
        "lie_bytes": 8 * MiB,
        "fifo_requests": 48,
        "slow_bodies_n": 8,
        "read_timeout": 0.5,
    },
}
