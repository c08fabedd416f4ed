"""Attack rows on the daemon's other doors (scenario 13): download servers and registries that lie
(e, f), control requests naming a FIFO (g), a group member asking for a root-only file (h), slow
request bodies to the control socket and the gateway (i).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import trio

from tensord.config import KiB

from ..caller import call_as_group_member
from ..lying_http import Reply, Request, evil_host, honest, lying_servers
from .attacks_target import (
    Target,
    closed_by_peer,
    control,
    reset_peak,
    survived,
    written,
)
from .rows import Row, fmt_bytes, wait_log

# -- e, f. downloads and registries that lie --------------------------------------------------

LAYER = os.urandom(1000)
LAYER_DIGEST = "sha256:" + hashlib.sha256(LAYER).hexdigest()
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"


def manifest(data: bytes) -> bytes:
    layer = {
        "mediaType": "x",
        "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }
    doc = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "layers": [layer]}
    return json.dumps(doc).encode()


def cause(error: str) -> str:
    """The end of an error message (its start names the URL), for the report."""
    return error if len(error) <= 160 else "..." + error[-157:]


async def finished(t: Target, job: dict[str, Any], after: int) -> dict[str, Any]:
    """The job once it has ended (each state change is a log line of the daemon)."""
    async with control(t) as c:
        while True:
            after = await wait_log(t.d, f"download {job['id']}: ", after, limit=60)
            got: dict[str, Any] = (await c.get(f"/v1/downloads/{job['id']}")).json()
            if got["state"] in ("done", "failed", "cancelled"):
                return got


async def start_download(t: Target, body: dict[str, str]) -> tuple[dict[str, Any], int]:
    at = len(t.d.log)
    async with control(t) as c:
        r = await c.post("/v1/downloads", json=body)
    if r.status_code != 202:
        raise RuntimeError(f"the daemon did not take the download: {r.status_code} {r.text}")
    return r.json(), at


async def lying_downloads(row: Row, t: Target, big: int, ceiling: int) -> None:
    def registry(blob: Callable[[Request], Reply], data: bytes = LAYER) -> Any:
        doc = manifest(data)

        def handler(req: Request) -> Reply:
            if "/manifests/" in req.path:
                headers = [("Content-Type", MANIFEST_TYPE), ("Content-Length", str(len(doc)))]
                return Reply(200, headers, doc)
            return blob(req)

        return handler

    lies = {
        "206 with a Content-Range past the total": lambda req: Reply(
            206, [("Content-Range", f"bytes 0-{big - 1}/1000")], LAYER, extra=big - 1000
        ),
        "200 to a range": lambda req: Reply(
            200, [("Content-Length", str(big))], LAYER, extra=big - 1000
        ),
        "200 without a length": lambda req: Reply(200, [], LAYER, extra=big - 1000),
    }
    blobs = t.home / "state" / "models" / "blobs"
    before = reset_peak(t.pid)
    outcomes: list[str] = []
    worst_write = 0
    servers = [registry(h) for h in lies.values()]
    url_server = lambda req: Reply(200, [("Content-Length", str(big))], extra=big)  # noqa: E731
    good = os.urandom(512 * KiB)  # under downloads.max_bytes
    async with lying_servers(*servers, url_server, registry(honest(good), good)) as running:
        for what, server in zip(lies, running[:3], strict=True):
            wrote = written(t.pid)
            job, at = await start_download(t, {"model": f"http://{server.host}/m/x:v1"})
            job = await finished(t, job, at)
            delta = written(t.pid) - wrote
            worst_write = max(worst_write, delta)
            left = sorted(p.name for p in blobs.iterdir()) if blobs.exists() else []
            row.check(job["state"] == "failed", f"{what}: the download ended {job['state']}")
            row.check(not left, f"{what}: files left behind: {left}")
            row.check(delta < 256 * KiB, f"{what}: the daemon wrote {fmt_bytes(delta)}")
            outcomes.append(f"{what}: refused ({cause(job['error'])})")
        # A plain URL: no promised size, downloads.max_bytes is the ceiling.
        wrote = written(t.pid)
        sha = "0" * 64
        job, at = await start_download(t, {"url": running[3].url("/big"), "sha256": sha})
        job = await finished(t, job, at)
        delta = written(t.pid) - wrote
        worst_write = max(worst_write, delta)
        row.check(job["state"] == "failed", f"plain URL: the download ended {job['state']}")
        row.check("downloads.max_bytes" in job["error"], f"plain URL: {job['error']!r}")
        row.check(delta < 256 * KiB, f"plain URL: the daemon wrote {fmt_bytes(delta)}")
        outcomes.append(f"a {fmt_bytes(big)} URL over downloads.max_bytes: refused unread")
        # An honest registry is still served.
        job, at = await start_download(t, {"model": f"http://{running[4].host}/m/x:v1"})
        job = await finished(t, job, at)
        row.check(job["state"] == "done", f"an honest model pull ended {job['state']}")
        sent = sum(s.bytes_sent for s in running[:4])
    row.tried = (
        f"{len(lies)} lying registries serving a 1000-byte layer with {fmt_bytes(big)}, and a "
        f"{fmt_bytes(big)} plain URL (downloads.max_bytes = {fmt_bytes(ceiling)})"
    )
    tail = await survived(row, t, before, "downloads")
    row.outcome = (
        "; ".join(outcomes)
        + f". The daemon wrote at most {fmt_bytes(worst_write)} per attempt (all files, logs "
        f"included), left no .incomplete (it used to write 40 MiB and keep it); the liars got "
        f"{fmt_bytes(sent)} onto the wire before it hung up; an honest pull then completed; " + tail
    )
    row.figures.update(worst_write=worst_write, liar_bytes_sent=sent)


async def redirected_credentials(row: Row, t: Target, creds_file: Path) -> None:
    seen: list[str] = []
    evil = evil_host(seen)
    where: dict[str, str] = {}

    def registry(req: Request) -> Reply:
        return Reply(302, [("Location", where["evil"] + req.path), ("Content-Length", "0")])

    before = reset_peak(t.pid)
    async with lying_servers(registry, evil) as (reg, bad):
        evil.holder["port"] = bad.port  # type: ignore[attr-defined]
        where["evil"] = f"http://{bad.host}"
        creds = {"registries": {reg.host: {"username": "alice", "password": "s3cret"}}}
        await trio.Path(creds_file).write_text(json.dumps(creds))
        job, at = await start_download(t, {"model": f"http://{reg.host}/m/x:v1"})
        job = await finished(t, job, at)
        token_asked = any(r.path.startswith("/token") for r in bad.requests)
    leaked = [h for h in seen if h != "-"]
    basic = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    row.check(bool(seen), "the evil host was never asked: the redirect was not followed")
    row.check(not leaked, f"the evil host received Authorization headers: {leaked}")
    row.check(not token_asked, "the daemon asked the evil host's token endpoint")
    row.check(job["state"] == "failed", f"the pull ended {job['state']}")
    row.check("credentials only to" in job["error"], f"the error: {job['error']!r}")
    row.tried = (
        "a registry with credentials redirects the manifest to another host, whose 401 asks "
        "for a Bearer token"
    )
    tail = await survived(row, t, before, "redirect")
    row.outcome = (
        f"the other host saw {len(seen)} requests, none with an Authorization header "
        f"({'' if basic not in seen else 'Basic LEAKED; '}the registry's Basic credentials used "
        f"to go to the realm it named); the pull failed: {cause(job['error'])!r}; {tail}"
    )


# -- g. FIFOs, h. a group member, i. slow bodies ----------------------------------------------


async def fifo_flood(row: Row, t: Target, requests: int) -> None:
    fifo = t.home / "pipe.npy"
    os.mkfifo(fifo)
    before = reset_peak(t.pid)
    codes: Counter[int] = Counter()
    named = 0

    async def put(i: int) -> None:
        nonlocal named
        async with control(t) as c:
            r = await c.put(f"/v1/tensors/f{i}", json={"path": str(fifo)})
        codes[r.status_code] += 1
        named += r.status_code == 400 and "FIFO" in r.json()["error"]["message"]

    with trio.fail_after(120):  # healthy daemons answer in milliseconds
        async with trio.open_nursery() as nursery:
            for i in range(requests):
                nursery.start_soon(put, i)
    with trio.fail_after(60):
        ls = await trio.run_process(
            [sys.executable, "-m", "tensord", "--socket", str(t.d.socket), "ls"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    row.check(codes == {400: requests}, f"answers {dict(codes)}")
    row.check(named == requests, f"{requests - named} refusals do not name the FIFO")
    row.check(ls.returncode == 0, f"tensord ls exited {ls.returncode}: {ls.stderr.decode()}")
    row.tried = f"{requests} concurrent control requests naming a FIFO (trio has 40 worker threads)"
    tail = await survived(row, t, before, "fifo")
    t.d.terminate()
    with trio.fail_after(60):
        await t.d.proc.wait()
    row.check(t.d.proc.returncode == 0, f"SIGTERM: exit status {t.d.proc.returncode}")
    row.outcome = (
        f"{codes[400]}/{requests} refused at once with a 400 naming the FIFO; `tensord ls` "
        f"answered; {tail}; SIGTERM then stopped it (status {t.d.proc.returncode}) - 40 such "
        "requests used to wedge it for good"
    )


async def confused_deputy(row: Row, t: Target) -> None:
    python = "/usr/bin/python3"
    files = t.home / "files"
    files.mkdir(mode=0o755)
    for name, mode in [("secret", 0o600), ("world", 0o644)]:
        np.save(files / f"{name}.npy", np.full(4, mode, dtype=np.int32))
        os.chmod(files / f"{name}.npy", mode)
    calls = [
        ["PUT", "/v1/tensors/stolen", {"path": str(files / "secret.npy")}],
        ["POST", "/v1/send", {"peer": "elsewhere", "path": str(files / "secret.npy")}],
        ["PUT", "/v1/tensors/mine", {"path": str(files / "world.npy")}],
        ["GET", "/v1/tensors", {}],
    ]
    before = reset_peak(t.pid)
    out = await trio.to_thread.run_sync(lambda: call_as_group_member(python, t.d.socket, calls))
    if not row.check(out.returncode == 0, f"the client as uid 65534 failed: {out.stderr}"):
        return
    replies = json.loads(out.stdout)
    statuses = [r[0] for r in replies]
    stored = sorted(x["name"] for x in replies[3][1]["tensors"])
    row.check(statuses[:2] == [403, 403], f"a root-only file: {replies[:2]}")
    row.check(statuses[2] == 201, f"a world-readable file: {replies[2]}")
    row.check("stolen" not in stored, f"the root-only file was stored: {stored}")
    row.tried = (
        "uid 65534 in the socket's group asks the daemon (root) to load and to send a 0600 "
        "root-owned file, then a world-readable one"
    )
    tail = await survived(row, t, before, "deputy")
    message = replies[0][1]["error"]["message"] if statuses[0] == 403 else ""
    row.outcome = (
        f"403 for both ({message[:80]!r}); its own readable file was stored (201); the daemon "
        f"used to read anything it could for any group member; {tail}"
    )


async def slow_bodies(row: Row, t: Target, gateway: str, slow: int, deadline: float) -> None:
    head = (
        b"PUT /v1/tensors/x HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        b"content-length: 100\r\n\r\n"
    )
    ghead = (
        b"POST /api/chat HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        b"content-length: 200\r\n\r\n"
    )
    ghost, gport = gateway.removeprefix("http://").rsplit(":", 1)
    before = reset_peak(t.pid)
    replies: dict[str, list[bytes]] = {"control": [], "gateway": []}
    waited: list[float] = []

    async def stalled(where: str) -> None:
        if where == "control":
            stream: trio.abc.Stream = await trio.open_unix_socket(str(t.d.socket))
            first = head + b'{"path": '
        else:
            stream = await trio.open_tcp_stream(ghost, int(gport))
            first = ghead + b'{"model": '
        t0 = trio.current_time()
        reply = b""
        async with stream:
            await stream.send_all(first)
            with trio.fail_after(deadline + 30), contextlib.suppress(trio.BrokenResourceError):
                while data := await stream.receive_some(65536):
                    reply += data
        waited.append(trio.current_time() - t0)
        replies[where].append(reply)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for i in range(slow):
                nursery.start_soon(stalled, "control" if i % 2 == 0 else "gateway")
    statuses = Counter(
        f"{where} {r.split(b' ', 2)[1].decode() if r.startswith(b'HTTP/') else 'closed'}"
        for where, rs in replies.items()
        for r in rs
    )
    answered = sum(v for k, v in statuses.items() if k.endswith(" 408"))
    # Over a cap a newcomer may displace a stalled connection (closed) or be refused (503).
    row.check(all(k.endswith((" 408", " 503", " closed")) for k in statuses), f"answers {statuses}")
    row.check(answered >= min(slow, 8), f"only {answered} of {slow} answered 408")
    # Caps: more idle connections than control.max_connections still let a client in.
    idle = [await trio.open_unix_socket(str(t.d.socket)) for _ in range(8)]
    try:
        async with control(t) as c:
            status = (await c.get("/v1/status")).status_code
        with trio.fail_after(30):
            await closed_by_peer(idle[0])  # the longest idle made room
    finally:
        for s in idle:
            await s.aclose()
    async with httpx.AsyncClient(timeout=30) as client:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
        chat = await client.post(f"{gateway}/api/chat", json=body)
    row.check(status == 200, f"a control client behind 8 idle connections got {status}")
    row.check(chat.status_code == 200, f"a gateway chat afterwards got {chat.status_code}")
    row.tried = (
        f"{slow} stalled request bodies, half to the control socket, half to the gateway "
        f"(read_timeout {deadline:g} s), then 8 idle control connections (max_connections 4)"
    )
    tail = await survived(row, t, before, "slow")
    row.outcome = (
        f"all closed after at most {max(waited):.1f} s: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))
        + "; the longest idle connection made room for a real client, a chat was relayed "
        f"(bodies never timed out and connections were uncapped before); {tail}"
    )
    row.figures.update(slowest_close_s=max(waited), answers=dict(statuses))
