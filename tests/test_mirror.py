"""The OCI mirror as ``tensord serve`` runs it: real clients (skopeo, httpx, raw sockets) against
a real daemon whose upstream is the CNCF registry, reached through a counting TCP proxy so the
tests see every byte the mirror reads from the upstream."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import trio

from tensord.mirror.protocol import (
    MirrorError,
    Target,
    Upstream,
    choose_upstream,
    parse_range,
    parse_target,
)

from .support.cluster import write_cluster_file
from .support.control_api import ready
from .support.daemons import Daemon, daemon
from .support.helpers import require
from .support.registry import OLLAMA_MODEL, Registry, registry
from .support.tcp_proxy import ChaosProxy, proxied

MiB = 1 << 20
NAME = "library/tiny"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def layers(*sizes: int) -> list[bytes]:
    rng = np.random.default_rng(sum(sizes))
    return [rng.integers(0, 255, size=s, dtype=np.uint8).tobytes() for s in sizes]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_oci_model(reg: Registry, repo: str, tag: str, data: list[bytes]) -> bytes:
    """An Ollama model as an OCI manifest: skopeo copies OCI manifests whatever their layers'
    media types (it refuses Docker v2s2 manifests with Ollama's layer types); returns the
    manifest's bytes."""
    config = json.dumps({"model_format": "gguf", "model_family": "test"}).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": reg.push_blob(repo, config),
                   "size": len(config)},
        "layers": [
            {"mediaType": OLLAMA_MODEL, "digest": reg.push_blob(repo, d), "size": len(d)}
            for d in data
        ],
    }  # fmt: skip
    body = json.dumps(manifest).encode()
    with reg.client() as c:
        headers = {"content-type": OCI_MANIFEST}
        r = c.put(f"/v2/{repo}/manifests/{tag}", content=body, headers=headers)
        assert r.status_code == 201, r.text
    return body


@asynccontextmanager
async def upstream(tmp: Path, data: list[bytes]) -> AsyncIterator[tuple[Registry, ChaosProxy]]:
    """The registry with ``library/tiny:v1`` pushed, behind a proxy that counts connections and
    bytes."""
    with registry(tmp) as reg:
        push_oci_model(reg, NAME, "v1", data)
        async with proxied(reg.port, {}) as proxy:
            yield reg, proxy


@asynccontextmanager
async def mirror(env: dict[str, str], *args: str) -> AsyncIterator[tuple[Daemon, str]]:
    """A daemon with the mirror on loopback, and the mirror's URL."""
    async with daemon({"TENSORD_MIRROR_LISTEN": "127.0.0.1:0", **env}, *args) as d:
        await ready(d)
        end = await d.wait_for("mirror on http://")
        yield d, d.text[end - len("http://") :].split()[0]


def skopeo_copy(url: str, name: str, dest: Path, *extra: str) -> None:
    """``skopeo copy docker://MIRROR/NAME dir:DEST`` (run in a thread: it blocks)."""
    host = url.removeprefix("http://")
    done = subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false", *extra,
         f"docker://{host}/{name}", f"dir:{dest}"],
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode(errors="replace")


def copied_digests(dest: Path) -> tuple[str, set[str]]:
    """The manifest's digest and the blobs skopeo wrote (each checked against its name)."""
    blobs = set()
    for path in dest.iterdir():
        if len(path.name) == 64:
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
            blobs.add(f"sha256:{path.name}")
    return sha((dest / "manifest.json").read_bytes()), blobs


def upstream_reads(proxy: ChaosProxy) -> tuple[int, int]:
    """Connections made to the upstream, and the bytes it sent back."""
    return len(proxy.conns), sum(c.downstream for c in proxy.conns)


