"""A node's lifecycle as one explicit state machine (h11's ``_state.py`` style).

Every change of state goes through :meth:`Lifecycle.fire` and the one transition table below;
an event the table does not list for the current state raises, instead of leaving a node in a
state nobody designed (a ``shutdown()`` while the listener was still binding used to be undone
by the start that followed it: the node ran after it had been shut down).
"""

from __future__ import annotations

import enum

from .errors import NodeClosed


class State(enum.Enum):
    NEW = "new"
    STARTING = "starting"  # binding the listener, starting the node's tasks
    RUNNING = "running"
    STOPPING = "stopping"  # shutdown() was called; the node's tasks are being cancelled
    CLOSED = "closed"


class Event(enum.Enum):
    START = "start"  # run() was called
    STARTED = "started"  # listening, tasks running: readiness is signalled
    SHUTDOWN = "shutdown"  # shutdown() (or drain) was called
    STOPPED = "stopped"  # run() returned or raised: nothing of the node runs any more


_TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.NEW, Event.START): State.STARTING,
    (State.NEW, Event.SHUTDOWN): State.CLOSED,
    (State.STARTING, Event.STARTED): State.RUNNING,
    (State.STARTING, Event.SHUTDOWN): State.STOPPING,
    (State.STARTING, Event.STOPPED): State.CLOSED,
    (State.RUNNING, Event.SHUTDOWN): State.STOPPING,
    (State.RUNNING, Event.STOPPED): State.CLOSED,
    (State.STOPPING, Event.SHUTDOWN): State.STOPPING,
    (State.STOPPING, Event.STOPPED): State.CLOSED,
    (State.CLOSED, Event.SHUTDOWN): State.CLOSED,
}


class Lifecycle:
    """The current :class:`State` and the only way to change it."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.state = State.NEW

    def fire(self, event: Event) -> State:
        """Apply ``event``; :class:`NodeClosed` if the table has no such transition."""
        new = _TRANSITIONS.get((self.state, event))
        if new is None:
            if event is Event.START:
                raise NodeClosed(
                    f"node {self.owner} was already started ({self.state.value}): a TensorNode "
                    "runs once; create a new one"
                )
            raise NodeClosed(f"node {self.owner}: cannot {event.value} while {self.state.value}")
        self.state = new
        return new


__all__ = ["Event", "Lifecycle", "State"]
