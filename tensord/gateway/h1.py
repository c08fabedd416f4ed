"""Sans-I/O HTTP/1.1 for the gateway: upstream, a request's bytes out and a response's head and
body bytes in (:class:`ResponseReader`); downstream, a client's request head in
(:func:`parse_request_head`) and a reply's framing out (:func:`response_head`, :func:`chunk`).

Why not httpx/httpcore + h11 here: a token is one chunk of a chunked reply, and those layers
spend an event object, a state-machine pass and several awaits on each; this reader turns a
whole socket read (however many tokens it holds) into one ``bytes`` of body in one call. It is
only what a backend's reply needs - a head, then a ``Content-Length``, chunked or
close-delimited body - and every number from the backend is bounded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

#: The largest response head (status line and headers) accepted.
MAX_HEAD = 64 << 10
#: The longest chunk-size line (size, extensions) and trailer line accepted.
MAX_CHUNK_LINE = 4096
#: The largest Content-Length or chunk size accepted (bytes).
MAX_LENGTH = 1 << 40


class ProtocolError(Exception):
    """The backend's reply is not HTTP/1.1 as this reader accepts it."""


@dataclass(frozen=True)
class ResponseHead:
    status: int
    headers: dict[bytes, bytes]  # lower-case names; a repeated header: the last value
    keep_alive: bool  # the connection may carry another request once this reply is read

    def header(self, name: bytes, default: bytes = b"") -> bytes:
        return self.headers.get(name, default)


