"""The chunked transfer, as two small sans-I/O state machines: ``SendTransfer`` and
``ReceiveTransfer``. They see messages and byte buffers, never sockets or clocks.

Flow (see docs/PROTOCOL.md)::

    sender                                   receiver
    Begin(id, meta, chunk_size, window) -->
    Chunk 0 + payload ---------------------> verify crc32c, place at offset
    Chunk 1 + payload --------------------->
                                        <--- Ack(upto=2)          (every window/4 chunks)
    ...                                 <--- Nack(i)              (crc mismatch: send i again)
    End(crc of the whole tensor) ---------->
                                        <--- Stored(id)           (all chunks in, crc matches)

The sender keeps at most ``window`` chunks unacknowledged (no stop-and-wait). On a new connection
after a failure it sends ``Begin(resume=True)``; the receiver answers ``Accept(have=ranges)`` and
the sender skips what the receiver already holds - the transfer resumes from the first missing
chunk, and at most the chunks in flight at the cut are sent twice.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import ProtocolError
from ..limits import MAX_CHUNK, MAX_CHUNKS, MIN_CHUNK, chunk_count
from .compress import AdaptiveCompressor, decompress_into, lz4_bound
from .crc import combine_all, crc32c
from .messages import Accept, Ack, Begin, Chunk, End, Error, Message, Nack, Ranges, Stored
from .meta import TensorMeta


def to_ranges(indices: Iterable[int]) -> Ranges:
    """Sorted, merged half-open ranges of a set of indices."""
    out: list[tuple[int, int]] = []
    for i in sorted(set(indices)):
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return tuple(out)


def bitmap_ranges(bitmap: bytearray | bytes) -> Ranges:
    """Ranges of the set entries of a 0/1 bytearray, found with C-speed ``find`` calls."""
    out: list[tuple[int, int]] = []
    n = len(bitmap)
    i = bitmap.find(1)
    while i != -1:
        j = bitmap.find(0, i)
        j = n if j == -1 else j
        out.append((i, j))
        i = bitmap.find(1, j) if j < n else -1
    return tuple(out)


@dataclass(frozen=True, slots=True)
class OutgoingChunk:
    header: Chunk
    payload: memoryview | bytes


@dataclass
class SendStats:
    chunks_sent: int = 0
    bytes_sent: int = 0  # payload bytes on the wire, including resends
    chunks_resent: int = 0
    bytes_resent: int = 0
    nacks: int = 0
    skipped_by_resume: int = 0


class SendState(enum.Enum):
    SENDING = "sending"
    ENDED = "ended"  # End sent; resends (after a Nack) may still follow
    DONE = "done"
    FAILED = "failed"


class SendTransfer:
    """Sender side of one transfer. ``data`` is the tensor's bytes as a flat ``B`` memoryview."""

    def __init__(
        self,
        xid: str,
        meta: TensorMeta,
        data: memoryview,
        *,
        chunk_size: int,
        window: int,
        crc: bool = True,
        compressor: AdaptiveCompressor | None = None,
    ) -> None:
        if len(data) != meta.nbytes:
            raise ValueError("data length does not match the metadata")
        # The same floors and ceilings a receiver holds us to (a peer's Hello chose chunk_size).
        if not MIN_CHUNK <= chunk_size <= MAX_CHUNK or chunk_count(meta.nbytes, chunk_size) > (
            MAX_CHUNKS
        ):
            raise ProtocolError(
                f"chunk size {chunk_size} for {meta.nbytes} bytes is outside "
                f"{MIN_CHUNK}..{MAX_CHUNK} or makes over {MAX_CHUNKS} chunks",
                code="too_large",
            )
        self.id = xid
        self.meta = meta
        self.data = data
        self.chunk_size = chunk_size
        self.window = max(1, window)
        self.crc = crc
        self.compressor = compressor
        self.nchunks = chunk_count(meta.nbytes, chunk_size)
        self.state = SendState.SENDING
        self.stats = SendStats()
        self.error: Error | None = None
        self._acked = bytearray(self.nchunks)
        self._nacked = 0
        self._sent = bytearray(self.nchunks)
        self._unacked: set[int] = set()
        self._pending: deque[int] = deque(range(self.nchunks))
        self._raw_crc: list[int | None] = [None] * self.nchunks

    def chunk_len(self, index: int) -> int:
        return min(self.chunk_size, self.meta.nbytes - index * self.chunk_size)

    def precompute_crcs(self, stop: list[bool]) -> None:
        """Fill in the chunks' crc32c ahead of :meth:`next_chunk` (``stop[0]`` ends it early).

        Meant to run in a worker thread while the I/O layer sends: crc32c releases the GIL, so
        on a machine with a spare core the checksums cost the sending thread nothing. Each entry
        is written once, whole, so the sending thread sees either ``None`` or the value.
        """
        for i in range(self.nchunks):
            if stop[0]:
                return
            if self._raw_crc[i] is None:
                off = i * self.chunk_size
                self._raw_crc[i] = crc32c(self.data[off : off + self.chunk_len(i)])

    def begin(self, resume: bool = False) -> Begin:
        """The ``Begin`` for a new attempt. A resumed attempt re-sends whatever is unacked."""
        if resume:
            self._unacked.clear()
            self._pending = deque(i for i in range(self.nchunks) if not self._acked[i])
            if self.state is SendState.ENDED:
                self.state = SendState.SENDING
        return Begin(self.id, self.meta, self.chunk_size, self.window, resume)

    def on_accept(self, msg: Accept) -> None:
        """The receiver already holds ``msg.have``: never send those again."""
        self._check_id(msg.id)
        self._acked = bytearray(self.nchunks)  # the receiver's word is authoritative
        ones = memoryview(b"\x01" * self.nchunks)
        for a, b in msg.have:  # slices, not a loop per chunk: a peer sends up to 4096 ranges
            start, end = max(a, 0), min(b, self.nchunks)
            if start < end:
                self._acked[start:end] = ones[: end - start]
        self.stats.skipped_by_resume = self._acked.count(1)
        self._unacked.clear()
        self._pending = deque(i for i in range(self.nchunks) if not self._acked[i])
        if self.state is SendState.ENDED:
            self.state = SendState.SENDING

    @property
    def bytes_acked(self) -> int:
        """Bytes the receiver confirmed holding (for progress reports)."""
        n = self._acked.count(1)
        if n and self._acked[-1]:
            return (n - 1) * self.chunk_size + self.chunk_len(self.nchunks - 1)
        return n * self.chunk_size

    @property
    def window_open(self) -> bool:
        return len(self._unacked) < self.window

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def next_chunk(self) -> OutgoingChunk | None:
        """The next chunk to send, or ``None`` if all are sent or the window is full."""
        while self._pending and len(self._unacked) < self.window:
            i = self._pending.popleft()
            if self._acked[i]:
                continue
            off = i * self.chunk_size
            raw = self.data[off : off + self.chunk_len(i)]
            packed = self.compressor.compress(raw) if self.compressor is not None else None
            payload: memoryview | bytes = raw if packed is None else packed
            crc: int | None = None
            if self.crc:
                raw_crc = self._raw_crc[i]
                if raw_crc is None:
                    raw_crc = self._raw_crc[i] = crc32c(raw)
                crc = raw_crc if packed is None else crc32c(packed)
            if self._sent[i]:
                self.stats.chunks_resent += 1
                self.stats.bytes_resent += len(payload)
            self._sent[i] = 1
            self._unacked.add(i)
            self.stats.chunks_sent += 1
            self.stats.bytes_sent += len(payload)
            header = Chunk(self.id, i, off, len(raw), len(payload), crc, packed is not None)
            return OutgoingChunk(header, payload)
        return None

    @property
    def wants_end(self) -> bool:
        return self.state is SendState.SENDING and not self._pending

    def end(self) -> End:
        """The ``End`` frame, with the whole-tensor crc combined from the chunks' crcs."""
        self.state = SendState.ENDED
        if not self.crc:
            return End(self.id, None)
        if self.nchunks == 1 and self._raw_crc[0] is not None:  # a small tensor: nothing to combine
            return End(self.id, self._raw_crc[0])
        for i, c in enumerate(self._raw_crc):
            if c is None:  # skipped thanks to a resume: never read so far
                off = i * self.chunk_size
                self._raw_crc[i] = crc32c(self.data[off : off + self.chunk_len(i)])
        whole = combine_all((c or 0, self.chunk_len(i)) for i, c in enumerate(self._raw_crc))
        return End(self.id, whole)

    def on_message(self, msg: Message) -> None:
        """Feed a reply from the receiver (Ack, Nack, Stored, Error)."""
        match msg:
            case Ack(xid, upto, ranges):
                self._check_id(xid)
                for i in [i for i in self._unacked if i < upto or _in_ranges(i, ranges)]:
                    self._unacked.discard(i)
                    self._acked[i] = 1
            case Nack(xid, index):
                self._check_id(xid)
                if index >= self.nchunks:
                    raise ProtocolError(f"nack for chunk {index} of {self.nchunks}")
                self.stats.nacks += 1
                if not self._acked[index]:
                    self._unacked.discard(index)
                    self._pending.appendleft(index)
            case Stored(xid):
                self._check_id(xid)
                if self.state is not SendState.ENDED or self._pending:
                    raise ProtocolError("'stored' before the transfer ended")
                self._acked = bytearray(b"\x01" * self.nchunks)  # Stored answers for all
                self._unacked.clear()
                self.state = SendState.DONE
            case Error() as err:
                if err.id is not None:
                    self._check_id(err.id)
                self.error = err
                self.state = SendState.FAILED
            case Accept() as acc:
                self.on_accept(acc)
            case _:
                raise ProtocolError(f"unexpected {type(msg).__name__} during a send")

    def _check_id(self, xid: str) -> None:
        if xid != self.id:
            raise ProtocolError(f"reply for transfer {xid}, expected {self.id}")


