"""The node's lifecycle is one transition table (tensord/lifecycle.py); illegal moves raise."""

from __future__ import annotations

import itertools

import pytest
import trio

import tensord.node
from tensord.errors import NodeClosed
from tensord.lifecycle import _TRANSITIONS, Event, Lifecycle, State
from tensord.node import TensorNode

from .support.helpers import fast_settings


def test_every_state_and_event_is_either_a_listed_transition_or_refused() -> None:
    for state, event in itertools.product(State, Event):
        life = Lifecycle("n")
        life.state = state
        if (state, event) in _TRANSITIONS:
            assert life.fire(event) is _TRANSITIONS[state, event]
        else:
            with pytest.raises(NodeClosed, match="n"):
                life.fire(event)
            assert life.state is state  # a refused event changes nothing


def test_closed_is_final_and_a_node_runs_once() -> None:
    life = Lifecycle("n")
    for event in (Event.START, Event.STARTED, Event.SHUTDOWN, Event.STOPPED):
        life.fire(event)
    assert life.state is State.CLOSED
    with pytest.raises(NodeClosed, match="runs once"):
        life.fire(Event.START)


async def test_a_shutdown_while_the_listener_binds_is_not_undone_by_the_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 12: ``shutdown()`` during ``await open_listeners`` set ``closed``, then the start
    set ``running``: the node ran after shutdown. Now the start fails with NodeClosed, the
    listener is closed, and the node never reports running."""
    node = TensorNode(fast_settings())
    real = tensord.node.open_listeners
    bound: list[trio.SocketListener] = []

    async def binding_then_shutdown(addr: object) -> list[trio.SocketListener]:
        node.shutdown()  # as if called by another task while the listener was being bound
        bound.extend(await real(addr))  # type: ignore[arg-type]
        return bound

    monkeypatch.setattr(tensord.node, "open_listeners", binding_then_shutdown)
    with pytest.raises(NodeClosed, match="shut down while it started"):
        async with node:
            pytest.fail("the node started after it was shut down")
    assert not node.running and node.state is State.CLOSED
    with pytest.raises(OSError):  # the listener was closed
        await trio.open_tcp_stream("127.0.0.1", bound[0].socket.getsockname()[1])


async def test_shutdown_before_start_and_twice_is_harmless() -> None:
    node = TensorNode(fast_settings())
    node.shutdown()
    node.shutdown()
    assert node.state is State.CLOSED
    with pytest.raises(NodeClosed, match="runs once"):
        async with node:
            pass