def request_bytes(method: str, host: str, target: str, body: bytes, content_type: str) -> bytes:
    """One request with its body, ready to write in one send."""
    head = (
        f"{method} {target} HTTP/1.1\r\nhost: {host}\r\naccept: */*\r\n"
        f"user-agent: tensord-gateway\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


# Body framing states.
_HEAD, _SIZE, _DATA, _DATA_END, _TRAILER, _LENGTH, _CLOSE, _DONE = range(8)


class ResponseReader:
    """The bytes of one response in (:meth:`feed`, then :meth:`eof` at the end of the stream);
    its head (:attr:`head`, once complete) and its body's bytes out, de-chunked."""

    def __init__(self) -> None:
        self.head: ResponseHead | None = None
        self._state = _HEAD
        self._buf = b""
        self._left = 0  # bytes of the current chunk, or of a Content-Length body, still to come

    @property
    def done(self) -> bool:
        """The whole response was read."""
        return self._state == _DONE

    def feed(self, data: bytes) -> bytes:
        """The body bytes ``data`` completes (possibly none); :attr:`head` is set once read."""
        if self._state == _DATA and not self._buf and len(data) < self._left:
            self._left -= len(data)  # the middle of a large chunk: as it is
            return data
        if self._state == _SIZE and not self._buf:
            # The common case on the token path: a read that is exactly one whole chunk.
            nl = data.find(b"\r\n", 0, 18)
            size_line = data[:nl]
            if nl > 0 and size_line.isalnum():
                try:
                    size = int(size_line, 16)
                except ValueError:
                    size = -1
                start = nl + 2
                if size > 0 and len(data) == start + size + 2 and data.endswith(b"\r\n"):
                    return data[start : start + size]
        buf = self._buf + data if self._buf else data
        self._buf = b""
        out: list[bytes] = []
        pos = 0
        end = len(buf)
        while pos < end:
            state = self._state
            if state in (_DATA, _LENGTH):
                take = min(self._left, end - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._left -= take
                if not self._left:
                    self._state = _DATA_END if state == _DATA else _DONE
            elif state == _DATA_END:
                if end - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise ProtocolError("a chunk does not end with CRLF")
                pos += 2
                self._state = _SIZE
            elif state in (_SIZE, _TRAILER):
                nl = buf.find(b"\r\n", pos)
                if nl < 0:
                    if end - pos > MAX_CHUNK_LINE:
                        raise ProtocolError("a chunk-size line is too long")
                    break
                if nl - pos > MAX_CHUNK_LINE:
                    raise ProtocolError("a chunk-size line is too long")
                line = buf[pos:nl]
                pos = nl + 2
                if state == _SIZE:
                    self._left = _chunk_size(line)
                    self._state = _DATA if self._left else _TRAILER
                elif not line:  # the blank line that ends the trailer
                    self._state = _DONE
            elif state == _CLOSE:
                out.append(buf[pos:] if pos else buf)
                pos = end
            elif state == _HEAD:
                pos = self._read_head(buf, pos)
                if pos < 0:
                    return b""
            else:  # _DONE
                raise ProtocolError("the backend sent more than its reply")
        if pos < end:
            self._buf = buf[pos:]
        return out[0] if len(out) == 1 else b"".join(out)

    def eof(self) -> None:
        """The backend closed the connection: the end of a close-delimited body, else an error."""
        if self._state == _CLOSE:
            self._state = _DONE
        elif self._state != _DONE:
            what = "before its reply's head" if self._state == _HEAD else "in the middle of a reply"
            raise ProtocolError(f"the backend closed the connection {what}")

    def _read_head(self, buf: bytes, pos: int) -> int:
        """Parse a complete head starting at ``pos``; the position after it, or -1 (kept in the
        buffer) while it is incomplete."""
        blank = buf.find(b"\r\n\r\n", pos)
        if blank < 0:
            if len(buf) - pos > MAX_HEAD:
                raise ProtocolError(f"the reply's head is longer than {MAX_HEAD} bytes")
            self._buf = buf[pos:]
            return -1
        if blank - pos > MAX_HEAD:
            raise ProtocolError(f"the reply's head is longer than {MAX_HEAD} bytes")
        lines = buf[pos:blank].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise ProtocolError(f"not an HTTP/1.1 status line: {lines[0][:80]!r}")
        if len(parts[1]) != 3 or not parts[1].isdigit():
            raise ProtocolError(f"not an HTTP status code: {parts[1][:80]!r}")
        status = int(parts[1])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise ProtocolError(f"not an HTTP header line: {line[:80]!r}")
            headers[name.lower()] = value.strip()
        after = blank + 4
        if 100 <= status < 200:
            return after  # an interim reply (100 Continue): the real head follows
        connection = headers.get(b"connection", b"").lower()
        keep_alive = parts[0] == b"HTTP/1.1" and b"close" not in connection
        encoding = headers.get(b"transfer-encoding", b"").lower()
        if status in (204, 304):
            self._state = _DONE
        elif encoding:
            if encoding.rsplit(b",", 1)[-1].strip() != b"chunked":
                raise ProtocolError(f"unsupported transfer-encoding {encoding[:80]!r}")
            self._state = _SIZE
        elif b"content-length" in headers:
            self._left = _number(headers[b"content-length"], 10, "content-length")
            self._state = _LENGTH if self._left else _DONE
        else:
            self._state = _CLOSE
            keep_alive = False
        self.head = ResponseHead(status, headers, keep_alive)
        return after


def _chunk_size(line: bytes) -> int:
    return _number(line.split(b";", 1)[0].strip(), 16, "chunk size")


def _number(text: bytes, base: int, what: str) -> int:
    # isalnum: int() would also take a sign, underscores and spaces.
    if not text or len(text) > 16 or not text.isalnum():
        raise ProtocolError(f"not a valid {what}: {text[:40]!r}")
    try:
        value = int(text, base)
    except ValueError:
        raise ProtocolError(f"not a valid {what}: {text[:40]!r}") from None
    if value > MAX_LENGTH:
        raise ProtocolError(f"a {what} larger than {MAX_LENGTH} bytes")
    return value


# -- the server side: a client's request head, a reply's framing --------------------------------

#: The largest request head (request line and headers) a client may send.
MAX_REQUEST_HEAD = 64 << 10
#: The most header lines a request may have.
MAX_HEADERS = 100
#: The longest request target (path and query).
MAX_TARGET = 8 << 10

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_METHODS = re.compile(rb"[A-Z]{1,20}")


class BadRequest(ProtocolError):
    """A client's request is not HTTP/1.1 as the gateway accepts it: answered ``status``, then
    the connection is closed."""

    def __init__(self, message: str, status: int = 400, path: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.path = path  # the request's path, when its head was read that far


@dataclass(frozen=True)
class RequestHead:
    """A parsed request head. ``headers`` keeps every line, names lower-cased (as ASGI has them)."""

    method: str
    target: bytes  # as sent: path and query
    path: str  # percent-decoded, without the query
    query: bytes
    http11: bool  # HTTP/1.1 (else 1.0)
    headers: list[tuple[bytes, bytes]]
    content_length: int
    keep_alive: bool  # the client may send another request on the connection after this one
    expect_continue: bool
    upgrade: bool  # a WebSocket upgrade (``Upgrade: websocket``)


def parse_request_head(buf: bytes | bytearray, max_body: int) -> tuple[RequestHead, int] | None:
    """The request head at the start of ``buf`` and its length, or None while it is incomplete.

    Raises :class:`BadRequest` (400; 413 for a ``Content-Length`` over ``max_body``, 411 for a
    ``Transfer-Encoding`` body, 431 for a head over :data:`MAX_REQUEST_HEAD`) on anything else:
    a bad request line, a header line that is not ``token: value``, obsolete line folding, a
    ``Content-Length`` that is not one plain number, more than :data:`MAX_HEADERS` lines."""
    end = buf.find(b"\r\n\r\n", 0, MAX_REQUEST_HEAD + 4)
    if end < 0:
        if len(buf) > MAX_REQUEST_HEAD:
            raise BadRequest(f"the request head is longer than {MAX_REQUEST_HEAD} bytes", 431)
        return None
    lines = bytes(buf[:end]).split(b"\r\n")
    while lines and not lines[0]:  # RFC 9112 2.2: blank lines before the request line
        lines.pop(0)
    if not lines:
        raise BadRequest("an empty request head")
    if len(lines) > MAX_HEADERS + 1:
        raise BadRequest(f"more than {MAX_HEADERS} header lines")
    method, target, version = _request_line(lines[0])
    headers: list[tuple[bytes, bytes]] = []
    length: bytes | None = None
    connection = b""
    expect = upgrade = False
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise BadRequest(f"not an HTTP header line: {line[:80]!r}")
        value = value.strip(b" \t")
        if not _VALUE.fullmatch(value):
            raise BadRequest(f"a control character in the {name[:40]!r} header")
        name = name.lower()
        headers.append((name, value))
        if name == b"content-length":
            if length is not None and value != length:
                raise BadRequest("two different Content-Length headers")
            length = value
        elif name == b"transfer-encoding":
            raise BadRequest("a request body must be sent with a Content-Length", 411)
        elif name == b"connection":
            connection += b"," + value.lower()
        elif name == b"expect":
            expect = value.lower() == b"100-continue"
        elif name == b"upgrade":
            upgrade = value.lower() == b"websocket"
    path_bytes, _, query = target.partition(b"?")
    path = _path(path_bytes)
    content_length = 0
    if length is not None:
        if not length.isdigit() or len(length) > 16:
            raise BadRequest(f"not a valid Content-Length: {length[:40]!r}")
        content_length = int(length)
        if content_length > max_body:
            raise BadRequest(f"the request body is over {max_body} bytes", 413, path)
    tokens = {t.strip() for t in connection.split(b",")}
    http11 = version == b"HTTP/1.1"
    keep_alive = b"close" not in tokens if http11 else b"keep-alive" in tokens
    head = RequestHead(method, target, path, query, http11, headers, content_length,
                       keep_alive, expect and content_length > 0, upgrade)  # fmt: skip
    return head, end + 4


def _path(raw: bytes) -> str:
    return unquote(raw.decode("latin-1"), errors="replace")


def _request_line(line: bytes) -> tuple[str, bytes, bytes]:
    parts = line.split(b" ")
    if len(parts) != 3:
        raise BadRequest(f"not an HTTP request line: {line[:80]!r}")
    method, target, version = parts
    if not _METHODS.fullmatch(method):
        raise BadRequest(f"not an HTTP method: {method[:40]!r}")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadRequest(f"not HTTP/1.1: {version[:40]!r}", 505 if version[:5] == b"HTTP/" else 400)
    if len(target) > MAX_TARGET:
        raise BadRequest(f"a request target longer than {MAX_TARGET} bytes", 414)
    if target.startswith((b"http://", b"https://")):  # absolute form: the path is what counts
        target = b"/" + target.split(b"/", 3)[3] if target.count(b"/") >= 3 else b"/"
    if not target.startswith(b"/") or not _VALUE.fullmatch(target) or b"\t" in target:
        raise BadRequest(f"not a request target: {target[:80]!r}")
    return method.decode("ascii"), target, version


_REASONS = {
    100: b"Continue", 101: b"Switching Protocols", 200: b"OK", 201: b"Created",
    204: b"No Content", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden",
    404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout",
    411: b"Length Required", 413: b"Content Too Large", 414: b"URI Too Long",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    502: b"Bad Gateway", 503: b"Service Unavailable", 505: b"HTTP Version Not Supported",
}  # fmt: skip


def response_head(status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A reply's status line and headers (the caller adds the framing headers it needs)."""
    out = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b""))]
    for name, value in headers:
        if b"\r" in name or b"\n" in name or b"\r" in value or b"\n" in value:
            raise ValueError(f"a newline in the reply header {name[:40]!r}")
        out.append(name + b": " + value)
    out.append(b"\r\n")
    return b"\r\n".join(out)


def chunk(data: bytes, *, last: bool = False) -> bytes:
    """``data`` as one chunk of a chunked body (nothing for no data), and the body's end if
    ``last``: what one write sends."""
    framed = b"%x\r\n%s\r\n" % (len(data), data) if data else b""
    return framed + b"0\r\n\r\n" if last else framed


__all__ = [
    "MAX_REQUEST_HEAD",
    "BadRequest",
    "ProtocolError",
    "RequestHead",
    "ResponseHead",
    "ResponseReader",
    "chunk",
    "parse_request_head",
    "request_bytes",
    "response_head",
]
