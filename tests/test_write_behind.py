"""The store's write-behind thread (tensord.sink._WriteBehind): each step that lands is handed to
the kernel's writeback from a worker thread, and stop() returns only once no system call on the
file is still running (the file is committed or closed right after)."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tensord.config import HostPort, StoreSettings
from tensord.sink import WRITEBACK_STEP, StoreSink, _WriteBehind
from tensord.store import TensorStore
from tensord.wire.meta import TensorMeta

from .support.helpers import fast_settings, running


class FakePartial:
    """Records the writeback requests; one of them can be held inside the "system call"."""

    def __init__(self) -> None:
        self.requests: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.inside = False

    def start_writeback(self, stop: int) -> bool:
        self.inside = True
        self.requests.append(stop)
        self.entered.set()
        self.release.wait()
        self.inside = False
        return True


def started(wb: _WriteBehind) -> threading.Thread:
    thread = threading.Thread(target=wb.run)
    thread.start()
    return thread


def test_a_step_that_landed_is_written_back_and_stop_ends_the_thread() -> None:
    partial = FakePartial()
    wb = _WriteBehind(partial)  # type: ignore[arg-type]
    thread = started(wb)
    wb.landed(WRITEBACK_STEP // 2)  # less than a step: nothing to do yet
    wb.landed(WRITEBACK_STEP + 5)
    assert partial.entered.wait(10)
    wb.stop()
    thread.join(10)
    assert not thread.is_alive()
    assert partial.requests == [WRITEBACK_STEP + 5]


def test_stop_waits_for_a_writeback_in_progress() -> None:
    partial = FakePartial()
    partial.release.clear()
    wb = _WriteBehind(partial)  # type: ignore[arg-type]
    thread = started(wb)
    wb.landed(2 * WRITEBACK_STEP)
    assert partial.entered.wait(10)
    stopper = threading.Thread(target=wb.stop)
    stopper.start()
    stopper.join(0.2)
    assert stopper.is_alive() and partial.inside  # held by the call on the file
    partial.release.set()
    stopper.join(10)
    thread.join(10)
    assert not partial.inside and not stopper.is_alive() and not thread.is_alive()
    # Nothing more is asked of the file once stopped, whatever lands after.
    wb.landed(4 * WRITEBACK_STEP)
    assert partial.requests == [2 * WRITEBACK_STEP]


def test_a_stop_before_the_thread_started_ends_it_at_once() -> None:
    partial = FakePartial()
    wb = _WriteBehind(partial)  # type: ignore[arg-type]
    wb.landed(3 * WRITEBACK_STEP)
    wb.stop()
    thread = started(wb)
    thread.join(10)
    assert not thread.is_alive() and partial.requests == []


async def test_each_receive_into_the_store_gets_its_own_write_behind_a_resumed_one_too(
    tmp_path: Path,
) -> None:
    store = TensorStore(tmp_path)
    big = TensorMeta.of("big", np.empty(2 * WRITEBACK_STEP, np.uint8))
    sink = StoreSink(store, big, "peer/1", None)
    first = sink.worker()
    assert first is not None
    sink.stopped()  # the first attempt was cut; the partial is kept for the resume
    second = sink.worker()
    assert second is not None and second != first
    thread = threading.Thread(target=second)
    thread.start()
    sink.landed(big.nbytes)
    await sink.commit("peer")  # stops the running thread before the file is renamed
    thread.join(10)
    assert not thread.is_alive()
    assert sink.worker() is None  # nothing to write behind once committed
    small = TensorMeta.of("small", np.empty(1024, np.uint8))
    assert StoreSink(store, small, "peer/2", None).worker() is None


async def test_a_bug_in_a_sink_worker_is_logged_and_the_receive_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: _WriteBehind) -> None:
        raise RuntimeError("worker bug")

    monkeypatch.setattr(_WriteBehind, "run", broken)
    settings = replace(
        fast_settings(), listen=HostPort("127.0.0.1", 0), state_dir=tmp_path, store=StoreSettings()
    )
    array = np.arange(8 << 20, dtype=np.int32)  # 32 MiB: a write-behind worker runs
    async with running() as a, running(settings) as b:
        await a.send_tensor(b.addr, "w", array)
        assert np.array_equal(b.get_tensor("w"), array)
        await a.send_tensor(b.addr, "v", array)  # the node still serves
    assert "worker bug" in caplog.text
