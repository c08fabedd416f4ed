"""What the store returns (:class:`TensorInfo`, :class:`PartialInfo`) and the small files that
describe data on disk: a tensor's sidecar, a partial receive's header, the ``.npy`` header.

Metadata never disagrees with data: the sidecar names the data file together with the wire
metadata, so replacing it is the single commit point. Everything read back from disk is validated
as a peer's input would be (a damaged file is logged and ignored, never trusted).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadTensor, ProtocolError
from ..wire.meta import EXTENDED_DTYPES, TensorMeta
from .names import _is_data_file_name, encode_component

log = logging.getLogger("tensord.store")

_FORMAT_VERSION = 1
_MAX_SIZE = 1 << 62  # metadata read back from disk is validated with this as the size limit


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """A stored tensor: its wire metadata, who sent it and when it was stored.

    Has the fields of :class:`~tensord.wire.meta.TensorMeta` (``name``, ``dtype`` - the wire dtype,
    ``shape``, ``nbytes``, ``requires_grad``) plus ``sender`` and ``stored_at`` (Unix time);
    :attr:`meta` is the ``TensorMeta`` itself, e.g. to send the tensor on.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    requires_grad: bool
    sender: str
    stored_at: float

    @property
    def meta(self) -> TensorMeta:
        return TensorMeta(self.name, self.dtype, self.shape, self.nbytes, self.requires_grad)

    @classmethod
    def of(cls, meta: TensorMeta, sender: str, stored_at: float) -> TensorInfo:
        return cls(
            meta.name, meta.dtype, meta.shape, meta.nbytes, meta.requires_grad, sender, stored_at
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form (for the control API)."""
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
            "requires_grad": self.requires_grad,
            "sender": self.sender,
            "stored_at": self.stored_at,
        }


@dataclass(frozen=True, slots=True)
class PartialInfo:
    """An interrupted receive found on disk: enough to log it and to resume it."""

    key: str
    meta: TensorMeta
    chunk_size: int | None
    bytes_have: int
    created: float
    updated: float


@dataclass(frozen=True, slots=True)
class _Sidecar:
    info: TensorInfo
    data: Path


@dataclass(frozen=True, slots=True)
class _PartialHeader:
    key: str
    meta: TensorMeta
    chunk_size: int | None
    created: float


# --------------------------------------------------------------------------------------------
# The .npy header


def _storage_dtype(wire: str) -> np.dtype[Any]:
    """The dtype written in the ``.npy`` header: the uint of the same size for bf16/fp8."""
    if wire in EXTENDED_DTYPES:
        return np.dtype(f"<u{EXTENDED_DTYPES[wire]}")
    return np.dtype(wire)


def _npy_header(meta: TensorMeta) -> bytes:
    """The ``.npy`` header for ``meta``: deterministic, so a re-opened file can be checked."""
    fmt: Any = np.lib.format
    d = {
        "descr": fmt.dtype_to_descr(_storage_dtype(meta.dtype)),
        "fortran_order": False,
        "shape": tuple(meta.shape),
    }
    buf = io.BytesIO()
    try:
        fmt.write_array_header_1_0(buf, d)
    except ValueError:  # header over 64 KiB: version 2.0 has a 4-byte length
        buf = io.BytesIO()
        fmt.write_array_header_2_0(buf, d)
    return buf.getvalue()


def _validated(meta: TensorMeta) -> TensorMeta:
    """Check a ``TensorMeta`` the way a peer's is checked (name, dtype, shape x itemsize)."""
    try:
        return TensorMeta.from_wire(meta.to_wire(), _MAX_SIZE)
    except ProtocolError as exc:
        raise BadTensor(str(exc)) from None


# --------------------------------------------------------------------------------------------
# A complete tensor's sidecar: ``tensors/<stem>.json``


def _sidecar_bytes(meta: TensorMeta, sender: str, stored_at: float, data_name: str) -> bytes:
    return json.dumps(
        {
            "version": _FORMAT_VERSION,
            "meta": meta.to_wire(),
            "sender": sender,
            "stored_at": stored_at,
            "file": data_name,
        },
        sort_keys=True,
    ).encode()


def _read_sidecar(tensor_dir: Path, stem: str) -> _Sidecar | None:
    """The sidecar of ``stem`` in ``tensor_dir``, validated; ``None`` if absent or damaged."""
    path = tensor_dir / f"{stem}.json"
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable tensor metadata %s: %s", path, exc)
        return None
    try:
        if not isinstance(raw, dict) or raw.get("version") != _FORMAT_VERSION:
            raise ValueError("not a version 1 sidecar")
        meta = TensorMeta.from_wire(raw.get("meta"), _MAX_SIZE)
        if encode_component(meta.name) != stem:
            raise ValueError(f"it describes {meta.name!r}, another tensor")
        data = raw.get("file")
        # Never join a name read from disk to a path unchecked.
        if not isinstance(data, str) or not _is_data_file_name(stem, data):
            raise ValueError(f"bad data file name {str(data)[:80]!r}")
        sender = raw.get("sender")
        stored_at = raw.get("stored_at")
        if not isinstance(sender, str) or not isinstance(stored_at, int | float):
            raise ValueError("bad sender or stored_at")
    except (ValueError, ProtocolError) as exc:
        log.warning("ignoring damaged tensor metadata %s: %s", path, exc)
        return None
    return _Sidecar(TensorInfo.of(meta, sender, float(stored_at)), tensor_dir / data)


# --------------------------------------------------------------------------------------------
# A partial receive's header: ``partial/<stem>.json``


def _partial_header_bytes(
    key: str, meta: TensorMeta, chunk_size: int | None, created: float
) -> bytes:
    return json.dumps(
        {
            "version": _FORMAT_VERSION,
            "key": key,
            "meta": meta.to_wire(),
            "chunk_size": chunk_size,
            "created": created,
        },
        sort_keys=True,
    ).encode()


def _read_partial_header(partial_dir: Path, stem: str) -> _PartialHeader | None:
    """The header of partial ``stem`` in ``partial_dir``, validated; ``None`` if absent or
    damaged."""
    path = partial_dir / f"{stem}.json"
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable partial receive %s: %s", path, exc)
        return None
    try:
        if not isinstance(raw, dict) or raw.get("version") != _FORMAT_VERSION:
            raise ValueError("not a version 1 partial header")
        key = raw.get("key")
        if not isinstance(key, str) or encode_component(key) != stem:
            raise ValueError("its key does not match its file name")
        meta = TensorMeta.from_wire(raw.get("meta"), _MAX_SIZE)
        cs = raw.get("chunk_size")
        if cs is not None and (not isinstance(cs, int) or isinstance(cs, bool) or cs <= 0):
            raise ValueError("bad chunk_size")
        created = raw.get("created")
        if not isinstance(created, int | float):
            raise ValueError("bad created time")
    except (ValueError, ProtocolError) as exc:
        log.warning("ignoring damaged partial receive %s: %s", path, exc)
        return None
    return _PartialHeader(key, meta, cs, float(created))
