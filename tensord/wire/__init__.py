"""Sans-I/O protocol code: frames, messages, negotiation and transfer state machines.

Nothing in this package does I/O or imports trio; it is driven by ``tensord.net``.
"""

from .frames import FrameDecoder, encode, encode_many
from .handshake import Agreement, accept_reply, answer_hello, local_features, make_hello
from .messages import (
    Accept,
    Ack,
    Begin,
    Chunk,
    End,
    Error,
    Hello,
    Legacy,
    Message,
    Nack,
    Ping,
    Pong,
    Request,
    Stored,
)
from .meta import TensorMeta
from .transfer import Placement, ReceiveTransfer, SendTransfer

__all__ = [
    "Accept",
    "Ack",
    "Agreement",
    "Begin",
    "Chunk",
    "End",
    "Error",
    "FrameDecoder",
    "Hello",
    "Legacy",
    "Message",
    "Nack",
    "Ping",
    "Placement",
    "Pong",
    "ReceiveTransfer",
    "Request",
    "SendTransfer",
    "Stored",
    "TensorMeta",
    "accept_reply",
    "answer_hello",
    "encode",
    "encode_many",
    "local_features",
    "make_hello",
]
