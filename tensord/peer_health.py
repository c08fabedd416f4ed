"""What the daemon knows of each configured peer, and the loop that keeps it current.

One supervisor task per peer pings it every ``transfer.peer_check_interval``; a failure marks the
peer down and the next try waits 1 s, 2 s, 4 s ... 30 s (:data:`PEER_BACKOFF`), or less: any
successful connection to the peer meanwhile (a send that got through) ends the wait at once, so
the state shown never contradicts what the user just did. The daemon owns
the tasks (one cancel scope each, so a reload can drop one peer); the control API reads the
records through :mod:`tensord.control.status`. Nothing here can take the daemon down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .backoff import Backoff
from .boundary import report_unexpected
from .config import NodeEntry
from .errors import TensorError
from .events import PeerEvent
from .node import TensorNode

log = logging.getLogger("tensord.daemon")

MAX_PEER_BACKOFF = 30.0
#: A peer that does not answer its pings is tried again 1 s, 2 s, 4 s ... 30 s later.
PEER_BACKOFF = Backoff(base=1.0, cap=MAX_PEER_BACKOFF)


@dataclass
class PeerHealth:
    """What the daemon knows of a configured peer."""

    entry: NodeEntry
    state: str = "unknown"  # "up", "down", "unknown"
    rtt: float | None = None
    failures: int = 0
    last_error: str = ""
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


async def supervise_peer(
    node: TensorNode,
    health: PeerHealth,
    check_interval: Callable[[], float],
    changed: Callable[[], None],
) -> None:
    """Keep one peer checked until ``health.scope`` is cancelled. ``check_interval`` is read on
    every round (a reload may change it); ``changed`` is called when the peer's state changes."""

    def set_state(state: str) -> None:
        if health.state != state:
            health.state = state
            node.events.publish(PeerEvent(health.entry.id, state, health.last_error))
            changed()

    with health.scope:
        while True:
            try:
                health.rtt = await node.ping(health.entry.id)
            except TensorError as exc:
                health.failures += 1
                health.last_error = str(exc)
                if health.state != "down":
                    log.warning("peer %s is down: %s", health.entry.id, exc)
                set_state("down")
                await _backoff_or_connected(node, health)
                continue
            except Exception as exc:  # a bug: log it, count it, keep supervising
                report_unexpected(log, "peer", f"supervisor of peer {health.entry.id}", exc)
                await trio.sleep(MAX_PEER_BACKOFF)
                continue
            if health.state != "up":
                log.info("peer %s is up (rtt %.2f ms)", health.entry.id, health.rtt * 1e3)
            health.failures = 0
            set_state("up")
            await trio.sleep(check_interval())


async def _backoff_or_connected(node: TensorNode, health: PeerHealth) -> None:
    """Wait out the backoff after ``health.failures`` failures, or until a connection to the
    peer succeeds, whichever comes first."""
    with trio.move_on_after(PEER_BACKOFF.delay(health.failures)):
        await node.wait_connected(health.entry.id)
