"""Receiving into memory the caller provides (``receive_tensor(into=...)``,
``pull_tensor(out=...)``) and the pool of freed receive buffers: real nodes on loopback."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing

from tensord.config import HostPort, StoreSettings
from tensord.errors import DestinationMismatch
from tensord.node import TensorNode
from tensord.results import Arrival

from .support.helpers import fast_settings, running
from .support.tcp_proxy import Fault, proxied

SIZE = 4 << 20  # above the pool's minimum: pooled memory would show in its counters


def tensor(seed: int, n: int = SIZE // 4) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


async def receive_in_task(
    node: TensorNode, nursery: trio.Nursery, into: np.ndarray | None = None
) -> list[Arrival | BaseException]:
    """Start ``receive_tensor(into=...)`` and return once it waits (its array is offered)."""
    got: list[Arrival | BaseException] = []

    async def run() -> None:
        try:
            got.append(await node.receive_tensor(into=into))
        except DestinationMismatch as exc:
            got.append(exc)

    nursery.start_soon(run)
    await trio.testing.wait_all_tasks_blocked()
    return got


async def test_a_push_lands_straight_in_the_waiting_callers_array() -> None:
    data = tensor(1)
    into = np.empty_like(data)
    async with running() as a, running() as b, trio.open_nursery() as nursery:
        got = await receive_in_task(a, nursery, into)
        await b.send_tensor(a.addr, "w", data)
    arrival = got[0]
    assert isinstance(arrival, Arrival)
    assert arrival.array is into and arrival.name == "w"
    assert np.array_equal(into, data)
    # No memory of the node's own was taken for it.
    assert (a.receive_buffers.made, a.receive_buffers.reused) == (0, 0)


async def test_a_tensor_that_arrived_before_the_call_is_copied_into_the_array() -> None:
    data = tensor(2)
    into = np.empty_like(data)
    async with running() as a, running() as b:
        await b.send_tensor(a.addr, "w", data)
        arrival = await a.receive_tensor(into=into)
        assert arrival.array is into
        assert np.array_equal(into, data)
        assert a.get_tensor("w") is into


async def test_a_tensor_that_does_not_fit_fails_the_call_and_waits_for_the_next() -> None:
    data = tensor(3)
    wrong = np.full((7, 3), 42.0, np.float32)
    async with running() as a, running() as b, trio.open_nursery() as nursery:
        got = await receive_in_task(a, nursery, wrong)
        await b.send_tensor(a.addr, "w", data)  # the sender does not notice
        with trio.fail_after(10):
            arrival = await a.receive_tensor()
    assert isinstance(got[0], DestinationMismatch)
    assert "float32[1048576]" in str(got[0]) and "float32[7, 3]" in str(got[0])
    assert np.all(wrong == 42.0)  # not a byte written
    assert np.array_equal(arrival.array, data)


@pytest.mark.parametrize(
    "bad",
    [
        np.empty((SIZE // 2,), np.float32)[::2],  # not contiguous
        np.empty(SIZE // 4, np.float64),  # another dtype
        "not an array",
    ],
)
async def test_an_array_that_cannot_take_it_is_refused_before_any_byte(bad: object) -> None:
    data = tensor(4)
    async with running() as a, running() as b:
        await b.send_tensor(a.addr, "w", data)
        with pytest.raises(DestinationMismatch) as exc:
            await a.receive_tensor(into=bad)  # type: ignore[arg-type]
        assert str(exc.value) and not str(exc.value).endswith(":")
        # Still queued for the next call.
        assert np.array_equal((await a.receive_tensor()).array, data)


async def test_a_read_only_array_is_refused() -> None:
    data = tensor(5)
    ro = np.empty_like(data)
    ro.flags.writeable = False
    async with running() as a, running() as b:
        await b.send_tensor(a.addr, "w", data)
        with pytest.raises(DestinationMismatch, match="writable"):
            await a.receive_tensor(into=ro)


async def test_a_cut_receive_into_the_callers_array_is_resent_into_it() -> None:
    """The connection breaks half-way: what arrived is dropped, and the sender's retry lands
    in the same array (a caller's array is never kept as a partial)."""
    data = tensor(6, 16 << 18)  # 16 MiB
    into = np.empty_like(data)
    async with running() as a, running() as b, trio.open_nursery() as nursery:
        got = await receive_in_task(a, nursery, into)
        async with proxied(a.port, {0: Fault(cut_after=6 << 20)}) as proxy:
            with trio.fail_after(30):
                result = await b.send_tensor(proxy.addr, "w", data)
    assert result.retries >= 1 and proxy.conns[0].cut
    arrival = got[0]
    assert isinstance(arrival, Arrival) and arrival.array is into
    assert np.array_equal(into, data)


async def test_a_cancelled_call_frees_its_array_and_the_tensor_goes_to_the_queue() -> None:
    data = tensor(7)
    into = np.zeros_like(data)
    async with running() as a, running() as b, trio.open_nursery() as nursery:
        got = await receive_in_task(a, nursery, into)
        nursery.cancel_scope.cancel()
    assert got == []
    async with running() as a, running() as b:
        await b.send_tensor(a.addr, "w", data)
        arrival = await a.receive_tensor()
    assert arrival.array is not into and np.array_equal(arrival.array, data)
    assert not np.any(into)


async def test_pull_lands_in_the_callers_array() -> None:
    data = tensor(8)
    out = np.empty_like(data)
    async with running() as a, running() as b:
        b.put_tensor("w", data)
        got = await a.pull_tensor(b.addr, "w", out=out)
        assert got is out
        assert np.array_equal(out, data)
        assert (a.receive_buffers.made, a.receive_buffers.reused) == (0, 0)
        wrong = np.full(3, 7, np.int32)
        with pytest.raises(DestinationMismatch, match="int32"):
            await a.pull_tensor(b.addr, "w", out=wrong)
        assert np.all(wrong == 7)
        # The node goes on pulling after the refusal.
        assert np.array_equal(await a.pull_tensor(b.addr, "w"), data)


async def test_a_node_with_a_store_stores_then_copies_into_the_array(tmp_path: Path) -> None:
    data = tensor(9)
    settings = replace(
        fast_settings(),
        listen=HostPort("127.0.0.1", 0),
        state_dir=tmp_path,
        store=StoreSettings(),
    )
    async with running(settings) as a, running() as b:
        b.put_tensor("w", data)
        out = np.empty_like(data)
        assert await a.pull_tensor(b.addr, "w", out=out) is out
        assert np.array_equal(out, data)
        assert np.array_equal(a.get_tensor("w"), data)  # stored as well
        await b.send_tensor(a.addr, "v", data * 2)
        into = np.empty_like(data)
        arrival = await a.receive_tensor(into=into)
        assert arrival.array is into and np.array_equal(into, data * 2)


async def test_freed_receive_memory_is_reused_and_memory_still_held_never_is() -> None:
    first, second, third = tensor(10), tensor(11), tensor(12)
    async with running() as a, running() as b:
        await b.send_tensor(a.addr, "one", first)
        view = (await a.receive_tensor()).array[10:20]  # a view keeps the buffer in use
        a.delete_tensor("one")
        await b.send_tensor(a.addr, "two", second)
        arrival = await a.receive_tensor()
        assert np.array_equal(arrival.array, second)
        assert a.receive_buffers.reused == 0  # "one" is still reachable through the view
        assert np.array_equal(view, first[10:20])
        a.delete_tensor("two")
        del arrival
        # (The next send's Begin is served on the same pooled connection, so only after the
        # receive of "two" let go of its buffer.)
        await b.send_tensor(a.addr, "three", third)
        got = await a.receive_tensor()
        assert a.receive_buffers.reused == 1
        assert np.array_equal(got.array, third)
        assert np.array_equal(view, first[10:20])
