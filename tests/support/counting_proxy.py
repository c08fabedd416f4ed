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

CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 512; }}
http {{
    log_format log '$request_method|$request_uri|$status|$http_range|$bytes_sent';
    access_log {d}/access.log log;
    client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
    uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""


@dataclass
class Served:
    method: str
    uri: str
    status: int
    range: str
    sent: int


@dataclass
class CountingProxy:
    port: int
    dir: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> list[Served]:
        out = []
        path = self.dir / "access.log"
        for line in path.read_text().splitlines() if path.exists() else []:
            method, uri, status, rng, sent = line.split("|")
            out.append(Served(method, uri, int(status), rng, int(sent)))
        return out

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
    (d / "nginx.conf").write_text(CONF.format(d=d, port=p.port, upstream=upstream))
    proc = subprocess.Popen([binary, "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")])
    try:
        probe = lambda: socket.create_connection(("127.0.0.1", p.port), timeout=1).close()  # noqa: E731
        wait_serving(probe, proc, d / "error.log", 10)
        yield p
    finally:
        proc.terminate()
        proc.wait(10)
