"""Arrays callers wait to receive into: ``TensorNode.receive_tensor(into=...)``.

A push is not asked for, so its destination must be waiting before its ``Begin`` arrives (as a
receive posted ahead of the message in NCCL/UCX/MPI). :class:`Destinations` keeps the waiting
calls in order; the receiver asks it for one when a ``Begin`` arrives (:meth:`claim`), checks
the tensor fits before any byte lands, and receives straight into the caller's array. A
destination that does not fit fails its call with :class:`~tensord.errors.DestinationMismatch`
(and the tensor lands in memory of the node's own, queued for a plain ``receive_tensor()``).

A receive into a caller's array is never kept as a partial: if its connection breaks, what
arrived is dropped and the destination waits again at the front, so the sender's retry lands in
it from the start. A call cancelled while its array is being written cancels that receive and
returns only once nothing writes into the array any more.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import trio

from .errors import DestinationMismatch
from .results import Arrival
from .sink import check_destination
from .wire.meta import TensorMeta


class Destination:
    """One waiting ``receive_tensor(into=...)`` call (the :class:`~tensord.sink.Claim` a
    receive into its array holds)."""

    def __init__(self, owner: Destinations, into: np.ndarray[Any, Any]) -> None:
        self._owner = owner
        self.into = into
        self.result: Arrival | None = None
        self.error: DestinationMismatch | None = None
        self.claimed = False
        self.cancelled = False
        #: Set when no receive writes into the array any more (it ended, either way).
        self.idle = trio.Event()
        self.idle.set()
        self._scope: trio.CancelScope | None = None

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    def bind(self, scope: trio.CancelScope) -> None:
        """The cancel scope of the receive writing into the array (cancelled with the call)."""
        self._scope = scope
        if self.cancelled:
            scope.cancel()

    def release(self) -> None:
        """The receive ended without the tensor: wait again (first in line) for the retry."""
        self.claimed = False
        self._scope = None
        self.idle.set()
        self._owner._released(self)

    def cancel(self) -> None:
        self.cancelled = True
        if self._scope is not None:
            self._scope.cancel()


class Destinations:
    """The waiting ``receive_tensor(into=...)`` calls of one node, first come first served."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._waiting: deque[Destination] = deque()
        self._claimed: dict[int, Destination] = {}

    def add(self, into: np.ndarray[Any, Any]) -> Destination:
        dest = Destination(self, into)
        self._waiting.append(dest)
        return dest

    def remove(self, dest: Destination) -> None:
        """The call is leaving (cancelled or done): stop offering its array."""
        if dest in self._waiting:
            self._waiting.remove(dest)
        dest.cancel()

    def claim(self, meta: TensorMeta) -> tuple[np.ndarray[Any, Any], Destination] | None:
        """The array the tensor ``meta`` lands in, if a call is waiting and it fits; a call
        whose array does not fit fails (the tensor then lands in the node's own memory)."""
        if not self._waiting:
            return None
        dest = self._waiting.popleft()
        try:
            check_destination(meta, dest.into)
        except DestinationMismatch as exc:
            dest.error = exc
            self._wake()
            return None
        dest.claimed = True
        dest.idle = trio.Event()
        self._claimed[id(dest.into)] = dest
        return dest.into, dest

    def arrived(self, arrival: Arrival) -> Arrival | None:
        """Hand a committed tensor to the call whose array it landed in. Returns the arrival to
        queue for a plain ``receive_tensor()`` instead (``None`` when a call took it)."""
        dest = self._claimed.get(id(arrival.array))
        if dest is None or dest.into is not arrival.array:
            return arrival
        del self._claimed[id(arrival.array)]
        dest.claimed = False
        dest.idle.set()
        if dest.cancelled:
            # Its caller left: queue a copy, so nobody else is handed the caller's memory.
            return arrival._replace(array=arrival.array.copy())
        dest.result = arrival
        self._wake()
        return None

    def _released(self, dest: Destination) -> None:
        self._claimed.pop(id(dest.into), None)
        if not dest.cancelled and not dest.done:
            self._waiting.appendleft(dest)


__all__ = ["Destination", "Destinations"]
