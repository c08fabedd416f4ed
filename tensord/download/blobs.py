"""The content-addressed blob store: ``blobs/sha256-<hex>``, written only by a verified rename.

A blob's file name is its digest, so a name read from a manifest (untrusted) is checked against
``sha256:<64 hex>`` before it becomes a path: it can never escape the directory. In-progress
downloads live beside their final name as ``.incomplete`` files with a ranges file (see
:mod:`tensord.download.fetch`).
"""

from __future__ import annotations

import os
from pathlib import Path

from .fetch import DownloadError
from .registry import DIGEST_RE


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root / "blobs"
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        """Where blob ``digest`` (``sha256:<hex>``) lives, complete or not."""
        if not DIGEST_RE.fullmatch(digest):
            raise DownloadError(f"bad digest {digest[:80]!r}: expected sha256:<64 hex digits>")
        return self.root / digest.replace(":", "-")

    def has(self, digest: str, size: int | None = None) -> bool:
        try:
            st = os.stat(self.path(digest))
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def list(self) -> list[tuple[str, int]]:
        out = []
        for entry in os.scandir(self.root):
            name = entry.name
            if name.startswith("sha256-") and "." not in name and entry.is_file():
                out.append((name.replace("-", ":", 1), entry.stat().st_size))
        return sorted(out)


__all__ = ["BlobStore"]
