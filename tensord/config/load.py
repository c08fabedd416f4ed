"""Where settings come from: defaults < the JSON cluster file < env vars < CLI flags.

The cluster file is the same on every node; a node finds itself in it by its id. Everything is
validated here, at start, so that a bad value fails with one line naming where it came from (the
file and key, or the variable), the value, and what is accepted - never deep inside a transfer.
Nothing else in tensord reads ``os.environ``: the ``Settings`` object is built once and passed
down. Which variable sets what, and the ranges, are the fields' specs (settings.py).
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .paths import default_control_socket, default_state_dir
from .schema import Section, env_override, env_raw, parse_keys, spec_of, specs, with_env
from .settings import (
    ControlSettings,
    NodeEntry,
    SecuritySettings,
    Settings,
    TlsSettings,
)
from .values import HostPort

_SECTIONS = tuple(f.name for f, spec in specs(Settings) if isinstance(spec.kind, Section))
_NODE_ID = spec_of(Settings, "node_id")
_SECRET_FILE_VAR = spec_of(SecuritySettings, "secret_file").env


def read_cluster_file(path: Path) -> dict[str, Any]:
    """Read and validate a cluster file; returns the values it sets, by ``Settings`` field name
    (its ``name`` key is ``cluster_name``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the cluster file: {exc.strerror or exc}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}"
        ) from None
    return parse_keys(str(path), raw, Settings)


def _security_paths(sec: SecuritySettings, node: str, env: Mapping[str, str]) -> SecuritySettings:
    """Paths that one shared cluster file can name for every node: ``{node}`` is this node's
    id, ``{credentials}`` systemd's ``$CREDENTIALS_DIRECTORY`` (``LoadCredential=``, the way a
    ``DynamicUser=`` service reads root-only keys). With no secret file configured, a
    ``cluster.secret`` credential is the secret."""
    creds = env.get("CREDENTIALS_DIRECTORY", "")

    def fill(p: Path) -> Path:
        text = str(p).replace("{node}", node)
        if "{credentials}" in text:
            if not creds:
                raise ConfigError(
                    f"security: {p} names {{credentials}} but CREDENTIALS_DIRECTORY is not set "
                    "(use LoadCredential= in the systemd unit, or a plain path)"
                )
            text = text.replace("{credentials}", creds)
        return Path(text)

    secret = sec.secret_file
    if secret is None and creds and (Path(creds) / "cluster.secret").is_file():
        secret = Path(creds) / "cluster.secret"
    tls = sec.tls
    if tls is not None:
        tls = TlsSettings(fill(tls.ca), fill(tls.cert), fill(tls.key))
    return replace(sec, secret_file=fill(secret) if secret is not None else None, tls=tls)


