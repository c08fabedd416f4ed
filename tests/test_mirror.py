"""The OCI mirror as ``tensord serve`` runs it: real clients (skopeo, httpx, raw sockets) against
a real daemon whose upstream is the CNCF registry, reached through a counting TCP proxy so the
tests see every byte the mirror reads from the upstream."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import trio

from tensord.certs import issue
from tensord.mirror.protocol import (
    MirrorError,
    Target,
    Upstream,
    choose_upstream,
    parse_range,
    parse_target,
)

from .support import pki as shared_pki
from .support.cluster import write_cluster_file
from .support.control_api import ready
from .support.daemons import Daemon, daemon
from .support.helpers import require
from .support.registry import OCI_CONFIG, OCI_MANIFEST, OLLAMA_MODEL, Registry, registry
from .support.tcp_proxy import ChaosProxy, proxied

pki = shared_pki.pki  # the fixture: the suite's one test PKI (tests/support/pki.py)

MiB = 1 << 20
NAME = "library/tiny"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def layers(*sizes: int) -> list[bytes]:
    rng = np.random.default_rng(sum(sizes))
    return [rng.integers(0, 255, size=s, dtype=np.uint8).tobytes() for s in sizes]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_oci_model(reg: Registry, repo: str, tag: str, data: list[bytes]) -> bytes:
    """An Ollama model as an OCI manifest (what skopeo copies); returns the manifest's bytes."""
    return json.dumps(reg.push_model(repo, tag, data, oci=True)).encode()


@asynccontextmanager
async def upstream(tmp: Path, data: list[bytes]) -> AsyncIterator[tuple[Registry, ChaosProxy]]:
    """The registry with ``library/tiny:v1`` pushed, behind a proxy that counts connections and
    bytes."""
    with registry(tmp) as reg:
        push_oci_model(reg, NAME, "v1", data)
        async with proxied(reg.port, {}) as proxy:
            yield reg, proxy


@asynccontextmanager
async def mirror(
    env: dict[str, str], *args: str, scheme: str = "http"
) -> AsyncIterator[tuple[Daemon, str]]:
    """A daemon with the mirror on loopback (unless ``env`` says otherwise), and its URL."""
    async with daemon({"TENSORD_MIRROR_LISTEN": "127.0.0.1:0", **env}, *args) as d:
        await ready(d)
        prefix = f"mirror on {scheme}://"
        end = await d.wait_for(prefix)
        yield d, d.text[end - len(f"{scheme}://") :].split()[0]


