"""A threaded HTTP/1.1 handler on a Unix socket, for client tests that need a server which is
not the daemon (one that records requests, refuses an upload early, plays a fake daemon)."""

from __future__ import annotations

import contextlib
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@contextlib.contextmanager
def serving(path: Path, handler: type[socketserver.BaseRequestHandler]) -> Iterator[None]:
    """``handler`` answers connections to ``path`` (in threads) for the length of the block."""
    with _Server(str(path), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield
        finally:
            server.shutdown()
            thread.join()
