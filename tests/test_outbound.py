"""The retry policy of sends and pulls, in virtual time: a fake network (no sockets) under
``autojump_clock``, so seconds of backoff and timeouts run in milliseconds and every wait is
measured exactly."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import trio
import trio.testing

from tensord.address import PeerAddress
from tensord.errors import PeerUnreachable, TransferFailed
from tensord.net.connection import Connection
from tensord.net.stream import ConnectionClosed
from tensord.outbound import RetryBudget

from .support.fake_network import FakeNetwork
from .support.helpers import fast_settings, running

BASE = 0.1  # retry_base_delay=100 (ms)


def refused(addr: PeerAddress) -> BaseException:
    return PeerUnreachable(f"{addr}: connection refused")


def assert_backoff(gap: float, stalled: int) -> None:
    """``gap`` is the backoff after the ``stalled``-th consecutive stall: doubling, +-20 %."""
    plain = min(BASE * 2 ** (max(stalled, 1) - 1), 5.0)
    assert plain * 0.8 - 1e-9 <= gap <= plain * 1.2 + 1e-9, (gap, stalled)


async def silent(conn: Connection) -> None:
    """A peer that handshakes and reads everything, but never answers (a hung process)."""
    buf = memoryview(bytearray(1 << 16))
    while await conn.stream.transport.recv_into(buf, len(buf)):
        pass


async def test_failed_dials_spend_the_budget_then_the_send_is_unreachable(
    autojump_clock: trio.abc.Clock,
) -> None:
    settings = fast_settings(max_retries=4, retry_base_delay=100)
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery, refuse=refused)
        async with running(settings, dialer=net.dial) as node:
            with pytest.raises(PeerUnreachable, match="after 5 attempts"):
                await node.send_tensor("127.0.0.1:9", "x", np.zeros(4))
    assert len(net.dials) == 5  # the first attempt and max_retries more
    for stalled, gap in enumerate(net.gaps(), 1):
        assert_backoff(gap, stalled)
    assert net.gaps() == sorted(net.gaps())  # each wait longer than the last


async def test_a_pull_spends_the_same_budget(autojump_clock: trio.abc.Clock) -> None:
    settings = fast_settings(max_retries=2, retry_base_delay=100)
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery, refuse=refused)
        async with running(settings, dialer=net.dial) as node:
            with pytest.raises(TransferFailed, match=r"pulling 'w' from .* after 3 attempts"):
                await node.pull_tensor("127.0.0.1:9", "w")
    assert len(net.dials) == 3
    for stalled, gap in enumerate(net.gaps(), 1):
        assert_backoff(gap, stalled)


async def test_a_peer_that_stops_answering_stalls_each_attempt_for_io_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Stall detection: an attempt whose peer goes silent ends after ``io_timeout``, is retried
    on a new connection after the backoff, and the budget ends the transfer."""
    io_timeout = 3.0
    settings = fast_settings(max_retries=1, retry_base_delay=100).with_transfer(
        io_timeout=io_timeout
    )
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery, peer=silent)
        async with running(settings, dialer=net.dial) as node:
            started = trio.current_time()
            with pytest.raises(TransferFailed, match="after 2 attempts"):
                await node.send_tensor("tensord://b@127.0.0.1:9", "x", np.ones(1000))
            spent = trio.current_time() - started
            with pytest.raises(TransferFailed, match=r"pulling 'y' .* after 2 attempts"):
                await node.pull_tensor("tensord://b@127.0.0.1:9", "y")
    assert len(net.dials) == 4  # two attempts of the send, two of the pull
    # An attempt stalls for io_timeout, up to 10 % more (the deadline's slack, see Deadline),
    # then waits the first backoff.
    send_gap, _, pull_gap = net.gaps()
    assert io_timeout + BASE * 0.8 <= send_gap <= io_timeout * 1.1 + BASE * 1.2
    assert io_timeout + BASE * 0.8 <= pull_gap <= io_timeout * 1.1 + BASE * 1.2
    assert 2 * io_timeout + BASE * 0.8 <= spent <= 2 * io_timeout * 1.1 + BASE * 1.2


async def test_attempts_that_move_bytes_start_the_stall_count_again(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The budget counts consecutive attempts that moved nothing: three cut attempts that each
    moved bytes cost nothing, then three stalls (max_retries = 2) end it."""
    proto = fast_settings(max_retries=2, retry_base_delay=100).tensor_protocol
    moves = [True, True, True, False, False, False]
    moved = 0
    starts: list[float] = []

    async def attempt() -> None:
        nonlocal moved
        starts.append(trio.current_time())
        if moves[len(starts) - 1]:
            moved += 4096
        raise ConnectionClosed("cut")

    budget = RetryBudget(proto, "sending 'x' to b", lambda: moved)
    with pytest.raises(TransferFailed, match="sending 'x' to b failed after 6 attempts: cut"):
        await budget.run(attempt)
    assert budget.retries == 6 and len(starts) == 6
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # after progress the wait is the first one again; consecutive stalls double it
    for gap, stalled in zip(gaps, [0, 0, 0, 1, 2], strict=True):
        assert_backoff(gap, stalled)


async def test_a_budget_of_zero_retries_fails_at_the_first_error(
    autojump_clock: trio.abc.Clock,
) -> None:
    proto = fast_settings(max_retries=0).tensor_protocol
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionClosed("cut")

    with pytest.raises(TransferFailed, match="after 1 attempts"):
        await RetryBudget(proto, "pulling 'w' from b", lambda: 0).run(attempt)
    assert calls == 1


async def test_a_ping_to_a_silent_peer_is_unreachable_after_io_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A hung peer is a typed PeerUnreachable (the peer supervisor backs off on it), not a raw
    TooSlowError it would count as a bug."""
    settings = fast_settings().with_transfer(io_timeout=7.0)
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery, peer=silent)
        async with running(settings, dialer=net.dial) as node:
            started = trio.current_time()
            with pytest.raises(PeerUnreachable, match=r"did not answer a ping within 7 s"):
                await node.ping("127.0.0.1:9")
            assert trio.current_time() - started == pytest.approx(7.0)
        nursery.cancel_scope.cancel()


async def test_a_ping_over_a_pooled_connection_the_peer_closed_retries_on_a_fresh_one(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The peer answers one ping per connection and then closes it (as a restarted peer or an
    error boundary does): the next ping finds the pooled connection dead and dials again."""

    async def one_pong(conn: Connection) -> None:
        from tensord.wire.messages import Ping, Pong

        msg = await conn.stream.receive()
        assert isinstance(msg, Ping)
        await conn.stream.send(Pong(msg.seq))
        await conn.stream.transport.aclose()

    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery, peer=one_pong)
        async with running(fast_settings(), dialer=net.dial) as node:
            assert await node.ping("127.0.0.1:9") >= 0
            await trio.testing.wait_all_tasks_blocked()  # the peer has closed its end
            assert await node.ping("127.0.0.1:9") >= 0
        nursery.cancel_scope.cancel()
    assert len(net.dials) == 2
