"""Pulling models from a real CNCF distribution registry (Debian's docker-registry)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from tensord.download import pull as pull_module
from tensord.download.fetch import DownloadError, FetchConfig
from tensord.download.pull import PullProgress, manifest_path, pull_model
from tensord.download.registry import (
    DEFAULT_REGISTRY,
    Credential,
    Reference,
    parse_reference,
)

from .support.registry import registry
from .support.token_issuer import token_issuer

MiB = 1 << 20
FAST = FetchConfig(connections=4, min_piece=2 * MiB, backoff_base=0.01)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("llama3", Reference(DEFAULT_REGISTRY, "library/llama3", "latest")),
        ("llama3:8b", Reference(DEFAULT_REGISTRY, "library/llama3", "8b")),
        ("me/model:q4", Reference(DEFAULT_REGISTRY, "me/model", "q4")),
        ("ghcr.io/org/m:v1", Reference("ghcr.io", "org/m", "v1")),
        ("http://127.0.0.1:5000/m/x:t", Reference("127.0.0.1:5000", "m/x", "t", scheme="http")),
        # Loopback registries speak plain HTTP unless told otherwise (Docker's convention).
        ("localhost/m", Reference("localhost", "m", "latest", scheme="http")),
        ("127.0.0.1:5000/m/x:t", Reference("127.0.0.1:5000", "m/x", "t", scheme="http")),
        ("127.9.0.1/m", Reference("127.9.0.1", "m", "latest", scheme="http")),
        ("[::1]:5000/m", Reference("[::1]:5000", "m", "latest", scheme="http")),
        ("https://localhost:5000/m", Reference("localhost:5000", "m", "latest")),
        ("10.0.0.1:5000/m", Reference("10.0.0.1:5000", "m", "latest")),
        (
            "r.io/m@sha256:" + "a" * 64,
            Reference("r.io", "m", None, "sha256:" + "a" * 64),
        ),
    ],
)
def test_parse_reference(text: str, expected: Reference) -> None:
    assert parse_reference(text) == expected


@pytest.mark.parametrize("bad", ["UPPER/case", "r.io/m@sha256:abc", "r.io/m:bad tag", "r.io/../x"])
def test_bad_references_are_refused_clearly(bad: str) -> None:
    with pytest.raises(DownloadError, match="bad model reference"):
        parse_reference(bad)


def layers(*sizes: int) -> list[bytes]:
    rng = np.random.default_rng(sum(sizes))
    return [rng.integers(0, 255, size=s, dtype=np.uint8).tobytes() for s in sizes]


async def test_pull_a_model_byte_exact_and_digest_checked(tmp_path: Path) -> None:
    with registry(tmp_path) as reg:
        data = layers(9 * MiB + 7, 300_000, 0)
        pushed = reg.push_model("models/tiny", "v1", data)
        ref = parse_reference(f"http://{reg.host}/models/tiny:v1")
        seen: list[PullProgress] = []
        async with httpx.AsyncClient() as client:
            manifest = await pull_model(
                client, ref, tmp_path / "store", config=FAST, progress=seen.append
            )
            assert [b.digest for b in manifest.layers] == [x["digest"] for x in pushed["layers"]]  # type: ignore[index]
            for blob, content in zip(manifest.layers, data, strict=True):
                path = tmp_path / "store" / "blobs" / blob.digest.replace(":", "-")
                assert path.read_bytes() == content
                assert blob.digest == "sha256:" + hashlib.sha256(content).hexdigest()
            # Kept as Ollama keeps it: the registry's bytes, whose SHA-256 is the digest.
            saved = manifest_path(tmp_path / "store", ref).read_bytes()
            assert "sha256:" + hashlib.sha256(saved).hexdigest() == manifest.digest
            assert len(json.loads(saved)["layers"]) == 3
            dones = [p.done for p in seen]
            assert dones == sorted(dones)  # progress never goes backwards
            assert dones[-1] == manifest.total
            # A second pull finds every blob in place and fetches nothing.
            again: list[PullProgress] = []
            await pull_model(client, ref, tmp_path / "store", config=FAST, progress=again.append)
            assert again == []


async def test_basic_auth_from_the_credentials_and_a_clear_error_without(tmp_path: Path) -> None:
    with registry(tmp_path, user=("alice", "s3cret")) as reg:
        (content,) = layers(3 * MiB)
        reg.push_model("private/m", "v1", [content])
        ref = parse_reference(f"http://{reg.host}/private/m:v1")
        async with httpx.AsyncClient() as client:
            with pytest.raises(DownloadError, match="username and password"):
                await pull_model(client, ref, tmp_path / "a", config=FAST)
            creds = {reg.host: ("alice", "s3cret")}
            m = await pull_model(client, ref, tmp_path / "b", credentials=creds, config=FAST)
        path = tmp_path / "b" / "blobs" / m.layers[0].digest.replace(":", "-")
        assert path.read_bytes() == content


async def test_unknown_tag_names_the_model(tmp_path: Path) -> None:
    with registry(tmp_path) as reg:
        ref = parse_reference(f"http://{reg.host}/models/absent:v9")
        async with httpx.AsyncClient() as client:
            with pytest.raises(DownloadError, match="no such model or tag"):
                await pull_model(client, ref, tmp_path / "s", config=FAST)


async def test_bearer_token_flow_with_a_token_issuer(tmp_path: Path) -> None:
    with token_issuer(tmp_path) as issuer, registry(tmp_path, token=issuer) as reg:
        (content,) = layers(2 * MiB + 3)
        reg.push_model("secure/m", "v1", [content])
        issued_by_push = len(issuer.issued)
        ref = parse_reference(f"http://{reg.host}/secure/m:v1")
        async with httpx.AsyncClient() as client:
            with pytest.raises(DownloadError, match=r"token request .* failed: HTTP 401"):
                await pull_model(client, ref, tmp_path / "a", config=FAST)
            # The issuer is another host:port: the credentials go there only if named for it.
            issuer_host = issuer.url.split("/")[2]
            creds = {reg.host: Credential("alice", "s3cret", (issuer_host,))}
            m = await pull_model(client, ref, tmp_path / "b", credentials=creds, config=FAST)
        path = tmp_path / "b" / "blobs" / m.layers[0].digest.replace(":", "-")
        assert path.read_bytes() == content
        # One token for the pull's scope, cached for the manifest and every blob request.
        pulls = issuer.issued[issued_by_push:]
        assert pulls.count("repository:secure/m:pull") == 1, pulls


class _ScriptedFetch:
    """Stands in for a blob's fetch: records when it starts and ends; the test says when it
    ends and whether it reports "nothing more from the origin" first (the real fetches are
    tested above and in test_share.py)."""

    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name
        self.on_origin_done: Callable[[], None] | None = None
        self.started, self.end = trio.Event(), trio.Event()

    async def run(self) -> None:
        self.log.append(f"start {self.name}")
        self.started.set()
        await self.end.wait()
        self.log.append(f"end {self.name}")


async def test_a_blob_whose_rest_comes_from_peers_gives_its_origin_slot_to_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``max_concurrent`` bounds the blobs reading from the origin, not the blobs in flight:
    once a shared blob needs nothing more from the origin the next one starts, while the first
    still takes its last pieces from peers (the origin never idles between blobs)."""
    with registry(tmp_path) as reg:
        reg.push_model("models/three", "v1", layers(1000, 2000, 3000))
        ref = parse_reference(f"http://{reg.host}/models/three:v1")
        log: list[str] = []
        made = iter(_ScriptedFetch(log, f"blob{i}") for i in range(4))  # config + 3 layers
        fetches: dict[str, _ScriptedFetch] = {}
        fetched = trio.Event()  # the manifest was read (no I/O after it)

        def scripted(client: Any, url: str, dest: Path, peers: Any, **kw: Any) -> _ScriptedFetch:
            fetch = next(made)
            fetches[fetch.name] = fetch
            fetched.set()
            return fetch

        monkeypatch.setattr(pull_module, "make_fetch", scripted)

        async def started(name: str) -> _ScriptedFetch:
            await wait_all_tasks_blocked()  # the pull made its next fetch, if it may
            assert name in fetches, f"{name} did not start; so far: {log}"
            await fetches[name].started.wait()
            return fetches[name]

        async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(pull_model, client, ref, tmp_path / "store", max_concurrent=1)
            )
            with trio.fail_after(30):
                await fetched.wait()
            first = await started("blob0")
            await wait_all_tasks_blocked()
            assert log == ["start blob0"]  # one origin slot: nothing else started
            assert first.on_origin_done is not None
            first.on_origin_done()  # its rest comes from peers: the next may start
            second = await started("blob1")
            assert log == ["start blob0", "start blob1"]
            second.end.set()  # ends without ever saying so: its slot comes back at its end
            third = await started("blob2")
            assert log[2:] == ["end blob1", "start blob2"]
            first.end.set()
            third.end.set()
            (await started("blob3")).end.set()
        assert log[-1] == "end blob3" and len(log) == 8
