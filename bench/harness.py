"""Process plumbing for the benchmark: fresh child processes per row, and nothing left behind.

Every row starts its own processes from the ``spawn`` context (a clean interpreter: no state
inherited from the runner or from earlier rows) through :class:`Children`, which

- hands each child one end of a ``Pipe``; the child's function gets a :class:`Reporter` to send
  intermediate messages (a listening port, a memory reading) and its return value is sent last;
- turns a child's exception, its death, or its silence past a deadline into :class:`ChildFailed`
  with a one-line reason, so that the row prints ``failed: <reason>`` and the next row still runs;
- terminates (then kills) every child when the row ends, however it ends. Children also ask the
  kernel to kill them if the runner dies (``PR_SET_PDEATHSIG``), and ignore Ctrl-C (the runner
  handles it and stops them), so an interrupted run leaves no process listening on a port.

Listening children bind port 0 and report the port they got, so there is no free-port race.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Any

import numpy as np

MP = multiprocessing.get_context("spawn")
PR_SET_PDEATHSIG = 1
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


class ChildFailed(Exception):
    """A child process raised, died, or did not answer in time."""


def make_tensor(nbytes: int) -> np.ndarray[Any, Any]:
    """The payload of every row: float32 normals (dense weights: lz4 cannot shrink them)."""
    return np.random.default_rng(0).standard_normal(nbytes // 4, dtype=np.float32)


def maxrss_bytes() -> int:
    """This process's peak resident set size so far (``ru_maxrss`` is in KiB on Linux).

    Linux carries ``ru_maxrss`` over from the parent into a spawned child (fork, then exec), so
    a child's figure is the larger of its own peak and its parent's peak at spawn time.
    """
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KiB


def memory_status() -> dict[str, int]:
    """Current and peak RSS of this process image alone (``VmRSS``, ``VmHWM``), and ``ru_maxrss``.

    ``VmHWM`` belongs to the address space created at exec, so unlike ``ru_maxrss`` it never
    includes the parent's peak: the two agree whenever ``ru_maxrss`` is the process's own.
    """
    out = {"maxrss": maxrss_bytes(), "rss": 0, "hwm": 0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out["rss" if key == "VmRSS" else "hwm"] = int(value.split()[0]) * KiB
    except OSError:
        pass
    return out


class Reporter:
    """A child's way to send messages to the runner before its function returns."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def send(self, payload: Any) -> None:
        self._conn.send(("msg", payload))


def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the runner died before prctl took effect
        os._exit(1)


def _describe(exc: BaseException) -> str:
    """One line for a failure, unwrapping exception groups to their first real error."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _child_main(
    conn: Connection, parent: int, fn: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = fn(Reporter(conn), *args)
    except BaseException as exc:
        if os.environ.get("VERBOSE"):
            traceback.print_exc()
        with contextlib.suppress(OSError):
            conn.send(("error", _describe(exc)))
        raise SystemExit(1) from None
    conn.send(("done", result))


class Child:
    """One child process and the runner's end of its pipe."""

    def __init__(self, name: str, proc: BaseProcess, conn: Connection) -> None:
        self.name = name
        self.proc = proc
        self.conn = conn

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def recv(self, timeout: float) -> Any:
        """The child's next message or its return value. Raises :class:`ChildFailed`."""
        deadline = time.monotonic() + timeout
        while True:
            if self.conn.poll(0):
                try:
                    kind, payload = self.conn.recv()
                except EOFError:
                    self.proc.join(1)
                    raise ChildFailed(
                        f"{self.name} exited (code {self.proc.exitcode}) without a result"
                    ) from None
                if kind == "error":
                    raise ChildFailed(f"{self.name}: {payload}")
                return payload
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChildFailed(f"{self.name}: no answer within {timeout:g} s")
            ready = wait([self.conn, self.proc.sentinel], remaining)
            if self.proc.sentinel in ready and not self.conn.poll(0):
                self.proc.join(1)
                raise ChildFailed(
                    f"{self.name} exited (code {self.proc.exitcode}) without a result"
                )

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(3)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(3)
        self.conn.close()


