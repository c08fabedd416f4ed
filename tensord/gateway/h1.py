"""Sans-I/O HTTP/1.1 for the gateway's upstream requests: a request's bytes out, a response's
head and body bytes in.

Why not httpx/httpcore + h11 here: a token is one chunk of a chunked reply, and those layers
spend an event object, a state-machine pass and several awaits on each; this reader turns a
whole socket read (however many tokens it holds) into one ``bytes`` of body in one call. It is
only what a backend's reply needs - a head, then a ``Content-Length``, chunked or
close-delimited body - and every number from the backend is bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

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


__all__ = ["ProtocolError", "ResponseHead", "ResponseReader", "request_bytes"]
