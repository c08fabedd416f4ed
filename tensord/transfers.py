"""The transfers a daemon is running and has run, kept from the node's events.

The control API's ``/v1/transfers`` and ``/v1/status`` read this table; it is fed by the same
events the ``/v1/events`` stream carries, so what a client lists and what it watches agree.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .events import TransferEvent

#: States after which a transfer is over.
FINAL_STATES = frozenset({"done", "failed", "interrupted"})


class TransferTable:
    """In-flight transfers by (direction, id), and the last ``keep`` finished ones."""

    def __init__(self, keep: int = 100) -> None:
        self._live: dict[tuple[str, str], dict[str, Any]] = {}
        self._done: deque[dict[str, Any]] = deque(maxlen=keep)
        self._ended: deque[tuple[str, str]] = deque(maxlen=4 * keep)

    def update(self, event: TransferEvent) -> None:
        key = (event.direction, event.id)
        if key in self._ended:
            if event.state != "started":
                return  # a straggler after the transfer's last event: it is over
            self._ended.remove(key)  # a resumed receive (the sender retried): live again
        row = self._live.get(key)
        if row is None:
            row = {
                "id": event.id,
                "name": event.name,
                "peer": event.peer,
                "direction": event.direction,
                "started_at": event.at,
            }
            self._live[key] = row
        row.update(
            state=event.state,
            bytes_done=event.bytes_done,
            bytes_total=event.bytes_total,
            retries=event.retries,
            detail=event.detail,
            updated_at=event.at,
        )
        if event.state in FINAL_STATES:
            self._done.appendleft(self._live.pop(key))
            self._ended.append(key)

    def in_flight(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._live.values()]

    def recent(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._done]


__all__ = ["FINAL_STATES", "TransferTable"]
