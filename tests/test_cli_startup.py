"""What a CLI command imports before it talks to the daemon: its start-up is mostly imports
(issue 15 times ``tensord download`` from the shell against aria2c's 0.06 s), so the modules
that cost the most - trio, anyio, httpx and httpcore (which pulls h2), numpy, the settings'
specs - must stay out of the commands that do not need them. No timing here (bench/downloads.py
measures it): which modules are loaded is what decides it, and that is exact."""

from __future__ import annotations

import ast
import contextlib
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tensord.config.paths import CLUSTER_FILE_VAR, CONTROL_SOCKET_VAR
from tensord.config.schema import spec_of
from tensord.config.settings import ControlSettings, Settings
from tensord.control.base import resolve_socket

from .support.unix_http import serving

#: What no client command, nor ``import tensord``, may import.
HEAVY = (
    "trio",
    "anyio",
    "sniffio",
    "httpx",
    "httpcore",
    "h2",
    "h11",
    "numpy",
    "rich",
    "dataclasses",
    "logging",
    "tensord.config.schema",
    "tensord.config.settings",
    "tensord.node",
)
SHA = "ab" * 32


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TENSORD_", "OLLAMA_"))}
    return env | extra


def _loaded_by(code: str, env: dict[str, str] | None = None) -> tuple[list[str], str]:
    """Run ``code`` in a fresh interpreter; the heavy modules it left loaded, and its stderr."""
    probe = f"{code}\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=False
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    return ast.literal_eval(lines[-1]), out.stderr


def _cli(*argv: str) -> str:
    """Code that runs ``tensord ARGV`` and keeps its exit status on stderr's last line."""
    return (
        "import sys\nfrom tensord.cli import main\n"
        f"print('exit', main({list(argv)!r}), file=sys.stderr)"
    )


def test_import_tensord_loads_none_of_the_heavy_modules() -> None:
    loaded, _ = _loaded_by("import tensord", _clean_env())
    assert loaded == []
    # ...and what it names lazily still resolves.
    loaded, _ = _loaded_by(
        "from tensord import Settings, load_settings, Client\n"
        "assert load_settings({}, library=True).__class__ is Settings\n"
        "assert Client.__module__ == 'tensord.control.blocking'"
    )
    assert "tensord.config.settings" in loaded
    assert {"trio", "httpx", "httpcore", "anyio"}.isdisjoint(loaded)


def test_client_commands_run_without_trio_httpx_or_the_settings(tmp_path: Path) -> None:
    """Told no socket and configured by nothing, a command finds the default one without
    reading the settings; with ``--socket`` too. No daemon: the command fails as it should."""
    env = _clean_env(XDG_RUNTIME_DIR=str(tmp_path))
    for argv in (
        ("download", "http://x/y", "--sha256", SHA),
        ("--socket", str(tmp_path / "absent.sock"), "download", "http://x/y", "--sha256", SHA),
        ("ls",),
        ("status", "--json"),
        ("downloads",),
        ("send", "x.npy", "--to", "b"),
        ("send", "x.npy", "--to", "b,c"),
        ("pull", "b", "w", "-o", "w.npy"),
        ("watch",),
        ("pull-model", "llama3:8b"),
        ("pull-model", "llama3:8b", "--on", "all", "--detach"),
    ):
        loaded, err = _loaded_by(_cli(*argv), env)
        assert loaded == [], argv
        assert err.splitlines()[-1] == "exit 69" and "tensord is not running" in err, err


# --------------------------------------------------------------------------------------------
# Whole commands (download, send, pull -o), against a daemon that plays its part of the protocol


