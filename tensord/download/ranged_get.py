"""The HTTP side of a fetch: one ranged ``GET`` of a blob, and the checks every reply passes.

Redirects are followed here, not by the HTTP client, so the ``Range`` header is sent on every
hop and ``Authorization`` is dropped as soon as the host changes. Replies are checked, never
trusted: a ``Content-Range`` must name exactly the bytes asked for and a ``Content-Length`` must be
a plain bounded number (a :class:`~tensord.download.fetch_errors.BadReply` otherwise), and an
error body is read only up to a cap. The registry client uses the same helpers.
"""

from __future__ import annotations

import contextlib
import re
import ssl
from collections.abc import Awaitable, Callable
from urllib.parse import urljoin, urlsplit

import httpx

from ..errors import DownloadError
from .fetch_errors import BadReply

# httpcore reads a reply body 64 KiB per socket read, and each read costs a trip through
# h11, httpcore and httpx in Python: at loopback or datacentre speeds that per-read cost is the
# bottleneck (measured: one connection from nginx, 0.24 GB/s at 64 KiB, 1.16 GB/s at 1 MiB).
# A read returns whatever has arrived, so a bigger maximum adds no latency on slow links.
with contextlib.suppress(ImportError, AttributeError):
    from httpcore._async.http11 import AsyncHTTP11Connection

    if AsyncHTTP11Connection.READ_NUM_BYTES < 1 << 20:
        AsyncHTTP11Connection.READ_NUM_BYTES = 1 << 20

MAX_REDIRECTS = 10
# At most 19 digits: a 10,000-digit number must not cost a big-int parse (nor Python's
# int-from-str limit's ValueError); 19 digits already exceed any max_bytes.
_CONTENT_RANGE = re.compile(r"bytes (\d{1,19})-(\d{1,19})/(\d{1,19}|\*)")
_CONTENT_LENGTH = re.compile(r"\d{1,19}")

#: ``auth(url, challenge)`` -> headers to send to ``url``'s host. ``challenge`` is the
#: ``WWW-Authenticate`` of a 401 reply (then fresh credentials are wanted), else ``None``.
Auth = Callable[[str, str | None], Awaitable[dict[str, str]]]


async def no_auth(url: str, challenge: str | None) -> dict[str, str]:
    return {}


def describe_http_error(exc: BaseException, url: str) -> str:
    """One line naming what failed for a ``httpx`` error whose own text may be empty (a TLS
    failure under trio is ``ConnectError('')`` caused by ``BrokenResourceError('')`` caused by
    the ``ssl.SSLError`` that says what happened): the texts along the cause chain, and for a
    TLS failure the hint that the server may speak plain HTTP."""
    texts: list[str] = []
    tls = False
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        tls = tls or isinstance(e, ssl.SSLError)
        text = str(e).strip()
        if text and not any(text in t for t in texts):
            texts.append(text)
        e = e.__cause__ or e.__context__
    cause = "; ".join(texts) if texts else "the connection failed without a reason"
    line = f"GET {url}: {type(exc).__name__}: {cause}"
    if tls and url.startswith("https://"):
        line += (
            " (the TLS handshake failed: if the server speaks plain HTTP, "
            "write the address with http:// in front)"
        )
    return line


def content_length(resp: httpx.Response, url: str) -> int | None:
    """The reply's ``Content-Length`` (``None`` if absent), refused if malformed."""
    value = resp.headers.get("content-length")
    if value is None:
        return None
    if not _CONTENT_LENGTH.fullmatch(value.strip()):
        raise BadReply(f"GET {url}: a bad Content-Length {value[:40]!r}")
    return int(value)


def content_range(
    resp: httpx.Response, url: str, start: int, total: int | None
) -> tuple[int, int, int | None]:
    """The reply's ``Content-Range`` as ``(first, last, total)``; it must begin at ``start`` and,
    if ``total`` is given, name that total (a :class:`BadReply` otherwise)."""
    value = resp.headers.get("content-range", "")
    m = _CONTENT_RANGE.fullmatch(value.strip())
    if m is None:
        raise BadReply(f"GET {url}: 206 with a bad Content-Range {value[:80]!r}")
    s, e = int(m.group(1)), int(m.group(2))
    t = None if m.group(3) == "*" else int(m.group(3))
    if s != start or e < s or (total is not None and t != total):
        raise BadReply(f"GET {url}: asked for bytes {start}-, got Content-Range {value!r}")
    return s, e, t


async def read_capped(resp: httpx.Response, cap: int) -> bytes:
    """At most ``cap`` bytes of ``resp``'s body (raw: no decoder inflates it), then close it."""
    out = bytearray()
    try:
        async for data in resp.aiter_raw():
            out += data[: cap - len(out)]
            if len(out) >= cap:
                break
    except httpx.HTTPError:
        pass  # an error body is for the message only
    finally:
        await resp.aclose()
    return bytes(out)


def _same_host(a: str, b: str) -> bool:
    x, y = urlsplit(a), urlsplit(b)
    return (x.scheme, x.hostname, x.port) == (y.scheme, y.hostname, y.port)


class RangedGet:
    """Ranged ``GET``\\s of one blob URL, sharing the credentials its host asked for."""

    def __init__(self, client: httpx.AsyncClient, url: str, auth: Auth) -> None:
        self.client = client
        self.url = url
        self.auth = auth
        self._auth_headers: dict[str, str] | None = None

    async def open(self, start: int, end: int | None) -> httpx.Response:
        """GET ``[start, end)`` (or ``start-`` if ``end`` is None), following redirects here:
        Range on every hop, Authorization only while on the original host."""
        url = self.url
        rng = f"bytes={start}-{'' if end is None else end - 1}"
        challenge: str | None = None
        for _ in range(MAX_REDIRECTS + 2):
            headers = {"Range": rng, "Accept-Encoding": "identity"}
            if _same_host(url, self.url):
                if self._auth_headers is None or challenge is not None:
                    self._auth_headers = await self.auth(url, challenge)
                headers.update(self._auth_headers)
            resp = await self.client.send(
                self.client.build_request("GET", url, headers=headers), stream=True
            )
            if resp.status_code in (301, 302, 303, 307, 308) and "location" in resp.headers:
                await resp.aclose()
                url = urljoin(url, resp.headers["location"])
                continue
            if resp.status_code == 401 and challenge is None and _same_host(url, self.url):
                challenge = resp.headers.get("www-authenticate", "")
                await resp.aclose()
                continue
            return resp
        raise DownloadError(f"GET {self.url}: more than {MAX_REDIRECTS} redirects")
