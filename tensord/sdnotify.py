"""sd_notify(3), written against the protocol: datagrams of ``KEY=VALUE`` lines to the AF_UNIX
socket named by ``NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace).

Without ``NOTIFY_SOCKET`` every call is a no-op, so the daemon runs the same outside systemd. A
failed send is logged at debug level and never raised: telling systemd is never worth crashing.
The watchdog is pinged from the trio event loop itself, so a stuck loop stops the pings and
systemd restarts the service - that is the point of the watchdog.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Mapping

import trio

log = logging.getLogger("tensord.sdnotify")


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        if address:
            target = "\0" + address[1:] if address.startswith("@") else address
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
                self._sock.connect(target)
            except OSError as exc:
                log.debug("NOTIFY_SOCKET %s unusable: %s", address, exc)
                self._sock = None

    @classmethod
    def from_env(cls, env: Mapping[str, str], pid: int) -> Notifier:
        """From the service environment; the watchdog only if it is meant for this process."""
        usec: int | None = None
        raw = env.get("WATCHDOG_USEC", "")
        owner = env.get("WATCHDOG_PID", "")
        if raw.isdigit() and int(raw) > 0 and (not owner or owner == str(pid)):
            usec = int(raw)
        return cls(env.get("NOTIFY_SOCKET") or None, usec)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.send("\n".join(lines).encode())
        except OSError as exc:
            log.debug("sd_notify %s failed: %s", lines, exc)

    def ready(self) -> None:
        self.send("READY=1")

    def status(self, text: str) -> None:
        self.send("STATUS=" + text.replace("\n", " "))

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def reloading(self) -> None:
        # Type=notify-reload wants the monotonic time with RELOADING=1.
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises."""
        if self._sock is None or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2e6

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def run_watchdog(
    notifier: Notifier, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Ping the watchdog from the event loop until cancelled (returns at once if none is set)."""
    interval = notifier.watchdog_interval()
    task_status.started()
    if interval is None:
        return
    while True:
        notifier.watchdog()
        await trio.sleep(interval)
