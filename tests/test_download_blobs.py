"""The blob store never builds a path from a digest it has not validated."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensord.download.blobs import BlobStore
from tensord.download.fetch import DownloadError

HEX = "ab" * 32


@pytest.mark.parametrize(
    "digest",
    [
        f"sha256:../../{HEX[:58]}",
        f"sha256:{HEX}/../../etc/passwd",
        "sha256:/etc/passwd",
        f"sha512:{HEX}",
        f"sha256:{HEX.upper()}",
        f"sha256:{HEX}\n",
        f"sha256:{HEX}\x00",
        f"sha256:{HEX[:-1]}",
        "",
    ],
)
def test_hostile_digests_are_refused(tmp_path: Path, digest: str) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(DownloadError, match="bad digest"):
        store.path(digest)


def test_a_valid_digest_stays_inside_the_store(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    path = store.path(f"sha256:{HEX}")
    assert path.parent == tmp_path / "blobs" and path.name == f"sha256-{HEX}"
