"""What a transfer returns and how it reports itself, on whichever side of the node it runs.

The node's outbound jobs (:mod:`tensord.outbound`) and its inbound server
(:mod:`tensord.receiver`) are separate objects, but they report transfers the same way: a
:class:`TransferResult` or an :class:`Arrival`, a :class:`TransferEvent` on the events stream,
an id from one per-node counter, a failure named the same way in logs and errors, and one count
of the transfers in flight that ``drain()`` waits on.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import trio

from .events import EventBus, TransferEvent
from .wire.meta import TensorMeta


class Arrival(NamedTuple):
    """A received tensor, as returned by :meth:`TensorNode.receive_tensor`."""

    name: str
    array: np.ndarray[Any, Any]
    sender: str


@dataclass(frozen=True)
class TransferResult:
    """What a completed send or pull cost."""

    id: str
    name: str
    peer: str
    nbytes: int
    seconds: float
    retries: int
    bytes_sent: int = 0  # payload bytes on the wire (after compression), resends included
    bytes_resent: int = 0
    chunks_compressed: int = 0
    nacks: int = 0
    legacy: bool = False
    transport: str = "tcp"  # of the attempt that completed: "tcp" or "quic"

    @property
    def rate(self) -> float:
        """Bytes per second."""
        return self.nbytes / self.seconds if self.seconds > 0 else float("inf")


class TransferIds:
    """Transfer ids: a random per-node prefix and a counter (no syscall per transfer)."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(4)
        self._counter = 0

    def next_seq(self) -> int:
        """The next number of the counter (a ping's sequence number uses it too)."""
        self._counter += 1
        return self._counter

    def next(self) -> str:
        return f"{self._prefix}{self.next_seq() & 0xFFFFFFFF:08x}"


class InFlight:
    """How many sends, pulls and receives run now, and a wake-up when that reaches zero."""

    def __init__(self) -> None:
        self.count = 0
        self._quiet = trio.Event()

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if not self.count:
            self._quiet.set()
            self._quiet = trio.Event()

    async def wait_quiet(self) -> None:
        """Until nothing is in flight."""
        while self.count:
            await self._quiet.wait()


def publish_transfer(
    events: EventBus,
    direction: str,
    xid: str,
    meta: TensorMeta,
    peer: str,
    state: str,
    done: int,
    retries: int = 0,
    detail: str = "",
) -> None:
    """A :class:`TransferEvent` for the events stream (built only if someone listens)."""
    if events.active:
        events.publish(
            TransferEvent(
                id=xid,
                name=meta.name,
                peer=peer,
                direction=direction,
                state=state,
                bytes_done=done,
                bytes_total=meta.nbytes,
                retries=retries,
                detail=detail,
            )
        )


def why(exc: BaseException) -> str:
    """A failure as a log line or an error message names it."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


__all__ = [
    "Arrival",
    "InFlight",
    "TransferIds",
    "TransferResult",
    "publish_transfer",
    "why",
]
