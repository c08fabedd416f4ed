"""Live progress on stderr while a command runs: one bar per transfer (:class:`Bars`), or per
layer of a download (:class:`DownloadBars`), fed by the daemon's events stream.

Bars are drawn only when stderr is a terminal; tests and pipes get the summary lines and nothing
else. They are a nicety: a command's result is the daemon's reply, never what the bars saw.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar, cast

from ..errors import ControlError
from .render import short_digest, sources_text

# Neither trio nor tensord.transfers (which imports it): the CLI runs without trio (a quarter of
# a second of CPU to import), see tensord.cli.commands.

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from ..control.blocking import Client

#: The states after which a transfer is over: ``tensord.transfers.FINAL_STATES``, which cannot be
#: imported without trio (tests/test_cli_commands.py checks they agree).
FINAL_STATES = frozenset({"done", "failed", "interrupted"})

Json = dict[str, Any]
T = TypeVar("T")


class _NoBars:
    """What :class:`_LiveBars` asks of rich's ``Progress``, drawing nothing: stderr is not a
    terminal, and rich (~50 ms of CPU to import) is not imported."""

    def __init__(self) -> None:
        self._next = 0

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def add_task(self, description: str, **fields: Any) -> TaskID:
        self._next += 1
        return cast("TaskID", self._next)

    def update(self, task: TaskID, **fields: Any) -> None:
        pass

    def remove_task(self, task: TaskID) -> None:
        pass

    def stop_task(self, task: TaskID) -> None:
        pass


class _LiveBars:
    """Rich bars on stderr, drawn only when stderr is a terminal: a bar's description, bytes,
    speed and time left, then ``last`` (a text column of the bar's fields)."""

    progress: Progress | _NoBars

    def __init__(self, console: Console | None, last: str) -> None:
        if console is None and not sys.stderr.isatty():
            self.live = False
            self.progress = _NoBars()
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.console = console if console is not None else Console(stderr=True)
        self.live = self.console.is_terminal and not self.console.is_dumb_terminal
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn(last),
            console=self.console,
            disable=not self.live,
            # Results go to stdout, which may be a pipe: do not route it through the bars.
            redirect_stdout=False,
            redirect_stderr=False,
        )

    def __enter__(self) -> Self:
        self.progress.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.progress.stop()


class Bars(_LiveBars):
    """One live progress bar per transfer on stderr, fed by transfer events; drawn only when
    stderr is a terminal (tests and pipes get the summary lines and nothing else)."""

    def __init__(self, console: Console | None = None, *, drop_finished: bool = False) -> None:
        super().__init__(console, "{task.fields[retries]} retries")
        #: ``watch`` runs for days: a finished transfer's bar goes (its line stays).
        self._drop_finished = drop_finished
        self._tasks: dict[tuple[str, str], TaskID] = {}
        #: The last event of each transfer seen, by (direction, id).
        self.last: dict[tuple[str, str], Json] = {}

    def update(self, ev: Json) -> None:
        key = (ev["direction"], ev["id"])
        self.last[key] = ev
        total = ev["bytes_total"] or None
        task = self._tasks.get(key)
        if task is None:
            arrow = "->" if ev["direction"] == "send" else "<-"
            task = self.progress.add_task(
                f"{ev['name']} {arrow} {ev['peer']}", total=total, retries=ev["retries"]
            )
            self._tasks[key] = task
        done = ev["bytes_done"]
        if ev["state"] == "done":
            done = ev["bytes_total"]
        self.progress.update(task, completed=done, total=total, retries=ev["retries"])
        if ev["state"] in FINAL_STATES and self._drop_finished:
            self.progress.remove_task(self._tasks.pop(key))
        elif ev["state"] in ("failed", "interrupted"):
            self.progress.update(task, description=f"{ev['name']} {ev['state']}")
            self.progress.stop_task(task)

    def finish(self) -> None:
        """The call succeeded: its transfers are done even if their last events were not read
        yet (the reply and the events stream race)."""
        for key, task in self._tasks.items():
            last = self.last[key]
            if last["state"] not in ("failed", "interrupted"):
                self.progress.update(task, completed=last["bytes_total"])

    def print(self, line: str) -> None:
        """A line of output: above the bars when stdout is the bars' terminal, else to stdout."""
        if self.live and sys.stdout.isatty():
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, flush=True)

    def retries(self, match: Callable[[Json], bool]) -> int | None:
        """The most retries a matching transfer reported (``None``: none was seen)."""
        seen = [ev["retries"] for ev in self.last.values() if match(ev)]
        return max(seen) if seen else None


def following(
    client: Client, bars: Bars, match: Callable[[Json], bool], call: Callable[[], T]
) -> T:
    """``call()`` while the transfers it causes feed ``bars``. Subscribed before the call is
    posted, so even its first event is seen.

    The events are read on a worker thread and the call is made on this one, the main thread:
    Ctrl-C (delivered to the main thread only) interrupts the call itself, whose connection is
    then shut down so the daemon cancels the transfer, and the call's errors are raised as they
    are. When the call ends, the stream is cut (``EventStream.stop``), which ends the reader."""
    failure: list[BaseException] = []
    with client.events() as events:

        def follow() -> None:
            try:
                for ev in events:
                    if ev.get("kind") == "transfer" and match(ev):
                        bars.update(ev)
            except ControlError:
                pass  # bars are a nicety: the call's own reply is the result
            except BaseException as exc:  # a bug: raised on the main thread below
                failure.append(exc)

        reader = threading.Thread(target=follow, name="tensord-events")
        reader.start()
        try:
            result = call()
        finally:
            events.stop()
            reader.join()
    if failure:
        raise failure[0]
    bars.finish()
    return result


def download_info(ev: Json) -> str:
    """The total bar's last column: connections, retries, and the bytes by source (the origin
    and each peer it took pieces from)."""
    info = f"{ev.get('connections', 0)} connections, {ev.get('retries', 0)} retries"
    sources = sources_text(ev.get("sources") or ())
    return f"{info}; {sources}" if sources else info


class DownloadBars(_LiveBars):
    """A total bar and one bar per layer, with the connections in use and the bytes by
    source, from download events."""

    def __init__(self) -> None:
        super().__init__(None, "{task.fields[info]}")
        self._total: TaskID | None = None
        self._layers: dict[str, TaskID] = {}
        self.max_connections = 0

    def update(self, ev: Json) -> None:
        self.max_connections = max(self.max_connections, int(ev.get("connections") or 0))
        info = download_info(ev)
        if self._total is None:
            self._total = self.progress.add_task("total", total=ev.get("bytes_total"), info=info)
        self.progress.update(
            self._total, completed=ev["bytes_done"], total=ev.get("bytes_total"), info=info
        )
        for digest, done, total in ev.get("layers") or []:
            task = self._layers.get(digest)
            if task is None:
                task = self.progress.add_task(f"  {short_digest(digest)}", total=total, info="")
                self._layers[digest] = task
            self.progress.update(task, completed=done, total=total or None)
