"""The control socket: hypercorn serving the control API over a Unix socket, local users only.

Why a Unix socket: it is local by construction (never reachable over the network) and its
file permissions are the first gate - the socket is created ``0660``, so only the daemon's
user and group can even connect. The second gate is ``SO_PEERCRED``: the kernel tells us the
uid/gid/pid of the process at the other end of each accepted connection, and one that is not
root, the daemon's own uid, or in the socket's group gets a ``403`` with the reason and is
closed before any request reaches the API (a socket ``chmod``-ed wider by mistake does not open
the daemon to everyone).

Why our own accept loop: hypercorn's trio worker accepts connections itself and has no hook to
vet a peer first. We accept, check the credentials, then hand the stream to hypercorn's
``TCPServer`` - the same per-connection object its worker uses - so HTTP/1.1 parsing, keep-alive
and streaming bodies are still hypercorn's. The same loop caps connections and bounds how long a
request may take to arrive (tensord/control/serving.py), and hands the caller's credentials to
the API: a request that names a file is served only if the caller could read that file itself
(the daemon is not a deputy that reads, for a member of the socket's group, what only the
daemon's user may read).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import trio
from hypercorn.config import Config
from hypercorn.typing import ASGIFramework

from .serving import HTTPConnections, refuse

log = logging.getLogger("tensord.control")

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket | trio.socket.SocketType) -> PeerCred:
    """The credentials of the process at the other end of a connected Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCred(*_UCRED.unpack(raw))


def _supplementary_groups(pid: int) -> set[int]:
    """The peer process's groups, from ``/proc`` (SO_PEERCRED has only the primary gid)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def allowed(cred: PeerCred, sock_gid: int) -> bool:
    """Root, the daemon's own uid, and members of the socket's group may use the API."""
    if cred.uid in (0, os.geteuid()):
        return True
    return cred.gid == sock_gid or sock_gid in _supplementary_groups(cred.pid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def bind_control_socket(path: Path) -> socket.socket:
    """Create the listening socket at ``path``, mode 0660, its directory made if needed (0750).

    A stale socket file from a daemon that died is replaced; a live one (another daemon answers
    on it) is an error, so two daemons never fight over one socket.
    """
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    owner = path.parent.lstat()
    if not stat.S_ISDIR(owner.st_mode) or owner.st_uid not in (0, os.geteuid()):
        # e.g. /tmp/tensord-<uid> made by someone else first: they could swap our socket.
        raise OSError(
            errno.EPERM,
            f"{path.parent} is not a directory owned by this user or root: remove it or set "
            "TENSORD_CONTROL_SOCKET",
        )
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens: left by a daemon that was killed
        else:
            raise OSError(
                errno.EADDRINUSE, f"another tensord is already serving its control socket {path}"
            )
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Nobody can connect before listen(): set the mode first, so it is never wider.
        os.chmod(path, 0o660)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _forbidden(cred: PeerCred, sock_gid: int) -> dict[str, object]:
    message = (
        f"uid {cred.uid} may not use this tensord's control socket: run the command as root, "
        f"as the daemon's user (uid {os.geteuid()}) or as a member of group "
        f"{_group_name(sock_gid)!r}"
    )
    return {"error": {"code": "forbidden", "message": message}}


@dataclass(frozen=True)
class Caller:
    """Who is at the other end of a control connection: what the API checks a request that
    names a file against (``scope["extensions"]["tensord.caller"]``)."""

    pid: int
    uid: int
    gids: frozenset[int]  # primary and supplementary

    @classmethod
    def of(cls, cred: PeerCred) -> Caller:
        return cls(cred.pid, cred.uid, frozenset({cred.gid, *_supplementary_groups(cred.pid)}))


CALLER_KEY = "tensord.caller"


async def serve_control(
    app: ASGIFramework,
    path: Path,
    *,
    max_connections: int = 64,
    read_timeout: float = 30.0,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on the Unix socket ``path`` until cancelled; the socket file is removed on
    the way out. Signals readiness (with the path) once the socket is bound.

    At most ``max_connections`` clients at once (the longest-idle one is closed for a newcomer;
    when all are busy the newcomer gets a 503), and a request must arrive within
    ``read_timeout`` (see :mod:`tensord.control.serving`). Each request's scope carries the
    caller's :class:`Caller` under ``extensions["tensord.caller"]``."""
    sock = bind_control_socket(path)
    st = os.stat(path)
    sock_gid = st.st_gid
    config = Config()
    config.keep_alive_timeout = 60
    config.graceful_timeout = 0
    config.accesslog = None
    config.errorlog = logging.getLogger("tensord.control.http")
    server = HTTPConnections(
        app,
        config,
        max_connections=max_connections,
        read_timeout=read_timeout,
        what="control socket",
    )
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    async def handle(stream: trio.SocketStream) -> None:
        try:
            cred = peer_cred(stream.socket)
        except OSError:
            await stream.aclose()
            return
        if not allowed(cred, sock_gid):
            log.warning("control socket: refused uid %d (pid %d)", cred.uid, cred.pid)
            await refuse(stream, 403, b"Forbidden", _forbidden(cred, sock_gid))
            return
        await server.serve(stream, {CALLER_KEY: Caller.of(cred)})

    try:
        async with listener:
            task_status.started(path)
            await trio.serve_listeners(handle, [listener])
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == st.st_ino:  # still ours, not a successor's
                os.unlink(path)


__all__ = [
    "CALLER_KEY",
    "Caller",
    "PeerCred",
    "allowed",
    "bind_control_socket",
    "peer_cred",
    "serve_control",
]
