"""One blob over HTTP: parallel ranged GETs with work stealing, resumable, digest-checked.

What the known downloaders get wrong, and what this does instead:

* **The last percent.** Pieces are handed out from a queue; a connection that runs out of work
  takes half of the largest range another connection still has to read (split at its middle), so
  all connections finish together. A connection far slower than the others (under
  ``slow_ratio`` of the median for ``slow_seconds``) or stalled is cancelled and its remaining
  range goes back to the front of the queue for a fresh connection.
* **Range replies are checked, never trusted.** Every ranged reply must be ``206`` with a
  ``Content-Range`` naming exactly the bytes asked for, inside the size the manifest promised,
  and a matching ``Content-Length``; a ``200`` to a piece (a server or CDN that dropped the
  Range header) is an error for that piece and is never appended. Bytes are written at their
  offset (``pwrite``) and every body is cut at the length expected of it, so a reply can only
  ever fill its own range: a server that lies about a range or a size gets a :class:`BadReply`,
  which is not retried, and whatever the download wrote is removed (:class:`Refused`).
* **Sizes are bounded before they size anything.** The promised size (manifest) or, for a plain
  URL, the ``Content-Length`` / ``Content-Range`` total is checked against ``max_bytes``
  (``downloads.max_bytes``) before the first write, and a body without a length is counted as it
  streams: past the ceiling it is a :class:`TooLarge`.
* **Redirects are followed here, not by the HTTP client,** so the ``Range`` header is sent on
  every hop and ``Authorization`` is dropped as soon as the host changes.
* **Resume across restarts.** Data goes to ``<name>.incomplete`` at its offsets; the written
  ranges - each connection's contiguous prefix of its piece, not only whole pieces - are
  recorded in ``<name>.incomplete.json`` (after ``fdatasync`` of the data it vouches for) every
  ``checkpoint_bytes`` written, at least every ``checkpoint_seconds``, after every piece and when
  the fetch stops, so a ``kill -9`` loses a few MiB, not the pieces in flight (was: ~50 MiB at
  100 MB/s with a once-a-second record). A restarted fetch asks only for the missing ranges.
* **Digests.** The SHA-256 is computed as the bytes arrive while they arrive in order, and the
  rest is read back from the page cache once it is contiguous; a mismatch (or a ``416`` for a
  partial) discards the partial and refetches the blob once, with a log line saying why.

This module is the fetch itself: probing, planning and stealing ranges, the connections, the
writer. The HTTP request and reply checks live in :mod:`.ranged_get`, the partial file, its resume
record and the digest in :mod:`.partial_blob`, the error kinds in :mod:`.fetch_errors`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from .. import metrics
from ..backoff import Backoff
from ..errors import DownloadError
from .fetch_errors import BadReply, DiskFull, Refused, TooLarge, _StartOver, first_error
from .partial_blob import PartialBlob
from .ranged_get import (
    MAX_REDIRECTS,
    Auth,
    RangedGet,
    content_length,
    content_range,
    describe_http_error,
    no_auth,
    read_capped,
)
from .ranges import RangeSet, guided_pieces, steal_point

log = logging.getLogger("tensord.download")

PIECE_CAP = 32 << 20
WRITE_QUEUE = 256  # reads (up to 1 MiB each, see ranged_get) waiting for the writer thread
WRITE_BATCH = 64  # reads written per trip to the thread
#: Bytes of written batches kept for the hasher while it lags (a catch-up read back); beyond
#: that they are let go and it reads them back from the page cache too.
HASH_BACKLOG = 64 << 20
DEFAULT_MAX_BYTES = 256 << 30


#: A written batch for the hasher: its reads, the contiguous prefix before it was written, its
#: bytes (0 for a batch let go: then the prefix, taken after, covers it).
_Hashable = tuple[list[tuple[int, memoryview]], int, int]


@dataclass
class FetchConfig:
    connections: int = 4
    min_piece: int = 8 << 20
    retries: int = 8  # per piece
    backoff_base: float = 0.2
    backoff_max: float = 5.0
    stall_seconds: float = 15.0
    #: A connection reading under this share of the median rate for ``slow_seconds`` is
    #: replaced (a straggler at a fifth of its siblings' speed holds the whole blob back); the
    #: connection that takes over its range is replaced only under half of this share, so a
    #: link whose new connections ramp up slowly (long round trips) costs at most one extra
    #: connection per range, never a churn.
    slow_ratio: float = 0.2
    slow_seconds: float = 1.5
    checkpoint_seconds: float = 1.0
    #: Record progress once this many bytes were written since the last record: what a kill -9
    #: re-fetches is about this plus what arrives during one record's fdatasync.
    checkpoint_bytes: int = 2 << 20
    chunk: int = 1 << 20  # bytes read from a reply between writes
    max_bytes: int = DEFAULT_MAX_BYTES  # the largest blob (downloads.max_bytes)


@dataclass
class Progress:
    """What a fetch reports: bytes done of total, connections, retries, rate."""

    url: str
    done: int
    total: int | None
    connections: int
    retries: int
    rate: float
    #: The most connections this fetch had open at once (``connections`` is the current
    #: count, often 0 by the time a small blob's last bytes are reported).
    peak_connections: int = 0
    #: Bytes by where they came from: ``"origin"``, or a peer's id (peer-first downloads).
    sources: dict[str, int] = field(default_factory=dict)


#: A connection's progress is sampled at most this often (seconds): a rate's window starts
#: within this of where it should.
SAMPLE_STEP = 0.05


@dataclass
class _Task:
    """A connection's current range: ``[pos, end)`` still to read; a thief may lower ``end``."""

    start: int
    pos: int
    end: int
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: ``(when, bytes read by then)``, SAMPLE_STEP apart but for the newest, which moves with
    #: every read. Counts, not per-read sizes: a connection making thousands of small reads
    #: (16 KiB TLS records) in a window is measured as well as one making a few big ones.
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=256))
    started: float = field(default_factory=time.monotonic)
    read: int = 0  # bytes read since ``started``
    #: It reads what a connection replaced as too slow left: a new connection, still ramping
    #: up where round trips are long, so it is judged at half the ratio (see FetchConfig).
    replacing: bool = False

    def note(self, now: float, n: int) -> None:
        """``n`` bytes were read at ``now``."""
        self.read += n
        s = self.samples
        if len(s) >= 2 and now - s[-2][0] < SAMPLE_STEP:
            s[-1] = (now, self.read)
        else:
            s.append((now, self.read))

    def restart(self) -> None:
        """A new request for the rest (a retry): its rate is measured afresh."""
        self.started = time.monotonic()
        self.read = 0
        self.samples.clear()

    def rate(self, now: float, window: float) -> float | None:
        """Bytes/s over the last ``window`` s, or None if the task is younger than that."""
        if now - self.started < window:
            return None
        since = now - window
        before = 0  # read by ``since``: the newest sample at or before it
        for t, total in reversed(self.samples):
            if t <= since:
                before = total
                break
        return (self.read - before) / window


