"""containerd pulls through the OCI mirror with the README's ``hosts.toml`` recipe: a real
containerd and ``ctr`` against a real ``tensord serve`` whose upstream is the registry
containerd names in its ``?ns=`` parameter (the CNCF registry behind a counting proxy)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import re
import tarfile
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import trio

from .support.cluster import write_cluster_file
from .support.containerd import Containerd, containerd
from .support.control_api import ready
from .support.daemons import Daemon, daemon
from .support.registry import Registry, registry
from .support.tcp_proxy import ChaosProxy, proxied

README = Path(__file__).resolve().parent.parent / "README.md"
NAME = "library/hello"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
GREETING = b"pulled through tensord\n"
KEY = "ctr-key-1"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar() -> tuple[bytes, bytes]:
    """A layer as containerd unpacks it: a gzip'd tar with a small file and 2 MiB of random
    bytes (so the blob is more than a few packets). Returns (blob, uncompressed tar)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, body in (
            ("hello.txt", GREETING),
            ("weights.bin", np.random.default_rng(14).bytes(2 << 20)),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(body), 0, 0o644
            tar.addfile(info, io.BytesIO(body))
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0), raw


def push_image(reg: Registry, tag: str) -> tuple[bytes, set[str]]:
    """A one-layer OCI image for this machine's architecture (containerd checks the config's
    platform); returns the manifest's bytes and the digests of everything it names."""
    blob, raw = layer_tar()
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    config = json.dumps(
        {"architecture": arch, "os": "linux", "config": {"Cmd": ["/hello.txt"]},
         "rootfs": {"type": "layers", "diff_ids": [sha(raw)]}}
    ).encode()  # fmt: skip
    manifest = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
         "config": {"mediaType": OCI_CONFIG, "digest": reg.push_blob(NAME, config),
                    "size": len(config)},
         "layers": [{"mediaType": OCI_LAYER, "digest": reg.push_blob(NAME, blob),
                     "size": len(blob)}]}
    ).encode()  # fmt: skip
    with reg.client() as c:
        r = c.put(f"/v2/{NAME}/manifests/{tag}", content=manifest,
                  headers={"content-type": OCI_MANIFEST})  # fmt: skip
        assert r.status_code == 201, r.text
    return manifest, {sha(manifest), sha(config), sha(blob)}


def readme_hosts_toml(registry_url: str, mirror_url: str, key: str) -> str:
    """The README's containerd ``hosts.toml``, pointed at this test's registry and mirror: the
    recipe itself is what containerd is given (a README that drops a line breaks this)."""
    text = README.read_text()
    start = text.index("containerd (`/etc/containerd/certs.d/")
    block = re.search(r"```toml\n(.*?)```", text[start:], re.DOTALL)
    assert block is not None, "the README's containerd recipe has no toml block"
    recipe = block.group(1)
    for old, new in (
        ("https://registry-1.docker.io", registry_url),
        ("http://127.0.0.1:5050", mirror_url),
        ('"Bearer KEY"', f'"Bearer {key}"'),
    ):
        assert old in recipe, f"the README's hosts.toml no longer has {old}"
        recipe = recipe.replace(old, new)
    tomllib.loads(recipe)  # containerd would refuse what TOML does not parse
    return recipe


@asynccontextmanager
async def mirror(tmp: Path) -> AsyncIterator[tuple[Daemon, str]]:
    """A daemon with the mirror on loopback, an API key required and no ``mirror.upstream``
    (a miss goes where containerd's ``ns`` says), and its URL."""
    keys = tmp / "mirror-keys"
    keys.write_text(f"{KEY}\n")
    cluster = write_cluster_file(tmp / "cluster.json", mirror={"api_keys_file": str(keys)})
    env = {"TENSORD_MIRROR_LISTEN": "127.0.0.1:0"}
    async with daemon(env, "--cluster", str(cluster)) as d:
        await ready(d)
        end = await d.wait_for("mirror on http://")
        yield d, d.text[end - len("http://") :].split()[0]


def upstream_reads(proxy: ChaosProxy) -> tuple[int, int]:
    """Connections made to the registry, and the bytes it sent back."""
    return len(proxy.conns), sum(c.downstream for c in proxy.conns)


def containerd_reached_registry(log: Path) -> list[str]:
    """The registry's access-log lines of requests containerd made itself (its User-Agent): a
    host that fails makes containerd fall back to ``server``, which would hide a broken
    mirror."""
    return [line for line in log.read_text().splitlines() if '"containerd/' in line]


def assert_pulled(ctd: Containerd, ref: str, manifest: bytes, want: set[str]) -> None:
    """The image points at the pushed manifest, containerd holds exactly the pushed blobs
    (each verified against its digest as it was written), and the layer is unpacked."""
    assert ctd.image_target(ref) == sha(manifest)
    assert ctd.content() == want
    for digest in want:
        assert sha(ctd.ctr_bytes("content", "get", digest)) == digest
    files = ctd.snapshot_files("hello.txt")
    assert files and all(f.read_bytes() == GREETING for f in files)


async def test_containerd_pulls_through_the_mirror_with_the_readme_hosts_toml(
    tmp_path: Path,
) -> None:
    with registry(tmp_path) as reg:
        manifest, want = push_image(reg, "v1")
        async with proxied(reg.port, {}) as proxy, mirror(tmp_path) as (d, url):
            # The image is named by the registry's address, so containerd's ``ns`` is it and
            # its hosts.toml lives in a directory of that name.
            hosts = tmp_path / "certs.d"
            (hosts / proxy.addr).mkdir(parents=True)
            recipe = readme_hosts_toml(f"http://{proxy.addr}", url, KEY)
            (hosts / proxy.addr / "hosts.toml").write_text(recipe)
            ref = f"{proxy.addr}/{NAME}:v1"

            with containerd(tmp_path / "node-a") as a:
                await trio.to_thread.run_sync(a.pull, ref, hosts)
                assert_pulled(a, ref, manifest, want)
            # Every request containerd made went to the mirror: none fell back to ``server``.
            assert containerd_reached_registry(tmp_path / "registry" / "log") == []
            # The mirror fetched the image and keeps it (the miss queued a pull).
            await d.wait_for(f"{proxy.addr}/{NAME}:v1 done")
            blobs = d.home / "state" / "models" / "blobs"
            for digest in want - {sha(manifest)}:
                assert (blobs / digest.replace(":", "-")).is_file()
            before = upstream_reads(proxy)
            assert before[1] >= (1 << 21)  # the layer came through the proxy once at least

            # Another node pulls by digest: everything comes from the mirror's store.
            pinned = f"{proxy.addr}/{NAME}@{sha(manifest)}"
            with containerd(tmp_path / "node-b") as b:
                await trio.to_thread.run_sync(b.pull, pinned, hosts)
                assert_pulled(b, pinned, manifest, want)
            assert upstream_reads(proxy) == before

            assert containerd_reached_registry(tmp_path / "registry" / "log") == []
