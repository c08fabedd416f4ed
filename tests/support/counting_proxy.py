"""nginx as a reverse proxy in front of a server (the registry), logging the bytes it relayed,
so a test can tell what the origin served: ``proxy.log()`` lists (uri, status, bytes sent)."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .daemons import free_port
from .helpers import require, wait_serving

PROXY_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format served
        '$request_method|$request_uri|$status|$http_range|$body_bytes_sent|$bytes_sent|'
        '$msec|$request_time|$remote_addr';
    access_log {d}/access.log served;
    client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
    uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
    client_max_body_size 0;
    server {{
        listen {listen};
        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_max_temp_file_size 0;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def proxy_conf(d: Path, listen: str, upstream: str) -> str:
    """nginx.conf for a reverse proxy on ``listen`` (``ADDR:PORT``) in front of ``upstream``
    (``HOST:PORT``), its files in ``d``, logging every request as :func:`read_served` reads it.
    Used on loopback here and inside the registry host's namespace (tests/support/netcluster.py)."""
    return PROXY_CONF.format(d=d, listen=listen, upstream=upstream)


@dataclass
class Served:
    """One request the proxy answered."""

    method: str
    uri: str
    status: int
    range: str
    body: int  # reply body bytes
    sent: int  # bytes sent, headers included
    ended: float = 0.0  # when the reply ended (Unix time)
    seconds: float = 0.0  # how long the request took
    client: str = ""  # the client's address


def read_served(log: Path) -> list[Served]:
    """Every request in the proxy's access log, in order."""
    out = []
    for line in log.read_text().splitlines() if log.exists() else ():
        method, uri, status, rng, body, sent, ended, seconds, client = line.split("|")
        out.append(
            Served(
                method,
                uri,
                int(status),
                rng,
                int(body),
                int(sent),
                float(ended),
                float(seconds),
                client,
            )
        )
    return out


@dataclass
class CountingProxy:
    port: int
    dir: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> list[Served]:
        return read_served(self.dir / "access.log")

    def blob_bytes(self) -> int:
        """Bytes the origin sent in replies to blob GETs (headers included)."""
        return sum(s.sent for s in self.log() if "/blobs/" in s.uri and s.method == "GET")


@contextmanager
def counting_proxy(tmp: Path, upstream: str) -> Iterator[CountingProxy]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    require(Path(binary).exists(), "nginx is not installed (apt-get install nginx-light)")
    d = tmp / "proxy"
    (d / "tmp").mkdir(parents=True)
    p = CountingProxy(free_port(), d)
    (d / "nginx.conf").write_text(proxy_conf(d, f"127.0.0.1:{p.port}", upstream))
    proc = subprocess.Popen([binary, "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")])
    try:
        probe = lambda: socket.create_connection(("127.0.0.1", p.port), timeout=1).close()  # noqa: E731
        wait_serving(probe, proc, d / "error.log", 10)
        yield p
    finally:
        proc.terminate()
        proc.wait(10)
