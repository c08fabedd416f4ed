"""The public namespace: ``from tensord import ...`` is the API the README teaches."""

from __future__ import annotations

import inspect
import subprocess
import sys

import tensord
from tensord import errors


def test_every_public_name_imports() -> None:
    for name in tensord.__all__:
        assert getattr(tensord, name) is not None, name
    from tensord import Arrival, AsyncClient, Client, TensorNode, TransferResult

    assert TensorNode.__module__ == "tensord.node"
    assert {Arrival.__name__, TransferResult.__name__} == {"Arrival", "TransferResult"}
    assert Client.__name__ == "Client" and AsyncClient.__name__ == "AsyncClient"


def test_every_public_error_is_in_the_namespace() -> None:
    public = {
        name
        for name, obj in vars(errors).items()
        if inspect.isclass(obj)
        and issubclass(obj, errors.TensorError)
        and obj.__module__ == errors.__name__
        and not name.startswith("_")
    }
    assert public - set(tensord.__all__) == set()
    for name in public:
        assert getattr(tensord, name) is getattr(errors, name)


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        tensord.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("tensord.NoSuchThing resolved")


def test_import_tensord_is_light() -> None:
    """The daemon's CLI and library users pay for numpy and httpx only when they use them."""
    code = (
        "import sys, tensord; "
        "print(sorted(m for m in ('numpy', 'httpx', 'trio', 'tensord.node') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
