"""The daemon's transfer table, fed by node events."""

from __future__ import annotations

from tensord.events import TransferEvent
from tensord.transfers import TransferTable


def ev(state: str, done: int = 0, xid: str = "x1") -> TransferEvent:
    return TransferEvent(
        id=xid,
        name="w",
        peer="b",
        direction="receive",
        state=state,
        bytes_done=done,
        bytes_total=100,
    )


def test_rows_move_from_live_to_recent_and_stragglers_are_ignored() -> None:
    t = TransferTable(keep=2)
    t.update(ev("started"))
    t.update(ev("progress", 50))
    assert [r["state"] for r in t.in_flight()] == ["progress"]
    t.update(ev("done", 100))
    t.update(ev("checkpoint", 90))  # late: the transfer is over
    assert t.in_flight() == []
    assert [(r["state"], r["bytes_done"]) for r in t.recent()] == [("done", 100)]


def test_an_interrupted_receive_that_resumes_is_live_again() -> None:
    t = TransferTable()
    t.update(ev("started"))
    t.update(ev("interrupted", 40))
    t.update(ev("started", 40))
    t.update(ev("progress", 70))
    assert [(r["state"], r["bytes_done"]) for r in t.in_flight()] == [("progress", 70)]
    t.update(ev("done", 100))
    assert [r["state"] for r in t.recent()] == ["done", "interrupted"]


def test_recent_keeps_the_newest() -> None:
    t = TransferTable(keep=2)
    for i in range(3):
        t.update(ev("started", xid=f"x{i}"))
        t.update(ev("done", 100, xid=f"x{i}"))
    assert [r["id"] for r in t.recent()] == ["x2", "x1"]
