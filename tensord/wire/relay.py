"""The sender of one link of a chain broadcast: a :class:`SendTransfer` of chunks that may still
be arriving.

A relay forwards each chunk as soon as it has it, from the buffer it was received into (the
receive's memoryview: no copy), so the link's sender starts with no chunk available and is told
of each one by :meth:`RelaySend.make_available`; ``End`` waits until every chunk was available.
The origin of a broadcast uses the same class with every chunk available from the start. A
resumed link (a repair: the successor already holds chunks from a predecessor that died) learns
what to skip from ``Accept`` as any resume does.

Chunk checksums come from the receive that verified them (no second crc32c pass on the relay),
except when that receive had no crc32c negotiated: then they are computed when sent.
"""

from __future__ import annotations

from collections import deque

from .messages import Accept, Begin, ChainOutcome, Message, Stored
from .meta import TensorMeta
from .transfer import ReceiveTransfer, SendState, SendTransfer


class RelaySend(SendTransfer):
    """One chain link's sender. ``chain``: the peers the receiver forwards to, in order."""

    def __init__(
        self,
        xid: str,
        meta: TensorMeta,
        data: memoryview,
        *,
        chunk_size: int,
        window: int,
        crc: bool,
        chain: tuple[str, ...],
    ) -> None:
        # Uncompressed: relays forward the bytes they hold as they are (and the weights a
        # broadcast carries are dense: lz4 would be pure cost).
        super().__init__(xid, meta, data, chunk_size=chunk_size, window=window, crc=crc)
        self.chain = chain
        self._available = bytearray(self.nchunks)
        self.available_count = 0
        self._pending: deque[int] = deque()
        #: The receiver's ``Stored``: its outcomes are those of the rest of the chain.
        self.stored: Stored | None = None

    def make_available(self, index: int, raw_crc: int | None) -> None:
        """Chunk ``index`` is in ``data`` now (with its verified crc32c, if known)."""
        if self._available[index]:
            return
        self._available[index] = 1
        self.available_count += 1
        if raw_crc is not None and self.crc:
            self._raw_crc[index] = raw_crc
        if not self._acked[index] and index not in self._unacked:
            self._pending.append(index)

    def make_all_available(self) -> None:
        for i in range(self.nchunks):
            self.make_available(i, None)

    @property
    def all_available(self) -> bool:
        return self.available_count == self.nchunks

    @property
    def waiting(self) -> bool:
        """Nothing to send until more chunks arrive (or replies open the window)."""
        return not self._pending and not self.all_available

    def _requeue(self) -> None:
        self._pending = deque(
            i for i in range(self.nchunks) if self._available[i] and not self._acked[i]
        )

    def begin(self, resume: bool = False) -> Begin:
        begin = super().begin(resume)
        if resume:
            self._requeue()
        return Begin(begin.id, begin.meta, begin.chunk_size, begin.window, resume, self.chain)

    def on_accept(self, msg: Accept) -> None:
        super().on_accept(msg)
        self._requeue()

    @property
    def wants_end(self) -> bool:
        return self.all_available and super().wants_end

    def precompute_crcs(self, stop: list[bool]) -> None:
        if self.all_available:  # never read a chunk that has not arrived
            super().precompute_crcs(stop)

    def on_message(self, msg: Message) -> None:
        super().on_message(msg)
        if isinstance(msg, Stored) and self.state is SendState.DONE:
            self.stored = msg

    @property
    def outcomes(self) -> tuple[ChainOutcome, ...]:
        return self.stored.outcomes if self.stored is not None else ()


class Arriving:
    """The chunks of a receive as they arrive, told to the relay link that forwards them.

    Chunks mostly arrive in order: a cursor walks the receive's bitmap, so each chunk is looked
    at about once. One arriving out of order (a resend after a ``Nack``) is told once the gap
    before it fills; every chunk is told by the time the receive completes.
    """

    def __init__(self, recv: ReceiveTransfer) -> None:
        self.recv = recv
        self._cursor = 0
        self.link: RelaySend | None = None

    def attach(self, link: RelaySend) -> None:
        """A new link (the first, or one after a repair): tell it every chunk held now."""
        self.link = link
        recv = self.recv
        for a, b in recv.held_ranges():
            for i in range(a, b):
                link.make_available(i, recv.raw_crc(i))

    def poll(self) -> bool:
        """Tell the link of the chunks arrived since the last poll; whether there were any."""
        recv, link = self.recv, self.link
        start = self._cursor
        end = recv.held_from(start)  # one scan of the bitmap, in place
        if link is not None:
            for i in range(start, end):
                link.make_available(i, recv.raw_crc(i))
        self._cursor = end
        return end > start


__all__ = ["Arriving", "RelaySend"]