class Children:
    """The processes of one row; all are stopped when the ``with`` block ends."""

    def __init__(self) -> None:
        self._children: list[Child] = []

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    def start(self, name: str, fn: Callable[..., Any], *args: Any) -> Child:
        """Run ``fn(reporter, *args)`` in a fresh spawned process."""
        ours, theirs = MP.Pipe()
        proc = MP.Process(
            target=_child_main, args=(theirs, os.getpid(), fn, args), name=name, daemon=True
        )
        proc.start()
        theirs.close()
        child = Child(name, proc, ours)
        self._children.append(child)
        return child

    def stop_all(self) -> None:
        while self._children:
            self._children.pop().stop()


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Make SIGTERM unwind the runner like Ctrl-C does, so ``finally`` blocks stop children."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# -- other load on the machine ----------------------------------------------------------------


def _clock_ticks() -> int:
    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (ValueError, OSError):
        return 100


def _machine_busy_seconds() -> float:
    """CPU seconds all processes have used since boot (user, nice, system, irq, softirq)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[1:8])
    return (user + nice + system + irq + softirq) / _clock_ticks()


def _own_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def _process_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds used so far by every process, with its name: ``{pid: (comm, seconds)}``."""
    out: dict[int, tuple[str, float]] = {}
    tick = _clock_ticks()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmd = f.read(200).replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        comm = stat[stat.find("(") + 1 : stat.rfind(")")]
        rest = stat[stat.rfind(")") + 2 :].split()
        out[int(entry.name)] = (cmd or comm, (int(rest[11]) + int(rest[12])) / tick)
    return out


class OtherLoad:
    """CPU that processes other than the benchmark's used while a row ran.

    The machine's busy time from ``/proc/stat`` minus the CPU time of the runner and its
    (reaped) children; plus the busiest other processes by name, so a disturbed row says
    what disturbed it. Tick-based accounting makes this accurate to a few hundredths of a core.
    """

    def __init__(self) -> None:
        self._t = time.monotonic()
        self._busy = _machine_busy_seconds()
        self._own = _own_seconds()
        self._procs = _process_seconds()
        self._me = os.getpid()

    def stop(self) -> dict[str, Any]:
        wall = max(time.monotonic() - self._t, 1e-9)
        other = (_machine_busy_seconds() - self._busy) - (_own_seconds() - self._own)
        after = _process_seconds()
        top: list[tuple[float, str]] = []
        for pid, (cmd, secs) in after.items():
            # The row's own children are gone by now (stopped and reaped): what is left is not ours.
            used = secs - self._procs.get(pid, ("", 0.0))[1]
            if pid != self._me and used >= 0.05 * wall:
                top.append((used, cmd))
        top.sort(reverse=True)
        return {
            "cores": max(0.0, other / wall),
            "top": [{"cpu_seconds": round(s, 2), "cmd": c[:80]} for s, c in top[:3]],
        }


def first_touch_rates(out: Reporter, nbytes: int) -> tuple[float, float]:
    """GB/s of touching every page of a fresh ``nbytes`` array: never-used, then recycled memory.

    On bare metal both are the kernel's page zeroing (~10-20 GB/s). On a VM that hands freed
    memory back to its host, never-used memory is far slower: a row whose receiver allocates a
    new buffer per transfer then varies from rep to rep for reasons that are not its own.
    Run it in a child (``Children.start``): a spawned process's ``ru_maxrss`` starts at its
    parent's peak RSS, so the runner must never hold a large buffer itself.
    """
    rates: list[float] = []
    for _ in range(2):
        t = time.perf_counter()
        buf = np.empty(nbytes, np.uint8)
        buf[:: 4 * KiB] = 1
        rates.append(nbytes / (time.perf_counter() - t) / 1e9)
        del buf
    return rates[0], rates[1]