async def test_skopeo_copies_through_the_mirror_then_from_the_store(tmp_path: Path) -> None:
    require(shutil.which("skopeo") is not None, "skopeo is not installed (apt-get install skopeo)")
    data = layers(3 * MiB + 5, 70_000)
    async with upstream(tmp_path, data) as (reg, proxy):
        async with httpx.AsyncClient() as c:
            pushed = await c.get(
                f"http://{reg.host}/v2/{NAME}/manifests/v1", headers={"accept": OCI_MANIFEST}
            )
        manifest_digest = sha(pushed.content)
        want = {sha(x) for x in data} | {pushed.json()["config"]["digest"]}
        env = {"TENSORD_MIRROR_UPSTREAM": f"http://{proxy.addr}"}
        async with mirror(env) as (d, url):
            first = tmp_path / "first"
            await trio.to_thread.run_sync(skopeo_copy, url, f"{NAME}:v1", first)
            assert copied_digests(first) == (manifest_digest, want)
            # The pull the miss queued ends with the manifest in the store.
            await d.wait_for(f"{proxy.addr}/{NAME}:v1 done")
            before = upstream_reads(proxy)
            assert before[1] >= sum(len(x) for x in data)

            second = tmp_path / "second"
            await trio.to_thread.run_sync(skopeo_copy, url, f"{NAME}:v1", second)
            assert copied_digests(second) == (manifest_digest, want)
            # ... by digest too.
            by_digest = tmp_path / "by-digest"
            await trio.to_thread.run_sync(skopeo_copy, url, f"{NAME}@{manifest_digest}", by_digest)
            assert copied_digests(by_digest) == (manifest_digest, want)
            assert upstream_reads(proxy) == before  # nothing more came from the upstream

            models = d.home / "state" / "models"
            assert_ollama_layout(models, proxy.addr, manifest_digest, pushed.content)
            await head_and_ranges(url, manifest_digest, data[0])


def assert_ollama_layout(models: Path, registry: str, digest: str, raw: bytes) -> None:
    """The model directory is what Ollama reads with ``OLLAMA_MODELS`` pointing at it
    (ollama's server/manifest.go ``ParseNamedManifest`` and ``GetBlobsPath``): the manifest at
    ``manifests/<host>/<namespace>/<model>/<tag>`` (types/model/name.go ``Filepath``: the host
    as written, port included), holding the registry's bytes (Ollama's digest of a model is the
    SHA-256 of that file), with ``schemaVersion``, ``config`` and ``layers``; every layer at
    ``blobs/sha256-<hex>`` with its size."""
    namespace, model = NAME.split("/")
    path = models / "manifests" / registry / namespace / model / "v1"
    body = path.read_bytes()
    assert body == raw and sha(body) == digest
    doc = json.loads(body)
    assert doc["schemaVersion"] == 2
    for layer in [doc["config"], *doc["layers"]]:
        blob = models / "blobs" / layer["digest"].replace(":", "-")
        assert blob.stat().st_size == layer["size"]
    # Nothing else in the manifests tree: no files of tensord's own beside Ollama's.
    files = [p for p in (models / "manifests").rglob("*") if p.is_file()]
    assert files == [path]


async def head_and_ranges(url: str, manifest_digest: str, blob: bytes) -> None:
    digest, size = sha(blob), len(blob)
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        r = await c.get("/v2/")
        assert r.status_code == 200
        assert r.headers["docker-distribution-api-version"] == "registry/2.0"
        r = await c.head(f"/v2/{NAME}/manifests/v1")
        assert r.status_code == 200 and r.content == b""
        assert r.headers["docker-content-digest"] == manifest_digest
        assert r.headers["content-type"] == OCI_MANIFEST
        manifest = (await c.get(f"/v2/{NAME}/manifests/{manifest_digest}")).content
        assert int(r.headers["content-length"]) == len(manifest)
        assert sha(manifest) == manifest_digest

        r = await c.head(f"/v2/{NAME}/blobs/{digest}")
        assert r.status_code == 200 and r.content == b""
        assert int(r.headers["content-length"]) == size
        assert r.headers["docker-content-digest"] == digest
        assert r.headers["accept-ranges"] == "bytes"
        r = await c.get(f"/v2/{NAME}/blobs/{digest}")
        assert r.status_code == 200 and r.content == blob
        cases = {
            "bytes=100-199": (100, 200),
            f"bytes={size - 10}-": (size - 10, size),
            "bytes=-7": (size - 7, size),
            "bytes=5-99999999999999999": (5, size),  # an end past the blob is clamped
            f"bytes={MiB - 3}-{MiB + 3}": (MiB - 3, MiB + 4),  # across a chunk boundary
        }
        for header, (start, end) in cases.items():
            r = await c.get(f"/v2/{NAME}/blobs/{digest}", headers={"range": header})
            assert r.status_code == 206, header
            assert r.content == blob[start:end], header
            assert r.headers["content-range"] == f"bytes {start}-{end - 1}/{size}"
        r = await c.head(f"/v2/{NAME}/blobs/{digest}", headers={"range": "bytes=10-19"})
        assert r.status_code == 206 and r.headers["content-length"] == "10" and r.content == b""
        for header in (f"bytes={size}-", "bytes=9-3", "bytes=1-2-3", "bytes=" + "9" * 40 + "-"):
            r = await c.get(f"/v2/{NAME}/blobs/{digest}", headers={"range": header})
            assert r.status_code == 416, header
            assert r.headers["content-range"] == f"bytes */{size}"
            assert r.json()["errors"][0]["code"] == "RANGE_INVALID"


