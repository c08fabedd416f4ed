"""Asking peers to pull a model: ``tensord pull-model NAME --on all|b,c``.

One small request and reply over the node's authenticated peer connections (negotiated feature
``remote_pull``): :func:`request_pull` sends ``PullModel(ref)`` and returns the id of the download
job the peer started; :func:`serve_pull_model` answers one on an inbound connection by calling the
hook the daemon installed (``TensorNode.on_pull_request``). The node knows nothing of downloads:
a library node has no hook and answers ``unsupported``. The nodes asked then pull as they always
do, peer-first, so they share the pieces (``downloads.share``).

A peer can only ask for what the control API could: a reference bounded in length and charset
by the decoder (``MODEL_REF_RE``), then parsed by the download manager (a bad one is a
``download`` error, the connection stays usable). Every failure on the asking side is a
:class:`RemotePullError` naming the peer; a peer without the feature raises
:class:`RemotePullUnsupported` before anything is sent, and a peer that does not answer within
``transfer.io_timeout`` is a timeout, never a hang; one that cannot be reached (or hangs before
the handshake: ``transfer.connect_timeout``) is a :class:`PeerUnreachable` naming it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import trio

from ..address import PeerAddress
from ..config import Settings
from ..errors import PeerUnreachable, ProtocolError, TensorError, TransferFailed
from ..net.connection import Connection, ConnectionClosed
from ..wire.messages import Error, PullModel, PullStarted

T = TypeVar("T")


class PeerCaller(Protocol):
    """What asking a peer needs of the node (a :class:`~tensord.node.TensorNode`, which imports
    this module for its hook's type)."""

    settings: Settings

    async def with_peer_connection(
        self, peer: str | PeerAddress, fn: Callable[[Connection], Awaitable[T]]
    ) -> T: ...


log = logging.getLogger("tensord.cluster.remote_pull")

#: What the daemon installs: ``(peer id, model reference) -> job id``; raises a
#: :class:`TensorError` (a bad reference: ``DownloadError``) to refuse.
PullHook = Callable[[str, str], str]


class RemotePullError(TransferFailed):
    """Asking ``peer`` to pull a model failed (``code`` says how)."""

    def __init__(self, message: str, *, peer: str, code: str) -> None:
        super().__init__(message, code=code)
        self.peer = peer


class RemotePullUnsupported(RemotePullError):
    """The peer does not take pull requests: an older tensord, or a library node."""


class _Closed(Exception):
    """The peer answered with an error and closed the connection."""


async def request_pull(node: PeerCaller, peer: str | PeerAddress, ref: str) -> str:
    """Ask ``peer`` to start pulling model ``ref``; returns the id of its download job."""
    replies: list[PullStarted | Error] = []
    lacking: list[str] = []

    async def ask(conn: Connection) -> None:
        if not conn.agreement.remote_pull:
            lacking.append(conn.peer_id)
            return
        await conn.stream.send(PullModel(ref))
        with trio.fail_after(node.settings.transfer.io_timeout):
            reply = await conn.stream.receive()
        if not isinstance(reply, PullStarted | Error):
            raise ProtocolError(
                f"peer {conn.peer_id}: expected pullstarted, got {type(reply).__name__}"
            )
        replies.append(reply)
        if isinstance(reply, Error) and reply.code == "internal":
            # The peer's error boundary closes the connection after a bug: raising here keeps
            # it out of the pool (with_peer_connection closes it) - the error is raised below.
            raise _Closed

    try:
        await node.with_peer_connection(peer, ask)
    except _Closed:
        pass
    except PeerUnreachable as exc:
        # Down, or hung before the handshake (its kernel still accepts): the address alone
        # would not say which node of the cluster this was.
        raise PeerUnreachable(f"peer {peer} could not be asked to pull: {exc}") from None
    except (ConnectionClosed, OSError, trio.BrokenResourceError) as exc:
        raise PeerUnreachable(
            f"peer {peer}: the connection broke before it answered the pull request "
            f"({type(exc).__name__}: {str(exc) or 'closed'})"
        ) from None
    except trio.TooSlowError:
        raise RemotePullError(
            f"peer {peer} did not answer the pull request within "
            f"{node.settings.transfer.io_timeout:g} s (transfer.io_timeout)",
            peer=str(peer),
            code="timeout",
        ) from None
    if lacking:
        raise RemotePullUnsupported(
            f"peer {lacking[0]} does not take pull requests (an older tensord): run "
            "`tensord pull-model` on it",
            peer=lacking[0],
            code="unsupported",
        )
    reply = replies[0]
    if isinstance(reply, Error):
        cls = RemotePullUnsupported if reply.code == "unsupported" else RemotePullError
        raise cls(f"peer {peer}: {reply.message or reply.code}", peer=str(peer), code=reply.code)
    return reply.job


async def serve_pull_model(conn: Connection, msg: PullModel, hook: PullHook | None) -> None:
    """Answer ``PullModel``: the job the hook started, or an ``Error`` saying why not (the
    connection stays usable either way)."""
    if not conn.agreement.remote_pull:
        raise ProtocolError("unexpected pullmodel: the remote_pull feature was not agreed")
    if hook is None:
        await conn.stream.send(
            Error("unsupported", "this node takes no pull requests (it runs no download manager)")
        )
        return
    try:
        job = hook(conn.peer_id, msg.ref)
    except TensorError as exc:
        log.info("peer %s asked to pull %r: refused: %s", conn.peer_id, msg.ref, exc)
        await conn.stream.send(Error(exc.http()[1], str(exc)[:512]))
        return
    log.info("peer %s asked to pull %r: download %s", conn.peer_id, msg.ref, job)
    await conn.stream.send(PullStarted(job))


__all__ = [
    "PeerCaller",
    "PullHook",
    "RemotePullError",
    "RemotePullUnsupported",
    "request_pull",
    "serve_pull_model",
]
