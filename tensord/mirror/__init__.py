"""A read-only OCI Distribution API over the daemon's model store (``mirror.listen``).

Standard clients pull through tensord - skopeo, containerd (a ``hosts.toml`` mirror), Ollama
(``ollama pull HOST:PORT/library/NAME --insecure``) - and what they ask for that the store lacks
is fetched through the daemon's download manager. :mod:`.protocol` is the request grammar (sans
I/O), :mod:`.store` the lookups in the model directory, :mod:`.misses` the fetch on a miss,
:mod:`.landing` a blob sent while it lands, :mod:`.reply` one response (and cutting it short),
:mod:`.app` the ASGI app and :mod:`.server` the listener (HTTP or HTTPS).
"""

from .server import Mirror

__all__ = ["Mirror"]
