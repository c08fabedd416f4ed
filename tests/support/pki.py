"""One test PKI for the TLS tests over TCP and over QUIC, as a pytest fixture.

Import the fixture into a test module (``from .support.pki import pki``); it is built once per
module in a temporary directory.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tensord.certs import init_ca, issue

#: The node ids with certificates (``a``/``b`` for nodes, ``client``/``server`` for QUIC ends).
NODES = ("a", "b", "client", "server")


def make_pki(root: Path) -> Path:
    """Under ``root``: the cluster CA (``ca/``) and its certificates for every node of
    :data:`NODES` (``certs/``); another CA (``other-ca/``) with its own certificates for the
    same ids (``other/``: nodes of another cluster); ``expired/b.*``, issued by the cluster CA
    but no longer valid; and ``both.crt``, trusting both CAs (as during a CA rotation)."""
    init_ca(root / "ca")
    init_ca(root / "other-ca")
    for node in NODES:
        issue(root / "ca", node, root / "certs")
        issue(root / "other-ca", node, root / "other")
    past = datetime.now(UTC) - timedelta(days=2)
    issue(root / "ca", "b", root / "expired", not_before=past, not_after=past + timedelta(days=1))
    both = (root / "ca" / "ca.crt").read_bytes() + (root / "other-ca" / "ca.crt").read_bytes()
    (root / "both.crt").write_bytes(both)
    return root


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test PKI of :func:`make_pki`, made once per test module."""
    return make_pki(tmp_path_factory.mktemp("pki"))