async def raw_request(url: str, target: bytes) -> bytes:
    """One request sent as given (no client normalises its path), and the status line back."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(b"GET %s HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n" % target)
        reply = b""
        while b"\r\n" not in reply and (chunk := await stream.receive_some(65536)):
            reply += chunk
    return reply.split(b"\r\n", 1)[0]


async def test_errors_in_oci_form_and_hostile_requests(tmp_path: Path) -> None:
    data = layers(200_000)
    async with upstream(tmp_path, data) as (_, proxy):
        env = {"TENSORD_MIRROR_UPSTREAM": f"http://{proxy.addr}"}
        async with mirror(env) as (d, url), httpx.AsyncClient(base_url=url, timeout=30) as c:

            async def error(path: str, status: int, code: str, method: str = "GET") -> None:
                r = await c.request(method, path)
                assert r.status_code == status, (path, r.text)
                if method != "HEAD":
                    assert r.json()["errors"][0]["code"] == code, (path, r.text)

            await error("/v2/nosuch/model/manifests/latest", 404, "MANIFEST_UNKNOWN")
            await error(f"/v2/nosuch/model/blobs/{sha(b'x')}", 404, "BLOB_UNKNOWN")
            # A known repository: the unknown digest is asked of the upstream, which lacks it.
            r = await c.get(f"/v2/{NAME}/manifests/v1")
            assert r.status_code == 200
            await d.wait_for(f"{proxy.addr}/{NAME}:v1 done")
            await error(f"/v2/{NAME}/blobs/{sha(b'not there')}", 404, "BLOB_UNKNOWN")
            await error(f"/v2/{NAME}/blobs/sha256:zz", 400, "DIGEST_INVALID")
            await error(f"/v2/{NAME}/blobs/md5:{'0' * 32}", 400, "DIGEST_INVALID")
            await error(f"/v2/{NAME}/blobs/latest", 400, "DIGEST_INVALID")
            await error(f"/v2/{NAME}/manifests/{'t' * 200}", 400, "MANIFEST_INVALID")
            await error(f"/v2/{'a' * 300}/manifests/latest", 400, "NAME_INVALID")
            await error("/v2/UPPER/case/manifests/latest", 400, "NAME_INVALID")
            await error(f"/v2/{NAME}/manifests/v1", 405, "UNSUPPORTED", "DELETE")
            await error(f"/v2/{NAME}/blobs/uploads/", 405, "UNSUPPORTED", "POST")
            await error("/v2/_catalog", 404, "UNSUPPORTED")
            # With mirror.upstream set, a client's ns does not send the daemon elsewhere.
            await error("/v2/x/manifests/latest?ns=example.com", 404, "MANIFEST_UNKNOWN")
            for target in (
                b"/v2/../../../etc/passwd/manifests/latest",
                b"/v2/library/%2e%2e/%2e%2e/x/manifests/latest",
                b"/v2/library/tiny/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd",
                b"/v2/library/tiny/manifests/..",
                b"/v2//etc/manifests/latest",
            ):
                status = await raw_request(url, target)
                assert status.startswith(b"HTTP/1.1 4"), (target, status)
            # The daemon carries on: the model is still served, byte-exact.
            r = await c.get(f"/v2/{NAME}/blobs/{sha(data[0])}")
            assert r.status_code == 200 and r.content == data[0]
            assert "Traceback" not in d.text


async def test_api_key_required_when_configured(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# mirror clients\nk-123\n")
    path = write_cluster_file(tmp_path / "c.json", mirror={"api_keys_file": str(keys)})
    data = layers(100_000)
    async with upstream(tmp_path, data) as (_, proxy):
        upstream_url = f"http://{proxy.addr}"
        await keys_checked(path, upstream_url, data, tmp_path)


async def keys_checked(path: Path, upstream_url: str, data: list[bytes], tmp_path: Path) -> None:
    async with (
        mirror({"TENSORD_MIRROR_UPSTREAM": upstream_url}, "--cluster", str(path)) as (_, url),
        httpx.AsyncClient(base_url=url, timeout=30) as c,
    ):
        r = await c.get("/v2/")
        assert r.status_code == 401 and r.json()["errors"][0]["code"] == "UNAUTHORIZED"
        assert r.headers["www-authenticate"].startswith("Basic")
        bad = {"authorization": "Bearer k-12"}
        assert (await c.get("/v2/", headers=bad)).status_code == 401
        bearer = {"authorization": "Bearer k-123"}
        assert (await c.get("/v2/", headers=bearer)).status_code == 200
        # Registry clients given a username and password send Basic: the key is the password.
        basic = {"authorization": "Basic " + base64.b64encode(b"anyone:k-123").decode()}
        assert (await c.get("/v2/", headers=basic)).status_code == 200
        r = await c.get(f"/v2/{NAME}/blobs/{sha(b'x')}")
        assert r.status_code == 401  # before anything else is looked at
        # skopeo given the key as a password answers the Basic challenge (the README's recipe).
        if shutil.which("skopeo") is not None:
            dest = tmp_path / "copy"
            creds = ("--src-creds", "anyone:k-123")
            await trio.to_thread.run_sync(skopeo_copy, url, f"{NAME}:v1", dest, *creds)
            assert sha(data[0]) in copied_digests(dest)[1]


async def test_off_loopback_without_api_keys_refused_at_start() -> None:
    env = {"TENSORD_MIRROR_LISTEN": "0.0.0.0:0"}
    async with daemon(env) as d:
        with trio.fail_after(30):
            await d.proc.wait()
        assert d.proc.returncode == 78
        assert "mirror.api_keys_file" in d.text


def test_upstream_choice_and_request_grammar() -> None:
    """Sans-I/O: where a miss goes, and what a request may name."""
    assert choose_upstream("http://10.0.0.9:5000", b"ns=docker.io") == Upstream(
        "http", "10.0.0.9:5000"
    )
    assert choose_upstream(None, b"ns=docker.io") == Upstream("https", "registry-1.docker.io")
    assert choose_upstream(None, b"ns=127.0.0.1:5000") == Upstream("http", "127.0.0.1:5000")
    assert choose_upstream(None, b"") == Upstream("https", "registry.ollama.ai")
    for ns in (b"ns=bad%20host", b"ns=a/b", b"ns=" + b"a" * 300, b"ns=x:99999999"):
        with pytest.raises(MirrorError) as info:
            choose_upstream(None, ns)
        assert info.value.code == "NAME_INVALID"
    assert parse_target("/v2/") is None
    assert parse_target(f"/v2/a/b/c/blobs/{sha(b'')}") == Target("a/b/c", "blobs", sha(b""))
    assert parse_range("bytes=0-0", 1) == (0, 1)
    assert parse_range("bytes=0-1,5-6", 10) is None  # several ranges: the whole blob
    assert parse_range("items=0-1", 10) is None
    with pytest.raises(MirrorError):
        parse_range("bytes=-5", 0)


def test_a_manifest_file_of_an_older_tensord_is_a_miss_not_served(tmp_path: Path) -> None:
    """tensord before the mirror kept a JSON summary where the manifest now lives: the mirror
    must not serve it as a manifest (a miss fetches the real one again; blobs are kept)."""
    from tensord.mirror.store import ModelDir

    root = tmp_path / "models"
    path = root / "manifests" / "127.0.0.1:5000" / "library" / "m" / "v1"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"reference": "x", "digest": "sha256:" + "0" * 64, "blobs": []}))
    models = ModelDir(root)
    assert models.manifest_by_tag("127.0.0.1:5000", "library/m", "v1") is None
    real = json.dumps({"schemaVersion": 2, "layers": []}).encode()
    path.write_bytes(real)
    assert models.manifest_by_tag("127.0.0.1:5000", "library/m", "v1") == real
