"""A stateful fuzzer for the blob fetcher against a real loopback server that lies.

Hypothesis drives a :class:`~tests.support.lying_http.LyingServer` whose every answer is drawn
from edge values: wrong ``Content-Length`` (missing, short, long, garbage, huge), ``200`` to a
range, ``Content-Range`` starting or ending elsewhere than asked or past the total, totals that
disagree with the promised size or are huge, truncated bodies, extra bytes, wrong bytes,
``Content-Encoding: gzip``, redirects (loops, to another host) and ``401`` challenges; the lies
start at the first request or only after some honest ones. Downloads run one after the other
into the same directory (what one leaves, the next finds), with the size promised (a manifest)
or not (a plain URL under ``max_bytes``). After every download:

* it ended in a verified blob holding exactly the right bytes, or in a typed
  :class:`~tensord.download.fetch.DownloadError` - nothing else escapes;
* no file in the directory ever exceeded the promised size (checked at every progress report
  and at the end), and a :class:`~tensord.download.fetch.Refused` download left nothing;
* the other host of a redirect never saw the ``Authorization`` meant for the first;
* the process's peak RSS stayed within 64 MiB of where it started;
* and the ``good`` rule, interleaved anywhere, still downloads a verified blob.

Bounded for ``make test`` (a few seconds); ``TENSORD_FUZZ_LONG=1`` (``make chaos``) runs many
more and longer sequences.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tensord.download.fetch import BlobFetch, DownloadError, FetchConfig, Refused

from .support.lying_http import Handler, Reply, Request, lying_servers

KiB = 1 << 10
MiB = 1 << 20
LONG = bool(os.environ.get("TENSORD_FUZZ_LONG"))
TOKEN = "Bearer fuzz-secret"


@dataclass(frozen=True)
class Lie:
    """How the server answers a request (from request number ``after`` on; before, honestly)."""

    after: int
    status: str  # "206" | "200" | "416" | "500" | "redirect-loop" | "redirect-away" | "401"
    start_delta: int
    end_delta: int
    total: str  # "true" | "star" | "plus1" | "minus1" | "huge" | "absent"
    length: str  # "true" | "absent" | "plus1" | "minus1" | "huge" | "garbage"
    body: str  # "exact" | "short" | "extra" | "wrong" | "empty"
    gzip: bool


_VALUES: dict[str, list[object]] = {
    "after": [0, 1, 2, 3],
    "status": ["206", "200", "416", "500", "redirect-loop", "redirect-away", "401"],
    "start_delta": [0, -1, 1, 4096],
    "end_delta": [0, -1, 1, 1000, 1 << 40],
    "total": ["true", "star", "plus1", "minus1", "huge", "absent"],
    "length": ["true", "absent", "plus1", "minus1", "huge", "garbage"],
    "body": ["exact", "short", "extra", "wrong", "empty"],
    "gzip": [False, True],
}
#: Every field honest: a lie is one (or more) fields away from this.
_TRUTH = Lie(0, "206", 0, 0, "true", "true", "exact", False)

#: Half the cases tell one lie (the field and its value drawn), half draw every field: single
#: lies find a missing check quickly, combinations find checks that mask each other.


def _one_lie(name: str) -> st.SearchStrategy[Lie]:
    def build(value: object, after: int) -> Lie:
        return Lie(**(_TRUTH.__dict__ | {name: value, "after": after}))

    return st.builds(build, st.sampled_from(_VALUES[name][1:]), st.sampled_from(_VALUES["after"]))


lies = st.one_of(
    st.sampled_from(sorted(set(_VALUES) - {"after"})).flatmap(_one_lie),
    st.builds(Lie, **{k: st.sampled_from(v) for k, v in _VALUES.items()}),  # type: ignore[arg-type]
)


def liar(data: bytes, lie: Lie, away: list[str]) -> tuple[Handler, Handler]:
    """The main server's handler and the other host's (an honest server recording what
    ``Authorization`` it was sent)."""
    size = len(data)
    count = [0]

    def honest_reply(req: Request) -> Reply:
        rng = req.range
        if rng is None:
            return Reply(200, [("Content-Length", str(size))], data)
        start, end = rng
        end = size - 1 if end is None else min(end, size - 1)
        if start >= size:
            return Reply(416, [("Content-Range", f"bytes */{size}"), ("Content-Length", "0")])
        body = data[start : end + 1]
        headers = [("Content-Range", f"bytes {start}-{end}/{size}")]
        return Reply(206, [*headers, ("Content-Length", str(len(body)))], body)

    def other(req: Request) -> Reply:
        away.append(req.headers.get("authorization", "-"))
        return honest_reply(req)

    def handler(req: Request) -> Reply:
        n = count[0]
        count[0] += 1
        if n < lie.after:
            return honest_reply(req)
        if lie.status == "redirect-loop":
            return Reply(302, [("Location", req.path), ("Content-Length", "0")])
        if lie.status == "redirect-away":
            return Reply(307, [("Location", away[0] + "/elsewhere"), ("Content-Length", "0")])
        if lie.status == "401":
            challenge = 'Bearer realm="http://127.0.0.1:1/token",service="x"'
            return Reply(401, [("WWW-Authenticate", challenge), ("Content-Length", "0")])
        if lie.status in ("416", "500"):
            return Reply(int(lie.status), [("Content-Length", "0")])
        rng = req.range or (0, None)
        start = max(0, rng[0] + lie.start_delta)
        asked_end = size - 1 if rng[1] is None else rng[1]
        end = max(start, asked_end + lie.end_delta)
        if lie.status == "200":
            start, end = 0, size - 1
        body = data[start : end + 1]
        declared = end - start + 1
        extra = 0
        if lie.body == "short":
            body = body[: len(body) // 2]
        elif lie.body == "extra":
            extra = 64 * KiB
        elif lie.body == "wrong":
            body = bytes(b ^ 0xFF for b in body[:16]) + body[16:]
        elif lie.body == "empty":
            body = b""
        # A lying end is backed by real bytes, so the fetcher has something to (not) write.
        if len(body) < declared and lie.body == "exact":
            extra += min(declared - len(body), 2 * MiB)
        headers: list[tuple[str, str]] = []
        total = {
            "true": str(size),
            "star": "*",
            "plus1": str(size + 1),
            "minus1": str(max(0, size - 1)),
            "huge": str(1 << 62),
            "absent": "",
        }[lie.total]
        if lie.status == "206" and lie.total != "absent":
            headers.append(("Content-Range", f"bytes {start}-{end}/{total}"))
        length = {
            "true": str(declared),
            "absent": None,
            "plus1": str(declared + 1),
            "minus1": str(max(0, declared - 1)),
            "huge": str(1 << 62),
            "garbage": "12abc",
        }[lie.length]
        if length is not None:
            headers.append(("Content-Length", length))
        if lie.gzip:
            headers.append(("Content-Encoding", "gzip"))
        return Reply(200 if lie.status == "200" else 206, headers, body, extra=extra)

    return handler, other


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KiB


class HostileDownloads(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="tensord-fuzz-"))
        self.rss0 = _rss()
        self.data = b""
        self.good_runs = 0

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(
        size=st.sampled_from([0, 1, 1000, 64 * KiB - 1, 64 * KiB, 200 * KiB + 3]),
        seed=st.integers(0, 3),
    )
    def new_blob(self, size: int, seed: int) -> None:
        """The blob the next downloads are for (the directory keeps what earlier ones left)."""
        self.data = hashlib.sha256(bytes([seed])).digest() * (size // 32 + 1)
        self.data = self.data[:size]

    @rule(lie=lies, promised=st.booleans())
    def hostile(self, lie: Lie, promised: bool) -> None:
        self._check(lie, promised)

    @rule()
    def good(self) -> None:
        """An honest server: whatever came before, the blob arrives verified."""
        self._check(None, True)

    @invariant()
    def rss_bounded(self) -> None:
        assert _rss() - self.rss0 < 64 * MiB

    def _check(self, lie: Lie | None, promised: bool) -> None:
        data = self.data
        sha = hashlib.sha256(data).hexdigest()
        dest = self.dir / f"blob-{sha[:12]}"
        dest.unlink(missing_ok=True)  # a verified blob from an earlier case is not a result
        ceiling = len(data) if promised else max(len(data), 1) * 2
        away: list[str] = []
        biggest = [0]

        def sizes() -> None:
            for p in self.dir.iterdir():
                if p.name.startswith(dest.name) and not p.name.endswith(".json"):
                    biggest[0] = max(biggest[0], p.stat().st_size)

        error = trio.run(self._download, dest, lie, promised, ceiling, away, sizes)
        sizes()
        assert biggest[0] <= ceiling, (biggest[0], ceiling, lie)
        assert all(h == "-" for h in away[1:]), ("credentials sent away", away, lie)
        if error is None:
            assert dest.read_bytes() == data, lie
            return
        assert lie is not None, f"an honest server failed: {error!r}"
        assert str(error).strip() and not str(error).rstrip().endswith(":"), error
        assert not dest.exists()
        if isinstance(error, Refused):
            left = [p.name for p in self.dir.iterdir() if p.name.startswith(dest.name)]
            assert left == [], (left, error)

    async def _download(
        self,
        dest: Path,
        lie: Lie | None,
        promised: bool,
        ceiling: int,
        away: list[str],
        sizes: Callable[[], None],
    ) -> DownloadError | None:
        """One download; a typed error is returned, anything else escapes (and fails)."""
        data = self.data
        honest = Lie(1 << 30, "206", 0, 0, "true", "true", "exact", False)
        main, other = liar(data, lie or honest, away)

        async def auth(url: str, challenge: str | None) -> dict[str, str]:
            if challenge is not None:
                raise DownloadError(f"{url}: asks for authentication")
            return {"Authorization": TOKEN}

        cfg = FetchConfig(
            connections=3,
            min_piece=16 * KiB,
            chunk=16 * KiB,
            retries=2,
            backoff_base=0.001,
            backoff_max=0.005,
            checkpoint_seconds=0.05,
            max_bytes=ceiling,
        )
        async with lying_servers(main, other) as (server, elsewhere):
            away.insert(0, f"http://{elsewhere.host}")
            async with httpx.AsyncClient(timeout=10) as client:
                fetch = BlobFetch(
                    client,
                    server.url("/blob"),
                    dest,
                    size=len(data) if promised else None,
                    sha256=hashlib.sha256(data).hexdigest(),
                    auth=auth,
                    config=cfg,
                    progress=lambda p: sizes(),
                )
                with trio.fail_after(30):
                    try:
                        await fetch.run()
                    except DownloadError as exc:
                        return exc
        return None


HostileDownloads.TestCase.settings = settings(
    max_examples=300 if LONG else 12,
    stateful_step_count=25 if LONG else 8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    derandomize=not LONG,
)
test_hostile_download_servers = HostileDownloads.TestCase
