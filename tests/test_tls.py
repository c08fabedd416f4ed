"""Mutual TLS between real nodes: the cluster CA, node certificates, identity = node id."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import trio

from tensord.config import SecuritySettings, Settings, TlsSettings, load_settings
from tensord.errors import AuthenticationFailed

from .support import pki as shared_pki
from .support.cluster import write_cluster_file
from .support.helpers import LogWaiter, fast_settings, running

pki = shared_pki.pki  # the fixture: the suite's one test PKI (tests/support/pki.py)


def tls_node(
    pki: Path, node: str, certs: str = "certs", ca: str = "ca", secret: bool = False
) -> Settings:
    base = fast_settings(authenticated=secret)
    tls = TlsSettings(pki / ca / "ca.crt", pki / certs / f"{node}.crt", pki / certs / f"{node}.key")
    return replace(base, node_id=node, security=replace(base.security, tls=tls))


def plain_node(node: str) -> Settings:
    return replace(fast_settings(authenticated=False), node_id=node)


async def test_mutual_tls_transfer_and_pull(pki: Path) -> None:
    array = np.random.default_rng(1).standard_normal(300_000).astype(np.float32)
    async with running(tls_node(pki, "a")) as a, running(tls_node(pki, "b")) as b:
        await a.send_tensor(f"127.0.0.1:{b.port}", "w", array)
        got = await b.receive_tensor()
        assert got.sender == "a" and np.array_equal(got.array, array)


async def test_tls_and_the_cluster_secret_together(pki: Path) -> None:
    array = np.arange(5000, dtype=np.int64)
    async with (
        running(tls_node(pki, "a", secret=True)) as a,
        running(tls_node(pki, "b", secret=True)) as b,
    ):
        await a.send_tensor(f"127.0.0.1:{b.port}", "w", array)
        assert np.array_equal((await b.receive_tensor()).array, array)


@pytest.mark.parametrize(
    ("dialer", "listener", "dialer_says", "listener_logs"),
    [
        (("a", "other", "other-ca"), ("b", "certs", "ca"), "TLS", "TLS handshake failed"),
        (("a", "certs", "ca"), ("b", "other", "other-ca"), "TLS handshake failed", "TLS"),
        (("a", "certs", "ca"), ("b", "expired", "ca"), "TLS handshake failed", "TLS"),
        (("b", "expired", "ca"), ("a", "certs", "ca"), "TLS", "TLS handshake failed"),
        (("c", "certs", "ca"), ("b", "certs", "ca"), "certificate is for 'a'", "certificate"),
        (None, ("b", "certs", "ca"), "requires TLS", "requires TLS"),
        (("a", "certs", "ca"), None, "TLS", "speaks TLS"),
    ],
    ids=[
        "dialer from another CA",
        "listener from another CA",
        "listener certificate expired",
        "dialer certificate expired",
        "a certificate for another node id",
        "plaintext to a TLS listener",
        "TLS to a plaintext listener",
    ],
)
async def test_refusals_are_typed_fast_and_logged(
    pki: Path,
    caplog: pytest.LogCaptureFixture,
    dialer: tuple[str, str, str] | None,
    listener: tuple[str, str, str] | None,
    dialer_says: str,
    listener_logs: str,
) -> None:
    def settings(spec: tuple[str, str, str] | None, default: str) -> Settings:
        if spec is None:
            return plain_node(default)
        node, certs, ca = spec
        if node == "c":  # claims to be "c" with a's certificate
            return replace(tls_node(pki, "a", certs, ca), node_id="c")
        return tls_node(pki, node, certs, ca)

    caplog.set_level(logging.INFO, logger="tensord")
    seen = LogWaiter(lambda m: "refused" in m and listener_logs in m)
    with seen.watching("tensord"):
        async with running(settings(dialer, "a")) as d, running(settings(listener, "b")) as lis:
            target = f"127.0.0.1:{lis.port}"
            with trio.fail_after(10), pytest.raises(AuthenticationFailed, match=dialer_says):
                await d.send_tensor(target, "w", np.zeros(16))
            with trio.fail_after(10):
                await seen.event.wait()


#: The two nodes of the shared cluster files below (addresses never dialled).
NODES = {"a": "10.0.0.1:7070", "b": "10.0.0.2:7070"}


def test_node_placeholder_in_tls_paths_of_a_shared_cluster_file(tmp_path: Path) -> None:
    tls = {"ca": "/etc/t/ca.crt", "cert": "/etc/t/{node}.crt", "key": "/etc/t/{node}.key"}
    cluster = write_cluster_file(tmp_path / "cluster.json", NODES, security={"tls": tls})
    s = load_settings({}, cluster_file=cluster, node_id="b", library=True)
    assert s.security.tls == TlsSettings(
        Path("/etc/t/ca.crt"), Path("/etc/t/b.crt"), Path("/etc/t/b.key")
    )
    assert isinstance(s.security, SecuritySettings)


def test_credentials_placeholder_and_the_cluster_secret_credential(tmp_path: Path) -> None:
    from tensord.errors import ConfigError

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "cluster.secret").write_text("s" * 32)
    tls = {
        "ca": "{credentials}/ca.crt",
        "cert": "{credentials}/node.crt",
        "key": "{credentials}/node.key",
    }
    cluster = write_cluster_file(tmp_path / "cluster.json", NODES, security={"tls": tls})
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    s = load_settings(env, cluster_file=cluster, node_id="a", library=True)
    assert s.security.secret_file == creds / "cluster.secret"
    assert s.security.tls == TlsSettings(creds / "ca.crt", creds / "node.crt", creds / "node.key")
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY is not set"):
        load_settings({}, cluster_file=cluster, node_id="a", library=True)
