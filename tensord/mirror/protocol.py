"""The mirror's HTTP grammar, sans I/O: which request is which, byte ranges, OCI errors.

Everything a client sends is checked here before it names a file or sizes a reply: a repository
name must match the Distribution grammar (so ``..`` and absolute paths never reach the store), a
digest must be ``sha256:<64 hex>``, a tag the registry's tag grammar, a ``Range`` at most one
range of at most ``MAX_RANGE_DIGITS`` digits per number. What is not understood is answered with
an error in the OCI format (``{"errors": [{"code", "message", "detail"}]}``), never an exception.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from ..download.registry import (
    DEFAULT_REGISTRY,
    DIGEST_RE,
    REPOSITORY_RE,
    TAG_RE,
    registry_is_loopback,
)

#: The longest repository name accepted (the Distribution spec's practical limit).
MAX_NAME = 255
#: The most digits a number in a ``Range`` header may have (2**63 has 19).
MAX_RANGE_DIGITS = 19
#: ``ns`` values containerd sends that are not the registry's API host.
_NS_HOSTS = {"docker.io": "registry-1.docker.io"}
_HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})(?::[0-9]{1,5})?")
_ROUTE_RE = re.compile(r"/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)")
_RANGE_RE = re.compile(r"bytes=(?P<start>[0-9]*)-(?P<end>[0-9]*)")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


class MirrorError(Exception):
    """A request answered with an OCI error: ``status``, ``code`` (``BLOB_UNKNOWN``...)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: object = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = headers or []

    def body(self) -> bytes:
        entry: dict[str, object] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            entry["detail"] = self.detail
        return json.dumps({"errors": [entry]}).encode()


@dataclass(frozen=True)
class Target:
    """``/v2/<name>/<kind>/<reference>``: ``kind`` is ``manifests`` or ``blobs``; ``reference``
    a digest (``is_digest``) or a tag (manifests only)."""

    name: str
    kind: str
    reference: str

    @property
    def is_digest(self) -> bool:
        return self.reference.startswith("sha256:")


def parse_target(path: str) -> Target | None:
    """The manifest or blob ``path`` names (checked), None for ``/v2/`` itself; raises
    :class:`MirrorError` for a path that is neither, or names something malformed."""
    if path in ("/v2", "/v2/"):
        return None
    m = _ROUTE_RE.fullmatch(path)
    if m is None:
        raise MirrorError(404, "UNSUPPORTED", f"no endpoint {path[:200]!r} on this mirror")
    name, kind, ref = m["name"], m["kind"], m["ref"]
    if len(name) > MAX_NAME or not REPOSITORY_RE.fullmatch(name):
        raise MirrorError(400, "NAME_INVALID", "invalid repository name", name[:MAX_NAME])
    if ref.startswith("sha256:") or ":" in ref or kind == "blobs":
        if not DIGEST_RE.fullmatch(ref):
            raise MirrorError(
                400, "DIGEST_INVALID", "expected a digest sha256:<64 lowercase hex>", ref[:100]
            )
    elif not TAG_RE.fullmatch(ref):
        raise MirrorError(400, "MANIFEST_INVALID", "invalid tag", ref[:130])
    return Target(name, kind, ref)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The half-open ``[start, end)`` a ``Range`` header asks of a ``size``-byte blob, None for
    the whole blob (no header, or one this mirror ignores as RFC 9110 allows: several ranges, a
    unit other than bytes). An end past the blob is clamped; a start past it raises 416."""
    if header is None:
        return None
    text = header.strip()
    if "," in text or not text.startswith("bytes="):
        return None

    def unsatisfiable(why: str) -> MirrorError:
        headers = [(b"content-range", f"bytes */{size}".encode())]
        return MirrorError(416, "RANGE_INVALID", why, text[:100], headers)

    m = _RANGE_RE.fullmatch(text)
    if m is None or (not m["start"] and not m["end"]):
        raise unsatisfiable("malformed Range header")
    if len(m["start"]) > MAX_RANGE_DIGITS or len(m["end"]) > MAX_RANGE_DIGITS:
        raise unsatisfiable("a Range beyond any blob")
    if not m["start"]:  # the last N bytes
        last = int(m["end"])
        if last == 0 or size == 0:
            raise unsatisfiable("an empty suffix range")
        return max(0, size - last), size
    start = int(m["start"])
    end = int(m["end"]) + 1 if m["end"] else size
    if end <= start:
        raise unsatisfiable("a range that ends before it starts")
    if start >= size:
        raise unsatisfiable(f"the range starts past the blob's {size} bytes")
    return start, min(end, size)


@dataclass(frozen=True)
class Upstream:
    """Where a miss is fetched from: ``scheme`` and ``registry`` (``host[:port]``)."""

    scheme: str
    registry: str

    def reference(self, name: str, reference: str) -> str:
        """The model reference the download manager pulls (tag, or ``@digest``)."""
        sep = "@" if reference.startswith("sha256:") else ":"
        return f"{self.scheme}://{self.registry}/{name}{sep}{reference}"

    def blob_url(self, name: str, digest: str) -> str:
        return f"{self.scheme}://{self.registry}/v2/{name}/blobs/{digest}"


def choose_upstream(configured: str | None, query: bytes) -> Upstream:
    """``mirror.upstream`` when set (a client cannot redirect the daemon elsewhere), else the
    registry containerd names in ``?ns=``, else Ollama's registry."""
    if configured is not None:
        parts = urlsplit(configured)
        return Upstream(parts.scheme or "https", parts.netloc)
    ns = (parse_qs(query.decode("latin-1")).get("ns") or [""])[0]
    if ns:
        if not _HOST_RE.fullmatch(ns):
            raise MirrorError(400, "NAME_INVALID", "bad ns query parameter", ns[:100])
        host = _NS_HOSTS.get(ns, ns)
        return Upstream("http" if registry_is_loopback(host) else "https", host)
    return Upstream("https", DEFAULT_REGISTRY)


def media_type(manifest: bytes) -> str:
    """The manifest's content type: its own ``mediaType``, else what its shape says."""
    try:
        doc = json.loads(manifest)
    except ValueError:
        return OCI_MANIFEST
    if isinstance(doc, dict):
        declared = doc.get("mediaType")
        if isinstance(declared, str) and declared.isprintable() and len(declared) < 200:
            return declared
        if "manifests" in doc:
            return OCI_INDEX
    return OCI_MANIFEST


__all__ = [
    "MAX_NAME",
    "MirrorError",
    "Target",
    "Upstream",
    "choose_upstream",
    "media_type",
    "parse_range",
    "parse_target",
]
