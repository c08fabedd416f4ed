"""Model references, registry manifests and registry auth (OCI distribution API, Ollama).

A pull resolves a tag to a manifest digest **once** and then fetches every blob by digest, so a
tag moved during the pull cannot mix two versions of a model. Auth follows the registry's
challenge: anonymous first, then Basic or the Bearer token flow (``WWW-Authenticate: Bearer
realm=...,service=...,scope=...``) with the token cached until ``expires_in``. Credentials come
from a file (Docker's ``config.json`` format or ``{"registries": {host: {username, password}}}``)
and are never logged.

**Credentials never leave the registry they were configured for.** Redirects are followed here,
not by the HTTP client: ``Authorization`` (Basic, or a token obtained with the credentials) is
sent only to the registry's own scheme, host and port; a ``401`` from any other host (where the
registry redirected a request) is an error, never answered. A Bearer challenge's ``realm`` gets
the credentials only if it is on the registry's host, or on a host the credentials file names
for it (``"token_hosts": ["auth.example.com"]`` in the registry's entry), and never over plain
HTTP when the registry is HTTPS; a realm elsewhere is asked anonymously only when no
credentials are configured. Everything the registry sends is bounded before it is parsed:
manifests (``MAX_MANIFEST_BYTES``), token replies, layer counts and layer sizes
(``downloads.max_bytes``).

A registry on loopback (``localhost``, ``127.0.0.0/8``, ``::1``) is spoken to over plain HTTP
unless the reference says ``https://``: Docker's convention.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import httpx

from ..config import is_loopback
from .fetch import (
    DEFAULT_MAX_BYTES,
    MAX_REDIRECTS,
    DownloadError,
    content_length,
    describe_http_error,
    read_capped,
)

log = logging.getLogger("tensord.download")

#: Ollama's registry: where ``llama3:8b`` comes from.
DEFAULT_REGISTRY = "registry.ollama.ai"

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
ACCEPT = ", ".join(MANIFEST_TYPES + INDEX_TYPES)
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
REPOSITORY_RE = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
#: The largest manifest (or index) read; real ones are a few KiB.
MAX_MANIFEST_BYTES = 4 << 20
#: The most layers (or index entries) a manifest may list.
MAX_LAYERS = 4096
#: The largest token reply read.
MAX_TOKEN_BYTES = 64 << 10


class RegistryAuthError(DownloadError):
    """Authentication with a registry failed, or was asked for where tensord will not send the
    credentials (another host than the registry's)."""


@dataclass(frozen=True)
class Reference:
    """``[scheme://]registry/repository[:tag][@sha256:...]``."""

    registry: str
    repository: str
    tag: str | None = "latest"
    digest: str | None = None
    scheme: str = "https"

    @property
    def ref(self) -> str:
        """What to ask the manifests endpoint for: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def url(self, kind: str, ref: str) -> str:
        return f"{self.scheme}://{self.registry}/v2/{self.repository}/{kind}/{ref}"

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse_reference(text: str) -> Reference:
    """Parse a model reference the way Docker and Ollama do.

    ``llama3`` is ``registry.ollama.ai/library/llama3:latest``; a first component with a dot, a
    colon or ``localhost`` is a registry host; ``http://`` in front selects plain HTTP (a
    registry on loopback in tests, or inside a trusted network).
    """
    original = text
    scheme = ""
    for prefix in ("http://", "https://"):
        if text.startswith(prefix):
            scheme, text = prefix[:-3], text[len(prefix) :]
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not DIGEST_RE.fullmatch(digest):
            raise DownloadError(f"bad model reference {original!r}: digest must be sha256:<64 hex>")
    first, _, rest = text.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, rest
    else:
        registry, path = DEFAULT_REGISTRY, text
        if "/" not in path:
            path = f"library/{path}"
    tag: str | None = None
    name, colon, maybe_tag = path.rpartition(":")
    if colon and "/" not in maybe_tag:
        path, tag = name, maybe_tag
    if tag is None and digest is None:
        tag = "latest"
    if not REPOSITORY_RE.fullmatch(path) or (tag is not None and not TAG_RE.fullmatch(tag)):
        raise DownloadError(
            f"bad model reference {original!r}: expected [REGISTRY/]NAME[:TAG][@sha256:DIGEST]"
        )
    if not scheme:
        scheme = "http" if registry_is_loopback(registry) else "https"
    return Reference(registry, path, tag, digest, scheme)


def registry_is_loopback(host: str) -> bool:
    """Is a registry ``host`` (``name[:port]`` or ``[v6]:port``) on loopback? (Docker's rule:
    such a registry is plain HTTP unless the reference says ``https://``.)"""
    if host.startswith("["):
        name = host[1:].partition("]")[0]
    else:
        name = host.rpartition(":")[0] if host.count(":") == 1 else host
    return is_loopback(name)


@dataclass(frozen=True)
class Layer:
    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class Manifest:
    """A resolved manifest: its digest (what the tag pointed at), and the blobs to fetch."""

    digest: str
    media_type: str
    config: Layer | None
    layers: tuple[Layer, ...]
    #: The manifest exactly as the registry sent it (its SHA-256 is ``digest``): what is kept
    #: on disk (Ollama's layout) and served again by the mirror.
    raw: bytes = field(default=b"", repr=False, compare=False)

    @property
    def blobs(self) -> tuple[Layer, ...]:
        return ((self.config,) if self.config is not None else ()) + self.layers

    @property
    def total(self) -> int:
        return sum(b.size for b in self.blobs)


@dataclass(frozen=True)
class Credential:
    """A registry's username and password, and the other hosts (``host[:port]``) allowed to
    receive them as a token service (``token_hosts``; the registry's own host always is)."""

    username: str
    password: str
    token_hosts: tuple[str, ...] = ()


#: registry host -> its credentials (a plain ``(username, password)`` pair is accepted too).
Credentials = Mapping[str, "Credential | tuple[str, str]"]


def load_credentials(path: Path | None) -> dict[str, Credential]:
    """host -> credentials from Docker's ``config.json`` ``auths`` or our own form,
    ``{"registries": {host: {"username", "password", "token_hosts": [host, ...]}}}``
    (``token_hosts`` is accepted in an ``auths`` entry too)."""
    if path is None:
        return {}
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise DownloadError(f"cannot read the registry credentials file {path}: {exc}") from None
    out: dict[str, Credential] = {}
    for section in ("auths", "registries"):
        entries = doc.get(section) or {}
        if not isinstance(entries, dict):
            raise DownloadError(f"registry credentials file {path}: {section!r} is not an object")
        for host, entry in entries.items():
            if not isinstance(entry, dict):
                continue
            hosts = entry.get("token_hosts") or []
            if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
                raise DownloadError(
                    f"registry credentials file {path}: {host}: token_hosts must be a list of "
                    "host[:port] strings"
                )
            token_hosts = tuple(_host(h) for h in hosts)
            if section == "auths":
                if not isinstance(entry.get("auth"), str):
                    continue
                try:
                    decoded = base64.b64decode(entry["auth"], validate=True).decode()
                except (binascii.Error, UnicodeDecodeError):
                    raise DownloadError(
                        f"registry credentials file {path}: the auth of {host} is not base64 of "
                        "user:password"
                    ) from None
                user, _, password = decoded.partition(":")
            else:
                user, password = str(entry.get("username", "")), str(entry.get("password", ""))
            out[_host(host)] = Credential(user, password, token_hosts)
    return out


def _host(value: str) -> str:
    return value.split("://", 1)[-1].split("/", 1)[0]


def _origin(url: str) -> tuple[str, str | None, int | None]:
    """(scheme, host, port) with the scheme's default port filled in."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1  # a bad port matches nothing
    if port is None:
        port = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, parts.hostname, port


def _netloc(url: str) -> str:
    """``host[:port]`` of ``url`` as a credentials file names it (no user info)."""
    scheme, host, port = _origin(url)
    shown = f"[{host}]" if host and ":" in host else str(host)
    return shown if port == {"http": 80, "https": 443}.get(scheme) else f"{shown}:{port}"


def _challenge_params(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


class RegistryAuth:
    """Answers registry challenges; one instance per pull (tokens are scoped to a repository).

    Called only for URLs on the registry's own origin (the fetcher and :func:`fetch_manifest`
    drop ``Authorization`` once a redirect leaves it); what it returns for a host is never sent
    to another."""

    def __init__(self, client: httpx.AsyncClient, credentials: Credentials) -> None:
        self.client = client
        self.credentials: dict[str, Credential] = {
            host: c if isinstance(c, Credential) else Credential(*c)
            for host, c in credentials.items()
        }
        self._tokens: dict[str, tuple[str, float]] = {}  # host -> (header value, expiry)

    async def __call__(self, url: str, challenge: str | None) -> dict[str, str]:
        host = _host(url)
        cached = self._tokens.get(host)
        if challenge is None:
            if cached is not None and cached[1] > time.monotonic():
                return {"Authorization": cached[0]}
            return {}
        scheme, params = _challenge_params(challenge)
        creds = self.credentials.get(host)
        if scheme == "basic":
            if creds is None:
                raise RegistryAuthError(
                    f"{host} wants a username and password: add them to the "
                    "credentials file (downloads.credentials_file)"
                )
            pair = f"{creds.username}:{creds.password}".encode()
            value = "Basic " + base64.b64encode(pair).decode()
            self._tokens[host] = (value, math.inf)
            return {"Authorization": value}
        if scheme == "bearer" and "realm" in params:
            value = await self._token(url, host, params, creds)
            return {"Authorization": value}
        raise RegistryAuthError(f"{host} asks for unsupported authentication {scheme[:40]!r}")

    async def _token(
        self, url: str, host: str, params: dict[str, str], creds: Credential | None
    ) -> str:
        realm_url = params["realm"]
        realm_scheme, realm_name, _ = _origin(realm_url)
        if realm_scheme not in ("http", "https") or not realm_name:
            raise RegistryAuthError(f"{host} names a bad token service {realm_url[:200]!r}")
        realm_host = _netloc(realm_url)
        if creds is not None:
            if realm_host != host and realm_host not in creds.token_hosts:
                raise RegistryAuthError(
                    f"{host} sends tensord for a token to {realm_host}, another host: the "
                    f"credentials for {host} are sent only to {host}. If {realm_host} is its "
                    f'token service, add "token_hosts": ["{realm_host}"] to the entry for '
                    f"{host} in the credentials file (downloads.credentials_file)"
                )
            if realm_scheme == "http" and urlsplit(url).scheme == "https":
                raise RegistryAuthError(
                    f"{host} asks for a token over plain HTTP ({realm_url[:200]}): tensord does "
                    "not send the credentials of an HTTPS registry unencrypted"
                )
        query: dict[str, str] = {k: params[k] for k in ("service", "scope") if k in params}
        realm = realm_url + (("&" if "?" in realm_url else "?") + urlencode(query) if query else "")
        auth = httpx.BasicAuth(creds.username, creds.password) if creds is not None else None
        try:
            async with self.client.stream("GET", realm, auth=auth) as resp:
                body = await read_capped(resp, MAX_TOKEN_BYTES + 1)
        except httpx.HTTPError as exc:
            raise RegistryAuthError(describe_http_error(exc, realm_url)) from None
        if resp.status_code != 200:
            raise RegistryAuthError(
                f"token request to {realm_url[:200]} failed: HTTP {resp.status_code}"
                + ("" if creds else " (no credentials configured for " + host + ")")
            )
        if len(body) > MAX_TOKEN_BYTES:
            raise RegistryAuthError(
                f"token reply from {realm_url[:200]} is over {MAX_TOKEN_BYTES} bytes"
            )
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        token = (doc.get("token") or doc.get("access_token")) if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token.isprintable():
            raise RegistryAuthError(f"token reply from {realm_url[:200]} holds no token")
        try:
            expires = float(doc.get("expires_in") or 60) if isinstance(doc, dict) else 60.0
        except (TypeError, ValueError):
            expires = 60.0
        expires = min(max(expires, 1.0), 86400.0) if math.isfinite(expires) else 60.0
        value = f"Bearer {token}"
        # Renewed a little early so a long pull never sends an expired token.
        self._tokens[host] = (value, time.monotonic() + max(expires - 10, expires / 2))
        return value


async def fetch_manifest(
    client: httpx.AsyncClient,
    ref: Reference,
    auth: RegistryAuth,
    *,
    platform: str = "linux/amd64",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Manifest:
    """Resolve ``ref`` to a manifest (an index is resolved to ``platform``'s entry, else its
    first), checking the digest of what the registry sent. Layers over ``max_bytes`` (and
    manifests over ``MAX_LAYERS`` layers) are refused here, before anything is fetched."""
    try:
        return await _fetch_manifest(client, ref, auth, platform, max_bytes)
    except httpx.HTTPError as exc:
        url = ref.url("manifests", ref.ref)
        raise DownloadError(f"{ref}: {describe_http_error(exc, url)}") from None


async def _fetch_manifest(
    client: httpx.AsyncClient, ref: Reference, auth: RegistryAuth, platform: str, max_bytes: int
) -> Manifest:
    doc, digest, media, raw = await get_manifest(client, ref, ref.ref, auth)
    if media in INDEX_TYPES or "manifests" in doc:
        entries = [m for m in _entries(doc, "manifests", ref) if isinstance(m, dict)]
        want_os, _, want_arch = platform.partition("/")
        chosen = next(
            (
                m
                for m in entries
                if (m.get("platform") or {}).get("os") == want_os
                and (m.get("platform") or {}).get("architecture") == want_arch
            ),
            entries[0] if entries else None,
        )
        if chosen is None or not DIGEST_RE.fullmatch(str(chosen.get("digest"))):
            raise DownloadError(f"{ref}: the index has no usable manifest")
        doc, digest, media, raw = await get_manifest(client, ref, chosen["digest"], auth)
    layers = [
        layer
        for x in _entries(doc, "layers", ref)
        if (layer := _layer(x, ref, max_bytes)) is not None
    ]
    config = _layer(doc.get("config"), ref, max_bytes)
    return Manifest(digest, media, config, tuple(layers), raw)


def _entries(doc: dict[str, Any], key: str, ref: Reference) -> list[Any]:
    entries = doc.get(key) or []
    if not isinstance(entries, list):
        raise DownloadError(f"{ref}: the manifest's {key!r} is not a list")
    if len(entries) > MAX_LAYERS:
        raise DownloadError(
            f"{ref}: the manifest lists {len(entries)} {key}, more than tensord accepts "
            f"({MAX_LAYERS})"
        )
    return entries


def _layer(entry: Any, ref: Reference, max_bytes: int) -> Layer | None:
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise DownloadError(f"{ref}: a manifest entry is not an object")
    digest, size = entry.get("digest"), entry.get("size")
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise DownloadError(f"{ref}: bad blob digest {str(digest)[:80]!r} in the manifest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise DownloadError(f"{ref}: bad blob size {str(size)[:40]!r} in the manifest")
    if size > max_bytes:
        raise DownloadError(
            f"{ref}: blob {digest} is {size} bytes, more than downloads.max_bytes "
            f"({max_bytes}); raise downloads.max_bytes to pull this model"
        )
    return Layer(digest, size, str(entry.get("mediaType", ""))[:200])


async def get_manifest(
    client: httpx.AsyncClient, ref: Reference, which: str, auth: RegistryAuth
) -> tuple[dict[str, Any], str, str, bytes]:
    """One manifest or index by tag or digest (``which``) as the registry sent it, unresolved:
    (its JSON, its digest, its media type, its bytes). :func:`fetch_manifest` resolves an index
    to a platform's manifest; the mirror serves an index as it is."""
    registry_url = url = ref.url("manifests", which)
    challenge: str | None = None
    for _ in range(MAX_REDIRECTS + 2):
        on_registry = _origin(url) == _origin(registry_url)
        headers = {"Accept": ACCEPT, "Accept-Encoding": "identity"}
        if on_registry:
            headers |= await auth(url, challenge)
        async with client.stream("GET", url, headers=headers) as resp:
            status = resp.status_code
            if status in (301, 302, 303, 307, 308) and "location" in resp.headers:
                url = urljoin(url, resp.headers["location"])
                continue
            if status == 401 and not on_registry:
                raise RegistryAuthError(
                    f"GET {registry_url} was redirected to {_netloc(url)}, which asks for "
                    f"authentication: tensord sends credentials only to {ref.registry}"
                )
            if status == 401 and challenge is None:
                challenge = resp.headers.get("www-authenticate", "")
                continue
            if status == 404:
                raise DownloadError(
                    f"{ref}: no such model or tag on {ref.registry} (GET {url}: 404)"
                )
            if status != 200:
                text = await read_capped(resp, 200)
                raise DownloadError(f"GET {url}: HTTP {status}: {text!r}")
            body = await _manifest_body(resp, url)
            break
    else:
        raise DownloadError(f"GET {registry_url}: more than {MAX_REDIRECTS} redirects")
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if DIGEST_RE.fullmatch(which) and digest != which:
        raise DownloadError(f"GET {url}: the manifest's digest is {digest}, not {which}")
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise DownloadError(f"GET {url}: the manifest is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise DownloadError(f"GET {url}: the manifest is not a JSON object")
    media = resp.headers.get("content-type", "").split(";")[0].strip() or str(
        doc.get("mediaType", "")
    )
    return doc, digest, media[:200], body


async def _manifest_body(resp: httpx.Response, url: str) -> bytes:
    """The manifest, refused past ``MAX_MANIFEST_BYTES`` (declared or counted)."""
    encoding = resp.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise DownloadError(f"GET {url}: a {encoding[:40]!r} manifest, asked for identity")
    length = content_length(resp, url)
    if length is not None and length > MAX_MANIFEST_BYTES:
        raise DownloadError(
            f"GET {url}: a manifest of {length} bytes, more than tensord reads "
            f"({MAX_MANIFEST_BYTES})"
        )
    body = await read_capped(resp, MAX_MANIFEST_BYTES + 1)
    if len(body) > MAX_MANIFEST_BYTES:
        raise DownloadError(
            f"GET {url}: the manifest is over {MAX_MANIFEST_BYTES} bytes, more than tensord reads"
        )
    return body


__all__ = [
    "ACCEPT",
    "DEFAULT_REGISTRY",
    "MAX_LAYERS",
    "MAX_MANIFEST_BYTES",
    "REPOSITORY_RE",
    "TAG_RE",
    "Credential",
    "Credentials",
    "Layer",
    "Manifest",
    "Reference",
    "RegistryAuth",
    "RegistryAuthError",
    "fetch_manifest",
    "load_credentials",
    "parse_reference",
    "registry_is_loopback",
]
