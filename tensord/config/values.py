"""The value types and parsers every setting is read with, from any source.

Each parser takes ``(where, value)`` and returns the typed value or raises :class:`ConfigError`
with one line: ``"<where>: <value> is not valid: expected <what is accepted>"``, where ``where``
is the file and key (``cluster.json.transfer.window_bytes``), the variable or the flag. The same
``accepted`` texts describe each setting in the README (tensord/config/docs.py), so what an error
says and what the documentation says cannot drift apart.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")  # \Z: "$" lets "x\n" in
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*$")

ACCEPTED_BOOL = "true or false"
ACCEPTED_STR = "a non-empty string"
ACCEPTED_NODE_ID = "a node id of 1-63 letters, digits, '.', '_' or '-'"
ACCEPTED_HOSTPORT = "host:port (an IP address or hostname, and a port 1-65535)"
ACCEPTED_URL = "an http:// or https:// URL"


@dataclass(frozen=True)
class HostPort:
    """A validated ``host:port`` (IPv6 hosts in brackets on the wire, bare here)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def fail(where: str, value: object, accepted: str) -> ConfigError:
    return ConfigError(f"{where}: {value!r} is not valid: expected {accepted}")


def parse_bool(where: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
    raise fail(where, value, ACCEPTED_BOOL)


def with_unit(text: str, unit: str | None) -> str:
    return f"{text} ({unit})" if unit else text


def int_accepted(lo: int | None, hi: int | None, unit: str | None = None) -> str:
    """``an integer in 4 KiB..64 MiB (bytes)``: sizes in bytes are written in binary units."""
    sized = size_text if unit == "bytes" else str
    if lo is not None and hi is not None:
        text = f"an integer in {sized(lo)}..{sized(hi)}"
    elif lo is not None:
        text = f"an integer >= {sized(lo)}"
    elif hi is not None:
        text = f"an integer <= {sized(hi)}"
    else:
        text = "an integer"
    return with_unit(text, unit)


def parse_int(
    where: str,
    value: object,
    lo: int | None = None,
    hi: int | None = None,
    unit: str | None = None,
) -> int:
    if isinstance(value, bool):
        raise fail(where, value, "an integer")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        n = int(value)
    else:
        raise fail(where, value, "an integer")
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        raise fail(where, value, int_accepted(lo, hi, unit))
    return n


def float_accepted(lo: float, unit: str | None = None) -> str:
    return with_unit(f"a number >= {lo:g}", unit)


def parse_float(where: str, value: object, lo: float = 0.0, unit: str | None = None) -> float:
    if isinstance(value, bool):
        raise fail(where, value, "a number")
    try:
        f = float(value) if isinstance(value, int | float | str) else None
    except ValueError:
        f = None
    if f is None or f != f or f < lo:
        raise fail(where, value, float_accepted(lo, unit))
    return f


def parse_str(where: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise fail(where, value, ACCEPTED_STR)
    return value


def parse_path(where: str, value: object) -> Path:
    return Path(parse_str(where, value)).expanduser()


def parse_node_id(where: str, value: object) -> str:
    if not isinstance(value, str) or not _NODE_ID_RE.match(value):
        raise fail(where, value, ACCEPTED_NODE_ID)
    return value


def choice_accepted(choices: tuple[str, ...]) -> str:
    return "one of " + ", ".join(choices)


def parse_choice(where: str, value: object, choices: tuple[str, ...]) -> str:
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    if isinstance(value, str) and value.strip().lower() == "warn" and "warning" in choices:
        return "warning"
    raise fail(where, value, choice_accepted(choices))


def parse_hostport(where: str, value: object, allow_port_zero: bool = False) -> HostPort:
    """Parse ``host:port`` or ``[v6]:port``; the host must be an IP address or a hostname."""
    if not isinstance(value, str):
        raise fail(where, value, ACCEPTED_HOSTPORT)
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})", value) or re.fullmatch(
        r"([^:\[\]\s]+):(\d{1,5})", value
    )
    if not m:
        raise fail(where, value, ACCEPTED_HOSTPORT)
    host, port = m.group(1), int(m.group(2))
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME_RE.match(host) or ":" in value[: value.rfind(":")].strip("[]"):
            raise fail(where, value, ACCEPTED_HOSTPORT) from None
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise fail(where, value, ACCEPTED_HOSTPORT)
    return HostPort(host, port)


def parse_url(where: str, value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
        raise fail(where, value, ACCEPTED_URL)
    return value.rstrip("/")


def size_text(n: int) -> str:
    """``n`` in the largest binary unit that divides it: ``4 GiB``, ``64 KiB``, ``1452``."""
    for unit, size in (("EiB", 1 << 60), ("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", GiB),
                       ("MiB", MiB), ("KiB", KiB)):  # fmt: skip
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return str(n)
