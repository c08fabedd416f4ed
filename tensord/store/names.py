"""How a tensor name or a transfer key becomes a file name, and how a name read back is checked.

Names never become paths: a tensor name (which may contain ``/``) or a transfer key (an opaque
string) is percent-encoded into one path component of ``[A-Za-z0-9_.%~-]`` that never starts with
``.``; long ones are shortened with a SHA-256. A data file name read back from a sidecar is
checked against the form :func:`_data_file_name` gives before it is joined to the root.
"""

from __future__ import annotations

import hashlib
import re
import secrets

from ..errors import BadTensor, ProtocolError
from ..limits import check_name

_MAX_STEM = 160
_STEM_PREFIX_KEPT = 80
_SAFE_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.")
_GEN_RE = r"\.[0-9a-f]{16}\.npy"


def encode_component(text: str) -> str:
    """``text`` as one safe path component, injectively.

    Bytes outside ``[A-Za-z0-9_.-]`` (and a leading ``.``) become ``%XX``, so the result can never
    be ``.``, ``..``, a dotfile, or contain ``/`` or NUL. Results longer than 160 characters are
    shortened to a readable prefix, ``%~`` (which the escaping never produces) and the SHA-256 of
    the whole text, which keeps every file name well under the 255-byte limit.
    """
    raw = text.encode("utf-8", "surrogatepass")
    out = "".join(
        chr(b) if b in _SAFE_BYTES and not (i == 0 and b == 0x2E) else f"%{b:02X}"
        for i, b in enumerate(raw)
    )
    if not out or len(out) > _MAX_STEM:
        prefix = out[:_STEM_PREFIX_KEPT]
        cut = prefix.rfind("%")
        if cut > len(prefix) - 3 and cut != -1:
            prefix = prefix[:cut]  # do not end the prefix in half an escape
        out = prefix + "%~" + hashlib.sha256(raw).hexdigest()
    return out


def checked_name(name: str) -> str:
    """A tensor name from a caller (API, control request, CLI), checked by the one validator
    the wire uses too (:func:`~tensord.wire.meta.check_name`); :class:`BadTensor` if bad."""
    try:
        return check_name(name)
    except ProtocolError as exc:
        raise BadTensor(str(exc)) from None


def _data_file_name(stem: str) -> str:
    """A fresh generation name for the data file of the tensor whose name encodes to ``stem``."""
    return f"{stem}.{secrets.token_hex(8)}.npy"


def _is_data_file_name(stem: str, name: str) -> bool:
    """Is ``name`` (read from disk) a data file name :func:`_data_file_name` gives for ``stem``?"""
    return re.fullmatch(re.escape(stem) + _GEN_RE, name) is not None
