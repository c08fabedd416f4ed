"""Model references, registry manifests and registry auth (OCI distribution API, Ollama).

A pull resolves a tag to a manifest digest **once** and then fetches every blob by digest, so a
tag moved during the pull cannot mix two versions of a model. Auth follows the registry's
challenge: anonymous first, then Basic or the Bearer token flow (``WWW-Authenticate: Bearer
realm=...,service=...,scope=...``) with the token cached until ``expires_in``. Credentials come
from a file (Docker's ``config.json`` format or ``{"registries": {host: {username, password}}}``)
and are never logged.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

from .fetch import DownloadError

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
_REPO_RE = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


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
    scheme = "https"
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
    if not _REPO_RE.fullmatch(path) or (tag is not None and not _TAG_RE.fullmatch(tag)):
        raise DownloadError(
            f"bad model reference {original!r}: expected [REGISTRY/]NAME[:TAG][@sha256:DIGEST]"
        )
    return Reference(registry, path, tag, digest, scheme)


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

    @property
    def blobs(self) -> tuple[Layer, ...]:
        return ((self.config,) if self.config is not None else ()) + self.layers

    @property
    def total(self) -> int:
        return sum(b.size for b in self.blobs)


def load_credentials(path: Path | None) -> dict[str, tuple[str, str]]:
    """host -> (username, password) from Docker's ``config.json`` ``auths`` or our own form."""
    if path is None:
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DownloadError(f"cannot read the registry credentials file {path}: {exc}") from None
    out: dict[str, tuple[str, str]] = {}
    for host, entry in (doc.get("auths") or {}).items():
        if isinstance(entry, dict) and isinstance(entry.get("auth"), str):
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            out[_host(host)] = (user, password)
    for host, entry in (doc.get("registries") or {}).items():
        if isinstance(entry, dict):
            out[_host(host)] = (str(entry.get("username", "")), str(entry.get("password", "")))
    return out


def _host(value: str) -> str:
    return value.split("://", 1)[-1].split("/", 1)[0]


def _challenge_params(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


class RegistryAuth:
    """Answers registry challenges; one instance per pull (tokens are scoped to a repository)."""

    def __init__(self, client: httpx.AsyncClient, credentials: dict[str, tuple[str, str]]) -> None:
        self.client = client
        self.credentials = credentials
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
                raise DownloadError(
                    f"{host} wants a username and password: add them to the "
                    "credentials file (downloads.credentials_file)"
                )
            value = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
            self._tokens[host] = (value, float("inf"))
            return {"Authorization": value}
        if scheme == "bearer" and "realm" in params:
            query: dict[str, str] = {k: params[k] for k in ("service", "scope") if k in params}
            realm = params["realm"] + ("?" + urlencode(query) if query else "")
            auth = httpx.BasicAuth(*creds) if creds is not None else None
            resp = await self.client.get(realm, auth=auth)
            if resp.status_code != 200:
                raise DownloadError(
                    f"token request to {params['realm']} failed: HTTP {resp.status_code}"
                    + ("" if creds else " (no credentials configured for " + host + ")")
                )
            doc = resp.json()
            token = doc.get("token") or doc.get("access_token")
            if not isinstance(token, str):
                raise DownloadError(f"token reply from {params['realm']} holds no token")
            expires = float(doc.get("expires_in") or 60)
            value = f"Bearer {token}"
            # Renewed a little early so a long pull never sends an expired token.
            self._tokens[host] = (value, time.monotonic() + max(expires - 10, expires / 2))
            return {"Authorization": value}
        raise DownloadError(f"{host} asks for unsupported authentication {scheme!r}")


async def fetch_manifest(
    client: httpx.AsyncClient, ref: Reference, auth: RegistryAuth, *, platform: str = "linux/amd64"
) -> Manifest:
    """Resolve ``ref`` to a manifest (an index is resolved to ``platform``'s entry, else its
    first), checking the digest of what the registry sent."""
    doc, digest, media = await _get_manifest(client, ref, ref.ref, auth)
    if media in INDEX_TYPES or "manifests" in doc:
        entries = doc.get("manifests") or []
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
        doc, digest, media = await _get_manifest(client, ref, chosen["digest"], auth)
    layers = [layer for x in doc.get("layers") or [] if (layer := _layer(x, ref)) is not None]
    return Manifest(digest, media, _layer(doc.get("config"), ref), tuple(layers))


def _layer(entry: Any, ref: Reference) -> Layer | None:
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise DownloadError(f"{ref}: a manifest entry is not an object")
    digest, size = entry.get("digest"), entry.get("size")
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise DownloadError(f"{ref}: bad blob digest {str(digest)[:80]!r} in the manifest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise DownloadError(f"{ref}: bad blob size {size!r} in the manifest")
    return Layer(digest, size, str(entry.get("mediaType", "")))


async def _get_manifest(
    client: httpx.AsyncClient, ref: Reference, which: str, auth: RegistryAuth
) -> tuple[dict[str, Any], str, str]:
    url = ref.url("manifests", which)
    challenge: str | None = None
    for _ in range(2):
        headers = {"Accept": ACCEPT} | await auth(url, challenge)
        resp = await client.get(url, headers=headers, follow_redirects=True)
        if resp.status_code == 401 and challenge is None:
            challenge = resp.headers.get("www-authenticate", "")
            continue
        break
    if resp.status_code == 404:
        raise DownloadError(f"{ref}: no such model or tag on {ref.registry} (GET {url}: 404)")
    if resp.status_code != 200:
        raise DownloadError(f"GET {url}: HTTP {resp.status_code}: {resp.text[:200]!r}")
    body = resp.content
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
    return doc, digest, media


__all__ = [
    "ACCEPT",
    "DEFAULT_REGISTRY",
    "Layer",
    "Manifest",
    "Reference",
    "RegistryAuth",
    "fetch_manifest",
    "load_credentials",
    "parse_reference",
]
