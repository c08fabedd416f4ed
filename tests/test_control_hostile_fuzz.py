"""A stateful fuzzer of the control API (issue 12): a hostile but well-formed local client
against a real ``tensord serve``. Every endpoint, every field drawn from edge values (names with
``/``, ``..``, NUL, 4 KiB; paths to FIFOs, directories, devices, nothing; JSON of every wrong
type; huge numbers; bad methods; broken ``.npy`` uploads). After every step: the answer is a 2xx
or a 4xx whose JSON error has a message (never a 5xx for bad input), the daemon still answers
``status``, and its RSS stays within 64 MiB of where it started.

Bounded for ``make test`` (a few seconds); ``TENSORD_FUZZ_LONG=1`` runs it for much longer.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from .support.daemons import daemon_env
from .support.helpers import wait_serving

LONG = os.environ.get("TENSORD_FUZZ_LONG", "") not in ("", "0")
#: Examples (runs of up to 25 or 50 steps): a dozen in ``make test``, 400 with TENSORD_FUZZ_LONG.
EXAMPLES = int(os.environ.get("TENSORD_FUZZ_EXAMPLES", "0")) or (400 if LONG else 12)
RSS_GROWTH_LIMIT = 64 << 20


@dataclass
class Live:
    proc: subprocess.Popen[bytes]
    client: httpx.Client
    files: dict[str, str]
    log: Path
    rss_start: int

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS for the daemon")


def _files(root: Path) -> dict[str, str]:
    """The paths the fuzzer names: good files, and every kind of file that is not one."""
    np.save(root / "good.npy", np.arange(12, dtype=np.float32).reshape(3, 4))
    header = json.dumps({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (root / "good.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    (root / "lying.safetensors").write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    (root / "garbage.npy").write_bytes(b"\x93NUMPY\x01\x00\xff\xff" + b"{" * 100)
    (root / "empty.npy").write_bytes(b"")
    os.mkfifo(root / "fifo.npy")
    (root / "dir.npy").mkdir()
    (root / "loop.npy").symlink_to(root / "loop.npy")
    (root / "dangling.npy").symlink_to(root / "absent.npy")
    paths = {
        p.name: str(p)
        for p in root.iterdir()
        if p.name.endswith((".npy", ".safetensors"))  # loop/dangling are symlinks: still named
    }
    paths |= {
        "loop.npy": str(root / "loop.npy"),
        "dangling.npy": str(root / "dangling.npy"),
        "zero": "/dev/zero",
        "null": "/dev/null",
        "proc": "/proc/self/mem",
        "missing": str(root / "missing.npy"),
        "relative": "good.npy",
        "nul": str(root / "good\x00.npy"),
        "long": "/" + "a" * 4096 + ".npy",
        "root": "/",
    }
    return paths


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    with tempfile.TemporaryDirectory(prefix="tensord-fuzz-") as where:
        home = Path(where)
        files = home / "files"
        files.mkdir()
        env = daemon_env({"TENSORD_LISTEN": "127.0.0.1:0", "TENSORD_NODE_ID": "fz"}, home)
        log = home / "daemon.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "tensord", "serve"], stderr=out, env=env)
        client = httpx.Client(
            transport=httpx.HTTPTransport(uds=env["TENSORD_CONTROL_SOCKET"]),
            base_url="http://tensord",
            timeout=httpx.Timeout(30, connect=5),
        )
        try:
            wait_serving(lambda: client.get("/v1/status").raise_for_status(), proc, log, 30)
            live = Live(proc, client, _files(files), log, 0)
            live.rss_start = live.rss()
            yield live
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(40) == 0, log.read_text()  # drain_timeout is 30 s
            text = log.read_text()
            assert "a bug in tensord" not in text and "Traceback" not in text, text
        finally:
            client.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# -- edge values -----------------------------------------------------------------------------

EDGE_NAMES = [
    "ok",
    "layers/0/w",
    "layers//0",
    "a/../b",
    "..",
    ".",
    "/abs",
    "x\x00y",
    "n" * 4096,
    "n" * 257,
    "n" * 256,
    "ü",
    "a b",
    "a/",
    "%2F",
    "x\n",
]
names = st.sampled_from(EDGE_NAMES) | st.text(max_size=12)
huge = st.sampled_from([2**63, -(2**63), 2**64 + 1, 10**40, -1, 0])
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | huge
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
peers = st.sampled_from(["zz", "", "x\x00", "p" * 4096, "tensord://", "x:notaport"]) | st.text(
    alphabet="abc", max_size=4
)
FIELDS = ["peer", "name", "path", "as", "model", "url", "sha256", "bogus"]
METHODS = ["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "OPTIONS"]
ENDPOINTS = [
    "/v1/status",
    "/v1/peers",
    "/v1/tensors",
    "/v1/tensors/ok",
    "/v1/tensors/ok/data",
    "/v1/tensors/a/b/c",
    "/v1/send",
    "/v1/pull",
    "/v1/transfers",
    "/v1/downloads",
    "/v1/downloads/nope",
    "/v1/nothing",
    "/v2/status",
    "/",
    "/metrics",
]


def npy_bytes(shape: object, descr: str = "<f4", fortran: bool = False, data: int = 0) -> bytes:
    header = repr({"descr": descr, "fortran_order": fortran, "shape": shape}).encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + bytes(data)


uploads = st.sampled_from(
    [
        npy_bytes((2,), data=8),
        npy_bytes((2**62,)),
        npy_bytes((2**31, 2**31, 4)),
        npy_bytes((-1,)),
        npy_bytes((0,)),
        npy_bytes((2,), descr="|O", data=16),
        npy_bytes((2,), fortran=True, data=8),
        npy_bytes("not a shape"),
        npy_bytes((2,), data=7),
        npy_bytes((2,), data=9),
        b"\x93NUMPY\x02\x00" + struct.pack("<I", 1 << 30),
        b"\x93NUMPY",
        b"",
        b"not numpy at all",
    ]
) | st.binary(max_size=64)


#: Bodies are encoded here: httpx's json= refuses NaN and infinities, which a client may send.
JSON = {"content-type": "application/json"}


def url_of(name: str) -> str:
    return "/v1/tensors/" + quote(name, safe="").replace(".", "%2E")


class ControlFuzz(RuleBasedStateMachine):
    live: Live

    def call(self, method: str, url: str, **kw: Any) -> httpx.Response:
        r = self.live.client.request(method, url, **kw)
        where = f"{method} {url[:120]} {str(kw)[:300]}"
        assert r.status_code < 500, f"{where}: {r.status_code} {r.text[:500]}"
        if r.status_code >= 400 and method != "HEAD":
            err = r.json()["error"]
            message = err["message"]
            assert isinstance(message, str) and message.strip(), f"{where}: {r.text[:300]}"
            assert not message.rstrip().endswith(":"), f"{where}: {message}"
            assert err["code"], f"{where}: {r.text[:300]}"
        return r

    @rule(name=names)
    def put_good(self, name: str) -> None:
        self.call("PUT", url_of(name), json={"path": self.live.files["good.npy"]})

    @rule(name=names, which=st.data())
    def put_path(self, name: str, which: st.DataObject) -> None:
        key = which.draw(st.sampled_from(sorted(self.live.files)))
        self.call("PUT", url_of(name), json={"path": self.live.files[key]})

    @rule(name=names, body=json_values)
    def put_json(self, name: str, body: object) -> None:
        self.call("PUT", url_of(name), content=json.dumps(body).encode(), headers=JSON)

    @rule(name=names, body=uploads)
    def upload(self, name: str, body: bytes) -> None:
        headers = {"content-type": "application/octet-stream"}
        self.call("PUT", url_of(name), content=body, headers=headers)

    @rule(name=names, method=st.sampled_from(["GET", "DELETE"]), data=st.booleans())
    def tensor(self, name: str, method: str, data: bool) -> None:
        suffix = "/data" if data and method == "GET" else ""
        self.call(method, url_of(name) + suffix)

    @rule(
        endpoint=st.sampled_from(["/v1/send", "/v1/pull", "/v1/downloads"]),
        fields=st.lists(st.sampled_from(FIELDS), unique=True, max_size=4),
        which=st.data(),
    )
    def post(self, endpoint: str, fields: list[str], which: st.DataObject) -> None:
        body: dict[str, object] = {}
        for key in fields:
            if key == "peer":
                value: object = which.draw(peers | json_values)
            elif key in ("name", "as"):
                value = which.draw(names | json_values)
            elif key == "path":
                value = which.draw(st.sampled_from(sorted(self.live.files)).map(
                    self.live.files.__getitem__) | json_values)  # fmt: skip
            elif key == "model":  # a registry that refuses at once: never the network
                value = which.draw(names.map(lambda n: f"http://127.0.0.1:9/{n}") | json_values)
            elif key == "url":
                value = which.draw(st.sampled_from(["http://127.0.0.1:9/x", "ftp://x", ""]))
            elif key == "sha256":
                value = which.draw(st.sampled_from(["0" * 64, "x", "0" * 65]) | json_values)
            else:
                value = which.draw(json_values)
            body[key] = value
        self.call("POST", endpoint, content=json.dumps(body).encode(), headers=JSON)

    @rule(endpoint=st.sampled_from(ENDPOINTS), method=st.sampled_from(METHODS))
    def any_method(self, endpoint: str, method: str) -> None:
        if (method, endpoint) == ("GET", "/v1/events"):
            return
        self.call(method, endpoint)

    @rule(
        endpoint=st.sampled_from(["/v1/send", "/v1/pull", "/v1/downloads", "/v1/tensors/ok"]),
        body=st.binary(max_size=64)
        | st.sampled_from([b"[" * 100_000, b'{"a":' * 50_000, b"1" * 5000, b"\xff\xfe"]),
    )
    def raw_body(self, endpoint: str, body: bytes) -> None:
        method = "PUT" if endpoint.startswith("/v1/tensors") else "POST"
        self.call(method, endpoint, content=body, headers={"content-type": "application/json"})

    @rule(job=st.sampled_from(["x", "0" * 12, "%00", "a" * 4096]), method=st.sampled_from(
        ["GET", "DELETE"]))  # fmt: skip
    def download_job(self, job: str, method: str) -> None:
        self.call(method, "/v1/downloads/" + quote(job, safe=""))

    @invariant()
    def still_serving(self) -> None:
        r = self.live.client.get("/v1/status")
        assert r.status_code == 200, r.text
        assert r.json()["node_id"] == "fz"
        growth = self.live.rss() - self.live.rss_start
        assert growth < RSS_GROWTH_LIMIT, f"daemon RSS grew by {growth >> 20} MiB"


def test_the_control_api_answers_every_hostile_request_with_a_4xx(live: Live) -> None:
    ControlFuzz.live = live
    run_state_machine_as_test(
        ControlFuzz,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=50 if LONG else 25,
            deadline=None,
            derandomize=not LONG,
            suppress_health_check=list(HealthCheck),
            database=None,
        ),
    )