def _in_ranges(i: int, ranges: Ranges) -> bool:
    return any(a <= i < b for a, b in ranges)


class Placement(enum.Enum):
    DIRECT = "direct"  # receive the payload straight into ``target``
    SCRATCH = "scratch"  # compressed: receive into a scratch buffer, then decompress
    DISCARD = "discard"  # a duplicate: read and drop


class ReceiveState(enum.Enum):
    RECEIVING = "receiving"
    DONE = "done"
    FAILED = "failed"


@dataclass
class ReceiveStats:
    chunks: int = 0
    bytes: int = 0  # payload bytes accepted (wire size)
    duplicates: int = 0
    crc_errors: int = 0


#: Checksum failures tolerated per transfer before a peer is refused, beyond four per good chunk.
MAX_CRC_ERRORS = 64


def _ack_every(window: int) -> int:
    """Chunks between acks for a sender's window: a quarter of it, at least 1, at most 64."""
    return max(1, min(window // 4, 64))


class ReceiveTransfer:
    """Receiver side of one transfer, writing into ``dest`` (a flat writable ``B`` memoryview).

    The object outlives a connection: if the sender's connection drops, the node keeps it and the
    sender's resumed ``Begin`` finds it again by id, so only missing chunks travel twice.
    """

    def __init__(
        self,
        begin: Begin,
        dest: memoryview,
        *,
        sender: str = "",
        crc: bool = True,
        lz4: bool = True,
        max_chunk: int = MAX_CHUNK,
    ) -> None:
        if not MIN_CHUNK <= begin.chunk_size <= max_chunk:
            raise ProtocolError(
                f"chunk size {begin.chunk_size} is outside {MIN_CHUNK}..{max_chunk}",
                code="too_large",
            )
        if chunk_count(begin.meta.nbytes, begin.chunk_size) > MAX_CHUNKS:
            raise ProtocolError(
                f"{begin.meta.nbytes} bytes in chunks of {begin.chunk_size} make over "
                f"{MAX_CHUNKS} chunks: use chunks of at least "
                f"{-(-begin.meta.nbytes // MAX_CHUNKS)} bytes",
                code="too_large",
            )
        if len(dest) != begin.meta.nbytes:
            raise ValueError("destination length does not match the metadata")
        self.begin = begin
        self.id = begin.id
        self.meta = begin.meta
        self.sender = sender
        self.dest = dest
        self.crc = crc
        #: Compressed chunks are accepted only if lz4 was negotiated (on the connection now
        #: carrying the transfer: :meth:`rebegin` sets it again).
        self.lz4 = lz4
        self.chunk_size = begin.chunk_size
        self.nchunks = chunk_count(begin.meta.nbytes, begin.chunk_size)
        self.state = ReceiveState.RECEIVING
        self.stats = ReceiveStats()
        self.have_count = 0
        self.ack_every = _ack_every(begin.window)
        self._have = bytearray(self.nchunks)
        self._raw_crc = [0] * self.nchunks
        self._first_missing = 0
        self._unacked: list[int] = []
        self._end: End | None = None

    def matches(self, begin: Begin) -> bool:
        """Is ``begin`` a resume of this transfer (same id, tensor and chunking)?"""
        return (
            begin.id == self.id and begin.meta == self.meta and begin.chunk_size == self.chunk_size
        )

    def rebegin(self, begin: Begin, *, lz4: bool) -> list[Message]:
        """A resumed attempt on a new connection: forget the old End, report what we have.
        ``lz4``: whether that connection negotiated lz4 (its agreement, not the first one's,
        decides whether compressed chunks are accepted from now on)."""
        self.lz4 = lz4
        # Acks as often as this attempt's window needs: a restarted or different sender may
        # have a narrower window than the first, and would stall waiting for acks.
        self.ack_every = _ack_every(begin.window)
        self._end = None
        self._unacked.clear()
        return [self.accept()] if begin.resume else []

    def accept(self) -> Accept:
        return Accept(self.id, self.held_ranges())

    def has(self, index: int) -> bool:
        """Is chunk ``index`` held (received, verified and in place in ``dest``)?"""
        return bool(self._have[index])

    def held_from(self, start: int) -> int:
        """The first chunk at or after ``start`` not held yet (``nchunks`` if there is none).

        How a chain relay learns what arrived: one C-speed scan of the bitmap from its cursor,
        no copy of it and no Python loop over chunks already known.
        """
        i = self._have.find(0, start)
        return self.nchunks if i == -1 else i

    def held_ranges(self) -> Ranges:
        """The chunks held, as sorted disjoint half-open ranges (what ``Accept`` carries)."""
        return bitmap_ranges(self._have)

    def raw_crc(self, index: int) -> int | None:
        """The crc32c of held chunk ``index``'s raw bytes, as verified on arrival; ``None``
        without crc32c negotiated (nothing was checked) or for a chunk not held."""
        return self._raw_crc[index] if self.crc and self._have[index] else None

    @property
    def end_crc(self) -> int | None:
        """The whole-tensor crc32c the sender's ``End`` carried (once it came)."""
        return self._end.crc if self._end is not None else None

    def progress(self) -> tuple[bytes, list[int]]:
        """What must be persisted to resume after a restart: the chunk bitmap and the chunks'
        crc32c (the whole-tensor check is combined from them, so they must survive too)."""
        return bytes(self._have), list(self._raw_crc)

    def restore(self, have: bytes, raw_crcs: list[int]) -> None:
        """Resume from persisted :meth:`progress` (the destination already holds those chunks)."""
        if len(have) != self.nchunks or len(raw_crcs) != self.nchunks:
            raise ValueError(
                f"progress is for {len(have)} chunks, this transfer has {self.nchunks}"
            )
        if any(b not in (0, 1) for b in have):
            raise ValueError("progress bitmap must hold only 0 and 1")
        self._have = bytearray(have)
        self._raw_crc = list(raw_crcs)
        self.have_count = self._have.count(1)
        self._first_missing = 0
        self._unacked.clear()

    @property
    def bytes_have(self) -> int:
        if not self.have_count:
            return 0
        last = self.nchunks - 1
        return self.have_count * self.chunk_size - (
            (self.chunk_size - self.chunk_len(last)) if self._have[last] else 0
        )

    def chunk_len(self, index: int) -> int:
        return min(self.chunk_size, self.meta.nbytes - index * self.chunk_size)

    def place(self, c: Chunk) -> tuple[Placement, memoryview | None]:
        """Where chunk ``c``'s payload goes. Validates the header against the transfer."""
        if c.id != self.id:
            raise ProtocolError(f"chunk for transfer {c.id} inside transfer {self.id}")
        if self.state is not ReceiveState.RECEIVING:
            raise ProtocolError(f"chunk after the transfer {self.state.value}")
        if not 0 <= c.index < self.nchunks:
            raise ProtocolError(f"chunk index {c.index} outside 0..{self.nchunks - 1}")
        expected = self.chunk_len(c.index)
        if c.offset != c.index * self.chunk_size or c.raw_len != expected:
            raise ProtocolError(
                f"chunk {c.index}: offset/length {c.offset}/{c.raw_len} do not "
                f"match {c.index * self.chunk_size}/{expected}"
            )
        if c.compressed:
            if not self.lz4:
                raise ProtocolError(f"chunk {c.index} is lz4-compressed but lz4 was not negotiated")
            if c.wire_len > lz4_bound(expected):
                raise ProtocolError(f"chunk {c.index}: compressed length {c.wire_len} too large")
        elif c.wire_len != expected:
            raise ProtocolError(f"chunk {c.index}: payload length {c.wire_len} != {expected}")
        if self.crc and c.crc is None:
            raise ProtocolError(f"chunk {c.index} has no crc32c but crc32c was negotiated")
        if self._have[c.index]:
            return Placement.DISCARD, None
        if c.compressed:
            return Placement.SCRATCH, None
        return Placement.DIRECT, self.dest[c.offset : c.offset + expected]

    def on_chunk(self, c: Chunk, payload: memoryview | None) -> list[Message]:
        """The chunk's payload arrived (in ``target`` for DIRECT, ``payload`` for SCRATCH).

        Returns the messages to send back (Ack, Nack, Stored, Error).
        """
        i = c.index
        if self._have[i]:
            self.stats.duplicates += 1
            self._unacked.append(i)
            return self._maybe_ack(force=True)
        target = self.dest[c.offset : c.offset + c.raw_len]
        wire = payload if c.compressed else target
        assert wire is not None
        if self.crc and crc32c(wire) != c.crc:
            self.stats.crc_errors += 1
            # A bad line corrupts some chunks; a peer that sends mostly bad ones (and so keeps
            # the transfer alive without progress) is refused.
            if self.stats.crc_errors > MAX_CRC_ERRORS + 4 * self.have_count:
                raise ProtocolError(
                    f"transfer {self.id}: {self.stats.crc_errors} chunks failed their checksum "
                    f"(of {self.nchunks}); giving up on this connection"
                )
            return [Nack(self.id, i)]
        if c.compressed:
            try:
                decompress_into(wire, target)
            except ValueError as exc:
                raise ProtocolError(f"chunk {i}: {exc}") from None
            raw_crc = crc32c(target) if self.crc else 0
        else:
            raw_crc = c.crc or 0
        self._raw_crc[i] = raw_crc
        self._have[i] = 1
        self.have_count += 1
        self.stats.chunks += 1
        self.stats.bytes += c.wire_len
        self._unacked.append(i)
        if self.have_count == self.nchunks and self._end is not None:
            return self._finish()
        return self._maybe_ack(force=False)

    def on_end(self, end: End) -> list[Message]:
        if end.id != self.id:
            raise ProtocolError(f"end for transfer {end.id} inside transfer {self.id}")
        if self.state is ReceiveState.FAILED:  # like a chunk after it: nothing to end
            raise ProtocolError("end after the transfer failed")
        if self.crc and end.crc is None:
            raise ProtocolError("end has no crc32c but crc32c was negotiated")
        self._end = end
        if self.have_count == self.nchunks:
            return self._finish()
        return self._maybe_ack(force=True)

    @property
    def complete(self) -> bool:
        return self.state is ReceiveState.DONE

    def _maybe_ack(self, force: bool) -> list[Message]:
        if not self._unacked or (not force and len(self._unacked) < self.ack_every):
            return []
        while self._first_missing < self.nchunks and self._have[self._first_missing]:
            self._first_missing += 1
        upto = self._first_missing
        ranges = to_ranges(i for i in self._unacked if i >= upto)
        self._unacked.clear()
        return [Ack(self.id, upto, ranges)]

    def _finish(self) -> list[Message]:
        assert self._end is not None
        self._unacked.clear()  # Stored (or the checksum Error) answers for every chunk
        if self.crc and self._end.crc is not None:
            if self.nchunks == 1:  # a small tensor: its one chunk's crc is the whole one
                whole = self._raw_crc[0]
            else:
                whole = combine_all((c, self.chunk_len(i)) for i, c in enumerate(self._raw_crc))
            if whole != self._end.crc and self.state is ReceiveState.DONE:
                # A resumed attempt's End for a tensor we already verified and stored: answer
                # Stored again if it agrees, but never let it discard the verified tensor.
                raise ProtocolError(
                    f"tensor {self.meta.name!r}: end crc32c {self._end.crc:#010x} != "
                    f"{whole:#010x} of the tensor already stored"
                )
            if whole != self._end.crc:
                # Every chunk matched its own crc, yet the whole does not: start over rather than
                # keep anything that might be wrong.
                self.state = ReceiveState.FAILED
                self._have = bytearray(self.nchunks)
                self.have_count = 0
                return [
                    Error(
                        "checksum",
                        f"tensor {self.meta.name!r}: whole-tensor "
                        f"crc32c {whole:#010x} != {self._end.crc:#010x}",
                        self.id,
                    ),
                ]
        self.state = ReceiveState.DONE
        return [Stored(self.id)]
