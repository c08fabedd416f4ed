"""The one writer of cluster files for tests and the chaos scenarios.

A cluster file is the JSON document every node of a cluster shares (see the README's
configuration section): ``nodes`` plus optional sections (``name``, ``transfer``, ``security``,
``control``...). Tests that need one on disk call :func:`write_cluster_file` instead of building
the JSON by hand, so the shape of a node entry is written once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: How a test names a node: its port on 127.0.0.1, an address ``"host:port"``, or the node's
#: fields (``addr`` and others such as ``ollama``).
NodeSpec = int | str | Mapping[str, Any]


def node_entry(node_id: str, spec: NodeSpec) -> dict[str, Any]:
    """One entry of the file's ``nodes`` list."""
    if isinstance(spec, int):
        return {"id": node_id, "addr": f"127.0.0.1:{spec}"}
    if isinstance(spec, str):
        return {"id": node_id, "addr": spec}
    return {"id": node_id, **spec}


def write_cluster_file(
    path: Path,
    nodes: Mapping[str, NodeSpec] | Sequence[Mapping[str, Any]] | None = None,
    **sections: Any,
) -> Path:
    """Write a cluster file to ``path`` and return ``path``.

    ``nodes`` maps each node id to a :data:`NodeSpec`, or is the list of entries itself (for
    the configuration tests, whose subject is the entries); no ``nodes`` key when omitted: a
    file that only sets sections, for a daemon told its own id and address by env vars.
    ``sections`` are the other top-level keys, written as given.
    """
    doc: dict[str, Any] = {}
    if isinstance(nodes, Mapping):
        doc["nodes"] = [node_entry(node_id, spec) for node_id, spec in nodes.items()]
    elif nodes is not None:
        doc["nodes"] = [dict(entry) for entry in nodes]
    doc.update(sections)
    path.write_text(json.dumps(doc))
    return path


def two_node_cluster(path: Path, ports: Mapping[str, int], **extra: Any) -> Path:
    """The cluster file of the control API tests: the nodes of ``ports`` on 127.0.0.1, peers
    checked every 0.2 s and quick retries (``extra`` sections replace these)."""
    sections: dict[str, Any] = {
        "name": "t",
        "transfer": {"peer_check_interval": 0.2},
        "tensor_protocol": {"retry_base_delay": 100, "max_retries": 8},
    }
    return write_cluster_file(path, dict(ports), **(sections | extra))
