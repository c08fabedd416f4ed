"""A real nginx on loopback for download tests: ranges, throttling, redirects, no-range replies.

Locations (all serving the same ``root`` directory):

* ``/files/NAME``     - ranges as nginx does them
* ``/throttled/NAME`` - 20 MB/s per connection (``limit_rate``), paced in 128 KiB sends
* ``/slowfirst/NAME`` - the first connection a test makes crawls at 64 KB/s, later ones are fast
* ``/norange/NAME``   - ignores ``Range`` (``max_ranges 0``): always a 200 with the whole file
* ``/redirect/NAME``  - ``302`` to ``/files/NAME`` on a second port (another "host")
* ``/bench25/NAME``, ``/bench25slow/NAME`` - for bench/downloads.py: 25 MB/s per connection, and
  the same with the first connection at 2.5 MB/s

The access log records each request's Range and Authorization headers and the bytes sent, so
tests assert on what went over the wire.
"""

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
events {{ worker_connections 256; }}
http {{
    log_format log
        '$server_port|$request_uri|$status|$http_range|$http_authorization|$body_bytes_sent';
    access_log {d}/access.log log;
    client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
    uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
    sendfile on;
    # Connection 1 is the readiness check; connection 2 is the first a test makes.
    map $connection $first_rate {{ "2" 64k; default 0; }}
    map $connection $bench_rate {{ "2" 2500k; default 25m; }}
    server {{
        listen 127.0.0.1:{port};
        location /files/ {{ alias {root}/; }}
        location /throttled/ {{ alias {root}/; limit_rate 20m; sendfile_max_chunk 128k; }}
        location /slowfirst/ {{ alias {root}/; limit_rate $first_rate; }}
        location /norange/ {{ alias {root}/; max_ranges 0; }}
        location /bench25/ {{ alias {root}/; limit_rate 25m; }}
        location /bench25slow/ {{ alias {root}/; limit_rate $bench_rate; }}
        location ~ ^/redirect/(.*)$ {{ return 302 http://127.0.0.1:{port2}/files/$1; }}
    }}
    server {{
        listen 127.0.0.1:{port2};
        location /files/ {{ alias {root}/; }}
    }}
}}
"""


@dataclass
class LogLine:
    port: int
    uri: str
    status: int
    range: str
    authorization: str
    sent: int


@dataclass
class Nginx:
    root: Path
    port: int
    port2: int
    dir: Path

    def url(self, location: str, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{location}/{name}"

    def log(self) -> list[LogLine]:
        out = []
        for line in (self.dir / "access.log").read_text().splitlines():
            port, uri, status, rng, auth, sent = line.split("|")
            out.append(LogLine(int(port), uri, int(status), rng, auth, int(sent)))
        return [x for x in out if x.uri != "/ping"]


@contextmanager
def nginx(tmp: Path) -> Iterator[Nginx]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    require(Path(binary).exists(), "nginx is not installed (apt-get install nginx-light)")
    d = tmp / "nginx"
    root = tmp / "www"
    (d / "tmp").mkdir(parents=True)
    root.mkdir()
    n = Nginx(root, free_port(), free_port(), d)
    (d / "nginx.conf").write_text(CONF.format(d=d, root=root, port=n.port, port2=n.port2))
    proc = subprocess.Popen([binary, "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")])
    try:
        probe = lambda: socket.create_connection(("127.0.0.1", n.port), timeout=1).close()  # noqa: E731
        wait_serving(probe, proc, d / "error.log", 10)
        yield n
    finally:
        proc.terminate()
        proc.wait(10)
