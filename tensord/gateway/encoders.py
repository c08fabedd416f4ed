"""Sans-I/O pieces of the token gateway: splitting a byte stream into lines (NDJSON objects, SSE
fields) and SSE framing.

No sockets and no trio here (the h11 pattern): bytes or dicts in, bytes out, so the relay's
framing is tested without a network and property-tested for arbitrary splits.
"""

from __future__ import annotations

import json
import re
from typing import Any

Json = dict[str, Any]

#: OpenAI's finish reasons; anything else a backend says becomes "stop".
FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})


class LineSplitter:
    """Bytes in, complete lines out (without the newline); a partial line waits for the rest."""

    def __init__(self, max_line: int = 1 << 20) -> None:
        self._buf = bytearray()
        self.max_line = max_line

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        if b"\n" not in data:
            if len(self._buf) > self.max_line:
                raise ValueError(f"a line longer than {self.max_line} bytes")
            return []
        *lines, rest = self._buf.split(b"\n")
        self._buf = bytearray(rest)
        return [bytes(line).rstrip(b"\r") for line in lines]

    def feed_through(self, data: bytes) -> tuple[list[bytes], bytes]:
        """As :meth:`feed`, and the complete lines' bytes as they came (newlines included), to
        pass on without re-framing: ``data`` itself when it holds only complete lines."""
        if not self._buf and data.endswith(b"\n"):
            return [line.rstrip(b"\r") for line in data[:-1].split(b"\n")], data
        lines = self.feed(data)
        return lines, b"".join(line + b"\n" for line in lines)

    def close(self) -> list[bytes]:
        """The last line, if the stream did not end with a newline."""
        rest, self._buf = bytes(self._buf), bytearray()
        return [rest] if rest.strip() else []


def sse(data: Json | str) -> bytes:
    """One Server-Sent Event carrying ``data`` (a JSON object, or a literal like ``[DONE]``)."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


KEEPALIVE = b": keep-alive\n\n"


#: What one line of a backend's stream is (:func:`line_kind`).
TOKEN, ERROR, OTHER = "token", "error", "other"

#: The fields that carry generated output in a message (Ollama's ``message``, OpenAI's ``delta``).
_OUTPUT_FIELDS = ("content", "thinking", "reasoning", "tool_calls")


# A JSON string without escapes, and a JSON integer: enough to recognise a token line in the two
# shapes backends write on every token (Ollama's /api/chat object, OpenAI's chunk as Ollama
# writes it) without parsing it - a line these match is a JSON object carrying non-empty content
# and nothing else, so it is a TOKEN. Any other line (escapes in a string, more fields, another
# order) is parsed as JSON: the answer is the same, only slower.
_STR = rb'"[^"\\\x00-\x1f]*"'
_INT = rb"(?:0|[1-9][0-9]{0,18})"
_CONTENT = rb'"content":"[^"\\\x00-\x1f]+"'
_OLLAMA_CHAT_TOKEN = re.compile(
    rb'\{"model":' + _STR + rb',"created_at":' + _STR + rb',"message":\{"role":"assistant",'
    + _CONTENT + rb'\},"done":false\}'
)  # fmt: skip
_OPENAI_CHUNK_TOKEN = re.compile(
    rb'\{"id":' + _STR + rb',"object":"chat\.completion\.chunk","created":' + _INT
    + rb',"model":' + _STR + rb',"system_fingerprint":' + _STR + rb',"choices":\[\{"index":'
    + _INT + rb',"delta":\{"role":"assistant",' + _CONTENT + rb'\},"finish_reason":null\}\]\}'
)  # fmt: skip


def line_kind(line: bytes, sse: bool) -> str:
    """Classify one line of a backend's stream (NDJSON, or SSE when ``sse``).

    ``TOKEN``: it carries generated output (content, thinking, tool calls) - one token chunk as
    the client sees it. ``ERROR``: an error object (Ollama writes ``{"error": ...}`` when a
    generation fails mid-way). ``OTHER``: everything else - blank lines, SSE comments and other
    fields, ``data: [DONE]``, the final metrics object, OpenAI's closing chunk with only a
    ``finish_reason``, the usage chunk, and anything that is not a JSON object (relayed all the
    same: the gateway counts, it does not validate).
    """
    if sse:
        if not line.startswith(b"data:"):
            return OTHER
        line = line[5:].strip()
        if line == b"[DONE]":
            return OTHER
        if _OPENAI_CHUNK_TOKEN.fullmatch(line):
            return TOKEN
    elif _OLLAMA_CHAT_TOKEN.fullmatch(line):
        return TOKEN
    elif not line.strip():
        return OTHER
    try:
        obj = json.loads(line.decode())  # a str: json's encoding detection costs as much
    except ValueError:
        return OTHER
    if not isinstance(obj, dict):
        return OTHER
    if "error" in obj:
        return ERROR
    return TOKEN if carries_output(obj) else OTHER


def carries_output(obj: Json) -> bool:
    """Whether a stream object (Ollama chat/generate, OpenAI chat/completion chunk) carries
    generated output."""
    message = obj.get("message")  # /api/chat
    if isinstance(message, dict):
        return _has_output(message)
    if obj.get("response") or obj.get("thinking"):  # /api/generate
        return True
    choices = obj.get("choices")  # /v1/chat/completions, /v1/completions
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict):
                delta = choice.get("delta")
                if (isinstance(delta, dict) and _has_output(delta)) or choice.get("text"):
                    return True
    return False


def _has_output(message: Json) -> bool:
    return any(message.get(k) for k in _OUTPUT_FIELDS)


def reply_tokens(body: bytes) -> int:
    """The completion tokens a whole (non-streamed) reply reports: Ollama's ``eval_count`` or
    OpenAI's ``usage.completion_tokens``; 0 when it reports none."""
    try:
        obj = json.loads(body)
    except ValueError:
        return 0
    if not isinstance(obj, dict):
        return 0
    usage = obj.get("usage")
    count = usage.get("completion_tokens") if isinstance(usage, dict) else obj.get("eval_count")
    return count if isinstance(count, int) and not isinstance(count, bool) else 0


def finish_reason(done_reason: object) -> str:
    return done_reason if isinstance(done_reason, str) and done_reason in FINISH_REASONS else "stop"


def openai_error(message: str, kind: str = "server_error", code: str | None = None) -> Json:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


__all__ = [
    "ERROR",
    "FINISH_REASONS",
    "KEEPALIVE",
    "OTHER",
    "TOKEN",
    "LineSplitter",
    "carries_output",
    "finish_reason",
    "line_kind",
    "openai_error",
    "reply_tokens",
    "sse",
]
