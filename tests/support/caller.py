"""A local caller of the control socket that is not the daemon's user: a member of the socket's
group (uid/gid 65534, group 0) running a standard-library HTTP client, so that the daemon's
answer to a confused deputy (issue 12, hole 6) is tested with the kernel's own credentials."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

#: The client, run as ``python -c CLIENT SOCKET CALLS``: CALLS is a JSON list of
#: ``[method, url, body]``; it prints a JSON list of ``[status, reply body]``.
CLIENT = """
import http.client, json, socket, sys
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(sys.argv[1])
out = []
for method, url, body in json.loads(sys.argv[2]):
    c = C("tensord")
    c.request(method, url, body=json.dumps(body), headers={"content-type": "application/json"})
    r = c.getresponse()
    out.append([r.status, json.loads(r.read())])
    c.close()
print(json.dumps(out))
"""

NOBODY = 65534


def as_group_member() -> None:
    """uid/gid 65534 (no passwd entry needed), a member of group 0: the socket's group."""
    os.setgroups([0])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def call_as_group_member(
    python: str, socket: Path, calls: list[list[Any]]
) -> subprocess.CompletedProcess[str]:
    """Run :data:`CLIENT` with ``python`` (a system one: the client's uid may not enter the
    venv) as a group member, making ``calls`` on ``socket``; blocking (run it in a thread)."""
    return subprocess.run(
        [python, "-c", CLIENT, str(socket), json.dumps(calls)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=as_group_member,
    )
