"""The listener's slot policy (tensord/net/admission.py), without sockets: who is evicted, when
a newcomer is refused, how often a refusal is answered and logged."""

from __future__ import annotations

from tensord.net.admission import Admission, Room


def admission(max_connections: int | None = 4, max_unauthenticated: int = 3) -> Admission[str]:
    return Admission(max_connections, max_unauthenticated, answers_per_second=2)


def test_room_while_below_both_bounds() -> None:
    slots = admission()
    slots.admit("a", "10.0.0.1")
    room = slots.make_room()
    assert room.victim is None and not room.full and not room.refused


def test_a_full_strangers_budget_evicts_the_oldest_of_the_busiest_source() -> None:
    slots = admission(max_connections=None, max_unauthenticated=3)
    slots.admit("member-handshaking", "10.0.0.1")
    slots.admit("flood-1", "10.0.0.9")
    slots.admit("flood-2", "10.0.0.9")
    room = slots.make_room()
    assert room.victim == "flood-1" and not room.full
    slots.forget("flood-1")
    assert slots.strangers == {"member-handshaking": "10.0.0.1", "flood-2": "10.0.0.9"}


def test_full_connections_evict_a_stranger_before_refusing() -> None:
    slots = admission(max_connections=2, max_unauthenticated=8)
    slots.admit("member", "10.0.0.1")
    slots.authenticated("member")
    slots.admit("stranger", "10.0.0.2")
    assert slots.make_room().victim == "stranger" and slots.make_room().full
    slots.forget("stranger")
    slots.admit("member-2", "10.0.0.3")
    slots.authenticated("member-2")
    room = slots.make_room()
    assert room.refused and (slots.open, slots.unauthenticated) == (2, 0)


def test_refusals_are_answered_a_few_times_a_second_and_logged_every_ten() -> None:
    slots = admission()
    assert slots.refusal(100.0) == (True, True)
    assert slots.refusal(100.1) == (False, True)
    assert slots.refusal(100.2) == (False, False)  # the third answer within the second
    assert slots.refusal(101.2) == (False, True)  # a new second
    assert slots.refusal(110.5) == (True, True)  # more than ten seconds since the last warning


def test_a_victim_being_dropped_holds_its_slot_until_forgotten_but_is_not_chosen_twice() -> None:
    """What the TCP listener does: an evicted stranger's socket stays open (and counted) until
    its task has closed it."""
    slots = admission(max_connections=2, max_unauthenticated=8)
    slots.admit("old", "10.0.0.1")
    slots.admit("new", "10.0.0.1")
    assert slots.make_room().victim == "old"
    slots.dropping("old")
    slots.admit("newest", "10.0.0.1")
    assert slots.open == 3 and list(slots.strangers) == ["new", "newest"]
    assert slots.make_room().victim == "new"
    slots.forget("old")
    assert slots.open == 2


def test_of_sources_holding_as_many_strangers_the_one_with_the_oldest_goes_first() -> None:
    slots = admission(max_connections=None, max_unauthenticated=2)
    slots.admit("a-1", "10.0.0.1")
    slots.admit("b-1", "10.0.0.2")
    slots.admit("a-2", "10.0.0.1")
    slots.forget("a-1")
    assert slots.make_room().victim == "b-1"


def test_no_bounds_mean_no_eviction_and_no_refusal() -> None:
    slots: Admission[int] = Admission(None, None)
    for key in range(1000):
        assert slots.make_room() == Room(None, False)
        slots.admit(key, "10.0.0.9")
    assert all(slots.refusal(100.0 + i / 100)[1] for i in range(50))  # every refusal answered


def test_without_a_strangers_budget_max_connections_alone_evicts() -> None:
    slots: Admission[str] = Admission(2, None)
    slots.admit("a", "10.0.0.1")
    assert slots.make_room().victim is None
    slots.admit("b", "10.0.0.2")
    assert slots.make_room() == Room("a", True)
