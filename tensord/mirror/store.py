"""What the mirror serves from: the daemon's model directory, in Ollama's layout.

``blobs/sha256-<hex>`` holds verified blobs (:class:`~tensord.download.blobs.BlobStore`);
``manifests/<registry>/<repository>/<tag>`` holds each pulled manifest as the registry sent it
(:func:`~tensord.download.pull.manifest_path`), so its digest is the SHA-256 of the file. A tag
is looked up under the registry the mirror fetches from; a digest under any registry, since a
digest names the same bytes wherever they came from. Names reaching here were checked by
:func:`~tensord.mirror.protocol.parse_target`, and every manifest read is bounded.

These are blocking file operations: the app runs them in a worker thread.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..download.blobs import BlobStore
from ..download.pull import manifest_path
from ..download.ranges import RangeSet
from ..download.registry import MAX_MANIFEST_BYTES, Reference
from ..fsutil import atomic_write

#: The largest resume record read (it lists the written ranges: a few KiB in practice).
MAX_RECORD_BYTES = 16 << 20


@dataclass(frozen=True)
class Landing:
    """A blob being written: its partial file (inode ``inode``), size, and ranges landed."""

    path: Path
    size: int
    done: RangeSet
    inode: int


class ModelDir:
    """Lookups in one model directory (``<state>/models``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = BlobStore(root)
        self.manifests = root / "manifests"

    def blob(self, digest: str) -> tuple[Path, int] | None:
        """The blob's file and size, if it is complete in the store."""
        path = self.blobs.path(digest)
        try:
            return path, os.stat(path).st_size
        except FileNotFoundError:
            return None

    def inode(self, digest: str) -> int | None:
        """The inode of the complete blob's file (None if it is not complete)."""
        try:
            return os.stat(self.blobs.path(digest)).st_ino
        except FileNotFoundError:
            return None

    def landing(self, digest: str) -> Landing | None:
        """The blob's download in progress as the fetch's resume record describes it: the
        partial file, the blob's size and the ranges written (and made durable) so far. None
        when there is no record (not started, or finished), or it is not one this mirror can
        trust to describe this blob (damaged, another digest, a data file of the wrong size)."""
        path = self.blobs.path(digest)
        data = path.with_name(path.name + ".incomplete")
        record = path.with_name(path.name + ".incomplete.json")
        try:
            with open(record, "rb") as f:
                body = f.read(MAX_RECORD_BYTES + 1)
            if len(body) > MAX_RECORD_BYTES:
                return None
            doc = json.loads(body)
            size = doc["size"]
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                return None
            if doc.get("sha256") != digest.removeprefix("sha256:"):
                return None
            done = RangeSet.from_json(doc["done"], size)
            st = os.stat(data)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if st.st_size != size:
            return None  # not yet sized: the fetch has not opened it for this blob
        return Landing(data, size, done, st.st_ino)

    def manifest_by_tag(self, registry: str, name: str, tag: str) -> bytes | None:
        return _read_manifest(manifest_path(self.root, Reference(registry, name, tag)))

    def manifest_by_digest(self, name: str, digest: str) -> bytes | None:
        """The manifest of ``name`` whose SHA-256 is ``digest``, pulled from any registry."""
        for path in self._manifest_files(name):
            body = _read_manifest(path)
            if body is not None and "sha256:" + hashlib.sha256(body).hexdigest() == digest:
                return body
        return None

    def index_by_digest(self, digest: str) -> bytes | None:
        """An index the mirror kept (:meth:`keep_manifest`): a manifest in the blob store,
        read only if it is manifest-sized and manifest-shaped (a model layer never is read)."""
        path = self.blobs.path(digest)
        try:
            if os.stat(path).st_size > MAX_MANIFEST_BYTES:
                return None
        except FileNotFoundError:
            return None
        body = _read_manifest(path)
        if body is None or "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            return None
        return body

    def keep_manifest(self, digest: str, body: bytes) -> None:
        """Keep a manifest that no pull keeps (an index) in the blob store, by its digest
        (checked by the caller): Ollama's ``manifests/`` tree stays as Ollama reads it."""
        path = self.blobs.path(digest)
        if not path.exists():
            atomic_write(path, body)

    def knows(self, name: str) -> bool:
        """Has any manifest of ``name`` been pulled (so its blobs may be fetched on a miss)?"""
        return any(True for _ in self._manifest_files(name))

    def tags_listing(self, name: str, digest: str) -> list[tuple[str, str]]:
        """``(registry, tag)`` of the stored manifests of ``name`` that list blob ``digest``."""
        out = []
        for path in self._manifest_files(name):
            body = _read_manifest(path)
            if body is not None and digest in _blob_digests(body):
                registry = path.relative_to(self.manifests).parts[0]
                out.append((registry, path.name))
        return out

    def _manifest_files(self, name: str) -> list[Path]:
        try:
            registries = [e.path for e in os.scandir(self.manifests) if e.is_dir()]
        except FileNotFoundError:
            return []
        files = []
        for registry in registries:
            try:
                entries = list(os.scandir(Path(registry) / name))
            except (FileNotFoundError, NotADirectoryError):
                continue
            files += [Path(e.path) for e in entries if e.is_file() and not e.name.startswith(".")]
        return files


def _read_manifest(path: Path) -> bytes | None:
    """A stored manifest's bytes, or None if there is none - or if the file is not a registry
    manifest: tensord before the mirror kept its own JSON summary there, which must be fetched
    again rather than served (a miss re-pulls it; the blobs are kept)."""
    try:
        with open(path, "rb") as f:
            body = f.read(MAX_MANIFEST_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    if len(body) > MAX_MANIFEST_BYTES:
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return body if isinstance(doc, dict) and "schemaVersion" in doc else None


def _blob_digests(body: bytes) -> set[str]:
    try:
        doc = json.loads(body)
    except ValueError:
        return set()
    if not isinstance(doc, dict):
        return set()
    entries = [doc.get("config"), *(doc.get("layers") or [])]
    return {str(e.get("digest")) for e in entries if isinstance(e, dict)}


__all__ = ["MAX_RECORD_BYTES", "Landing", "ModelDir"]
