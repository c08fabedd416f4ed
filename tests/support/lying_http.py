"""An HTTP server on loopback that lies: the download server, registry and "evil" host of the
hostile download tests (issue 12, holes 3 and 4) and of the chaos attack rows.

Raw bytes over trio sockets, so it can say what no honest server library would let it: a
``Content-Range`` past the total, a ``Content-Length`` the body contradicts, 40 MiB for a
1000-byte blob. Each :class:`LyingServer` answers every request with what its :data:`Handler`
returns and records what it was asked and how much it sent.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]

    @property
    def range(self) -> tuple[int, int | None] | None:
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("range", ""))
        if m is None:
            return None
        return int(m.group(1)), int(m.group(2)) if m.group(2) else None


@dataclass
class Reply:
    """What the server sends: ``headers`` verbatim (nothing added but ``Connection: close``),
    then ``body``, then ``extra`` more bytes (zeros, streamed: a huge lie costs no RAM)."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    extra: int = 0


Handler = Callable[[Request], Reply]


@dataclass
class LyingServer:
    handler: Handler
    port: int = 0
    requests: list[Request] = field(default_factory=list)
    open_now: int = 0
    most_open: int = 0
    bytes_sent: int = 0
    #: If set, every body waits (after its headers) until this many connections were open at
    #: once: a fetcher that opens fewer never gets its bytes (the test's deadline fails it).
    hold_bodies_until_open: int = 0
    _all_open: trio.Event = field(default_factory=trio.Event)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"http://{self.host}{path}"

    async def serve(self, stream: trio.SocketStream) -> None:
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        if self.most_open >= self.hold_bodies_until_open:
            self._all_open.set()
        try:
            async with stream:
                await self._serve(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client hung up on a lie: what it is expected to do
        finally:
            self.open_now -= 1

    async def _serve(self, stream: trio.SocketStream) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some(65536)
            if not data or len(buf) > 65536:
                return
            buf += data
            if buf.startswith(b"\x16"):  # a TLS ClientHello: answered as Go's net/http does
                await stream.send_all(
                    b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS "
                    b"server.\n"
                )
                return
        head = buf.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
        method, path, _ = head[0].split(" ", 2)
        headers = {}
        for line in head[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        req = Request(method, path, headers)
        self.requests.append(req)
        reply = self.handler(req)
        lines = [f"HTTP/1.1 {reply.status} X"] + [f"{k}: {v}" for k, v in reply.headers]
        lines.append("Connection: close")
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        await self._all_open.wait()
        await stream.send_all(reply.body)
        self.bytes_sent += len(reply.body)
        left, zeros = reply.extra, bytes(256 << 10)
        while left > 0:
            n = min(left, len(zeros))
            await stream.send_all(zeros[:n])
            self.bytes_sent += n
            left -= n


@asynccontextmanager
async def lying_servers(*handlers: Handler) -> AsyncIterator[list[LyingServer]]:
    """One loopback server per handler, stopped on exit."""
    servers = [LyingServer(h) for h in handlers]
    async with trio.open_nursery() as nursery:
        for server in servers:
            (listener,) = await nursery.start(
                functools.partial(trio.serve_tcp, host="127.0.0.1"), server.serve, 0
            )
            server.port = listener.socket.getsockname()[1]
        yield servers
        nursery.cancel_scope.cancel()


def honest(data: bytes) -> Handler:
    """A correct server of ``data``: ranges answered exactly."""

    def handler(req: Request) -> Reply:
        rng = req.range
        if rng is None:
            return Reply(200, [("Content-Length", str(len(data)))], data)
        start, end = rng
        end = min(len(data) - 1 if end is None else end, len(data) - 1)
        if start >= len(data):
            return Reply(416, [("Content-Range", f"bytes */{len(data)}")])
        body = data[start : end + 1]
        headers = [
            ("Content-Range", f"bytes {start}-{end}/{len(data)}"),
            ("Content-Length", str(len(body))),
        ]
        return Reply(206, headers, body)

    return handler


def evil_host(seen: list[str]) -> Handler:
    """Asks for a Bearer token from itself and records every Authorization it is sent."""
    holder: dict[str, int] = {}

    def handler(req: Request) -> Reply:
        seen.append(req.headers.get("authorization", "-"))
        if req.path.startswith("/token"):
            body = json.dumps({"token": "evil-token"}).encode()
            return Reply(200, [("Content-Length", str(len(body)))], body)
        realm = f'Bearer realm="http://127.0.0.1:{holder["port"]}/token",service="evil"'
        return Reply(401, [("WWW-Authenticate", realm), ("Content-Length", "0")])

    handler.holder = holder  # type: ignore[attr-defined]
    return handler
