"""An Ollama-compatible token server that stands in for a real Ollama node.

Why: the token-streaming gateway has to be tested (and benchmarked) against Ollama's real wire
formats and timing, without a GPU or a model. This server speaks Ollama 0.5's native API (NDJSON
streams) and its OpenAI-compatible API (SSE streams) over HTTP/1.1, built directly on trio and h11
so that every token is written to the socket the moment it is produced: one task per connection,
keep-alive, chunked transfer encoding, no buffering anywhere. It can be told to be slow, to fail
before the first token or to die mid-stream, and it notices within milliseconds when a client
abandons a stream, because it watches the socket for EOF while it waits for the next token.

The formats follow Ollama's ``api/types.go``, ``server/routes.go`` and ``openai/openai.go`` as of
0.5.x: field order as Go's ``encoding/json`` writes struct fields, zero metrics omitted
(``omitempty``), ``created_at`` in RFC 3339 with nanoseconds, Go's HTML escaping of ``<``, ``>`` and
``&``, native bodies without a trailing newline (gin's ``c.JSON``) and OpenAI bodies with one
(``json.Encoder``).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.utils import formatdate
from enum import Enum
from http import HTTPStatus
from typing import Any

import h11
import trio

__all__ = ["BackendConfig", "OllamaBackend", "ollama_backend"]

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
GIN_JSON = "application/json; charset=utf-8"  # gin's c.JSON, the native API's plain replies
OPENAI_JSON = "application/json"  # the OpenAI middleware sets this itself
TEXT = "text/plain; charset=utf-8"

CHAT = "/api/chat"
GENERATE = "/api/generate"
OPENAI_CHAT = "/v1/chat/completions"
OPENAI_COMPLETIONS = "/v1/completions"
GENERATION_PATHS = frozenset({CHAT, GENERATE, OPENAI_CHAT, OPENAI_COMPLETIONS})

KEEP_ALIVE_NS = 5 * 60 * 1_000_000_000  # Ollama keeps a model loaded 5 minutes after last use
MODIFIED_AT_NS = 1_736_000_000_123_456_789  # a fixed "pulled at" time, so listings are stable
RECV_SIZE = 65536
MAX_BODY = 16 * 1024 * 1024


@dataclass
class BackendConfig:
    """How the simulated model behaves; every knob a gateway test needs to provoke."""

    models: list[str] = field(default_factory=lambda: ["tiny:latest"])
    tokens: list[str] | None = None  # default: "tok0 ", "tok1 ", ... (n_tokens of them)
    n_tokens: int = 20
    interval: float = 0.02  # seconds between tokens (0 = as fast as possible)
    first_token_delay: float = 0.0  # "prompt evaluation": seconds before the first token
    fail_before_first: int | None = None  # answer generation requests with this HTTP status
    # Close the connection abruptly after this many tokens, when the next one is due (0: during
    # "prompt evaluation", after first_token_delay, before any response byte).
    die_after: int | None = None
    version: str = "0.5.7"

    def token_list(self) -> list[str]:
        """The tokens one reply is made of."""
        if self.tokens is not None:
            return list(self.tokens)
        return [f"tok{i} " for i in range(self.n_tokens)]


class _Outcome(Enum):
    """How a generation ended, returned rather than raised so no nursery wraps it in a group."""

    DONE = "done"
    GONE = "gone"  # the client went away
    DIED = "died"  # die_after: we hung up on purpose


@dataclass
class _Job:
    """One generation request, resolved: what to produce and in which wire format."""

    path: str
    model: str  # as the client spelt it: Ollama echoes the request's name back
    stream: bool
    tokens: list[str]
    done_reason: str
    prompt_count: int
    include_usage: bool = False
    load_only: bool = False  # empty prompt/messages: Ollama just loads the model
    oid: str = ""
    received: float = 0.0  # trio time the request was complete: total_duration starts here


@dataclass
class _Metrics:
    """Ollama's api.Metrics, in its field order; durations are nanoseconds."""

    total_duration: int = 0
    load_duration: int = 0
    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0
    eval_count: int = 0
    eval_duration: int = 0

    def fields(self) -> dict[str, int]:
        """The fields as Go writes them: zero values are omitted (``omitempty``)."""
        return {k: v for k, v in vars(self).items() if v}

    def usage(self) -> dict[str, int]:
        """The OpenAI usage object Ollama derives from the same counts."""
        return {
            "prompt_tokens": self.prompt_eval_count,
            "completion_tokens": self.eval_count,
            "total_tokens": self.prompt_eval_count + self.eval_count,
        }


