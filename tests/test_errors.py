"""One error table (tensord/errors.py): the control server answers each typed error with the
status and code its class states, and the client turns that answer back into the same class."""

from __future__ import annotations

import json

import pytest

from tensord.control import client
from tensord.control.app import error_for
from tensord.control.client import error_from_reply
from tensord.control.files import NotAllowed
from tensord.errors import (
    BadAddress,
    BadTensor,
    ConfigError,
    ControlError,
    DaemonNotRunning,
    DownloadError,
    DownloadNotFound,
    NodeClosed,
    PeerUnreachable,
    ProtocolError,
    StoreFull,
    TensorError,
    TensorNotFound,
    TransferFailed,
)


def answered(exc: BaseException) -> tuple[int, str]:
    e = error_for(exc)
    return e.status, e.code


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (ConfigError("m"), 400, "config"),
        (BadAddress("m"), 404, "unknown_peer"),
        (PeerUnreachable("m"), 502, "peer_unreachable"),
        (TensorNotFound("m"), 404, "not_found"),
        (TransferFailed("m"), 502, "transfer_failed"),
        (TransferFailed("m", code="quota"), 507, "quota"),
        (StoreFull("m"), 507, "quota"),
        (NodeClosed("m"), 503, "node_closed"),
        (BadTensor("m"), 400, "bad_request"),
        (ProtocolError("m"), 400, "bad_request"),
        (DownloadError("m"), 400, "download"),
        (DownloadNotFound("m"), 404, "download"),  # was told apart by matching message text
        (NotAllowed("m"), 403, "forbidden"),
        (ControlError("m"), 502, "error"),  # the client's error: an upstream daemon failed
        (ControlError("m", code="forbidden", status=403), 403, "forbidden"),  # as answered
        (DaemonNotRunning("m"), 503, "not_running"),
        (RuntimeError("m"), 500, "internal"),
    ],
)
def test_the_server_answers_what_each_class_states(
    exc: BaseException, status: int, code: str
) -> None:
    assert answered(exc) == (status, code)


@pytest.mark.parametrize(
    "cls", [TensorNotFound, PeerUnreachable, BadAddress, StoreFull, ConfigError, TransferFailed]
)
def test_the_client_raises_the_class_the_server_answered_for(cls: type[TensorError]) -> None:
    status, code = answered(cls("the cause"))
    body = json.dumps({"error": {"code": code, "message": "the cause"}}).encode()
    back = error_from_reply(status, body)
    assert type(back) is cls and str(back) == "the cause"


def test_other_codes_stay_control_errors_with_status_and_code() -> None:
    body = json.dumps({"error": {"code": "forbidden", "message": "no"}}).encode()
    back = error_from_reply(403, body)
    assert isinstance(back, ControlError) and (back.status, back.code) == (403, "forbidden")


def test_the_control_apis_result_carries_every_transfer_result_field() -> None:
    """Issue 13: the transfer JSON had 9 of TransferResult's 12 fields."""
    import dataclasses

    from tensord.control.app import result_json
    from tensord.node import TransferResult

    r = TransferResult("ab", "w", "b", 10, 0.5, 1, 12, 2, 1, 3, False, "quic")
    doc = result_json(r)
    assert {f.name for f in dataclasses.fields(r)} | {"rate"} == set(doc)
    assert doc["transport"] == "quic" and doc["nacks"] == 3 and doc["rate"] == 20.0
    json.dumps(doc)  # plain JSON types only


def test_the_clients_errors_are_in_the_one_table_and_still_where_they_were() -> None:
    """ControlError and DaemonNotRunning moved to tensord/errors.py (the client needs nothing
    else of the daemon for them); tensord.control.client still exports the same classes."""
    assert client.ControlError is ControlError and client.DaemonNotRunning is DaemonNotRunning
    assert issubclass(DaemonNotRunning, ControlError) and issubclass(ControlError, TensorError)
    gone = DaemonNotRunning("no socket")
    assert (gone.code, gone.status) == ("not_running", 0)  # status 0: no HTTP reply at all
    assert (ControlError("x").code, ControlError("x").status) == ("error", 0)
