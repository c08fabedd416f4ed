"""``tensord serve``: the long-running node under systemd.

One root nursery holds the node (its peer listener and per-peer nurseries), one supervisor per
configured peer, the systemd watchdog, the status reporter and the signal handler. Slots for the
control API, the download manager and the gateway of later issues go here too.

Signals:
- SIGTERM / SIGINT: ``STOPPING=1``, stop accepting, let transfers in flight finish for up to
  ``transfer.drain_timeout`` seconds, exit 0. A second signal exits at once.
- SIGHUP: ``RELOADING=1``, re-read the cluster file; a bad file is logged and the running
  configuration kept; peers that joined get a supervisor, peers that left lose theirs (and their
  connections) while transfers to unchanged peers carry on; then ``READY=1``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Mapping
from functools import partial
from pathlib import Path

import trio

from . import metrics
from ._version import __version__
from .cluster.sharing import NodePieces, Sharing
from .config import NodeEntry, Settings, check_security_policy, load_settings
from .control.app import ControlApp
from .control.server import serve_control
from .download.manager import DownloadManager
from .errors import ConfigError, NodeClosed
from .events import DownloadEvent, Event, TransferEvent
from .gateway.server import Gateway, backend_entries
from .mirror import Mirror
from .node import TensorNode
from .peer_health import PeerHealth, supervise_peer
from .sdnotify import Notifier, run_watchdog
from .store import TensorStore
from .transfers import FINAL_STATES, TransferTable

__all__ = ["Daemon", "count", "serve"]

log = logging.getLogger("tensord.daemon")


class Daemon:
    """The node, its peers' supervisors, the control API, the gateway and the download manager
    under one nursery. The control API sees it through
    :class:`tensord.control.service.DaemonServices`."""

    def __init__(self, settings: Settings, env: Mapping[str, str]) -> None:
        self.settings = settings
        self.env = env
        insecure = check_security_policy(settings)
        if insecure is not None:
            log.warning("%s", insecure)
        self.node = TensorNode(settings)
        log.info("peer authentication: %s", self.node.security.describe())
        assert self.node.store is not None, "load_settings gives the daemon a state directory"
        self.store: TensorStore = self.node.store
        self.transfers = TransferTable()
        # The token gateway runs when the cluster names Ollama nodes to relay from.
        self.gateway = Gateway(settings) if backend_entries(settings) else None
        # Peer-first downloads: blob pieces from the peers that are up (downloads.share).
        sharing = Sharing(
            NodePieces(self.node),
            self.live_peers,
            lambda: self.settings.downloads.share,
            settings.downloads.piece_size,
        )
        self.downloads = DownloadManager(
            self.store.root / "models", settings.downloads, self.node.events, sharing
        )
        # The OCI mirror runs when mirror.listen is set (its API keys are checked here).
        self.mirror = (
            Mirror(settings, self.downloads, self.node.events)
            if settings.mirror.listen is not None
            else None
        )
        self.notifier = Notifier.from_env(env, os.getpid())
        self.peers: dict[str, PeerHealth] = {}
        self.started_at = time.time()
        self._nursery: trio.Nursery | None = None
        self._status_changed = trio.Event()
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self.node.start(nursery)
                await nursery.start(self._report_status)
                await nursery.start(self.downloads.run)
                # A peer's `pull-model --on` starts a job here, as the control API would.
                self.node.on_pull_request = lambda peer, ref: self.downloads.start("model", ref).id
                if self.gateway is not None:
                    await nursery.start(self.gateway.run)
                if self.mirror is not None:
                    await nursery.start(self.mirror.run)
                socket_path = await self._start_control(nursery)
                for entry in self.settings.peers:
                    self._add_peer(entry)
                await nursery.start(run_watchdog, self.notifier)
                log.info(
                    "tensord %s: node %s listening on %s (cluster %r, %d peers); control socket "
                    "%s; state in %s",
                    __version__,
                    self.node.node_id,
                    self.node.addr,
                    self.settings.cluster_name,
                    len(self.settings.peers),
                    socket_path,
                    self.store.root,
                )
                # Every listener is bound: only now is the service ready.
                self.notifier.ready()
                self.notifier.status(self.status_line())
                nursery.start_soon(self._log_arrivals)
                await self._handle_signals(signals, nursery)
        return 0

    async def _handle_signals(self, signals: AsyncIterator[int], nursery: trio.Nursery) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                self.reload()
                continue
            name = signal.Signals(signum).name
            if self._stopping:
                log.warning("%s again: exiting now", name)
                nursery.cancel_scope.cancel()
                return
            self._stopping = True
            log.info("%s: draining (up to %g s)", name, self.settings.transfer.drain_timeout)
            self.notifier.stopping()
            nursery.start_soon(self._drain_then_stop, nursery)

    async def _drain_then_stop(self, nursery: trio.Nursery) -> None:
        in_flight = self.node.transfers_in_flight
        drained = await self.node.drain(self.settings.transfer.drain_timeout)
        if in_flight:
            log.info(
                "drain %s: %d transfers were in flight",
                "complete" if drained else "timed out",
                in_flight,
            )
        nursery.cancel_scope.cancel()

    async def _start_control(self, nursery: trio.Nursery) -> Path:
        control = self.settings.control
        path = control.socket
        assert path is not None, "load_settings gives the daemon a control socket"
        started: Path = await nursery.start(
            partial(
                serve_control,
                ControlApp(self),
                path,
                max_connections=control.max_connections,
                read_timeout=control.read_timeout,
            )
        )
        return started

    # -- reload ------------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the cluster file. A bad file is rejected and the old configuration kept."""
        try:
            self.reload_or_raise()
        except ConfigError:
            return False
        return True

    def reload_or_raise(self) -> int:
        """:meth:`reload`, raising the :class:`ConfigError` of a bad file (for the control API).
        Returns the number of peers now configured."""
        self.notifier.reloading()
        try:
            new = self._load_again()
        except ConfigError as exc:
            log.error("reload rejected, keeping the running configuration: %s", exc)
            self.notifier.ready()
            self.notifier.status(self.status_line())
            raise
        for warning in self.node.reconfigure(new):
            log.warning("reload: %s", warning)
        if self.gateway is not None:
            self.gateway.reconfigure(new)
        elif backend_entries(new):
            log.warning("reload: the cluster now has Ollama nodes: restart to start the gateway")
        old_ids = set(self.peers)
        new_peers = {n.id: n for n in new.peers}
        for gone in old_ids - set(new_peers):
            self.peers.pop(gone).scope.cancel()
            log.info("reload: peer %s left the cluster", gone)
        for peer_id, entry in new_peers.items():
            health = self.peers.get(peer_id)
            if health is None:
                self._add_peer(entry)
                log.info("reload: peer %s joined at %s", peer_id, entry.addr)
            elif health.entry != entry:
                health.scope.cancel()
                del self.peers[peer_id]
                self._add_peer(entry)
                log.info("reload: peer %s changed: %s", peer_id, entry.addr)
        self.settings = new
        log.info("reload: %d peers", len(self.peers))
        self.notifier.ready()
        self._changed()
        return len(self.peers)

    def _load_again(self) -> Settings:
        cur = self.settings
        new = load_settings(
            self.env,
            cluster_file=cur.cluster_file,
            node_id=cur.node_id,
            log_level=cur.log_level,
        )
        check_security_policy(new)
        if new.security != cur.security:
            log.warning("reload: security settings changed; they take effect at the next restart")
        return new

    # -- peers -------------------------------------------------------------------------------

    def _add_peer(self, entry: NodeEntry) -> None:
        assert self._nursery is not None
        health = PeerHealth(entry)
        self.peers[entry.id] = health
        self._nursery.start_soon(
            supervise_peer,
            self.node,
            health,
            lambda: self.settings.transfer.peer_check_interval,
            self._changed,
        )

    def live_peers(self) -> list[str]:
        """The ids of the peers answering their pings now."""
        return [peer for peer, health in self.peers.items() if health.state == "up"]

    # -- status ------------------------------------------------------------------------------

    def status_line(self) -> str:
        up = sum(1 for p in self.peers.values() if p.state == "up")
        return (
            f"{up}/{len(self.peers)} peers up, {self.node.transfers_in_flight} transfers in flight"
        )

    def _changed(self) -> None:
        self._status_changed.set()

    async def _report_status(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep the transfer table, and push STATUS= whenever it changes: on peer state changes
        and transfer start/end."""
        async with self.node.events.subscribe() as events:

            async def watch_events() -> None:
                async for event in events:
                    count(event)
                    if isinstance(event, TransferEvent):
                        self.transfers.update(event)
                        if event.state in ("progress", "checkpoint"):
                            continue
                    self._changed()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_events)
                task_status.started()
                last = ""
                while True:
                    await self._status_changed.wait()
                    self._status_changed = trio.Event()
                    line = self.status_line()
                    if line != last:
                        self.notifier.status(line)
                        last = line

    async def _log_arrivals(self) -> None:
        while True:
            try:
                arrival = await self.node.receive_tensor()
            except NodeClosed:  # draining
                return
            log.info(
                "tensor arrived: %r from %s: dtype %s shape %s (%d bytes)",
                arrival.name,
                arrival.sender,
                arrival.array.dtype,
                arrival.array.shape,
                arrival.array.nbytes,
            )


def count(event: Event) -> None:
    """Prometheus counters for finished transfers and downloads (tensord/metrics.py)."""
    if isinstance(event, TransferEvent) and event.state in FINAL_STATES:
        metrics.TRANSFERS.labels(event.direction, event.state).inc()
        if event.state == "done":
            metrics.TRANSFER_BYTES.labels(event.direction).inc(event.bytes_total)
    elif isinstance(event, DownloadEvent) and event.state in ("done", "failed", "cancelled"):
        metrics.DOWNLOADS.labels(event.state).inc()
        if event.state == "done":
            metrics.DOWNLOAD_BYTES.inc(event.bytes_done)


async def serve(settings: Settings, env: Mapping[str, str]) -> int:
    return await Daemon(settings, env).run()
