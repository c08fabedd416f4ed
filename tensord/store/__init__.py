"""The tensor store (see :mod:`tensord.store.tensor_store` for why it has this shape)."""

from .tensor_store import (
    PartialInfo,
    PartialReceive,
    StoreFull,
    TensorInfo,
    TensorStore,
    checked_name,
    encode_component,
)

__all__ = [
    "PartialInfo",
    "PartialReceive",
    "StoreFull",
    "TensorInfo",
    "TensorStore",
    "checked_name",
    "encode_component",
]
