"""Read tensors from the files people have: ``.npy`` and ``.safetensors``, memory-mapped.

``tensord send FILE`` hands the daemon a path; the daemon maps the file read-only and sends
straight from the mapping, so a 20 GiB checkpoint is never copied into RAM. safetensors is parsed
here (an 8-byte little-endian header length, a JSON header, then the raw data): the format is
small and stable, and reading it ourselves keeps bf16/fp8 tensors as their wire dtype without
needing torch or ml_dtypes.
"""

from __future__ import annotations

import errno
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadTensor, ProtocolError
from .limits import check_name
from .wire.meta import EXTENDED_DTYPES, wire_dtype

#: safetensors dtype -> wire dtype.
SAFETENSORS_DTYPES: dict[str, str] = {
    "BOOL": "|b1",
    "U8": "|u1",
    "I8": "|i1",
    "U16": "<u2",
    "I16": "<i2",
    "F16": "<f2",
    "BF16": "bfloat16",
    "U32": "<u4",
    "I32": "<i4",
    "F32": "<f4",
    "U64": "<u8",
    "I64": "<i8",
    "F64": "<f8",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
_MAX_HEADER = 100 << 20  # the reference implementation's limit


@dataclass(frozen=True)
class FileTensor:
    """One tensor of a file: its name, a read-only (mapped) array, and its wire dtype."""

    name: str
    array: np.ndarray[Any, Any]
    dtype: str


def read_tensor_file(path: Path, name: str | None = None) -> list[FileTensor]:
    """The tensors of ``path``. A ``.npy`` is one tensor, named ``name`` or the file's stem; each
    tensor ``k`` of a ``.safetensors`` is named ``name/k`` if ``name`` is given, else ``k``.

    Raises :class:`BadTensor` naming the file and what is wrong with it.
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return [_read_npy(path, name or path.stem)]
        if suffix == ".safetensors":
            return _read_safetensors(path, name)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise file_error(path, exc) from None
    raise BadTensor(f"{path}: expected a .npy or .safetensors file")


def file_error(path: Path, exc: OSError) -> BadTensor:
    """What a user reads when the daemon cannot open or read the file they named."""
    if isinstance(exc, FileNotFoundError):
        return BadTensor(f"{path}: no such file")
    if isinstance(exc, PermissionError):
        return BadTensor(f"{path}: permission denied (the daemon's user must be able to read it)")
    if isinstance(exc, IsADirectoryError):
        return BadTensor(f"{path}: is a directory, not a .npy or .safetensors file")
    if exc.errno == errno.ELOOP:
        return BadTensor(f"{path}: too many levels of symbolic links")
    return BadTensor(f"{path}: cannot open it: {exc.strerror or exc}")


def _checked(path: Path, name: str) -> str:
    try:
        return check_name(name)
    except ProtocolError as exc:
        raise BadTensor(f"{path}: {exc}") from None


def _read_npy(path: Path, name: str) -> FileTensor:
    try:
        array: np.ndarray[Any, Any] = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise BadTensor(f"{path}: not a readable .npy file: {exc}") from None
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)  # a Fortran-order file: one copy is unavoidable
    try:
        dtype = wire_dtype(array.dtype)
    except ProtocolError as exc:
        raise BadTensor(f"{path}: {exc}") from None
    return FileTensor(_checked(path, name), array, dtype)


def _read_safetensors(path: Path, prefix: str | None) -> list[FileTensor]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BadTensor(f"{path}: too short to be a .safetensors file")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > min(_MAX_HEADER, size - 8):
            raise BadTensor(f"{path}: header length {hlen} is larger than the file allows")
        try:
            header = json.loads(f.read(hlen))
        except ValueError as exc:
            raise BadTensor(f"{path}: the header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise BadTensor(f"{path}: the header is not a JSON object")
    data_start = 8 + hlen
    data_len = size - data_start
    raw: np.ndarray[Any, Any] = (
        np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_len,))
        if data_len
        else np.zeros(0, dtype=np.uint8)
    )
    out = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        out.append(_safetensor(path, raw, key, entry, prefix))
    if not out:
        raise BadTensor(f"{path}: holds no tensors")
    return out


def _safetensor(
    path: Path, raw: np.ndarray[Any, Any], key: str, entry: object, prefix: str | None
) -> FileTensor:
    where = f"{path}: tensor {key!r}"
    if not isinstance(entry, dict):
        raise BadTensor(f"{where}: its header entry is not an object")
    st_dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if st_dtype not in SAFETENSORS_DTYPES:
        raise BadTensor(f"{where}: dtype {st_dtype!r} is not supported")
    dtype = SAFETENSORS_DTYPES[str(st_dtype)]
    if not (
        isinstance(shape, list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise BadTensor(f"{where}: bad shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        and 0 <= offsets[0] <= offsets[1] <= len(raw)
    ):
        raise BadTensor(f"{where}: bad data_offsets {offsets!r}")
    itemsize = EXTENDED_DTYPES.get(dtype) or np.dtype(dtype).itemsize
    nbytes = itemsize * int(np.prod(shape, dtype=np.int64))
    begin, end = offsets
    if end - begin != nbytes:
        raise BadTensor(f"{where}: {end - begin} bytes of data for {nbytes} bytes of tensor")
    storage = np.dtype(f"<u{itemsize}") if dtype in EXTENDED_DTYPES else np.dtype(dtype)
    array = raw[begin:end].view(storage).reshape(shape)
    name = f"{prefix}/{key}" if prefix else key
    return FileTensor(_checked(path, name), array, dtype)


__all__ = ["SAFETENSORS_DTYPES", "FileTensor", "read_tensor_file"]
