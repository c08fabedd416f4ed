"""Real ``tensord serve`` subprocesses for tests, each with its own state dir and socket."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """A running ``tensord serve`` whose stderr the test can wait on."""

    def __init__(self, proc: trio.Process, home: Path, socket: Path) -> None:
        self.proc = proc
        self.home = home
        self.socket = socket
        self.log = bytearray()
        self.eof = False
        self.terminated = False
        self._grew = trio.Event()

    async def pump(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.receive_some(65536):
            self.log += chunk
            self._grew.set()
            self._grew = trio.Event()
        self.eof = True
        self._grew.set()

    async def wait_for(self, needle: str, after: int = 0) -> int:
        """Wait until ``needle`` appears in the log after offset ``after``; return its end."""
        data = needle.encode()
        with trio.fail_after(30):
            while (i := self.log.find(data, after)) < 0:
                if self.eof:
                    raise AssertionError(f"daemon exited before {needle!r}:\n{self.text}")
                await self._grew.wait()
        return i + len(data)

    def terminate(self) -> None:
        self.terminated = True
        self.proc.send_signal(signal.SIGTERM)

    @property
    def text(self) -> str:
        return self.log.decode(errors="replace")


_SECRET: Path | None = None


def cluster_secret() -> Path:
    """One cluster secret file for every test daemon of this run (they form clusters)."""
    global _SECRET
    if _SECRET is None:
        fd, name = tempfile.mkstemp(prefix="tensord-test-secret-")
        os.write(fd, os.urandom(32).hex().encode() + b"\n")
        os.close(fd)
        _SECRET = Path(name)
    return _SECRET


def daemon_env(env: dict[str, str], home: Path) -> dict[str, str]:
    """The environment of a test daemon: ours without TENSORD_*/OLLAMA_*/NOTIFY_SOCKET, with
    its state directory and control socket under ``home`` and the run's cluster secret, unless
    ``env`` says otherwise."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("TENSORD_", "OLLAMA_"))}
    full.pop("NOTIFY_SOCKET", None)
    full["TENSORD_CLUSTER_SECRET_FILE"] = str(cluster_secret())
    full["TENSORD_STATE_DIR"] = str(home / "state")
    full["TENSORD_CONTROL_SOCKET"] = str(home / "control.sock")
    full["TENSORD_GATEWAY_LISTEN"] = "127.0.0.1:0"  # many daemons at once: no fixed port
    return full | env


@asynccontextmanager
async def daemon(
    env: dict[str, str], *args: str, home: Path | None = None, wrapper: tuple[str, ...] = ()
) -> AsyncIterator[Daemon]:
    """``tensord serve`` as a subprocess, stopped (SIGTERM, then SIGKILL) on exit. Its state and
    control socket live in ``home`` (a fresh temporary directory unless given). ``wrapper`` is
    a command the daemon runs under (it must ``exec "$@"``)."""
    with contextlib.ExitStack() as stack:
        if home is None:
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tensord-")))
        async with _daemon(daemon_env(env, home), args, home, wrapper) as d:
            yield d


@asynccontextmanager
async def _daemon(
    full: dict[str, str], args: tuple[str, ...], home: Path, wrapper: tuple[str, ...]
) -> AsyncIterator[Daemon]:
    proc = await trio.lowlevel.open_process(
        [*wrapper, sys.executable, "-m", "tensord", "serve", *args],
        stderr=subprocess.PIPE,
        env=full,
    )
    d = Daemon(proc, home, Path(full["TENSORD_CONTROL_SOCKET"]))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(d.pump)
            yield d
            if proc.returncode is None and not d.terminated:
                d.terminate()
            with trio.fail_after(30):
                await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
