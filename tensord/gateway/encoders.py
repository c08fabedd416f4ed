"""Sans-I/O pieces of the token gateway: splitting a byte stream into lines (NDJSON objects, SSE
fields) and SSE framing.

No sockets and no trio here (the h11 pattern): bytes or dicts in, bytes out, so the relay's
framing is tested without a network and property-tested for arbitrary splits.
"""

from __future__ import annotations

import json
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

    def close(self) -> list[bytes]:
        """The last line, if the stream did not end with a newline."""
        rest, self._buf = bytes(self._buf), bytearray()
        return [rest] if rest.strip() else []


def sse(data: Json | str) -> bytes:
    """One Server-Sent Event carrying ``data`` (a JSON object, or a literal like ``[DONE]``)."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


KEEPALIVE = b": keep-alive\n\n"


def finish_reason(done_reason: object) -> str:
    return done_reason if isinstance(done_reason, str) and done_reason in FINISH_REASONS else "stop"


def openai_error(message: str, kind: str = "server_error", code: str | None = None) -> Json:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


__all__ = ["FINISH_REASONS", "KEEPALIVE", "LineSplitter", "finish_reason", "openai_error", "sse"]
