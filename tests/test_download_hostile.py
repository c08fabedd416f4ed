"""Download servers and registries that lie (issue 12, holes 3 and 4, and the bugs found beside).

A real HTTP server on loopback (``tests/support/lying_http.py``, raw bytes over trio sockets, so it
can say what no honest server library would let it: a ``Content-Range`` past the total, a
``Content-Length`` the body contradicts, 40 MiB for a 1000-byte blob) plays the download server,
the registry and the "evil" host a registry redirects to. Each test asserts what reached the disk
and what the other host saw, not only the error.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
from pathlib import Path

import httpx
import pytest

from tensord.download.fetch import (
    BadReply,
    BlobFetch,
    DownloadError,
    FetchConfig,
    TooLarge,
)
from tensord.download.pull import pull_model
from tensord.download.registry import (
    MAX_LAYERS,
    MAX_MANIFEST_BYTES,
    Credential,
    RegistryAuth,
    fetch_manifest,
    load_credentials,
    parse_reference,
)
from tensord.logs import setup_logging

from .support import cli
from .support.control_api import ready
from .support.lying_http import (
    Handler,
    Reply,
    Request,
    evil_host,
    honest,
    lying_servers,
)

MiB = 1 << 20
MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def leftovers(dest: Path) -> list[str]:
    """What a download left beside ``dest`` (the blob itself excluded)."""
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(dest.name + "."))


def cfg(**kw: object) -> FetchConfig:
    base = {"connections": 4, "min_piece": 1 * MiB, "backoff_base": 0.001, "retries": 2}
    return FetchConfig(**(base | kw))  # type: ignore[arg-type]


BLOB = os.urandom(1000)
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()


# -- hole 3: never past the promised size ---------------------------------------------------


def _range_end_past_total(req: Request) -> Reply:
    # The right first 1000 bytes (so the digest of the promised bytes matches), then 40 MiB.
    cr = f"bytes 0-{40 * MiB - 1}/1000"
    return Reply(206, [("Content-Range", cr)], BLOB, extra=40 * MiB - len(BLOB))


def _range_end_past_request(req: Request) -> Reply:
    return Reply(206, [("Content-Range", "bytes 0-999/1000")], BLOB, extra=40 * MiB)


def _whole_body_sized(req: Request) -> Reply:
    return Reply(200, [("Content-Length", str(40 * MiB))], BLOB, extra=40 * MiB - len(BLOB))


def _whole_body_unsized(req: Request) -> Reply:
    return Reply(200, [], BLOB, extra=40 * MiB - len(BLOB))


@pytest.mark.parametrize(
    "handler",
    [_range_end_past_total, _whole_body_sized, _whole_body_unsized],
    ids=["206-end-past-total", "200-content-length-40MiB", "200-no-length-40MiB"],
)
async def test_40_mib_for_a_1000_byte_blob_is_refused_and_nothing_stays(
    handler: Handler, tmp_path: Path
) -> None:
    """Today: the 206 case writes 40 MiB and renames it into place as the verified blob (the
    digest covers the first 1000 bytes only); the 200 cases write 40 MiB into ``.incomplete``
    and leave it there."""
    dest = tmp_path / "blob"
    biggest = 0

    def watch(p: object) -> None:
        nonlocal biggest
        for q in tmp_path.iterdir():
            biggest = max(biggest, q.stat().st_size)

    async with lying_servers(handler) as (server,), httpx.AsyncClient() as client:
        fetch = BlobFetch(
            client, server.url("/b"), dest, size=1000, sha256=BLOB_SHA, config=cfg(), progress=watch
        )
        with pytest.raises(BadReply, match=r"1000|promised|asked for"):
            await fetch.run()
    assert not dest.exists()
    assert leftovers(dest) == []
    assert biggest <= 1000


async def test_a_content_length_contradicting_the_range_is_refused(tmp_path: Path) -> None:
    def handler(req: Request) -> Reply:
        headers = [("Content-Range", "bytes 0-999/1000"), ("Content-Length", str(MiB))]
        return Reply(206, headers, BLOB, extra=MiB - 1000)

    async with lying_servers(handler) as (server,), httpx.AsyncClient() as client:
        fetch = BlobFetch(client, server.url("/b"), tmp_path / "b", size=1000, config=cfg())
        with pytest.raises(BadReply, match="Content-Length says"):
            await fetch.run()
    assert leftovers(tmp_path / "b") == [] and not (tmp_path / "b").exists()


async def test_a_piece_answered_with_a_longer_range_is_refused_and_removed(
    tmp_path: Path,
) -> None:
    """The first range is honest; the later pieces are answered for more than asked."""
    data = os.urandom(4 * MiB)
    sha = hashlib.sha256(data).hexdigest()
    good = honest(data)

    def handler(req: Request) -> Reply:
        rng = req.range
        if rng is None or rng[0] == 0:
            return good(req)
        start = rng[0]
        body = data[start:]
        cr = f"bytes {start}-{len(data) - 1}/{len(data)}"
        return Reply(206, [("Content-Range", cr), ("Content-Length", str(len(body)))], body)

    dest = tmp_path / "b"
    async with lying_servers(handler) as (server,), httpx.AsyncClient() as client:
        fetch = BlobFetch(client, server.url("/b"), dest, size=len(data), sha256=sha, config=cfg())
        with pytest.raises(BadReply, match="asked for bytes"):
            await fetch.run()
    assert leftovers(tmp_path / "b") == [] and not (tmp_path / "b").exists()


async def test_a_plain_url_over_max_bytes_is_refused_before_the_first_write(
    tmp_path: Path,
) -> None:
    """``Content-Length`` over the ceiling: refused with the body unread; a body without a
    length: cut at the ceiling; a ``Content-Range`` total over it: refused."""
    ceiling = 1 * MiB

    def sized(req: Request) -> Reply:
        return Reply(200, [("Content-Length", str(40 * MiB))], extra=40 * MiB)

    def unsized(req: Request) -> Reply:
        return Reply(200, [], extra=40 * MiB)

    def ranged(req: Request) -> Reply:
        headers = [("Content-Range", f"bytes 0-{MiB - 1}/{40 * MiB}"), ("Content-Length", str(MiB))]
        return Reply(206, headers, extra=MiB)

    async with lying_servers(sized, unsized, ranged) as servers, httpx.AsyncClient() as client:
        for i, server in enumerate(servers):
            dest = tmp_path / f"b{i}"
            fetch = BlobFetch(client, server.url("/u"), dest, config=cfg(max_bytes=ceiling))
            with pytest.raises(TooLarge, match=r"downloads\.max_bytes"):
                await fetch.run()
            assert not dest.exists() and leftovers(dest) == [], i
            assert fetch.bytes_fetched <= ceiling
    # A promised size over the ceiling is refused before any request.
    async with lying_servers(honest(BLOB)) as (server,), httpx.AsyncClient() as client:
        fetch = BlobFetch(
            client, server.url("/b"), tmp_path / "c", size=1000, config=cfg(max_bytes=999)
        )
        with pytest.raises(TooLarge):
            await fetch.run()
        assert server.requests == []


async def test_an_honest_plain_url_under_max_bytes_still_downloads(tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 5)

    def unranged(req: Request) -> Reply:
        return Reply(200, [], data)  # no length, no ranges: counted as it streams

    async with lying_servers(honest(data), unranged) as servers, httpx.AsyncClient() as client:
        for i, server in enumerate(servers):
            dest = tmp_path / f"b{i}"
            await BlobFetch(client, server.url("/u"), dest, config=cfg(max_bytes=4 * MiB)).run()
            assert dest.read_bytes() == data


# -- registry bounds ------------------------------------------------------------------------


def _manifest(layers: list[dict[str, object]], pad: int = 0) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "layers": layers,
        "annotations": {"pad": "x" * pad},
    }
    return json.dumps(doc).encode()


def _layer(size: int, i: int = 0) -> dict[str, object]:
    return {"mediaType": "x", "digest": "sha256:" + f"{i:064x}", "size": size}


def registry_of(manifest: bytes) -> Handler:
    def handler(req: Request) -> Reply:
        if "/manifests/" in req.path:
            return Reply(
                200, [("Content-Type", MANIFEST), ("Content-Length", str(len(manifest)))], manifest
            )
        return Reply(404, [("Content-Length", "0")])

    return handler


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (_manifest([_layer(10)], pad=MAX_MANIFEST_BYTES), "more than tensord reads"),
        (_manifest([_layer(10, i) for i in range(MAX_LAYERS + 1)]), "more than tensord accepts"),
        (_manifest([_layer(1 << 62)]), r"more than downloads\.max_bytes"),
    ],
    ids=["manifest-over-4MiB", "too-many-layers", "layer-over-max_bytes"],
)
async def test_registry_manifests_are_bounded(manifest: bytes, message: str) -> None:
    async with lying_servers(registry_of(manifest)) as (reg,), httpx.AsyncClient() as client:
        ref = parse_reference(f"http://{reg.host}/m/x:v1")
        with pytest.raises(DownloadError, match=message):
            await fetch_manifest(client, ref, RegistryAuth(client, {}), max_bytes=1 << 40)


# -- hole 4: credentials stay with their registry -------------------------------------------

BASIC = "Basic " + base64.b64encode(b"alice:s3cret").decode()


async def test_a_redirect_to_another_host_never_gets_the_credentials(tmp_path: Path) -> None:
    """Today: the registry redirects the manifest to an evil host; its 401 Bearer challenge is
    answered with the registry's Basic credentials, at the token URL the evil host chose."""
    seen: list[str] = []
    evil = evil_host(seen)
    target: dict[str, str] = {}

    def registry(req: Request) -> Reply:
        # Redirects before asking for credentials: the evil host's challenge is the first.
        return Reply(302, [("Location", target["url"] + req.path), ("Content-Length", "0")])

    async with lying_servers(registry, evil) as (reg, bad), httpx.AsyncClient() as client:
        evil.holder["port"] = bad.port  # type: ignore[attr-defined]
        target["url"] = f"http://{bad.host}"
        ref = parse_reference(f"http://{reg.host}/m/x:v1")
        creds = {reg.host: Credential("alice", "s3cret")}
        with pytest.raises(DownloadError) as info:
            await pull_model(client, ref, tmp_path, credentials=creds, config=cfg())
    assert seen and all(h == "-" for h in seen), seen  # the evil host saw no credentials
    assert not any(r.path.startswith("/token") for r in bad.requests)
    assert re.search(r"sends credentials only to 127\.0\.0\.1", str(info.value)), info.value


