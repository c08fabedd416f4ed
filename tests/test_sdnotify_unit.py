"""sd_notify datagrams, without a daemon around them."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import trio
import trio.testing

from tensord.sdnotify import Notifier, run_watchdog


def test_datagrams_to_a_path_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        n = Notifier.from_env({"NOTIFY_SOCKET": path}, os.getpid())
        n.ready()
        n.status("2/3 peers up\nsecond line")
        n.reloading()
        n.stopping()
        got = [sock.recv(4096).decode() for _ in range(4)]
    assert got[0] == "READY=1"
    assert got[1] == "STATUS=2/3 peers up second line"
    reload_lines = got[2].split("\n")
    assert reload_lines[0] == "RELOADING=1"
    usec = int(reload_lines[1].removeprefix("MONOTONIC_USEC="))
    assert abs(usec - time.monotonic_ns() // 1000) < 5_000_000
    assert got[3] == "STOPPING=1"


def test_abstract_namespace_socket() -> None:
    name = f"tensord-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        Notifier.from_env({"NOTIFY_SOCKET": "@" + name}, os.getpid()).ready()
        assert sock.recv(4096) == b"READY=1"


def test_without_systemd_everything_is_a_no_op(tmp_path: Path) -> None:
    for env in ({}, {"NOTIFY_SOCKET": str(tmp_path / "missing")}):
        n = Notifier.from_env(env, os.getpid())
        assert not n.enabled
        n.ready()
        n.status("x")
        n.watchdog()
        assert n.watchdog_interval() is None


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        base = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}
        assert Notifier.from_env(base, 42).watchdog_interval() == 1.0
        assert Notifier.from_env(base | {"WATCHDOG_PID": "42"}, 42).watchdog_interval() == 1.0
        assert Notifier.from_env(base | {"WATCHDOG_PID": "43"}, 42).watchdog_interval() is None


async def test_watchdog_pings_at_the_interval(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = str(tmp_path / "notify")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(path)
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000"}, os.getpid())
    async with trio.open_nursery() as nursery:
        await nursery.start(run_watchdog, n)
        start = trio.current_time()
        for _ in range(5):
            assert await sock.recv(100) == b"WATCHDOG=1"
        # five pings: at 0, 5, 10, 15 and 20 s of (virtual) time
        assert trio.current_time() - start == 20.0
        nursery.cancel_scope.cancel()
    sock.close()


async def test_a_stalled_event_loop_stops_the_watchdog_pings(tmp_path: Path) -> None:
    """The pings come from the event loop itself, so a loop stuck in blocking code (the failure
    the watchdog exists to catch) sends none, and systemd restarts the service."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.setblocking(False)
        n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "40000"}, os.getpid())

        def drain() -> int:
            count = 0
            while True:
                try:
                    sock.recv(100)
                except BlockingIOError:
                    return count
                count += 1

        async with trio.open_nursery() as nursery:
            await nursery.start(run_watchdog, n)  # pings every 20 ms
            await trio.sleep(0.2)
            assert drain() >= 3  # a healthy loop pings
            time.sleep(0.3)  # noqa: ASYNC251 - the point: the loop is stuck for 15 intervals
            assert drain() == 0
            await trio.sleep(0.2)
            assert drain() >= 3  # and it pings again once it runs
            nursery.cancel_scope.cancel()
