"""What the control API needs from the daemon that serves it, and nothing more.

The control app depends on this Protocol, not on :class:`tensord.daemon.Daemon`: the daemon
builds the app (``ControlApp(self)``) and satisfies it structurally, so the dependency points one
way (daemon -> control) and a test can serve the app from any object with these members.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..config import Settings
    from ..download.manager import DownloadManager
    from ..node import TensorNode
    from ..peer_health import PeerHealth
    from ..store import TensorStore
    from ..transfers import TransferTable


class DaemonServices(Protocol):
    """The parts of a running daemon the control API reads and drives."""

    @property
    def settings(self) -> Settings: ...

    @property
    def node(self) -> TensorNode: ...

    @property
    def store(self) -> TensorStore: ...

    @property
    def transfers(self) -> TransferTable: ...

    @property
    def downloads(self) -> DownloadManager: ...

    @property
    def peers(self) -> Mapping[str, PeerHealth]: ...

    @property
    def started_at(self) -> float: ...

    def reload_or_raise(self) -> int:
        """Re-read the cluster file; raise its :class:`~tensord.errors.ConfigError` if it is
        bad (the running configuration is kept). Returns the number of peers configured."""
        ...
