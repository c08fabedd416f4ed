"""How a send is built: an array's wire metadata, and the sender state machine a connection's
agreement calls for (chunk size, crc, lz4). The node's sends and pulls (:mod:`tensord.outbound`)
and the pulls it serves (:mod:`tensord.receiver`) build it the same way, here."""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import Settings
from .errors import BadTensor, ProtocolError, TransferFailed
from .limits import chunk_size_for
from .wire.compress import AdaptiveCompressor
from .wire.handshake import Agreement
from .wire.meta import TensorMeta
from .wire.transfer import SendTransfer


def contiguous(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The array itself if C-contiguous (no copy), else a contiguous copy. Keeps 0-d arrays 0-d."""
    array = np.asarray(array)
    return array if array.flags.c_contiguous else np.ascontiguousarray(array).reshape(array.shape)


def chunk_size(settings: Settings, meta: TensorMeta, agr: Agreement) -> int:
    """The configured chunk size, as the peer's Hello allows, within the protocol's bounds."""
    try:
        return chunk_size_for(meta.nbytes, settings.tensor_protocol.chunk_size, agr.peer_max_chunk)
    except ValueError as exc:
        raise TransferFailed(f"cannot send {meta.name!r}: {exc}", code="too_large") from None


def new_send(
    settings: Settings,
    xid: str,
    meta: TensorMeta,
    data: memoryview,
    agr: Agreement,
    chunk: int | None = None,
) -> SendTransfer:
    """A sender state machine for what this connection agreed (chunk size, crc, lz4).
    ``chunk``: :func:`chunk_size` for these, when the caller already has it."""
    proto = settings.tensor_protocol
    if chunk is None:
        chunk = chunk_size(settings, meta, agr)
    comp = AdaptiveCompressor(
        enabled=agr.lz4 and proto.enable_compression, threshold=proto.compression_threshold
    )
    return SendTransfer(
        xid,
        meta,
        data,
        chunk_size=chunk,
        window=max(2, settings.transfer.window_bytes // chunk),
        crc=agr.crc,
        compressor=comp,
    )


def meta_of(
    name: str, array: np.ndarray[Any, Any], requires_grad: bool = False, dtype: str | None = None
) -> TensorMeta:
    """A tensor's wire metadata; what cannot be sent is a :class:`BadTensor`."""
    try:
        return TensorMeta.of(name, array, requires_grad, dtype)
    except ProtocolError as exc:
        raise BadTensor(str(exc)) from None
    except TypeError as exc:
        raise BadTensor(f"tensor {name!r}: {exc}") from None


__all__ = ["chunk_size", "contiguous", "meta_of", "new_send"]