def is_loopback(host: str) -> bool:
    """Is ``host`` a loopback address (or ``localhost``)? ``0.0.0.0`` and ``::`` are not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def unauthenticated_listener(
    section: str, listen: HostPort, *, api_keys: bool, client_certs: bool | None = None
) -> str | None:
    """Why an HTTP service's listener may not be open as configured, or None if it may: off
    loopback its clients must be authenticated - by API keys, or by TLS client certificates
    (``client_certs``; None for a service without that option). TLS without client
    certificates encrypts but does not say who is asking. The one check for the gateway and
    the mirror (:func:`tensord.asgi.load_api_keys`, :func:`check_security_policy`)."""
    if api_keys or client_certs or is_loopback(listen.host):
        return None
    other = (
        f" or {section}.tls.client_ca (clients present certificates of that CA)"
        if client_certs is not None
        else ""
    )
    return (
        f"{section}.listen is {listen}, not a loopback address: set {section}.api_keys_file "
        f"(one API key per line){other} so that only known clients can use it"
    )


def check_security_policy(settings: Settings) -> str | None:
    """A daemon that strangers can reach must authenticate its peers.

    Raises :class:`ConfigError` when the cluster file lists more than one node, or the peer
    listener is bound to anything but loopback (a single-node file or ``TENSORD_LISTEN`` can do
    that too), and neither ``security.secret_file`` nor ``security.tls`` is set - unless
    ``security.insecure`` is true; then returns the warning to log at every start.

    The OCI mirror off loopback needs its clients authenticated (``mirror.api_keys_file`` or
    ``mirror.tls.client_ca``), whatever the peer security: otherwise anyone who can reach it
    reads the models and makes the cluster download.
    """
    mirror = settings.mirror
    if mirror.listen is not None:
        why = unauthenticated_listener(
            "mirror",
            mirror.listen,
            api_keys=mirror.api_keys_file is not None,
            client_certs=mirror.tls is not None and mirror.tls.client_ca is not None,
        )
        if why is not None:
            raise ConfigError(why)
    sec = settings.security
    if sec.secret_file is not None or sec.tls is not None:
        return None
    multi = len(settings.nodes) > 1
    exposed = not is_loopback(settings.listen.host)
    if not multi and not exposed:
        return None
    if not sec.insecure:
        why = (
            f"the cluster has {len(settings.nodes)} nodes"
            if multi
            else f"the peer listener {settings.listen} is not on loopback"
        )
        raise ConfigError(
            f"{why} and there is no peer authentication: set security.secret_file (or "
            f"{_SECRET_FILE_VAR}) or security.tls, or security.insecure: true to run "
            "without (anyone who can reach the port can send and fetch tensors)"
        )
    return (
        "security.insecure is set: peers are not authenticated, and anyone who can reach "
        f"{settings.listen} can send and fetch tensors"
    )


def _from_flag(name: str, value: str) -> Any:
    """A ``Settings`` value given on the command line, read like its env var."""
    spec = spec_of(Settings, name)
    return spec.kind.from_env(spec.flag or name, value)


def load_settings(
    env: Mapping[str, str] | None = None,
    *,
    cluster_file: str | Path | None = None,
    node_id: str | None = None,
    listen: str | None = None,
    log_level: str | None = None,
    library: bool = False,
) -> Settings:
    """Build the node's ``Settings``: defaults < cluster file < env vars < these arguments (CLI).

    ``library=True`` starts from :meth:`Settings.for_library` (random id, ephemeral port) instead
    of the daemon's defaults. Raises :class:`ConfigError` with one line on any invalid input.
    """
    env = os.environ if env is None else env
    base = Settings.for_library() if library else Settings()

    # Cluster file: the CLI flag wins over the variable.
    path: Path | None = None
    if cluster_file is not None:
        path = Path(cluster_file)
    elif (found := env_raw(env, spec_of(Settings, "cluster_file"))) is not None:
        path = Path(found[1])  # as given, like the flag's (no "~" expansion)
    file: dict[str, Any] = read_cluster_file(path) if path is not None else {}

    # The sections: each setting that has a variable takes it over the file's value.
    sections = {name: with_env(file.get(name, getattr(base, name)), env) for name in _SECTIONS}
    control: ControlSettings = sections["control"]
    state_dir: Path | None = env_override(
        env, Settings, "state_dir", file.get("state_dir", base.state_dir)
    )
    if not library:
        # The daemon always has a state directory and a control socket; a library node keeps
        # tensors in memory and has no control socket unless they are configured.
        if state_dir is None:
            state_dir = default_state_dir(env)
        if control.socket is None:
            sections["control"] = replace(control, socket=default_control_socket(env))

    level = file.get("log_level", base.log_level)
    if log_level is not None:
        level = _from_flag("log_level", log_level)
    else:
        level = env_override(env, Settings, "log_level", level)

    nodes: tuple[NodeEntry, ...] = file.get("nodes", ())
    me = base.node_id
    from_env = env_raw(env, _NODE_ID)
    if node_id is not None:
        me = _from_flag("node_id", node_id)
    elif from_env is not None:
        me = _NODE_ID.kind.from_env(*from_env)
    elif nodes and not library:
        raise ConfigError(
            f"{path}: this node's id is not set: expected {_NODE_ID.env} or {_NODE_ID.flag} "
            f"naming one of {', '.join(n.id for n in nodes)}"
        )
    entry = next((n for n in nodes if n.id == me), None)
    if nodes and entry is None and (node_id is not None or from_env is not None or not library):
        # A library node with no id of its own is a client of the cluster, not one of its nodes.
        where = _NODE_ID.flag if node_id is not None else _NODE_ID.env
        raise ConfigError(
            f"{where}: {me!r} is not valid: expected one of the cluster file's node ids "
            f"({', '.join(n.id for n in nodes)})"
        )

    addr = base.listen
    if entry is not None:
        # Listen on the node's own port, on all interfaces unless the address is loopback.
        host = entry.addr.host
        loop = is_loopback(host)
        addr = HostPort(host if loop else ("::" if ":" in host else "0.0.0.0"), entry.addr.port)
    if listen is not None:
        addr = _from_flag("listen", listen)
    else:
        addr = env_override(env, Settings, "listen", addr)

    transport = env_override(
        env, Settings, "transport", entry.transport if entry is not None else base.transport
    )
    sections["security"] = _security_paths(sections["security"], me, env)
    return Settings(
        node_id=me,
        listen=addr,
        cluster_name=file.get("cluster_name", base.cluster_name),
        cluster_file=path,
        nodes=nodes,
        transport=transport,
        state_dir=state_dir,
        log_level=level,
        **sections,
    )
