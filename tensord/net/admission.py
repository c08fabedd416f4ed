"""Who holds a listener's connection slots: members first, strangers share what is left.

Sans-I/O (no trio, no sockets): both peer listeners (``tcp.serve`` and the QUIC listener) ask it
on every new connection and tell it when a connection authenticates or goes. The policy is
sshd's ``MaxStartups``:

* at most ``max_connections`` connections are counted at once (handshakes included), and of
  those at most ``max_unauthenticated`` before their authenticated Hello ("strangers");
* a newcomer that finds either bound reached takes the place of the oldest stranger of the
  source address holding the most strangers (of sources holding as many, the one whose oldest
  stranger is oldest) - a flood from one host evicts its own, and a member mid-handshake is
  dropped only if its address holds as many strangers as any other;
* only when authenticated peers hold every slot is the newcomer refused. Refusals are
  answered at most ``answers_per_second`` times a second where answering costs the listener
  something (QUIC: a TLS handshake) and logged at most once per ``warn_every`` seconds.

What an evicted stranger costs until it is gone is the listener's to say: the QUIC listener
calls :meth:`~Admission.forget` on it at once (its datagrams share one socket), the TCP listener
marks it :meth:`~Admission.dropping` and counts it until its socket is closed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Room(Generic[K]):
    """The verdict on a newcomer: evict ``victim`` (a stranger) to make room for it, refuse it
    (no victim and ``full``: members hold every slot), or admit it (neither)."""

    victim: K | None
    full: bool

    @property
    def refused(self) -> bool:
        return self.victim is None and self.full


class Admission(Generic[K]):
    """The slots of one listener; ``K`` is whatever identifies a connection."""

    def __init__(
        self,
        max_connections: int | None,
        max_unauthenticated: int | None,
        *,
        answers_per_second: int | None = None,
        warn_every: float = 10.0,
    ) -> None:
        """``None`` for a bound means none: no cap on connections, no budget of the strangers'
        own (only ``max_connections``), every refusal answered."""
        self.max_connections = max_connections
        self.max_unauthenticated = max_unauthenticated
        self.answers_per_second = answers_per_second
        self.warn_every = warn_every
        self.admitted: set[K] = set()
        #: Those still before their authenticated Hello, oldest first, with their source.
        self.strangers: dict[K, str] = {}
        self._warned_at = -1e9
        self._answered_at = -1e9
        self._answered = 0

    @property
    def open(self) -> int:
        return len(self.admitted)

    @property
    def unauthenticated(self) -> int:
        return len(self.strangers)

    def make_room(self) -> Room[K]:
        """What a newcomer's arrival means now (call :meth:`forget` on an evicted victim)."""
        full = self.max_connections is not None and len(self.admitted) >= self.max_connections
        crowded = (
            self.max_unauthenticated is not None and len(self.strangers) >= self.max_unauthenticated
        )
        if self.strangers and (full or crowded):
            return Room(self._stranger_to_drop(), full)
        return Room(None, full)

    def admit(self, key: K, source: str) -> None:
        """``key`` counts from now, as a stranger."""
        self.admitted.add(key)
        self.strangers[key] = source

    def authenticated(self, key: K) -> None:
        """``key`` passed its Hello: out of the strangers' budget, still holding its slot."""
        self.strangers.pop(key, None)

    def dropping(self, key: K) -> None:
        """``key`` (a victim) is being dropped: out of the strangers, so it is not chosen twice,
        but it holds its slot until :meth:`forget` (a TCP connection holds its socket until it
        is closed)."""
        self.strangers.pop(key, None)

    def forget(self, key: K) -> None:
        """``key`` no longer counts (dropped, or gone)."""
        self.admitted.discard(key)
        self.strangers.pop(key, None)

    def refusal(self, now: float) -> tuple[bool, bool]:
        """A newcomer is refused at ``now``: (log a warning?, answer it?)."""
        warn = now - self._warned_at > self.warn_every
        if warn:
            self._warned_at = now
        if now - self._answered_at >= 1:
            self._answered_at, self._answered = now, 0
        answer = self.answers_per_second is None or self._answered < self.answers_per_second
        if answer:
            self._answered += 1
        return warn, answer

    def _stranger_to_drop(self) -> K:
        """The oldest stranger of the source address holding the most."""
        per_source = Counter(self.strangers.values())
        busiest = max(per_source, key=per_source.__getitem__)
        return next(k for k, source in self.strangers.items() if source == busiest)