class _Peer:
    """Set by the EOF watcher, so the producer knows why it was cancelled."""

    gone = False


_GO_ESCAPES = (
    ("<", "\\u003c"),
    (">", "\\u003e"),
    ("&", "\\u0026"),
    ("\u2028", "\\u2028"),
    ("\u2029", "\\u2029"),
)


def go_json(value: Any) -> bytes:
    """JSON as Go's encoding/json writes it: compact, UTF-8, HTML-escaped."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for raw, escaped in _GO_ESCAPES:
        text = text.replace(raw, escaped)
    return text.encode("utf-8", "surrogatepass")


def go_time(ns: int) -> str:
    """A UTC time as Go's RFC 3339 with nanoseconds prints it (trailing zeros trimmed)."""
    seconds, frac = divmod(ns, 1_000_000_000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    return text + "Z"


def model_key(name: str) -> str:
    """Ollama's name resolution: a name without a tag means ``:latest``."""
    if ":" in name.rsplit("/", 1)[-1]:
        return name
    return name + ":latest"


def _words(value: Any) -> int:
    """Prompt "tokens": whitespace-separated words, in plain or OpenAI multi-part content."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(part.get("text") if isinstance(part, dict) else part) for part in value)
    return 0


def _limit(value: Any) -> int | None:
    """num_predict / max_tokens: a positive integer caps the reply; anything else does not."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return int(value)
    return None


def _model_entry(name: str) -> dict[str, Any]:
    """A fake but stable /api/tags entry (the digest is derived from the name)."""
    digest = hashlib.sha256(name.encode()).hexdigest()
    return {
        "name": name,
        "model": name,
        "modified_at": go_time(MODIFIED_AT_NS),
        "size": 500_000_000 + int(digest[:6], 16),
        "digest": digest,
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "1.2B",
            "quantization_level": "Q4_K_M",
        },
    }


def _ns(seconds: float) -> int:
    """A duration in Ollama's unit, never zero (zero would vanish under omitempty)."""
    return max(1, round(seconds * 1e9))


def _out(conn: h11.Connection, event: h11.Event) -> bytes:
    """Bytes h11 wants written for ``event`` (None only for ConnectionClosed)."""
    return conn.send(event) or b""


def _reason(status: int) -> str:
    """The reason phrase Go's net/http puts on the status line ("200 OK")."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _http_date() -> str:
    """The Date header Go's net/http adds to every response."""
    return formatdate(usegmt=True)


