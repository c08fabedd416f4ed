"""What both control clients share beyond the endpoints (:mod:`.endpoints`): finding the
socket, the typed error of a reply or of a failed connect, the timeouts, the atomic file write.

Neither httpx nor the settings' specs at import: the blocking client (:mod:`.blocking`, what
``tensord download`` uses) starts without them; the async one (:mod:`.client`) adds httpx.

The clients are separate programs from the daemon: this is the one place outside ``config``
that reads the environment, and only to find the socket the way the daemon does.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

from .._version import __version__
from ..config.paths import CLUSTER_FILE_VAR, CONTROL_SOCKET_VAR, default_control_socket
from ..errors import ConfigError, ControlError, DaemonNotRunning, TensorError, error_for_code

#: Where a system daemon (systemd's ``RuntimeDirectory=tensord``) has its socket.
SYSTEM_SOCKET = Path("/run/tensord/control.sock")
BASE_URL = "http://tensord"
CONNECT_TIMEOUT = 5.0
DEFAULT_TIMEOUT = 60.0
UPLOAD_CHUNK = 1 << 20
USER_AGENT = f"tensord-client/{__version__}"


# --------------------------------------------------------------------------------------------
# Finding the socket


def resolve_socket(
    socket: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Path:
    """The control socket: ``socket`` if given, else where the daemon would put it under
    ``env`` (``TENSORD_CONTROL_SOCKET``, the cluster file's ``control.socket``, the defaults).

    One addition to the daemon's rules: when nothing configures the path and the per-user default
    does not exist but the system daemon's ``/run/tensord/control.sock`` does, that is the one -
    an operator in the service's group runs ``tensord status`` without setting anything.

    With neither variable set, only the defaults can name it: the settings (their specs cost
    a CLI command tens of milliseconds to import) are read only when one is.
    """
    if socket is not None:
        return Path(socket)
    env = os.environ if env is None else env
    configured: Path | None = None
    if any((env.get(var) or "").strip() for var in (CONTROL_SOCKET_VAR, CLUSTER_FILE_VAR)):
        from ..config.load import load_settings

        with contextlib.suppress(ConfigError):
            # library=True: a CLI user's environment need not name a node of the cluster.
            configured = load_settings(env, library=True).control.socket
    if configured is not None:
        return configured
    default = default_control_socket(env)
    if not default.exists() and SYSTEM_SOCKET.exists():
        return SYSTEM_SOCKET
    return default


# --------------------------------------------------------------------------------------------
# Errors


def error_from_reply(status: int, body: bytes) -> TensorError:
    """The typed error for a non-2xx reply ``{"error": {"code", "message"}}``."""
    try:
        doc = json.loads(body)
        err = doc["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        text = body.decode("utf-8", "replace").strip().splitlines()
        return ControlError(
            f"the daemon answered HTTP {status}: {text[0][:200] if text else 'no body'}",
            code="http",
            status=status,
        )
    typed = error_for_code(code, message)
    if typed is not None:
        return typed
    return ControlError(message, code=code, status=status)


def os_error(exc: BaseException) -> OSError | None:
    """The ``OSError`` under a client library's wrappers (httpx's, httpcore's), if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def connect_error(socket: Path, exc: BaseException) -> ControlError:
    """Why the socket could not be connected to, and what to do about it."""
    os_err = os_error(exc)
    code = os_err.errno if os_err is not None else None
    start = "start it with `tensord serve` (or `systemctl start tensord`)"
    if code in (errno.ENOENT, errno.ENOTDIR) or (code is None and not socket.exists()):
        return DaemonNotRunning(f"tensord is not running: no control socket at {socket}; {start}")
    if code == errno.ECONNREFUSED:
        return DaemonNotRunning(
            f"tensord is not running: nothing listens on the control socket at {socket}; {start}"
        )
    if code in (errno.EACCES, errno.EPERM):
        return ControlError(
            f"permission denied on the control socket {socket}: run as root, as the daemon's "
            "user, or as a member of the socket's group",
            code="forbidden",
        )
    return ControlError(f"cannot connect to the control socket {socket}: {exc}", code="connect")


def connect_timeout(socket: Path) -> ControlError:
    return ControlError(
        f"the daemon did not accept a connection on {socket} within {CONNECT_TIMEOUT:g} s "
        "(is it stuck?)",
        code="timeout",
    )


# --------------------------------------------------------------------------------------------
# Writing a tensor to a file (``get``)


def deprecated_download() -> None:
    warnings.warn(
        "Client.download(name, path) is now Client.get(name, path), as the CLI calls it "
        "(`tensord get`); `download` goes in a later release",
        DeprecationWarning,
        stacklevel=3,
    )


def download_info(name: str, target: Path, dtype: str, size: int) -> dict[str, object]:
    return {"name": name, "path": str(target), "dtype": dtype, "file_bytes": size}


def open_temp(target: Path) -> tuple[int, Path]:
    """A new file next to ``target`` (same filesystem, so the rename is atomic), created with
    the mode a plain ``open()`` would give it rather than ``mkstemp``'s 0600."""
    while True:
        tmp = target.with_name(f".{target.name}.{os.urandom(4).hex()}.part")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue
        except OSError as exc:  # name the file asked for, not our temporary one
            raise OSError(exc.errno, exc.strerror, str(target)) from None


def unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


__all__ = [
    "BASE_URL",
    "CONNECT_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "SYSTEM_SOCKET",
    "UPLOAD_CHUNK",
    "USER_AGENT",
    "connect_error",
    "connect_timeout",
    "error_from_reply",
    "os_error",
    "resolve_socket",
]
