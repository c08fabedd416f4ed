"""The one way tests run the ``tensord`` command.

The real CLI as a subprocess (``python -m tensord``), with an environment free of the test
runner's ``TENSORD_*``/``OLLAMA_*`` variables, pointed at a daemon's control socket when one is
given. :func:`tensord` blocks (for sync tests; the daemon is another process), :func:`run`
is the same under trio (for tests that serve something in-process meanwhile), :func:`start`
opens it for tests that signal it or read it as it runs (``watch``, Ctrl-C), and
:func:`in_process` calls ``main()`` for commands that need no daemon (``certs``, argument
errors), where a subprocess would only add start-up time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from typing import NamedTuple

import trio

from tensord.cli import main

SocketPath = str | os.PathLike[str]


class CliResult(NamedTuple):
    """How the command ended: ``code, out, err = await run(...)`` or ``result.code``."""

    code: int
    out: str
    err: str


def command(*args: str, socket: SocketPath | None = None) -> list[str]:
    """``python -m tensord [--socket SOCKET] ARGS...``."""
    where = ["--socket", os.fspath(socket)] if socket is not None else []
    return [sys.executable, "-m", "tensord", *where, *args]


def cli_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Ours without ``TENSORD_*``/``OLLAMA_*`` (they would configure the CLI), plus ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TENSORD_", "OLLAMA_"))}
    return clean | dict(env or {})


def tensord(
    *args: str, socket: SocketPath | None = None, env: Mapping[str, str] | None = None
) -> CliResult:
    """Run ``tensord ARGS`` to the end (blocking) and return its exit status and output."""
    out = subprocess.run(
        command(*args, socket=socket),
        capture_output=True,
        text=True,
        env=cli_env(env),
        timeout=60,
        check=False,
    )
    return CliResult(out.returncode, out.stdout, out.stderr)


async def run(
    *args: str, socket: SocketPath | None = None, env: Mapping[str, str] | None = None
) -> CliResult:
    """:func:`tensord` under trio: other tasks run while the command does."""
    out = await trio.run_process(
        command(*args, socket=socket),
        capture_stdout=True,
        capture_stderr=True,
        env=cli_env(env),
        check=False,
    )
    return CliResult(out.returncode, out.stdout.decode(), out.stderr.decode())


async def start(
    *args: str, socket: SocketPath | None = None, env: Mapping[str, str] | None = None
) -> trio.Process:
    """``tensord ARGS`` started with its stdout and stderr piped; the caller waits for it (and
    kills it if the test fails first)."""
    return await trio.lowlevel.open_process(
        command(*args, socket=socket),
        env=cli_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def in_process(*args: str) -> int:
    """``main(ARGS)`` in this process (capture its output with ``capsys``): for commands that
    talk to no daemon. Argument errors raise ``SystemExit(2)``, as argparse does."""
    return main(list(args))


def ok(*args: str, socket: SocketPath | None = None, env: Mapping[str, str] | None = None) -> str:
    """Run ``tensord ARGS``, check it succeeded, and return what it printed."""
    result = tensord(*args, socket=socket, env=env)
    assert result.code == 0, result
    return result.out