async def test_a_token_realm_on_another_host_gets_the_credentials_only_if_named(
    tmp_path: Path,
) -> None:
    """The registry itself names a realm elsewhere: refused (with the remedy) unless the
    credentials file lists that host in ``token_hosts``; then Basic goes there, and the token
    it issues goes only to the registry."""
    data = os.urandom(2000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    manifest = _manifest([{"mediaType": "x", "digest": digest, "size": len(data)}])
    seen: list[str] = []
    issuer_port: dict[str, int] = {}

    def issuer(req: Request) -> Reply:
        seen.append(req.headers.get("authorization", "-"))
        if req.headers.get("authorization") != BASIC:
            return Reply(401, [("Content-Length", "0")])
        body = json.dumps({"token": "good-token", "expires_in": 300}).encode()
        return Reply(200, [("Content-Length", str(len(body)))], body)

    blob = honest(data)

    def registry(req: Request) -> Reply:
        if req.headers.get("authorization") != "Bearer good-token":
            realm = f'Bearer realm="http://127.0.0.1:{issuer_port["p"]}/token",service="r"'
            return Reply(401, [("WWW-Authenticate", realm), ("Content-Length", "0")])
        if "/manifests/" in req.path:
            return Reply(
                200, [("Content-Type", MANIFEST), ("Content-Length", str(len(manifest)))], manifest
            )
        return blob(req)

    async with lying_servers(registry, issuer) as (reg, iss), httpx.AsyncClient() as client:
        issuer_port["p"] = iss.port
        ref = parse_reference(f"http://{reg.host}/m/x:v1")
        with pytest.raises(DownloadError, match=rf'"token_hosts": \["{iss.host}"\]'):
            await pull_model(
                client, ref, tmp_path / "a", credentials={reg.host: ("alice", "s3cret")}
            )
        assert seen == []  # nothing was sent to the other host
        creds_file = tmp_path / "creds.json"
        creds_file.write_text(
            json.dumps(
                {
                    "registries": {
                        reg.host: {
                            "username": "alice",
                            "password": "s3cret",
                            "token_hosts": [iss.host],
                        }
                    }
                }
            )
        )
        creds = load_credentials(creds_file)
        m = await pull_model(client, ref, tmp_path / "b", credentials=creds, config=cfg())
    assert (tmp_path / "b" / "blobs" / m.layers[0].digest.replace(":", "-")).read_bytes() == data
    assert BASIC in seen


async def test_a_blob_redirected_to_a_cdn_gets_no_authorization(tmp_path: Path) -> None:
    data = os.urandom(3 * MiB)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    manifest = _manifest([{"mediaType": "x", "digest": digest, "size": len(data)}])
    seen: list[str] = []
    good = honest(data)

    def cdn(req: Request) -> Reply:
        seen.append(req.headers.get("authorization", "-"))
        return good(req)

    where: dict[str, str] = {}

    def registry(req: Request) -> Reply:
        if req.headers.get("authorization") != BASIC:
            return Reply(401, [("WWW-Authenticate", 'Basic realm="r"'), ("Content-Length", "0")])
        if "/manifests/" in req.path:
            return Reply(
                200, [("Content-Type", MANIFEST), ("Content-Length", str(len(manifest)))], manifest
            )
        return Reply(307, [("Location", where["cdn"]), ("Content-Length", "0")])

    async with lying_servers(registry, cdn) as (reg, c), httpx.AsyncClient() as client:
        where["cdn"] = c.url("/blob")
        ref = parse_reference(f"http://{reg.host}/m/x:v1")
        creds = {reg.host: ("alice", "s3cret")}
        m = await pull_model(client, ref, tmp_path, credentials=creds, config=cfg())
    assert (tmp_path / "blobs" / m.layers[0].digest.replace(":", "-")).read_bytes() == data
    assert seen and all(h == "-" for h in seen), seen


# -- bugs: empty error messages, loopback registries, the summary, library chatter ----------


async def test_a_tls_failure_names_its_cause_and_the_http_hint(tmp_path: Path) -> None:
    """A plain-HTTP server asked over https: the error used to be empty."""
    async with lying_servers(honest(BLOB)) as (server,), httpx.AsyncClient() as client:
        url = f"https://{server.host}/b"
        with pytest.raises(DownloadError) as info:
            await BlobFetch(client, url, tmp_path / "b", config=cfg()).run()
        message = str(info.value)
        assert "SSL" in message and "http://" in message, message
        ref = parse_reference(f"https://{server.host}/library/tiny:latest")
        with pytest.raises(DownloadError) as info:
            await pull_model(client, ref, tmp_path)
        message = str(info.value)
        assert "SSL" in message and "http://" in message and not message.endswith(": "), message


async def test_library_loggers_stay_at_warning_unless_debugging() -> None:
    """httpx logged every download request at INFO into the daemon's log."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    names = ("httpx", "httpcore")
    levels = {n: logging.getLogger(n).level for n in names}
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    try:
        async with lying_servers(honest(BLOB)) as (server,):
            for level, expect_chatter in (("info", False), ("debug", True)):
                setup_logging(level, {})
                root.addHandler(Keep())
                records.clear()
                async with httpx.AsyncClient() as client:
                    await client.get(server.url("/b"))
                chatter = [r for r in records if r.name.startswith(names)]
                assert bool(chatter) is expect_chatter, (level, [r.getMessage() for r in chatter])
                assert logging.getLogger("tensord").isEnabledFor(logging.INFO)
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
        for n, lv in levels.items():
            logging.getLogger(n).setLevel(lv)


def _error_lines_are_whole(err: str) -> list[str]:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "no error line at all"
    for line in lines:
        assert not line.rstrip().endswith(":"), line
        assert line.split(":", 1)[-1].strip(), line
    return lines


async def test_cli_download_errors_name_their_cause(tmp_path: Path) -> None:
    """Every way a pull or download fails prints one line that says why."""
    from .support.daemons import daemon, free_port

    closed_port = free_port()
    big = os.urandom(2 * MiB)

    def sized(req: Request) -> Reply:
        return Reply(200, [("Content-Length", str(len(big)))], big)

    env = {"TENSORD_LISTEN": "127.0.0.1:0", "TENSORD_DOWNLOAD_MAX_BYTES": str(MiB)}
    async with lying_servers(honest(BLOB), sized) as (plain, large), daemon(env) as d:
        await ready(d)
        sock = d.socket
        cases = {
            # TLS against a plain-HTTP registry: the empty message of the bug.
            f"https://{plain.host}/library/tiny:latest": ("pull-model", "http://"),
            # Nobody listening.
            f"127.0.0.1:{closed_port}/library/tiny:latest": ("pull-model", "connect"),
            # The server answers, but not a registry.
            f"{plain.host}/library/tiny:latest": ("pull-model", "not JSON"),
        }
        for source, (command, word) in cases.items():
            code, out, err = await cli.run(command, source, socket=sock)
            assert code == 1, (source, out, err)
            (line,) = _error_lines_are_whole(err)
            assert word in line, (source, line)
        code, _, err = await cli.run(
            "download", large.url("/big"), "--sha256", hashlib.sha256(big).hexdigest(), socket=sock
        )
        assert code == 1
        (line,) = _error_lines_are_whole(err)
        assert "downloads.max_bytes" in line, line
        code, _, err = await cli.run("download", plain.url("/b"), "--sha256", "0" * 64, socket=sock)
        assert code == 1
        (line,) = _error_lines_are_whole(err)
        assert "sha256 mismatch" in line, line


def test_error_text_is_never_empty() -> None:
    from tensord.cli import _error_text

    try:
        try:
            raise ValueError("the real cause")
        except ValueError as inner:
            raise DownloadError("") from inner
    except DownloadError as exc:
        assert _error_text(exc) == "the real cause"
    assert _error_text(OSError()) == "OSError (no detail given)"
    try:
        try:
            raise OSError(111, "Connection refused")
        except OSError as inner:
            raise DownloadError("pulling x:") from inner
    except DownloadError as exc:
        assert _error_text(exc) == "pulling x: [Errno 111] Connection refused"


async def test_a_loopback_registry_is_plain_http_and_the_summary_counts_connections(
    tmp_path: Path,
) -> None:
    """``tensord pull-model 127.0.0.1:PORT/name:tag`` (no scheme) against the real registry:
    plain HTTP by default, and the summary says how many connections it used (it said 0)."""
    import numpy as np

    from .support.daemons import daemon
    from .support.registry import registry

    # Small, as in the report: a fast pull publishes few (rate-limited) progress events.
    layers = [np.random.default_rng(i).bytes(1000) for i in (1, 2)]
    with registry(tmp_path) as reg:
        reg.push_model("models/tiny", "v1", layers)
        async with daemon({"TENSORD_LISTEN": "127.0.0.1:0"}) as d:
            await ready(d)
            ref = f"{reg.host}/models/tiny:v1"
            code, out, err = await cli.run("pull-model", ref, socket=d.socket)
            assert code == 0, err
            m = re.search(r"up to (\d+) connections?", out)
            assert m is not None and int(m.group(1)) >= 1, out
            code, out, _ = await cli.run("downloads", "--json", socket=d.socket)
            (job,) = json.loads(out)
            assert job["state"] == "done" and job["peak_connections"] >= 1, job