class OllamaBackend:
    """A fake Ollama node on 127.0.0.1, with counters that tests assert on."""

    def __init__(self, config: BackendConfig | None = None) -> None:
        self.config = config if config is not None else BackendConfig()
        self.port = 0
        self.requests: list[dict[str, Any]] = []  # every generation request: path, body, headers
        self.in_flight = 0  # generations being produced right now
        self.cancelled = 0  # generations stopped because the client went away
        self.completed = 0  # generations that ran to their final object
        self.connections = 0  # TCP connections accepted (keep-alive makes this small)
        self.cancelled_event = trio.Event()  # set at the first cancellation; tests may replace it
        self._changed = trio.Event()
        self._loaded: dict[str, int] = {}  # model -> last use (ns), for /api/ps
        self._scope: trio.CancelScope | None = None
        self._stopped = False

    @property
    def url(self) -> str:
        """Base URL, as a gateway's cluster file would name this node."""
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on an ephemeral loopback port and serve until stop() or cancellation."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        with trio.CancelScope() as scope:
            self._scope = scope
            if self._stopped:
                scope.cancel()
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._serve_connection, listeners)
                task_status.started()

    def stop(self) -> None:
        """Stop listening and drop every connection (streams end mid-way, like a killed node)."""
        self._stopped = True
        if self._scope is not None:
            self._scope.cancel()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Block until ``predicate()`` holds; re-checked whenever a counter or list changes."""
        while not predicate():
            await self._changed.wait()

    async def wait_cancelled(self, count: int = 1) -> None:
        """Block until ``count`` generations have been cancelled by departing clients."""
        await self.wait_until(lambda: self.cancelled >= count)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- HTTP/1.1 ----------------------------------------------------------------------------

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        """One connection: requests in sequence over keep-alive, until either side closes."""
        self.connections += 1
        self._notify()
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_BODY)
        async with stream:
            try:
                while True:
                    got = await self._read_request(conn, stream)
                    if got is None:
                        return
                    request, body = got
                    if not await self._respond(conn, stream, request, body):
                        return
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        return
                    conn.start_next_cycle()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def _read_request(
        self, conn: h11.Connection, stream: trio.SocketStream
    ) -> tuple[h11.Request, bytes] | None:
        """The next complete request and its body, or None when the client is done."""
        request: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                await self._bad_request(conn, stream, exc)
                return None
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    response = h11.InformationalResponse(
                        status_code=100, headers=[], reason="Continue"
                    )
                    await stream.send_all(_out(conn, response))
                data = await stream.receive_some(RECV_SIZE)
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    return None
            elif isinstance(event, h11.EndOfMessage) and request is not None:
                return request, bytes(body)
            else:  # ConnectionClosed, or PAUSED (cannot happen between requests)
                return None

    async def _bad_request(
        self, conn: h11.Connection, stream: trio.SocketStream, exc: h11.RemoteProtocolError
    ) -> None:
        """Answer unparseable HTTP with a plain 400 when h11 still allows a response."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        try:
            body = f"400 Bad Request: {exc}".encode()
            await self._send(conn, stream, exc.error_status_hint, TEXT, body)
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _send(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        status: int,
        content_type: str,
        body: bytes,
        *,
        head: bool = False,
    ) -> None:
        """A whole response with Content-Length (HEAD: the headers only)."""
        headers = [
            ("Content-Type", content_type),
            ("Date", _http_date()),
            ("Content-Length", str(len(body))),
        ]
        response = h11.Response(status_code=status, headers=headers, reason=_reason(status))
        data = _out(conn, response)
        if body and not head:
            data += _out(conn, h11.Data(data=body))
        data += _out(conn, h11.EndOfMessage())
        await stream.send_all(data)

    async def _respond(
        self, conn: h11.Connection, stream: trio.SocketStream, request: h11.Request, body: bytes
    ) -> bool:
        """Route one request; False when the connection must not be reused."""
        method = request.method.decode("ascii", "replace")
        path = request.target.decode("utf-8", "replace").split("?", 1)[0]
        if method == "POST" and path in GENERATION_PATHS:
            return await self._generation(conn, stream, request, path, body)
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            await self._send(conn, stream, 404, TEXT, b"404 page not found")
        elif path == "/":
            await self._send(conn, stream, 200, TEXT, b"Ollama is running", head=head)
        elif path == "/api/tags":
            await self._send(conn, stream, 200, GIN_JSON, go_json(self.tags()), head=head)
        elif path == "/api/version":
            reply = {"version": self.config.version}
            await self._send(conn, stream, 200, GIN_JSON, go_json(reply), head=head)
        elif path == "/api/ps" and not head:
            await self._send(conn, stream, 200, GIN_JSON, go_json(self.ps()))
        elif path == "/v1/models" and not head:
            await self._send(conn, stream, 200, OPENAI_JSON, go_json(self.openai_models()) + b"\n")
        else:
            await self._send(conn, stream, 404, TEXT, b"404 page not found", head=head)
        return True

    # -- listings ----------------------------------------------------------------------------

    def _models(self) -> list[str]:
        return [model_key(m) for m in self.config.models]

    def tags(self) -> dict[str, Any]:
        """GET /api/tags: the models "pulled" on this node."""
        return {"models": [_model_entry(m) for m in self._models()]}

    def ps(self) -> dict[str, Any]:
        """GET /api/ps: models used in the last 5 minutes, as if still loaded."""
        now = time.time_ns()
        models = []
        for name, used in sorted(self._loaded.items(), key=lambda kv: -kv[1]):
            if used + KEEP_ALIVE_NS < now:
                continue
            entry = _model_entry(name)
            models.append(
                {
                    "name": name,
                    "model": name,
                    "size": entry["size"],
                    "digest": entry["digest"],
                    "details": entry["details"],
                    "expires_at": go_time(used + KEEP_ALIVE_NS),
                    "size_vram": entry["size"],
                }
            )
        return {"models": models}

    def openai_models(self) -> dict[str, Any]:
        """GET /v1/models: the same list in OpenAI's shape (owner = the name's namespace)."""
        data = []
        for name in self._models():
            owner = name.split("/")[-2] if "/" in name else "library"
            created = MODIFIED_AT_NS // 1_000_000_000
            data.append({"id": name, "object": "model", "created": created, "owned_by": owner})
        return {"object": "list", "data": data}

    # -- generation --------------------------------------------------------------------------

    async def _error(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        path: str,
        status: int,
        message: str,
        kind: str = "api_error",
    ) -> None:
        """Ollama's {"error": ...}, or on /v1 the OpenAI error object its middleware makes."""
        if path.startswith("/v1/"):
            error = {"message": message, "type": kind, "param": None, "code": None}
            await self._send(conn, stream, status, OPENAI_JSON, go_json({"error": error}) + b"\n")
        else:
            await self._send(conn, stream, status, GIN_JSON, go_json({"error": message}))

    async def _generation(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        request: h11.Request,
        path: str,
        raw: bytes,
    ) -> bool:
        """Validate a generation request as Ollama does, then produce (or refuse) the reply."""
        received = trio.current_time()
        body: Any = None
        problem: str | None = None
        if not raw.strip():
            problem = "EOF" if path.startswith("/v1/") else "missing request body"
        else:
            try:
                body = json.loads(raw)
            except ValueError as exc:
                problem = str(exc)
            else:
                if not isinstance(body, dict):
                    problem = f"json: cannot unmarshal {type(body).__name__} into request object"
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers}
        self.requests.append({"path": path, "body": body, "headers": headers})
        self._notify()
        if problem is not None:
            await self._error(conn, stream, path, 400, problem, "invalid_request_error")
            return True
        assert isinstance(body, dict)
        if path == OPENAI_CHAT and not body.get("messages"):
            message = "[] is too short - 'messages'"
            await self._error(conn, stream, path, 400, message, "invalid_request_error")
            return True
        name = body.get("model")
        if not isinstance(name, str) or not name:
            await self._error(conn, stream, path, 400, "model is required")
            return True
        if model_key(name) not in self._models():
            message = f'model "{name}" not found, try pulling it first'
            await self._error(conn, stream, path, 404, message)
            return True
        status = self.config.fail_before_first
        if status is not None:
            message = f"llama runner process has terminated: simulated failure ({status})"
            await self._error(conn, stream, path, status, message)
            return True
        self._loaded[model_key(name)] = time.time_ns()
        job = self._job(path, name, body)
        job.received = received
        return await self._produce_guarded(conn, stream, job)

    def _job(self, path: str, name: str, body: dict[str, Any]) -> _Job:
        """What this request asks for: the format, the stream flag, the prompt size, the cap."""
        options = body.get("options")
        options = options if isinstance(options, dict) else {}
        if path in (CHAT, OPENAI_CHAT):
            messages = body.get("messages")
            messages = messages if isinstance(messages, list) else []
            prompt = sum(_words(m.get("content")) for m in messages if isinstance(m, dict))
            load_only = not messages
        else:
            prompt_text = body.get("prompt")
            prompt = _words(prompt_text) + _words(body.get("system"))
            load_only = not prompt_text
        if path.startswith("/v1/"):
            stream = body.get("stream") is True  # a Go bool: absent means false
            cap = _limit(body.get("max_tokens"))
            stream_options = body.get("stream_options")
            include_usage = isinstance(stream_options, dict) and bool(
                stream_options.get("include_usage")
            )
            prefix = "chatcmpl" if path == OPENAI_CHAT else "cmpl"
            oid = f"{prefix}-{random.randrange(999)}"
        else:
            stream = body.get("stream") is not False  # a *bool: absent means true
            cap = _limit(options.get("num_predict"))
            include_usage = False
            oid = ""
        tokens = self.config.token_list()
        done_reason = "stop"
        if cap is not None and cap < len(tokens):
            tokens, done_reason = tokens[:cap], "length"
        if load_only:
            tokens, done_reason = [], "load"
        return _Job(
            path=path,
            model=name,
            stream=stream,
            tokens=tokens,
            done_reason=done_reason,
            prompt_count=max(1, prompt) if not load_only else 0,
            include_usage=include_usage,
            load_only=load_only,
            oid=oid,
        )

    async def _produce_guarded(
        self, conn: h11.Connection, stream: trio.SocketStream, job: _Job
    ) -> bool:
        """Produce while a sibling task watches the socket, so a departed client is seen at once.

        Returns whether the connection may carry another request.
        """
        peer = _Peer()
        outcome = _Outcome.GONE
        finished = False

        def finish() -> None:
            # Called just before the final object is written, so that whoever has read it sees
            # the counters already updated. A client leaving during that last write still got
            # a complete generation: it counts as completed, not cancelled.
            nonlocal finished
            finished = True
            self.in_flight -= 1
            self.completed += 1
            self._notify()

        self.in_flight += 1
        self._notify()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_peer, conn, stream, peer, nursery.cancel_scope)
                try:
                    outcome = await self._produce(conn, stream, job, finish)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    outcome = _Outcome.GONE  # a send failed: the client is gone
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            if not finished:
                self.in_flight -= 1
                self._notify()
        if peer.gone:
            outcome = _Outcome.GONE
        if outcome is _Outcome.GONE and not finished:
            self.cancelled += 1
            self.cancelled_event.set()
            self._notify()
        return outcome is _Outcome.DONE

    async def _watch_peer(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        peer: _Peer,
        scope: trio.CancelScope,
    ) -> None:
        """Read while we write: EOF or a reset means the client left; cancel the generation.

        Anything the client sends meanwhile (a pipelined request) is handed to h11 untouched.
        """
        while True:
            try:
                data = await stream.receive_some(RECV_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                peer.gone = True
                scope.cancel()
                return
            conn.receive_data(data)

    def _should_die(self, emitted: int) -> bool:
        return self.config.die_after is not None and emitted >= self.config.die_after

    async def _produce(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        job: _Job,
        finish: Callable[[], None],
    ) -> _Outcome:
        """Emit the tokens on schedule, each flushed to the socket as its own chunk."""
        cfg = self.config
        started = trio.current_time()
        deadline = started + cfg.first_token_delay
        first: float | None = None
        text: list[str] = []
        # The response head goes out with the first token, as Go's net/http does: a failure
        # before then could still have been a different status.
        head: bytes | None = None
        if job.stream and not (job.load_only and not job.path.startswith("/v1/")):
            response = h11.Response(
                status_code=200,
                headers=[("Content-Type", _stream_type(job)), ("Date", _http_date())],
                reason="OK",
            )
            head = _out(conn, response)
        for i, token in enumerate(job.tokens):
            await trio.sleep_until(deadline)
            if self._should_die(i):
                return _Outcome.DIED
            now = trio.current_time()
            if first is None:
                first = now
            # The next token is due one interval after this one was: no drift from sleep
            # overshoot, and no burst after a stall (a slow reader) either.
            deadline = max(deadline + cfg.interval, now)
            text.append(token)
            if head is not None:
                data = _out(conn, h11.Data(data=_piece(job, token)))
                await stream.send_all(head + data)
                head = b""
        if self._should_die(len(job.tokens)):
            return _Outcome.DIED
        end = trio.current_time()
        metrics = _Metrics()
        if not job.load_only:
            first = end if first is None else first
            load = _ns(started - job.received)
            prompt_eval = _ns(first - started)
            evaluation = _ns(end - first)
            metrics = _Metrics(
                total_duration=max(_ns(end - job.received), load + prompt_eval + evaluation),
                load_duration=load,
                prompt_eval_count=job.prompt_count,
                prompt_eval_duration=prompt_eval,
                eval_count=len(job.tokens),
                eval_duration=evaluation,
            )
        reply = "".join(text)
        finish()
        if head is not None:
            data = head + _out(conn, h11.Data(data=_ending(job, metrics)))
            await stream.send_all(data + _out(conn, h11.EndOfMessage()))
        else:
            content_type = OPENAI_JSON if job.path.startswith("/v1/") else GIN_JSON
            await self._send(conn, stream, 200, content_type, _whole(job, metrics, reply))
        return _Outcome.DONE


# -- wire formats ------------------------------------------------------------------------------


def _stream_type(job: _Job) -> str:
    return SSE if job.path.startswith("/v1/") else NDJSON


def _sse(obj: Any) -> bytes:
    return b"data: " + go_json(obj) + b"\n\n"


def _now_created() -> tuple[str, int]:
    ns = time.time_ns()
    return go_time(ns), ns // 1_000_000_000


def _openai_chat(job: _Job, created: int, choices: list[Any]) -> dict[str, Any]:
    return {
        "id": job.oid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": job.model,
        "system_fingerprint": "fp_ollama",
        "choices": choices,
    }


def _openai_text(job: _Job, created: int, choices: list[Any]) -> dict[str, Any]:
    return {
        "id": job.oid,
        "object": "text_completion",
        "created": created,
        "choices": choices,
        "model": job.model,
        "system_fingerprint": "fp_ollama",
    }


def _native(job: _Job, piece: str, metrics: _Metrics | None) -> dict[str, Any]:
    """One api.ChatResponse / api.GenerateResponse; ``metrics`` only on the final one."""
    created_at, _ = _now_created()
    obj: dict[str, Any] = {"model": job.model, "created_at": created_at}
    if job.path == CHAT:
        obj["message"] = {"role": "assistant", "content": piece}
        if metrics is not None:
            obj["done_reason"] = job.done_reason
        obj["done"] = metrics is not None
    else:
        obj["response"] = piece
        obj["done"] = metrics is not None
        if metrics is not None:
            obj["done_reason"] = job.done_reason
            if not job.load_only:  # the token ids of prompt and reply, for the next turn
                obj["context"] = list(range(100, 100 + job.prompt_count + metrics.eval_count))
    if metrics is not None:
        obj.update(metrics.fields())
    return obj


def _piece(job: _Job, token: str) -> bytes:
    """The stream element carrying one token."""
    _, created = _now_created()
    if job.path == OPENAI_CHAT:
        delta = {"role": "assistant", "content": token}
        choice = {"index": 0, "delta": delta, "finish_reason": None}
        return _sse(_openai_chat(job, created, [choice]))
    if job.path == OPENAI_COMPLETIONS:
        obj = _openai_text(job, created, [{"text": token, "index": 0, "finish_reason": None}])
        if job.include_usage:
            obj["usage"] = _Metrics().usage()  # Ollama puts a zero usage on every chunk
        return _sse(obj)
    return go_json(_native(job, token, None)) + b"\n"


def _ending(job: _Job, metrics: _Metrics) -> bytes:
    """The end of a stream: the done object, then (OpenAI) the usage chunk and [DONE]."""
    _, created = _now_created()
    if job.path == OPENAI_CHAT:
        delta = {"role": "assistant", "content": ""}
        choice = {"index": 0, "delta": delta, "finish_reason": job.done_reason}
        data = _sse(_openai_chat(job, created, [choice]))
        if job.include_usage:
            data += _sse({**_openai_chat(job, created, []), "usage": metrics.usage()})
        return data + b"data: [DONE]\n\n"
    if job.path == OPENAI_COMPLETIONS:
        choice = {"text": "", "index": 0, "finish_reason": job.done_reason}
        obj = _openai_text(job, created, [choice])
        if job.include_usage:
            obj["usage"] = _Metrics().usage()
            data = _sse(obj) + _sse({**obj, "choices": [], "usage": metrics.usage()})
        else:
            data = _sse(obj)
        return data + b"data: [DONE]\n\n"
    return go_json(_native(job, "", metrics)) + b"\n"


def _whole(job: _Job, metrics: _Metrics, reply: str) -> bytes:
    """A non-streamed reply: the final object with the whole text in it."""
    _, created = _now_created()
    if job.path == OPENAI_CHAT:
        message = {"role": "assistant", "content": reply}
        choice = {"index": 0, "message": message, "finish_reason": job.done_reason}
        obj = {**_openai_chat(job, created, [choice]), "object": "chat.completion"}
        obj["usage"] = metrics.usage()
        return go_json(obj) + b"\n"
    if job.path == OPENAI_COMPLETIONS:
        choice = {"text": reply, "index": 0, "finish_reason": job.done_reason}
        obj = {
            "id": job.oid,
            "object": "text_completion",
            "created": created,
            "model": job.model,
            "system_fingerprint": "fp_ollama",
            "choices": [choice],
            "usage": metrics.usage(),
        }
        return go_json(obj) + b"\n"
    return go_json(_native(job, reply, metrics))


@asynccontextmanager
async def ollama_backend(config: BackendConfig | None = None) -> AsyncIterator[OllamaBackend]:
    """A running backend for the duration of the block, stopped (connections dropped) after."""
    backend = OllamaBackend(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        try:
            yield backend
        finally:
            backend.stop()
