"""Where the daemon's files are when nothing configures them: the state directory and the
control socket. Apart from the specs (schema.py, settings.py), so that a client command finds
the socket without importing them (``tensord.control.base.resolve_socket``): the CLI starts
faster, with the same rule as the daemon's, which calls these too (load.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

#: The variables of ``control.socket`` and ``cluster_file`` (their specs name these constants).
CONTROL_SOCKET_VAR = "TENSORD_CONTROL_SOCKET"
CLUSTER_FILE_VAR = "TENSORD_CLUSTER_FILE"


def default_state_dir(env: Mapping[str, str]) -> Path:
    """Where the daemon keeps tensors when ``state_dir`` is not set: systemd's
    ``StateDirectory=`` (``$STATE_DIRECTORY``), else ``$XDG_STATE_HOME/tensord``, else
    ``/var/lib/tensord`` for root and ``~/.local/state/tensord`` for anyone else."""
    if (found := env.get("STATE_DIRECTORY")) and found.strip():
        return Path(found.split(":")[0])
    if (found := env.get("XDG_STATE_HOME")) and found.strip():
        return Path(found) / "tensord"
    if os.geteuid() == 0:
        return Path("/var/lib/tensord")
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".local" / "state" / "tensord"


def default_control_socket(env: Mapping[str, str]) -> Path:
    """Where the control socket is when ``control.socket`` is not set: systemd's
    ``RuntimeDirectory=`` (``$RUNTIME_DIRECTORY/control.sock``), else
    ``$XDG_RUNTIME_DIR/tensord/control.sock``, else ``/run/tensord/control.sock`` for root and
    ``/tmp/tensord-<uid>/control.sock`` for anyone else. The CLI resolves it the same way."""
    if (found := env.get(CONTROL_SOCKET_VAR)) and found.strip():
        return Path(found)
    if (found := env.get("RUNTIME_DIRECTORY")) and found.strip():
        return Path(found.split(":")[0]) / "control.sock"
    if (found := env.get("XDG_RUNTIME_DIR")) and found.strip():
        return Path(found) / "tensord" / "control.sock"
    if os.geteuid() == 0:
        return Path("/run/tensord/control.sock")
    return Path(f"/tmp/tensord-{os.geteuid()}/control.sock")


__all__ = ["CLUSTER_FILE_VAR", "CONTROL_SOCKET_VAR", "default_control_socket", "default_state_dir"]
