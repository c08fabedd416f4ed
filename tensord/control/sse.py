"""The events stream's wire format, ``text/event-stream`` (Server-Sent Events), sans-I/O.

:class:`SSEParser` turns bytes, however they are split, into the messages and comments the
WHATWG rules say they are; :class:`EventQueue` turns those into the daemon's events as dicts
and notices the ``: subscribed`` comment that says the subscription is live. No sockets here,
so both clients' streams (blocking and async, in :mod:`tensord.control.client`) share them
and the tests feed them byte strings.
"""

from __future__ import annotations

import json
import re
from collections import deque
from typing import Any, NamedTuple

from ..errors import ControlError

Json = dict[str, Any]


class SSEMessage(NamedTuple):
    """One dispatched event: its ``event:`` type (``message`` if none) and its joined data."""

    event: str
    data: str
    id: str | None = None


class SSEComment(NamedTuple):
    """A ``:`` line: the daemon's ``: subscribed`` and ``: keep-alive``."""

    text: str


_EOL = re.compile(rb"\r\n|\r|\n")


class SSEParser:
    """Incremental ``text/event-stream`` parser (the WHATWG rules): feed it bytes as they come,
    get back the messages and comments completed so far. Pure, so it is tested on byte strings.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._skip_lf = False  # the last chunk ended in "\r": a "\n" starting the next is its pair
        self._first = True
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, chunk: bytes) -> list[SSEMessage | SSEComment]:
        out: list[SSEMessage | SSEComment] = []
        if not chunk:
            return out
        if self._skip_lf:
            self._skip_lf = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        buf = self._buf + chunk
        start = 0
        for m in _EOL.finditer(buf):
            if m.group() == b"\r" and m.end() == len(buf):
                self._skip_lf = True
            self._line(buf[start : m.start()], out)
            start = m.end()
        self._buf = buf[start:]
        return out

    def _line(self, raw: bytes, out: list[SSEMessage | SSEComment]) -> None:
        line = raw.decode("utf-8", "replace")
        if self._first:
            self._first = False
            line = line.removeprefix("\ufeff")
        if not line:
            if self._data:
                out.append(SSEMessage(self._event or "message", "\n".join(self._data), self._id))
            self._event, self._data = "", []
            return
        if line.startswith(":"):
            out.append(SSEComment(line[1:].removeprefix(" ")))
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        # "retry" and unknown fields are ignored, as the standard says.


def event_dict(message: SSEMessage) -> Json:
    """A node event as a dict: the message's JSON data, with ``kind`` from ``event:`` if absent."""
    try:
        doc = json.loads(message.data)
    except ValueError as exc:
        raise ControlError(
            f"the events stream sent data that is not JSON: {exc}", code="protocol"
        ) from None
    if not isinstance(doc, dict):
        doc = {"data": doc}
    doc.setdefault("kind", message.event)
    return doc


class EventQueue:
    """The parser plus the events it produced that were not consumed yet, and whether the
    daemon has said ``: subscribed``."""

    def __init__(self) -> None:
        self.parser = SSEParser()
        self.events: deque[Json] = deque()
        self.subscribed = False

    def feed(self, chunk: bytes) -> None:
        for item in self.parser.feed(chunk):
            if isinstance(item, SSEComment):
                if item.text == "subscribed":
                    self.subscribed = True
            else:
                self.events.append(event_dict(item))


__all__ = ["EventQueue", "SSEComment", "SSEMessage", "SSEParser", "event_dict"]