class BlobFetch:
    """Fetch ``url`` into ``dest`` (renamed there only once complete and verified).

    ``size`` and ``sha256`` (hex) are what the manifest promised; either may be ``None`` for a
    plain URL (then the server's length is used and the digest computed, not checked).
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        dest: Path,
        *,
        size: int | None = None,
        sha256: str | None = None,
        auth: Auth = no_auth,
        config: FetchConfig | None = None,
        progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.client = client
        self.url = url
        self.dest = dest
        self.size = size
        self.sha256 = sha256
        self.auth = auth
        self.cfg = config or FetchConfig()
        self.on_progress = progress
        self._blob = PartialBlob(dest, url)
        self._http = RangedGet(client, url, auth)
        self.partial = self._blob.path
        self.control = self._blob.control
        self.retries = 0
        self.connections = 0
        self.peak_connections = 0
        self.bytes_fetched = 0  # from the network in this run (a resume fetches less)
        #: Bytes written in this run by source: "origin", or a peer's id.
        self.sources: dict[str, int] = {}
        #: Called with (offset, length) once bytes are in the partial file (peers may read them).
        self.on_landed: Callable[[int, int], None] | None = None
        #: Called once nothing more of the blob is read from the origin by this node (the rest
        #: comes from peers): a pull may start its next blob's origin work then.
        self.on_origin_done: Callable[[], None] | None = None
        self._queue: list[tuple[int, int]] = []
        self._tasks: dict[int, _Task] = {}
        self._next_id = 0
        self._finished_rates: deque[float] = deque(maxlen=16)
        #: Where the ranges of connections replaced as too slow resume (see _Task.replacing).
        self._replaced: set[int] = set()
        self._work = trio.Event()
        self._failed: DownloadError | None = None
        self._single_reply: httpx.Response | None = None
        self._save_lock = trio.Lock()
        self._unsaved = 0  # bytes written since the last record's snapshot
        self._dirty = trio.Event()  # set once _unsaved reaches checkpoint_bytes
        self._writes: trio.MemorySendChannel[tuple[int, memoryview]] | None = None
        self._hash_backlog = 0  # bytes of written batches waiting for the hasher
        self._pending_first = (0, 0)
        self._workers: trio.Nursery | None = None
        self._expected: int | None = None  # the single stream's length, when declared

    @property
    def done(self) -> RangeSet:
        """The byte ranges of the blob written so far."""
        return self._blob.done

    # -- entry point -------------------------------------------------------------------------

    async def run(self) -> Path:
        """Download, verify and rename into place; returns ``dest``. Refetches once from zero
        after a digest mismatch or a 416 on a partial. A :class:`Refused` download (the server
        lied about a range or a size, or the blob is over ``max_bytes``) and one whose digest
        is still wrong the second time leave nothing behind; one cut by the network keeps its
        partial for a resume."""
        try:
            for attempt in (1, 2):
                try:
                    return await self._run_once()
                except _StartOver as exc:
                    self._discard()
                    if attempt == 2:
                        raise DownloadError(str(exc)) from None
                    log.warning(
                        "download %s: %s; discarding the partial and starting over", self.url, exc
                    )
        except Refused as exc:
            log.warning("download %s: refused: %s", self.url, exc)
            self._discard()
            raise
        except httpx.HTTPError as exc:
            raise DownloadError(describe_http_error(exc, self.url)) from None
        raise AssertionError("unreachable")

    async def _run_once(self) -> Path:
        try:
            return await self._run_once_inner()
        except BaseExceptionGroup as group:
            # Errors of the worker, writer and checkpoint tasks come out of nurseries wrapped:
            # callers get the one that says what went wrong.
            raise first_error(group) from None

    async def _run_once_inner(self) -> Path:
        if self.size is not None and self.size > self.cfg.max_bytes:
            raise TooLarge(
                f"{self.url}: the blob is {self.size} bytes, more than downloads.max_bytes "
                f"({self.cfg.max_bytes}); raise downloads.max_bytes to fetch it"
            )
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        total, first = await self._probe()
        try:
            if first is not None and total is not None:
                await self._parallel(total, first)
            else:
                await self._single(first)
        finally:
            if self._blob.is_open:
                with contextlib.suppress(OSError):
                    self._save()  # what arrived is kept for a resume
                self._blob.close()
        return await trio.to_thread.run_sync(self._finish)

    # -- probing -----------------------------------------------------------------------------

    async def _probe(self) -> tuple[int | None, httpx.Response | None]:
        """Open the first range (or the whole blob). Returns the total size and, if the server
        honours ranges, the open 206 reply for the first missing piece."""
        resumed = self._blob.load(self.sha256)
        start = 0
        want_end = self.cfg.min_piece
        if resumed is not None:
            gaps = self.done.missing(resumed)
            if not gaps:
                self._blob.open(resumed)
                return resumed, None
            start, gap_end = gaps[0]
            want_end = min(start + self.cfg.min_piece, gap_end)  # never re-fetch what is here
        if self.size is not None:
            want_end = min(want_end, self.size)
        # A bounded first range even when the size is unknown: a server clamps it to the blob,
        # and the rest is split among the connections.
        resp = await self._http.open(start, want_end)
        try:
            return await self._check_probe(resp, resumed, start, want_end)
        except BaseException:
            await resp.aclose()
            raise

    async def _check_probe(
        self, resp: httpx.Response, resumed: int | None, start: int, want_end: int
    ) -> tuple[int | None, httpx.Response | None]:
        status = resp.status_code
        if status == 206 and "content-encoding" not in resp.headers:
            s, e, total = content_range(resp, self.url, start, None)
            if total is None:
                raise BadReply(f"GET {self.url}: 206 without a total length")
            if self.size is not None and total != self.size:
                raise BadReply(
                    f"GET {self.url}: the server has {total} bytes, the manifest says {self.size}"
                )
            if total > self.cfg.max_bytes:
                raise TooLarge(
                    f"GET {self.url}: the server has {total} bytes, more than "
                    f"downloads.max_bytes ({self.cfg.max_bytes}); raise it to fetch this"
                )
            if e >= want_end or e >= total:
                raise BadReply(
                    f"GET {self.url}: asked for bytes {start}-{want_end - 1} of {total}, got "
                    f"Content-Range {resp.headers['content-range']!r}"
                )
            self._check_length(resp, e + 1 - s)
            if resumed is not None and resumed != total:
                await resp.aclose()
                raise _StartOver(f"the blob is now {total} bytes, the partial was for {resumed}")
            self._blob.open(total)
            self._pending_first = (s, e + 1)
            return total, resp
        if status == 416 and resumed is None and self.size in (None, 0):
            await resp.aclose()  # an empty blob has no byte 0 to ask for
            self.size = 0
            self._blob.open(0)
            return 0, None
        if status == 416 and resumed is not None:
            await resp.aclose()
            raise _StartOver("the server refused the partial's range (416)")
        if status == 200:
            # No ranges: the whole blob, from byte 0, whatever range was asked for. It must be
            # the promised size (or, for a plain URL, within max_bytes), and is cut there.
            encoding = resp.headers.get("content-encoding", "identity").strip().lower()
            if encoding != "identity":
                # Asked for identity: a compressed body could inflate without bound.
                raise BadReply(f"GET {self.url}: a {encoding[:40]!r} body, asked for identity")
            length = content_length(resp, self.url)
            if length is not None and self.size is not None and length != self.size:
                raise BadReply(
                    f"GET {self.url}: the server sends {length} bytes, the manifest says "
                    f"{self.size}"
                )
            if length is not None and length > self.cfg.max_bytes:
                raise TooLarge(
                    f"GET {self.url}: the server sends {length} bytes, more than "
                    f"downloads.max_bytes ({self.cfg.max_bytes}); raise it to fetch this"
                )
            if resumed is not None and self.done.total:
                log.info("download %s: the server ignores Range; starting from zero", self.url)
                self._discard()
            self._expected = self.size if self.size is not None else length
            self._blob.open(self._expected)
            self._single_reply = resp
            return self.size, None
        body = await read_capped(resp, 200)
        raise DownloadError(f"GET {self.url} (bytes {start}-): HTTP {status}: {body!r}")

    def _check_length(self, resp: httpx.Response, want: int) -> None:
        length = content_length(resp, self.url)
        if length is not None and length != want:
            raise BadReply(
                f"GET {self.url}: Content-Range {resp.headers.get('content-range')!r} is "
                f"{want} bytes, Content-Length says {length}"
            )

    # -- single stream -----------------------------------------------------------------------

    async def _single(self, first: httpx.Response | None) -> None:
        resp, self._single_reply = self._single_reply, None
        if resp is None:
            return  # the partial was already complete
        self.connections = self.peak_connections = 1
        pos = 0
        expected = self._expected
        limit = expected if expected is not None else self.cfg.max_bytes
        async with self._writing():
            try:
                # Raw: asked for identity and checked (no decoder to inflate a small body).
                async for data in resp.aiter_raw():
                    if pos + len(data) > limit:
                        if expected is None:
                            raise TooLarge(
                                f"GET {self.url}: more than downloads.max_bytes ({limit}) "
                                "bytes; raise it to fetch this"
                            )
                        raise BadReply(
                            f"GET {self.url}: the server sent more than the {limit} bytes "
                            "it promised"
                        )
                    await self._queue_write(pos, memoryview(data))
                    pos += len(data)
            except httpx.HTTPError as exc:
                cause = describe_http_error(exc, self.url)
                raise DownloadError(f"{cause} (after {pos} bytes)") from None
            finally:
                await resp.aclose()
        if expected is not None and pos != expected:
            raise DownloadError(f"GET {self.url}: got {pos} bytes, expected {expected}")
        self.size = pos

    # -- parallel ----------------------------------------------------------------------------

    async def _parallel(self, total: int, first: httpx.Response) -> None:
        self.size = total
        s0, e0 = self._pending_first
        rest = RangeSet(self.done.missing(total))
        # The first reply covers [s0, e0): everything else is queued in pieces.
        gaps: list[tuple[int, int]] = []
        for s, e in rest:
            for ps, pe in ((s, min(e, s0)), (max(s, e0), e)):
                if ps < pe:
                    gaps.append((ps, pe))
        # Long ranges while much is left (fewer requests, no per-request ramp-up), never under
        # min_piece; stealing then evens out the ends.
        # The first reply counts as the first connection's share (it takes the last piece,
        # once the first reply is done).
        left = sum(e - s for s, e in gaps) + (e0 - s0)
        piece = max(self.cfg.min_piece, -(-left // max(1, self.cfg.connections)))
        # ...but not huge: pieces handed out in order keep the contiguous prefix growing, so
        # the SHA-256 keeps pace with the download instead of reading most of it back at the end.
        piece = min(piece, max(self.cfg.min_piece, PIECE_CAP))
        # Shrinking towards min_piece as the work left does: the last pieces in flight are
        # small, so the SHA-256 has little to read back once the last byte lands.
        queue = guided_pieces(gaps, self.cfg.connections, self.cfg.min_piece, piece)
        self._queue = queue
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._checkpoints)
            nursery.start_soon(self._watch_slow)
            async with self._writing(), trio.open_nursery() as workers:
                self._workers = workers
                workers.start_soon(self._worker, (s0, e0), first)
                for _ in range(self.cfg.connections - 1):
                    workers.start_soon(self._worker, None, None)
            nursery.cancel_scope.cancel()
        if self._failed is not None:
            raise self._failed
        if self.done.missing(total):
            raise DownloadError(f"GET {self.url}: ranges still missing: {self.done.missing(total)}")

    def _take(self) -> tuple[int, int] | None:
        """The next range for an idle connection: a queued piece, else half of the largest
        range another connection still has to read."""
        if self._queue:
            return self._queue.pop(0)
        victim = max(self._tasks.values(), key=lambda t: t.end - t.pos, default=None)
        if victim is None:
            return None
        # Halves of at least a quarter piece: each steal costs what the victim's reply already had
        # in flight beyond the split (it stops reading there), so it must be worth that.
        mid = steal_point(victim.pos, victim.end, max(self.cfg.chunk, self.cfg.min_piece // 4))
        if mid is None:
            return None
        stolen = (mid, victim.end)
        victim.end = mid
        return stolen

    async def _worker(self, first: tuple[int, int] | None, reply: httpx.Response | None) -> None:
        piece = first
        while self._failed is None:
            if piece is None:
                piece = self._take()
                if piece is None:
                    return
            await self._fetch_piece(piece, reply)
            reply = None
            piece = None
            # Record every finished piece at once: a kill -9 then costs only the pieces in
            # flight, never finished ones waiting for the next periodic save.
            await self._save_async()

    async def _fetch_piece(self, piece: tuple[int, int], reply: httpx.Response | None) -> None:
        start, end = piece
        attempt = 0
        task = _Task(start, start, end, replacing=start in self._replaced)
        self._replaced.discard(start)
        tid = self._next_id
        self._next_id += 1
        self._tasks[tid] = task
        self.connections += 1
        self.peak_connections = max(self.peak_connections, self.connections)
        try:
            while task.pos < task.end:
                try:
                    with task.scope:
                        if reply is None:
                            # A thief may lower task.end while the request is in flight: the
                            # reply is checked against what was asked, and read up to task.end.
                            asked = task.end
                            reply = await self._http.open(task.pos, asked)
                            if reply.status_code != 206:
                                # Never read: a 200 here is the whole blob, not this piece.
                                raise DownloadError(
                                    f"GET {self.url} (bytes {task.pos}-{asked - 1}): HTTP "
                                    f"{reply.status_code} instead of 206 Partial Content"
                                )
                            _, last, _ = content_range(reply, self.url, task.pos, self.size)
                            if last != asked - 1:
                                raise BadReply(
                                    f"GET {self.url}: asked for bytes {task.pos}-{asked - 1}, "
                                    f"got Content-Range {reply.headers['content-range']!r}"
                                )
                            self._check_length(reply, asked - task.pos)
                        await self._read_into(reply, task)
                    if task.scope.cancelled_caught:
                        # Too slow or stalled: give the rest back for a fresh connection, first
                        # in line - it holds back the contiguous prefix the SHA-256 follows.
                        if task.pos < task.end:
                            self._queue.insert(0, (task.pos, task.end))
                            if not task.replacing:
                                self._replaced.add(task.pos)
                        return
                    if task.pos < task.end:
                        raise DownloadError(
                            f"GET {self.url}: reply ended at byte {task.pos} of {task.end}"
                        )
                except Refused as exc:
                    # A lying server is not asked again: the whole download stops.
                    self._failed = exc
                    if self._workers is not None:
                        self._workers.cancel_scope.cancel()
                    return
                except (DownloadError, httpx.HTTPError, OSError) as exc:
                    if isinstance(exc, httpx.HTTPError):
                        exc = DownloadError(describe_http_error(exc, self.url))
                    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                        self._failed = DiskFull(
                            f"download {self.url}: the disk holding {self.partial.parent} is "
                            "full; free space and pull again (the partial is kept)"
                        )
                        return
                    attempt += 1
                    self.retries += 1
                    if attempt > self.cfg.retries:
                        self._failed = DownloadError(
                            f"{exc} (bytes {task.pos}-{task.end - 1}; gave up after "
                            f"{attempt} attempts)"
                        )
                        return
                    log.info(
                        "download %s: bytes %d-%d: %s; retry %d",
                        self.url,
                        task.pos,
                        task.end - 1,
                        exc,
                        attempt,
                    )
                    await Backoff(self.cfg.backoff_base, self.cfg.backoff_max).sleep(attempt)
                    task.scope = trio.CancelScope()
                    task.restart()
                finally:
                    if reply is not None:
                        await reply.aclose()
                        reply = None
        finally:
            del self._tasks[tid]
            self.connections -= 1
            took = time.monotonic() - task.started
            if task.pos > task.start and took > 0:
                self._finished_rates.append((task.pos - task.start) / took)

    async def _read_into(self, reply: httpx.Response, task: _Task) -> None:
        # Socket-sized reads, not buffered chunks: progress (and the slow-connection judgement
        # that rests on it) stays accurate even for a connection that crawls.
        async for data in reply.aiter_raw():
            view = memoryview(data)[: max(0, task.end - task.pos)]
            if len(view):
                pos = task.pos
                # Advanced before the (possibly waiting) hand-off, so a thief never splits
                # below bytes already queued for writing.
                task.pos += len(view)
                task.note(time.monotonic(), len(view))
                await self._queue_write(pos, view)
            if task.pos >= task.end:
                return  # done, or a thief took the rest: stop reading this reply

    async def _watch_slow(self) -> None:
        cfg = self.cfg
        while True:
            await trio.sleep(min(0.5, cfg.slow_seconds / 4))
            for t, why in self._stragglers(time.monotonic()):
                log.info(
                    "download %s: replacing a %s connection (bytes %d-%d)",
                    self.url,
                    why,
                    t.pos,
                    t.end - 1,
                )
                t.scope.cancel()

    def _stragglers(self, now: float) -> list[tuple[_Task, str]]:
        """The connections to replace now, each with why: stalled, or far slower than the
        median of the running ones and of those that finished lately (so the last connection
        left is still judged: the last percent must not crawl)."""
        cfg = self.cfg
        rates = {i: t.rate(now, cfg.slow_seconds) for i, t in self._tasks.items()}
        known = [r for r in rates.values() if r is not None] + list(self._finished_rates)
        median = statistics.median(known) if len(known) >= 2 else None
        out: list[tuple[_Task, str]] = []
        for i, t in self._tasks.items():
            if t.scope.cancel_called:
                continue
            last = t.samples[-1][0] if t.samples else t.started
            r = rates[i]
            ratio = cfg.slow_ratio / 2 if t.replacing else cfg.slow_ratio
            if now - last > cfg.stall_seconds:
                out.append((t, "stalled"))
            elif median is not None and r is not None and r < ratio * median:
                out.append((t, f"slow ({r / 1e6:.2f} MB/s)"))
        return out

    # -- writing -----------------------------------------------------------------------------

    @asynccontextmanager
    async def _writing(self) -> AsyncIterator[None]:
        """Run the writer for the duration of the block; on exit, wait until everything
        queued is written (or, on an error, stop it)."""
        send, recv = trio.open_memory_channel[tuple[int, memoryview]](WRITE_QUEUE)
        # Unbounded, but what it holds is bounded by HASH_BACKLOG (see _writer).
        to_hash, hashing = trio.open_memory_channel[_Hashable](float("inf"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._hasher, hashing)
            nursery.start_soon(self._writer, recv, to_hash)
            async with send:
                self._writes = send
                yield
        self._writes = None

    async def _queue_write(self, pos: int, data: memoryview) -> None:
        assert self._writes is not None
        # Shielded: the reader has already counted these bytes as read (task.pos), so a
        # cancellation (a slow connection being replaced) must not drop them on the way to the
        # writer. The wait is bounded: the writer always drains the queue.
        with trio.CancelScope(shield=True):
            await self._writes.send((pos, data))

    async def _writer(
        self,
        queue: trio.MemoryReceiveChannel[tuple[int, memoryview]],
        to_hash: trio.MemorySendChannel[_Hashable],
    ) -> None:
        """Write in a worker thread, a batch at a time, while the event loop goes on reading
        replies (``pwrite`` into fresh page cache costs as much CPU as the HTTP parsing, and two
        cores can do them at once). Ranges are marked done only once written, so a checkpoint
        never records bytes that are not in the file. Hashing is the :meth:`_hasher`'s, in its
        own thread: a catch-up of tens of MiB (the piece before the others completed) held up
        the writes behind it by 50-150 ms, and the reads queued meanwhile were lost to a
        kill -9 (4-6 MiB of the ~10 the bench measured)."""
        async with queue, to_hash:
            async for first in queue:
                batch = [first]
                while len(batch) < WRITE_BATCH:
                    try:
                        batch.append(queue.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                prefix = self.done.prefix()
                await self._in_thread(self._blob.write, batch)
                self._written(batch)
                size = sum(len(data) for _, data in batch)
                if self._hash_backlog + size > HASH_BACKLOG:
                    # The hasher is far behind: it reads this batch back from the file
                    # instead (the prefix now covers it, if contiguous), so memory stays bounded.
                    to_hash.send_nowait(([], self.done.prefix(), 0))
                else:
                    self._hash_backlog += size
                    to_hash.send_nowait((batch, prefix, size))

    async def _hasher(self, items: trio.MemoryReceiveChannel[_Hashable]) -> None:
        """Feed the SHA-256 with the written batches, in the order they were written, taking
        whatever is waiting in one trip to the thread; a long catch-up here delays nothing but
        the digest."""
        async with items:
            async for first in items:
                work = [first]
                while True:
                    try:
                        work.append(items.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self._in_thread(self._hash_all, work)
                self._hash_backlog -= sum(size for _, _, size in work)

    def _hash_all(self, work: list[_Hashable]) -> None:
        """(worker thread) Hash written batches in order (see :meth:`PartialBlob.hash`)."""
        for batch, prefix, _ in work:
            self._blob.hash(batch, prefix)

    async def _in_thread(self, fn: Callable[..., None], *args: object) -> None:
        """``fn(*args)`` on the partial file in a worker thread, its errors said plainly."""
        try:
            await trio.to_thread.run_sync(fn, *args)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(
                    f"download {self.url}: the disk holding {self.partial.parent} filled "
                    "up; free space and pull again (the partial is kept)"
                ) from None
            raise DownloadError(f"download {self.url}: writing {self.partial}: {exc}") from None

    def _written(self, batch: list[tuple[int, memoryview]]) -> None:
        """Mark a written batch done: peers may read it, the next record includes it."""
        written = 0
        for pos, data in batch:
            self.done.add(pos, pos + len(data))
            written += len(data)
            if self.on_landed is not None:
                self.on_landed(pos, len(data))
        self.bytes_fetched += written
        self._count("origin", written)
        self._wrote(written)
        self._report()

    def _wrote(self, n: int) -> None:
        """Count bytes written since the last record; past ``checkpoint_bytes``, wake the
        checkpoint task (the writer never waits for a record)."""
        self._unsaved += n
        if self._unsaved >= self.cfg.checkpoint_bytes:
            self._dirty.set()

    def _count(self, source: str, n: int) -> None:
        """Account ``n`` bytes to ``source`` (``"origin"`` or a peer id): per fetch, and in
        ``/metrics`` by kind."""
        if n <= 0:
            return
        self.sources[source] = self.sources.get(source, 0) + n
        metrics.DOWNLOAD_SOURCE_BYTES.labels("origin" if source == "origin" else "peer").inc(n)

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(
                Progress(
                    self.url,
                    self.done.total,
                    self.size,
                    self.connections,
                    self.retries,
                    0.0,
                    self.peak_connections,
                    dict(self.sources),
                )
            )

    # -- resume state ------------------------------------------------------------------------

    def _save(self, done: list[list[int]] | None = None) -> None:
        """Record completed ranges (``done``: a snapshot taken before the call, see
        :meth:`PartialBlob.save`); the data they name is made durable first."""
        if self.size is not None:
            self._blob.save(self.size, self.sha256, done)

    async def _save_async(self) -> None:
        async with self._save_lock:
            if not self._blob.is_open:
                return
            # The snapshot is taken here, on the event loop where the writer marks ranges done,
            # before the fdatasync that makes exactly those ranges durable.
            done = self.done.to_json()
            self._unsaved = 0
            try:
                await trio.to_thread.run_sync(self._save, done)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DiskFull(
                        f"download {self.url}: the disk holding {self.partial.parent} filled up; "
                        "free space and pull again (the partial is kept)"
                    ) from None
                # Not fatal: the download goes on, a restart would resume from an older save.
                log.warning("download %s: cannot save its progress: %s", self.url, exc)

    async def _checkpoints(self) -> None:
        """Save the completed ranges once ``checkpoint_bytes`` were written, and at least every
        ``checkpoint_seconds`` (and see ``_worker``). One record at a time: on a slow disk they
        run back to back, each covering what was written during the one before."""
        while True:
            with trio.move_on_after(self.cfg.checkpoint_seconds):
                await self._dirty.wait()
            self._dirty = trio.Event()  # replaced only here: this task is its one waiter
            await self._save_async()

    def _discard(self) -> None:
        self._blob.discard()

    def _finish(self) -> Path:
        """Verify the digest, then rename the blob into place."""
        size = self.size if self.size is not None else self.done.total
        self.sha256 = self._blob.finish(size, self.sha256)
        return self.dest


__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_REDIRECTS",
    "Auth",
    "BadReply",
    "BlobFetch",
    "DiskFull",
    "DownloadError",
    "FetchConfig",
    "Progress",
    "Refused",
    "TooLarge",
    "content_length",
    "describe_http_error",
    "first_error",
    "no_auth",
    "read_capped",
]