class _FakeDaemon(http.server.BaseHTTPRequestHandler):
    """The control API as ``tensord download``, ``send`` and ``pull`` see it: an events stream
    that says ``: subscribed``, then, once something is posted, its event (the download's end, a
    transfer's); a download that is running when it is posted, and that job; a send and a pull
    that have ended when they answer, and the pulled tensor's bytes."""

    protocol_version = "HTTP/1.1"
    job = {"id": "j1", "source": "http://x/y", "state": "done", "bytes_total": 5, "sources": []}
    transfer = {"name": "w", "peer": "b", "nbytes": 5, "seconds": 0.01, "rate": 500, "retries": 0}
    posted: threading.Event
    #: What was posted (its path), which the events stream tells the end of.
    what: list[str]

    def _json(self, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/v1/tensors/w/data":
            self.send_response(200)
            self.send_header("content-length", "5")
            self.send_header("x-tensord-dtype", "uint8")
            self.end_headers()
            self.wfile.write(b"bytes")
            return
        if self.path != "/v1/events":
            self._json(self.job | {"peak_connections": 4})
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.end_headers()
        self.wfile.write(b": subscribed\n\n")
        self.wfile.flush()
        self.posted.wait(30)
        if self.what == ["/v1/downloads"]:
            done = json.dumps(self.job | {"kind": "download", "bytes_done": 5}).encode()
            self.wfile.write(b"event: download\ndata: " + done + b"\n\n")
        else:
            direction = "send" if self.what == ["/v1/send"] else "receive"
            ev = {"id": "x1", "direction": direction, "state": "done", "bytes_done": 5}
            done = json.dumps(self.transfer | ev | {"bytes_total": 5}).encode()
            self.wfile.write(b"event: transfer\ndata: " + done + b"\n\n")
        self.wfile.flush()
        self.rfile.read()  # until the client hangs up

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.what.append(self.path)
        if self.path == "/v1/send":
            self._json({"transfers": [self.transfer]})
        elif self.path == "/v1/pull":
            self._json({"tensor": {"name": "w"}, "transfer": self.transfer})
        else:
            self._json(self.job | {"state": "running", "bytes_done": 0})
        self.posted.set()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _fake_daemon(path: Path) -> Iterator[None]:
    handler = type(
        "Handler",
        (_FakeDaemon,),
        {"address_string": lambda _: "local", "posted": threading.Event(), "what": []},
    )
    with serving(path, handler):
        yield
    path.unlink()


def test_a_whole_download_runs_without_trio_httpx_or_rich(tmp_path: Path) -> None:
    """Followed to its end on the events stream; stderr is not a terminal, so no bars: rich
    is not imported either."""
    (tmp_path / "tensord").mkdir()
    code = _cli("download", "http://x/y", "--sha256", SHA)
    with _fake_daemon(tmp_path / "tensord" / "control.sock"):
        loaded, err = _loaded_by(code, _clean_env(XDG_RUNTIME_DIR=str(tmp_path)))
    assert err.splitlines()[-1] == "exit 0", err
    assert loaded == []
    with _fake_daemon(tmp_path / "tensord" / "control.sock"):
        # A variable that names the socket: the settings are read, as the daemon reads them.
        env = _clean_env(TENSORD_CONTROL_SOCKET=str(tmp_path / "tensord" / "control.sock"))
        loaded, err = _loaded_by(code, env)
    assert err.splitlines()[-1] == "exit 0", err
    assert "tensord.config.settings" in loaded and "trio" not in loaded


def test_a_whole_send_and_pull_run_without_trio_httpx_numpy_or_rich(tmp_path: Path) -> None:
    """The request made while a worker thread reads the events stream, which is cut when the
    reply has come; ``pull -o`` writes the ``.npy`` the daemon sends, without numpy."""
    (tmp_path / "tensord").mkdir()
    env = _clean_env(XDG_RUNTIME_DIR=str(tmp_path))
    with _fake_daemon(tmp_path / "tensord" / "control.sock"):
        loaded, err = _loaded_by(_cli("send", str(tmp_path / "w.npy"), "--to", "b"), env)
    assert err.splitlines()[-1] == "exit 0", err
    assert loaded == []
    out = tmp_path / "out.npy"
    with _fake_daemon(tmp_path / "tensord" / "control.sock"):
        loaded, err = _loaded_by(_cli("pull", "b", "w", "-o", str(out)), env)
    assert err.splitlines()[-1] == "exit 0", err
    assert loaded == [] and out.read_bytes() == b"bytes"


# --------------------------------------------------------------------------------------------
# Finding the socket without the settings gives the daemon's answer


def test_the_variables_that_skip_the_settings_are_the_specs_own() -> None:
    assert spec_of(ControlSettings, "socket").env_names == (CONTROL_SOCKET_VAR,)
    assert spec_of(Settings, "cluster_file").env_names == (CLUSTER_FILE_VAR,)


def test_unconfigured_the_socket_is_the_daemons_default(tmp_path: Path) -> None:
    from tensord.config import load_settings

    for env in ({"XDG_RUNTIME_DIR": str(tmp_path)}, {"RUNTIME_DIRECTORY": str(tmp_path)}, {}):
        daemon = load_settings(env).control.socket
        assert daemon is not None
        if daemon.exists() or not Path("/run/tensord/control.sock").exists():
            assert resolve_socket(None, env) == daemon
