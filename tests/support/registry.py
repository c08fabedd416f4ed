"""The CNCF distribution registry (Debian's ``docker-registry``) on loopback, for pull tests.

Tests push layers with the registry's own upload API (``POST /v2/<name>/blobs/uploads/`` then
``PUT ?digest=``) and a manifest, then pull them with tensord.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import httpx

from .daemons import free_port
from .helpers import require, wait_serving
from .token_issuer import ISSUER, SERVICE, USER, Issuer

CONFIG = """
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
{auth}
"""

TOKEN = """auth:
  token:
    realm: {realm}
    service: {service}
    issuer: {issuer}
    rootcertbundle: {cert}
"""

HTPASSWD = """auth:
  htpasswd:
    realm: tensord-test
    path: {path}
"""

OLLAMA_MODEL = "application/vnd.ollama.image.model"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


@dataclass
class Registry:
    port: int
    user: tuple[str, str] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    token: bool = False

    def client(self) -> httpx.Client:
        auth: httpx.Auth | None = httpx.BasicAuth(*self.user) if self.user else None
        if self.token and self.user:
            auth = _BearerFlow(*self.user)
        return httpx.Client(base_url=f"http://{self.host}", auth=auth, timeout=60)

    def push_blob(self, repo: str, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with self.client() as c:
            r = c.post(f"/v2/{repo}/blobs/uploads/")
            assert r.status_code == 202, r.text
            location = r.headers["location"]
            sep = "&" if "?" in location else "?"
            r = c.put(
                f"{location}{sep}digest={digest}",
                content=data,
                headers={"content-type": "application/octet-stream"},
            )
            assert r.status_code == 201, r.text
        return digest

    def push_model(
        self, repo: str, tag: str, layers: list[bytes], *, oci: bool = False
    ) -> dict[str, object]:
        """Push ``layers`` as an Ollama-style model; returns the manifest. ``oci``: under an
        OCI manifest instead of Docker's v2 schema 2 (skopeo copies OCI manifests whatever
        their layers' media types, and refuses Docker ones with Ollama's layer types)."""
        config = json.dumps({"model_format": "gguf", "model_family": "test"}).encode()
        media = OCI_MANIFEST if oci else MANIFEST
        manifest = {
            "schemaVersion": 2,
            "mediaType": media,
            "config": {
                "mediaType": OCI_CONFIG if oci else DOCKER_CONFIG,
                "digest": self.push_blob(repo, config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": OLLAMA_MODEL, "digest": self.push_blob(repo, d), "size": len(d)}
                for d in layers
            ],
        }
        with self.client() as c:
            r = c.put(
                f"/v2/{repo}/manifests/{tag}",
                content=json.dumps(manifest).encode(),
                headers={"content-type": media},
            )
            assert r.status_code == 201, r.text
        return manifest


class _BearerFlow(httpx.Auth):
    """Pushes through a token-protected registry: answer each challenge with a fresh token."""

    def __init__(self, user: str, password: str) -> None:
        self.basic = httpx.BasicAuth(user, password)

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        response = yield request
        if response.status_code != 401:
            return
        params = dict(re.findall(r'(\w+)="([^"]*)"', response.headers["www-authenticate"]))
        query = {k: params[k] for k in ("service", "scope") if k in params}
        with httpx.Client(auth=self.basic) as c:
            tok = c.get(params["realm"], params=query).json()["token"]
        request.headers["Authorization"] = f"Bearer {tok}"
        yield request


@contextmanager
def registry(
    tmp: Path, *, user: tuple[str, str] | None = None, token: Issuer | None = None
) -> Iterator[Registry]:
    """The registry; ``user`` turns on htpasswd Basic auth, ``token`` the Bearer token flow
    with that issuer (pushes then authenticate as the issuer's user)."""
    binary = shutil.which("docker-registry")
    require(
        binary is not None, "docker-registry is not installed (apt-get install docker-registry)"
    )
    assert binary is not None
    d = tmp / "registry"
    d.mkdir()
    auth = ""
    if user is not None:
        hashed = bcrypt.hashpw(user[1].encode(), bcrypt.gensalt(rounds=4)).decode()
        (d / "htpasswd").write_text(f"{user[0]}:{hashed}\n")
        auth = HTPASSWD.format(path=d / "htpasswd")
    if token is not None:
        auth = TOKEN.format(realm=token.url, service=SERVICE, issuer=ISSUER, cert=token.cert_path)
        user = USER
    reg = Registry(free_port(), user, token=token is not None)
    (d / "config.yml").write_text(CONFIG.format(root=d / "data", port=reg.port, auth=auth))
    log = open(d / "log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([binary, "serve", str(d / "config.yml")], stdout=log, stderr=log)
    try:
        wait_serving(lambda: httpx.get(f"http://{reg.host}/v2/", timeout=1), proc, d / "log", 15)
        yield reg
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
