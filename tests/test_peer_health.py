"""The daemon's peer supervisor (tensord/peer_health.py) in trio time: a fake node whose pings
fail on cue, the autojump clock, and the state changes and waits it produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import trio
import trio.testing

from tensord.config import HostPort, NodeEntry
from tensord.errors import PeerUnreachable
from tensord.events import EventBus, PeerEvent
from tensord.node import TensorNode
from tensord.peer_health import MAX_PEER_BACKOFF, PEER_BACKOFF, PeerHealth, supervise_peer


@dataclass
class FakeNode:
    """Answers pings from a script: an exception to raise or an RTT, one per ping."""

    script: list[BaseException | float]
    events: EventBus = field(default_factory=EventBus)
    pinged_at: list[float] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)
    #: Set by a test to play "a send to the peer just connected".
    connected: trio.Event = field(default_factory=trio.Event)

    async def wait_connected(self, peer: str) -> None:
        await self.connected.wait()
        self.connected = trio.Event()

    async def ping(self, peer: str) -> float:
        self.pinged_at.append(trio.current_time())
        if not self.script:
            self.done.set()
            await trio.sleep_forever()
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step


async def run_script(
    script: list[BaseException | float], interval: float = 10.0, connect_at: float | None = None
) -> tuple[FakeNode, PeerHealth, list[PeerEvent], int]:
    node = FakeNode(script)
    health = PeerHealth(NodeEntry("gpu-2", HostPort("10.0.0.2", 7070)))
    changes = 0

    def changed() -> None:
        nonlocal changes
        changes += 1

    seen: list[PeerEvent] = []
    async with node.events.subscribe() as events, trio.open_nursery() as nursery:
        nursery.start_soon(
            supervise_peer, cast(TensorNode, node), health, lambda: interval, changed
        )
        if connect_at is not None:
            await trio.sleep(connect_at)
            node.connected.set()
        await node.done.wait()
        health.scope.cancel()
        while True:
            try:
                event: Any = events.receive_nowait()
            except trio.WouldBlock:
                break
            seen.append(event)
    return node, health, seen, changes


async def test_a_failing_peer_is_retried_with_growing_waits_then_marked_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    down = PeerUnreachable("connection refused")
    node, health, seen, changes = await run_script([down, down, down, 0.002])
    waits = [b - a for a, b in zip(node.pinged_at, node.pinged_at[1:], strict=False)]
    # 1 s, 2 s, 4 s (each +-20 % jitter), then the regular check interval after success.
    for wait, attempt in zip(waits[:3], (1, 2, 3), strict=True):
        plain = min(PEER_BACKOFF.base * 2 ** (attempt - 1), MAX_PEER_BACKOFF)
        assert plain * 0.8 <= wait <= plain * 1.2, (attempt, wait)
    assert waits[3] == pytest.approx(10.0)
    assert [(e.peer, e.state) for e in seen] == [("gpu-2", "down"), ("gpu-2", "up")]
    assert seen[0].detail == "connection refused"
    assert changes == 2  # a state change each, not one per failed ping
    assert health.state == "up" and health.failures == 0 and health.rtt == 0.002


async def test_waits_are_capped(autojump_clock: trio.testing.MockClock) -> None:
    down = PeerUnreachable("no route to host")
    node, health, _, _ = await run_script([down] * 9)
    waits = [b - a for a, b in zip(node.pinged_at, node.pinged_at[1:], strict=False)]
    assert max(waits) <= MAX_PEER_BACKOFF * 1.2
    assert waits[-1] >= MAX_PEER_BACKOFF * 0.8
    assert health.state == "down" and health.failures == 9


async def test_a_bug_in_a_ping_is_survived(autojump_clock: trio.testing.MockClock) -> None:
    """An unexpected exception is logged and counted; the supervisor waits and carries on."""
    node, health, _, _ = await run_script([ZeroDivisionError("bug"), 0.001])
    assert len(node.pinged_at) == 3
    assert node.pinged_at[1] - node.pinged_at[0] == pytest.approx(MAX_PEER_BACKOFF)
    assert health.state == "up"


async def test_a_connection_made_meanwhile_ends_the_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A send that got through to a peer marked down is news: the supervisor pings at once
    instead of waiting out its backoff, so `tensord peers` right after the send says "up"."""
    down = PeerUnreachable("connection refused")
    node, health, seen, _ = await run_script([down, 0.002], connect_at=0.1)
    assert node.pinged_at[1] - node.pinged_at[0] == pytest.approx(0.1)  # backoff was 0.8-1.2 s
    assert [e.state for e in seen] == ["down", "up"] and health.state == "up"
