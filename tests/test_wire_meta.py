"""TensorMeta: what a peer may claim about a tensor before anything is allocated."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensord.errors import ProtocolError
from tensord.limits import MAX_NAME_LEN, check_name
from tensord.wire import TensorMeta
from tensord.wire.meta import (
    ALLOWED_DTYPES,
    EXTENDED_DTYPES,
    numpy_dtype,
    wire_dtype,
)

BIG = 1 << 40


def wire(name: str = "w", dtype: str = "<f4", shape: Any = (2, 3), nbytes: Any = 24,
         **extra: Any) -> dict[str, Any]:  # fmt: skip
    shape = list(shape) if isinstance(shape, tuple) else shape
    return {"name": name, "dtype": dtype, "shape": shape, "nbytes": nbytes, **extra}


def refused(raw: object, max_bytes: int = BIG) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        TensorMeta.from_wire(raw, max_bytes)
    return info.value


# ---------------------------------------------------------------------------------------------
# Shape x itemsize == nbytes.


@pytest.mark.parametrize(
    ("dtype", "shape", "nbytes"),
    [("<f4", (2, 3), 24), (">i8", (5,), 40), ("|u1", (), 1), ("<f2", (0, 7), 0),
     ("bfloat16", (3, 4), 24), ("<c16", (2,), 32), ("|b1", (1, 1, 1), 1)],
)  # fmt: skip
def test_consistent_metadata_is_accepted(dtype: str, shape: tuple[int, ...], nbytes: int) -> None:
    meta = TensorMeta.from_wire(wire(dtype=dtype, shape=shape, nbytes=nbytes), BIG)
    assert meta == TensorMeta("w", dtype, shape, nbytes)


@pytest.mark.parametrize(
    ("dtype", "shape", "nbytes"),
    [("<f4", (2, 3), 23), ("<f4", (2, 3), 25), ("<f4", (2, 3), 6), (">i8", (5,), 5),
     ("|u1", (), 0), ("<f2", (0, 7), 14), ("bfloat16", (3,), 3), ("bfloat16", (3,), 12)],
)  # fmt: skip
def test_shape_times_itemsize_must_equal_nbytes(
    dtype: str, shape: tuple[int, ...], nbytes: int
) -> None:
    assert refused(wire(dtype=dtype, shape=shape, nbytes=nbytes)).code == "bad_meta"


@settings(max_examples=100, deadline=None)
@given(
    dtype=st.sampled_from(sorted(ALLOWED_DTYPES)),
    shape=st.lists(st.integers(0, 50), max_size=5),
    delta=st.integers(-3, 3),
)
def test_nbytes_rule_property(dtype: str, shape: list[int], delta: int) -> None:
    nbytes = math.prod(shape) * ALLOWED_DTYPES[dtype] + delta
    raw = wire(dtype=dtype, shape=shape, nbytes=nbytes)
    if delta == 0:
        assert TensorMeta.from_wire(raw, BIG).nbytes == nbytes
    else:
        refused(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "not a map",
        [1, 2],
        wire(shape="2x3"),
        wire(shape=[2, -3], nbytes=-24),
        wire(shape=[2, 3.0]),
        wire(shape=[True, 3], nbytes=12),
        wire(shape=[1] * 33, nbytes=4),
        wire(nbytes="24"),
        wire(nbytes=-1),
        wire(nbytes=True),
        wire(grad="yes"),
        {"dtype": "<f4", "shape": [1], "nbytes": 4},
    ],
)
def test_malformed_metadata_is_refused(raw: object) -> None:
    assert refused(raw).code in ("bad_meta", "bad_name")


def test_huge_shape_does_not_pass_by_overflow() -> None:
    # 2**62 - 1 elements in several dims: the product is huge, and must not wrap around to nbytes.
    assert refused(wire(dtype="|u1", shape=[(1 << 62) - 1] * 4, nbytes=1)).code == "bad_meta"
    assert refused(wire(dtype="|u1", shape=[1 << 62], nbytes=0)).code == "bad_meta"


# ---------------------------------------------------------------------------------------------
# The dtype allow-list.


@pytest.mark.parametrize(
    "dtype",
    ["object", "|O", "<U4", "U4", "V8", "|V8", "<M8[ns]", "<m8[s]", "S4", "float32", "<f16",
     "=f4", "<f3", "", "bfloat32", "BFLOAT16"],
)  # fmt: skip
def test_dtypes_outside_the_allow_list_are_refused(dtype: str) -> None:
    assert refused(wire(dtype=dtype, shape=[2], nbytes=8)).code == "bad_dtype"


def test_non_string_dtype_is_refused() -> None:
    assert refused(wire(dtype=4, shape=[2], nbytes=8)).code == "bad_dtype"
    assert refused(wire(dtype=None, shape=[2], nbytes=8)).code == "bad_dtype"


@pytest.mark.parametrize(
    ("dtype", "itemsize"),
    [("<f4", 4), (">i8", 8), ("bfloat16", 2), ("<f2", 2), (">f8", 8), ("|b1", 1), ("|i1", 1),
     ("<u2", 2), ("<c8", 8), ("float8_e4m3fn", 1), ("float8_e5m2", 1)],
)  # fmt: skip
def test_allowed_dtypes_and_item_sizes(dtype: str, itemsize: int) -> None:
    assert ALLOWED_DTYPES[dtype] == itemsize
    meta = TensorMeta.from_wire(wire(dtype=dtype, shape=[3], nbytes=3 * itemsize), BIG)
    assert meta.dtype == dtype


def test_bf16_has_item_size_two_and_receives_into_two_byte_items() -> None:
    assert EXTENDED_DTYPES["bfloat16"] == 2
    meta = TensorMeta.from_wire(wire(dtype="bfloat16", shape=[4, 8], nbytes=64), BIG)
    arr = meta.empty_array()
    assert arr.shape == (4, 8)
    assert arr.dtype.itemsize == 2
    assert arr.nbytes == meta.nbytes
    assert numpy_dtype("bfloat16").itemsize == 2


@pytest.mark.parametrize("dtype", ["object", "<U4", "V8", "datetime64[ns]"])
def test_wire_dtype_refuses_unsupported_numpy_dtypes(dtype: str) -> None:
    with pytest.raises(ProtocolError) as info:
        wire_dtype(np.dtype(dtype))
    assert info.value.code == "bad_dtype"


def test_wire_dtype_names() -> None:
    assert wire_dtype(np.dtype("<f4")) == "<f4"
    assert wire_dtype(np.dtype(">i8")) == ">i8"
    assert wire_dtype(np.dtype(np.uint8)) == "|u1"
    assert wire_dtype(np.dtype(bool)) == "|b1"
    assert wire_dtype("bfloat16") == "bfloat16"
    assert wire_dtype("float8_e5m2") == "float8_e5m2"
    for s, itemsize in ALLOWED_DTYPES.items():
        if s not in EXTENDED_DTYPES:
            assert wire_dtype(np.dtype(s)) in ALLOWED_DTYPES
            assert numpy_dtype(s).itemsize == itemsize


# ---------------------------------------------------------------------------------------------
# Names.

GOOD_NAMES = [
    "model.layers.0.attn.q_proj.weight",
    "blk.0/ffn",
    "a:b@c",
    "x",
    "_",
    "0",
    "a+b=c-d",
    "token_embd.weight",
    "a/b/c/d",
    "a..b",
    "a/..b/c.",
    "n" * MAX_NAME_LEN,
]
BAD_NAMES = [
    "",
    "../x",
    "/abs",
    "a//b",
    "a/./b",
    "a/../b",
    "a/",
    "a/.",
    "a/..",
    ".hidden",
    "-flag",
    "n" * 300,
    "n" * (MAX_NAME_LEN + 1),
    "nul\x00",
    "sp ace",
    "tab\tx",
    "new\nline",
    "trailing\n",
    "back\\slash",
    "caf\u00e9",
    "q?x",
    "a*",
    "%2e%2e",
]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names_are_accepted(name: str) -> None:
    assert check_name(name) == name
    meta = TensorMeta.from_wire(wire(name=name), BIG)
    assert meta.name == name


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ProtocolError) as info:
        check_name(name)
    assert info.value.code == "bad_name"
    assert refused(wire(name=name)).code == "bad_name"
    with pytest.raises(ProtocolError):
        TensorMeta.of(name, np.zeros(2, np.float32))


@pytest.mark.parametrize("name", [None, 3, b"bytes", ["a"]])
def test_non_string_names_are_refused(name: object) -> None:
    with pytest.raises(ProtocolError) as info:
        check_name(name)
    assert info.value.code == "bad_name"


def reference_name_ok(name: str) -> bool:
    return (
        1 <= len(name) <= MAX_NAME_LEN
        and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.:@+=\-/]*", name) is not None
        and all(seg not in ("", ".", "..") for seg in name.split("/"))
    )


@settings(max_examples=300, deadline=None)
@given(name=st.text(st.sampled_from("ab_0.:/@+=-\n\x00 \\"), max_size=12))
def test_name_rule_matches_its_specification(name: str) -> None:
    try:
        check_name(name)
    except ProtocolError:
        assert not reference_name_ok(name)
    else:
        assert reference_name_ok(name)


# ---------------------------------------------------------------------------------------------
# Size limit and round trip.


def test_max_tensor_bytes_is_enforced() -> None:
    raw = wire(dtype="|u1", shape=[1000], nbytes=1000)
    assert TensorMeta.from_wire(raw, 1000).nbytes == 1000
    err = refused(raw, 999)
    assert err.code == "too_large"
    assert "1000" in str(err) and "999" in str(err)


def test_too_large_is_reported_before_any_shape_arithmetic() -> None:
    # nbytes over the limit and an inconsistent shape: the limit is what the peer is told.
    assert refused(wire(dtype="|u1", shape=[1], nbytes=1 << 50), 1 << 30).code == "too_large"


metas = st.builds(
    lambda name, dtype, shape, grad: TensorMeta(
        name, dtype, tuple(shape), math.prod(shape) * ALLOWED_DTYPES[dtype], grad
    ),
    st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.:@+=\-]{0,30}(/[A-Za-z0-9_][A-Za-z0-9_.]{0,9}){0,3}",
                  fullmatch=True),
    st.sampled_from(sorted(ALLOWED_DTYPES)),
    st.lists(st.integers(0, 1 << 12), max_size=4),
    st.booleans(),
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(meta=metas)
def test_to_wire_from_wire_round_trip(meta: TensorMeta) -> None:
    assert TensorMeta.from_wire(meta.to_wire(), 1 << 62) == meta


def test_requires_grad_defaults_to_false() -> None:
    raw = wire()
    raw.pop("grad", None)
    assert TensorMeta.from_wire(raw, BIG).requires_grad is False
    assert TensorMeta.from_wire(wire(grad=True), BIG).requires_grad is True


# ---------------------------------------------------------------------------------------------
# TensorMeta.of(array).


@pytest.mark.parametrize(
    ("array", "dtype"),
    [
        (np.zeros((2, 3), np.float32), "<f4"),
        (np.zeros(5, np.float64), "<f8"),
        (np.zeros((4, 4), np.float16), "<f2"),
        (np.zeros(7, np.int8), "|i1"),
        (np.zeros(7, np.uint8), "|u1"),
        (np.zeros((2, 2), np.int64).astype(">i8"), ">i8"),
        (np.zeros(3, bool), "|b1"),
        (np.zeros(3, np.complex64), "<c8"),
        (np.zeros((0, 128), np.float32), "<f4"),
        (np.float32(3.0).reshape(()), "<f4"),
        (np.zeros((1, 2, 3, 4), np.uint16), "<u2"),
    ],
    ids=lambda v: getattr(v, "dtype", v) if not isinstance(v, str) else v,
)
def test_of_arrays(array: np.ndarray[Any, Any], dtype: str) -> None:
    meta = TensorMeta.of("t", array)
    assert meta.dtype == dtype
    assert meta.shape == array.shape
    assert meta.nbytes == array.nbytes
    assert meta.requires_grad is False
    assert TensorMeta.from_wire(meta.to_wire(), BIG) == meta
    assert meta.empty_array().dtype == array.dtype


def test_of_with_bf16_override_on_two_byte_items() -> None:
    arr = np.zeros((3, 5), np.uint16)
    meta = TensorMeta.of("bf", arr, requires_grad=True, dtype="bfloat16")
    assert meta == TensorMeta("bf", "bfloat16", (3, 5), 30, True)


def test_of_refuses_an_override_with_another_item_size() -> None:
    with pytest.raises(ProtocolError) as info:
        TensorMeta.of("bf", np.zeros(4, np.float32), dtype="bfloat16")
    assert info.value.code == "bad_dtype"


@pytest.mark.parametrize(
    "array",
    [np.array(["ab", "cd"]), np.array([object(), 1], dtype=object), np.zeros(2, dtype="V8")],
    ids=["unicode", "object", "void"],
)
def test_of_refuses_unsupported_arrays(array: np.ndarray[Any, Any]) -> None:
    with pytest.raises(ProtocolError) as info:
        TensorMeta.of("t", array)
    assert info.value.code == "bad_dtype"
