"""Tensor files for tests: ``.npy`` via numpy and ``.safetensors`` written by hand (the format is
a length, a JSON header and the raw bytes), and names no other test of a shared daemon uses."""

from __future__ import annotations

import json
import struct
import uuid
from pathlib import Path
from typing import Any

import numpy as np


def unique(prefix: str) -> str:
    """A tensor name no other test of the module uses (the daemons are shared)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def save(path: Path, array: np.ndarray[Any, Any]) -> Path:
    """``array`` as ``.npy`` at ``path``; returns ``path``."""
    np.save(path, array)
    return path


def write_safetensors(path: Path, tensors: dict[str, np.ndarray[Any, Any]]) -> Path:
    """``tensors`` as one ``.safetensors`` file at ``path`` (float32, int32, uint8); returns it."""
    codes = {"float32": "F32", "int32": "I32", "uint8": "U8"}
    header: dict[str, Any] = {}
    blobs = []
    offset = 0
    for key, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        header[key] = {
            "dtype": codes[array.dtype.name],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        blobs.append(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    return path