def skopeo_copy(url: str, name: str, dest: Path, *extra: str) -> None:
    """``skopeo copy docker://MIRROR/NAME dir:DEST`` (run in a thread: it blocks); plain HTTP
    unless ``extra`` says how to verify the mirror's certificate."""
    host = url.removeprefix("http://").removeprefix("https://")
    verify = (
        [] if any(x.startswith("--src-cert-dir") for x in extra) else ["--src-tls-verify=false"]
    )
    done = subprocess.run(
        ["skopeo", "--insecure-policy", "copy", *verify, *extra,
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


def tls_files(pki: Path, tmp: Path) -> dict[str, Path]:
    """A server certificate for 127.0.0.1 and a client certificate, from the test CA; and a
    skopeo certificate directory (``*.crt`` roots, ``*.cert``/``*.key`` its client pair)."""
    ca = pki / "ca"
    server_crt, server_key = issue(ca, "mirror", tmp / "server", hosts=["127.0.0.1", "localhost"])
    client_crt, client_key = issue(ca, "client", tmp / "client")
    skopeo_dir = tmp / "skopeo-certs"
    skopeo_dir.mkdir()
    shutil.copy(ca / "ca.crt", skopeo_dir / "ca.crt")
    shutil.copy(client_crt, skopeo_dir / "client.cert")
    shutil.copy(client_key, skopeo_dir / "client.key")
    files = {"ca": ca / "ca.crt", "cert": server_crt, "key": server_key}
    return files | {"client_cert": client_crt, "client_key": client_key, "skopeo": skopeo_dir}


async def test_tls_mirror_verified_by_its_clients_and_verifying_theirs(
    tmp_path: Path, pki: Path
) -> None:
    """mirror.tls with client_ca: HTTPS whose certificate clients verify (httpx with the test
    CA, skopeo with a certificate directory), clients without a certificate turned away; and
    since clients are authenticated, it may listen off loopback without API keys."""
    f = tls_files(pki, tmp_path)
    tls = {"cert": str(f["cert"]), "key": str(f["key"]), "client_ca": str(f["ca"])}
    cluster = write_cluster_file(tmp_path / "c.json", mirror={"tls": tls})
    data = layers(2 * MiB + 3)
    async with upstream(tmp_path, data) as (_, proxy):
        env = {
            "TENSORD_MIRROR_UPSTREAM": f"http://{proxy.addr}",
            "TENSORD_MIRROR_LISTEN": "0.0.0.0:0",
        }
        async with mirror(env, "--cluster", str(cluster), scheme="https") as (d, url):
            url = "https://127.0.0.1:" + url.rsplit(":", 1)[1]
            assert "client certificates required" in d.text
            trust = ssl.create_default_context(cafile=str(f["ca"]))
            anonymous = httpx.AsyncClient(base_url=url, verify=trust, timeout=30)
            with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake fails
                async with anonymous:
                    await anonymous.get("/v2/")
            trust.load_cert_chain(f["client_cert"], f["client_key"])
            async with httpx.AsyncClient(base_url=url, verify=trust, timeout=30) as c:
                assert (await c.get("/v2/")).status_code == 200
                r = await c.get(f"/v2/{NAME}/manifests/v1")
                assert r.status_code == 200
                blob = await c.get(f"/v2/{NAME}/blobs/{sha(data[0])}")
                assert blob.status_code == 200 and blob.content == data[0]
            # A client that does not trust the test CA does not get through either.
            async with httpx.AsyncClient(base_url=url, timeout=30) as untrusting:
                with pytest.raises(httpx.ConnectError):
                    await untrusting.get("/v2/")
            if shutil.which("skopeo") is not None:
                dest = tmp_path / "copy"
                cert_dir = ("--src-cert-dir", str(f["skopeo"]))
                await trio.to_thread.run_sync(skopeo_copy, url, f"{NAME}:v1", dest, *cert_dir)
                assert sha(data[0]) in copied_digests(dest)[1]


async def test_tls_without_client_certificates_is_no_licence_to_leave_loopback(
    tmp_path: Path, pki: Path
) -> None:
    """TLS alone encrypts; it does not say who asks: off loopback the mirror still wants API
    keys or client certificates, and a certificate it cannot load is a configuration error."""
    f = tls_files(pki, tmp_path)
    cases = {
        "open": ({"cert": str(f["cert"]), "key": str(f["key"])}, "0.0.0.0:0", "tls.client_ca"),
        "no key": ({"cert": str(f["cert"]), "key": str(tmp_path / "nokey")}, "127.0.0.1:0",
                   "cannot load the certificate"),
    }  # fmt: skip
    for name, (tls, listen, said) in cases.items():
        cluster = write_cluster_file(tmp_path / f"{name}.json", mirror={"tls": tls})
        async with daemon({"TENSORD_MIRROR_LISTEN": listen}, "--cluster", str(cluster)) as d:
            with trio.fail_after(30):
                await d.proc.wait()
            assert d.proc.returncode == 78, name
            assert said in d.text, (name, d.text)


def push_index(reg: Registry, repo: str, tag: str) -> tuple[bytes, dict[str, bytes]]:
    """A two-platform image: one OCI manifest per platform (pushed by digest, each with its own
    layer) under an OCI index tagged ``tag``. Returns the index and each platform's layer."""
    entries, platform_layers = [], {}
    for arch in ("amd64", "arm64"):
        layer = f"layer of {arch}".encode() * 1000
        body = push_oci_model(reg, repo, f"only-{arch}", [layer])
        entries.append({"mediaType": OCI_MANIFEST, "digest": sha(body), "size": len(body),
                        "platform": {"os": "linux", "architecture": arch}})  # fmt: skip
        platform_layers[arch] = layer
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    with reg.client() as c:
        r = c.put(f"/v2/{repo}/manifests/{tag}", content=index,
                  headers={"content-type": OCI_INDEX})  # fmt: skip
        assert r.status_code == 201, r.text
    return index, platform_layers


async def test_a_multi_platform_index_by_digest(tmp_path: Path) -> None:
    """A client that resolved a tag at the registry (containerd with only the "pull"
    capability) or holds an image pinned by digest asks the mirror for the index by its digest:
    it gets the index's bytes, then its platform's manifest and blobs by digest; the index is
    kept, so asking again reads nothing from the upstream."""
    with registry(tmp_path) as reg:
        index, platform_layers = push_index(reg, NAME, "multi")
        async with proxied(reg.port, {}) as proxy:
            env = {"TENSORD_MIRROR_UPSTREAM": f"http://{proxy.addr}"}
            async with mirror(env) as (_, url), httpx.AsyncClient(base_url=url, timeout=30) as c:
                r = await c.get(f"/v2/{NAME}/manifests/{sha(index)}")
                assert r.status_code == 200, r.text
                assert r.content == index
                assert r.headers["content-type"] == OCI_INDEX
                assert r.headers["docker-content-digest"] == sha(index)
                if shutil.which("skopeo") is not None:
                    # skopeo picks the arm64 entry of the index and copies that image.
                    dest = tmp_path / "arm64"
                    arch = ("--override-os", "linux", "--override-arch", "arm64")
                    ref = f"{NAME}@{sha(index)}"
                    await trio.to_thread.run_sync(skopeo_copy, url, ref, dest, *arch)
                    assert sha(platform_layers["arm64"]) in copied_digests(dest)[1]
                before = upstream_reads(proxy)
                r = await c.head(f"/v2/{NAME}/manifests/{sha(index)}")
                assert r.status_code == 200 and r.headers["docker-content-digest"] == sha(index)
                assert (await c.get(f"/v2/{NAME}/manifests/{sha(index)}")).content == index
                assert upstream_reads(proxy) == before


class GatedUpstream:
    """A registry of one model whose layer is held: of every reply for it (ranges honoured, as
    registries do), the bytes before :data:`HELD` go at once, those after 4 KiB at a time (a
    slow origin: the download keeps making progress) until the test opens :attr:`gate`, then
    at once. With ``corrupt``, the first reply holding byte ``-1000`` flips it: the download's
    SHA-256 check fails and it starts over, and later replies send good bytes."""

    HELD = 2 * MiB

    def __init__(self, layer: bytes, *, corrupt: bool) -> None:
        self.layer = layer
        self.corrupt = corrupt
        self.gate = trio.Event()
        config = json.dumps({"model_format": "gguf"}).encode()
        self.blobs = {sha(config): config, sha(layer): layer}
        self.manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha(config), "size": len(config)},
            "layers": [{"mediaType": OLLAMA_MODEL, "digest": sha(layer), "size": len(layer)}],
        }).encode()  # fmt: skip
        self.port = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self.handle, listeners)
            task_status.started()

    async def handle(self, stream: trio.SocketStream) -> None:
        """One request; a client that goes away (a downloader replacing a connection, or
        cutting a reply short) ends only its connection."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.reply(stream)

    async def reply(self, stream: trio.SocketStream) -> None:
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head and (data := await stream.receive_some(65536)):
                head += data
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1] if lines[0].count(" ") >= 2 else ""
            ranges = [x.split("=", 1)[1] for x in lines if x.lower().startswith("range: bytes=")]
            digest = path.rsplit("/", 1)[-1]
            if path == f"/v2/{NAME}/manifests/v1":
                await self.send(stream, "200 OK", self.manifest, OCI_MANIFEST)
            elif path.startswith(f"/v2/{NAME}/blobs/") and digest in self.blobs:
                body = self.blobs[digest]
                start, end = 0, len(body)
                if ranges:
                    first, _, last = ranges[0].partition("-")
                    start, end = int(first), min(int(last) + 1, len(body))
                status = "206 Partial Content" if ranges else "200 OK"
                extra = f"content-range: bytes {start}-{end - 1}/{len(body)}\r\n" if ranges else ""
                if digest != sha(self.layer):
                    await self.send(stream, status, body[start:end], "text/plain", extra)
                else:
                    await self.send_held(stream, status, extra, start, end)
            else:
                await stream.send_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")

    @staticmethod
    async def send(
        stream: trio.SocketStream, status: str, body: bytes, content_type: str, extra: str = ""
    ) -> None:
        head = f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\n{extra}"
        head += f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        await stream.send_all(head.encode() + body)

    async def send_held(
        self, stream: trio.SocketStream, status: str, extra: str, start: int, end: int
    ) -> None:
        data = bytearray(self.layer[start:end])
        flip = len(self.layer) - 1000
        if self.corrupt and start <= flip < end:
            self.corrupt = False
            data[flip - start] ^= 0xFF
        head = f"HTTP/1.1 {status}\r\ncontent-length: {len(data)}\r\n{extra}"
        head += "connection: close\r\n\r\n"
        pos = max(0, min(self.HELD - start, len(data)))
        await stream.send_all(head.encode() + data[:pos])
        while not self.gate.is_set() and pos < len(data):
            await stream.send_all(data[pos : pos + 4096])
            pos += 4096
            with trio.move_on_after(0.01):  # the origin's pace, not a synchronisation
                await self.gate.wait()
        await stream.send_all(data[pos:])


@asynccontextmanager
async def gated_mirror(
    layer: bytes, *, corrupt: bool
) -> AsyncIterator[tuple[GatedUpstream, Daemon, httpx.AsyncClient]]:
    origin = GatedUpstream(layer, corrupt=corrupt)
    async with trio.open_nursery() as nursery:
        await nursery.start(origin.run)
        env = {"TENSORD_MIRROR_UPSTREAM": f"http://127.0.0.1:{origin.port}"}
        async with mirror(env) as (d, url), httpx.AsyncClient(base_url=url, timeout=60) as c:
            r = await c.get(f"/v2/{NAME}/manifests/v1")  # the miss that queues the pull
            assert r.status_code == 200 and r.content == origin.manifest
            yield origin, d, c
        nursery.cancel_scope.cancel()


async def test_a_blob_is_streamed_while_it_lands(tmp_path: Path) -> None:
    """A client asking for a blob still downloading gets its bytes as they land - before the
    origin has sent them all - and the whole blob byte-exact once it is verified; a Range
    asked meanwhile gets its 206 with exactly its bytes."""
    layer = layers(24 * MiB)[0]
    async with gated_mirror(layer, corrupt=False) as (origin, _, c):
        url = f"/v2/{NAME}/blobs/{sha(layer)}"
        ranged: dict[str, object] = {}
        ranged_started = trio.Event()

        async def ranged_get() -> None:
            headers = {"range": "bytes=1000-2999"}
            async with c.stream("GET", url, headers=headers) as resp:
                ranged_started.set()
                ranged["status"], ranged["range"] = resp.status_code, resp.headers["content-range"]
                ranged["body"] = await resp.aread()

        got = bytearray()
        async with trio.open_nursery() as nursery, c.stream("GET", url) as resp:
            assert resp.status_code == 200
            assert int(resp.headers["content-length"]) == len(layer)
            assert resp.headers["docker-content-digest"] == sha(layer)
            async for part in resp.aiter_raw():
                got += part
                if not origin.gate.is_set():
                    # Bytes reached the client while the origin still holds most of the blob.
                    assert len(got) < len(layer) - 4 * MiB
                    nursery.start_soon(ranged_get)
                    await ranged_started.wait()
                    origin.gate.set()
        assert origin.gate.is_set() and bytes(got) == layer
        assert ranged == {"status": 206, "range": f"bytes 1000-2999/{len(layer)}",
                          "body": layer[1000:3000]}  # fmt: skip


async def test_a_blob_whose_download_fails_is_cut_short_not_completed(tmp_path: Path) -> None:
    """The bytes streamed came from a download whose SHA-256 then failed: the client's body is
    cut before its last byte (an error for any client, never a complete 200); the download
    starts over, and the next request gets the verified blob."""
    layer = layers(24 * MiB)[0]
    async with gated_mirror(layer, corrupt=True) as (origin, d, c):
        url = f"/v2/{NAME}/blobs/{sha(layer)}"
        got = bytearray()
        with pytest.raises(httpx.RemoteProtocolError):
            async with c.stream("GET", url) as resp:
                assert resp.status_code == 200
                async for part in resp.aiter_raw():
                    got += part
                    origin.gate.set()
        assert 0 < len(got) < len(layer)
        assert "reply cut short" in d.text
        r = await c.get(url)
        assert r.status_code == 200 and r.content == layer
        assert not origin.corrupt  # the corrupt byte was sent (and the blob fetched again)
