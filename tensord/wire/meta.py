"""Tensor metadata and its validation: what a peer may claim about a tensor before we allocate.

A hostile or broken peer controls every field of a ``Begin`` frame, so nothing here is trusted:
the dtype comes from an allow-list, the shape must multiply out to exactly ``nbytes``, ``nbytes``
is capped, and names are bounded and safe to use as store keys (no ``..``, no leading ``/``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ProtocolError
from ..limits import check_name, preview

MAX_NDIM = 32
#: numpy refuses a shape whose non-zero dimensions multiply out past this many bytes, even for
#: an empty array (``np.empty((0, 2**62, 4))`` raises ValueError).
MAX_ARRAY_BYTES = int(np.iinfo(np.intp).max)

#: dtype names carried as names because numpy has no builtin type for them (bf16, fp8).
#: Their item size is fixed here so that a peer without ml_dtypes can still validate and store them.
EXTENDED_DTYPES: dict[str, int] = {
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}

_NUMPY_DTYPES = (
    "bool",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
)


def _allowed_strings() -> dict[str, int]:
    allowed: dict[str, int] = {}
    for name in _NUMPY_DTYPES:
        dt = np.dtype(name)
        # Any byte-order mark is accepted ("<u1" from a peer means "|u1"); numpy parses all.
        for order in "<>|":
            allowed[order + dt.str[1:]] = dt.itemsize
    allowed.update(EXTENDED_DTYPES)
    return allowed


#: Wire dtype string -> item size. numpy's ``dtype.str`` (``<f4``) or an extended name.
ALLOWED_DTYPES: dict[str, int] = _allowed_strings()


_WIRE_NAMES: dict[object, str] = {}


def wire_dtype(dtype: np.dtype[Any] | str) -> str:
    """The wire name of a dtype: numpy's ``str`` form, or the extended name for bf16/fp8."""
    name = _WIRE_NAMES.get(dtype)
    if name is None:
        name = _wire_dtype(dtype)
        if len(_WIRE_NAMES) < 256:
            _WIRE_NAMES[dtype] = name
    return name


def _wire_dtype(dtype: np.dtype[Any] | str) -> str:
    if isinstance(dtype, str) and dtype in EXTENDED_DTYPES:
        return dtype
    dt = np.dtype(dtype)
    if dt.name in EXTENDED_DTYPES:
        return dt.name
    if dt.str not in ALLOWED_DTYPES:
        raise ProtocolError(
            f"dtype {dt!s} is not supported: expected one of {_dtype_list()}", code="bad_dtype"
        )
    return dt.str


def numpy_dtype(wire: str) -> np.dtype[Any]:
    """The numpy dtype for a wire dtype. bf16/fp8 need ml_dtypes; without it they are raw uints."""
    if wire in EXTENDED_DTYPES:
        try:
            import ml_dtypes  # type: ignore[import-not-found,unused-ignore]

            dt: np.dtype[Any] = np.dtype(getattr(ml_dtypes, wire))
            return dt
        except (ImportError, AttributeError):
            return np.dtype(f"<u{EXTENDED_DTYPES[wire]}")
    return np.dtype(wire)


def _dtype_list() -> str:
    return ", ".join(
        sorted(
            {np.dtype(s).name for s in ALLOWED_DTYPES if s not in EXTENDED_DTYPES}
            | set(EXTENDED_DTYPES)
        )
    )


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """What a tensor is, independent of where its bytes are."""

    name: str
    dtype: str  # wire dtype, see ALLOWED_DTYPES
    shape: tuple[int, ...]
    nbytes: int
    requires_grad: bool = False

    @classmethod
    def of(
        cls,
        name: str,
        array: np.ndarray[Any, Any],
        requires_grad: bool = False,
        dtype: str | None = None,
    ) -> TensorMeta:
        """Metadata for a C-contiguous array (``dtype`` overrides, e.g. bf16 sent as uint16)."""
        wire = wire_dtype(dtype if dtype is not None else array.dtype)
        meta = cls(
            check_name(name),
            wire,
            tuple(int(d) for d in array.shape),
            int(array.nbytes),
            bool(requires_grad),
        )
        if dtype is not None and ALLOWED_DTYPES[wire] != array.dtype.itemsize:
            raise ProtocolError(
                f"dtype {dtype} has item size {ALLOWED_DTYPES[wire]} but the array's is "
                f"{array.dtype.itemsize}",
                code="bad_dtype",
            )
        return meta

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
            "grad": self.requires_grad,
        }

    @classmethod
    def from_wire(cls, raw: object, max_bytes: int) -> TensorMeta:
        """Validate a peer's metadata. Raises :class:`ProtocolError` naming the bad field."""
        if not isinstance(raw, dict):
            raise ProtocolError("tensor metadata is not a map", code="bad_meta")
        name = check_name(raw.get("name"))
        dtype = raw.get("dtype")
        if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
            raise ProtocolError(
                f"tensor {name!r}: dtype {preview(dtype, 40)} is not allowed: "
                f"expected one of {_dtype_list()}",
                code="bad_dtype",
            )
        shape = raw.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 62 for d in shape
            )
        ):
            raise ProtocolError(
                f"tensor {name!r}: shape must be a list of at most {MAX_NDIM} "
                "non-negative integers",
                code="bad_meta",
            )
        nbytes = raw.get("nbytes")
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise ProtocolError(
                f"tensor {name!r}: nbytes must be a non-negative integer", code="bad_meta"
            )
        if nbytes > max_bytes:
            raise ProtocolError(
                f"tensor {name!r}: {nbytes} bytes exceeds the limit of "
                f"{max_bytes} (transfer.max_tensor_bytes)",
                code="too_large",
            )
        if math.prod(shape) * ALLOWED_DTYPES[dtype] != nbytes:
            raise ProtocolError(
                f"tensor {name!r}: shape {shape} x itemsize "
                f"{ALLOWED_DTYPES[dtype]} != nbytes {nbytes}",
                code="bad_meta",
            )
        if math.prod(d for d in shape if d) * ALLOWED_DTYPES[dtype] > MAX_ARRAY_BYTES:
            raise ProtocolError(
                f"tensor {name!r}: shape {shape} is too large for an array, even an empty one",
                code="bad_meta",
            )
        grad = raw.get("grad", False)
        if not isinstance(grad, bool):
            raise ProtocolError(
                f"tensor {name!r}: requires_grad must be a boolean", code="bad_meta"
            )
        return cls(name, dtype, tuple(shape), nbytes, grad)

    def empty_array(self) -> np.ndarray[Any, Any]:
        """A fresh, uninitialised array this tensor's bytes can be received into."""
        return np.empty(self.shape, dtype=numpy_dtype(self.dtype))
