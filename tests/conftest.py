"""pytest configuration: trio mode is set in setup.cfg; shared helpers live in helpers.py."""

from collections.abc import Iterator

import pytest

from .support import helpers


@pytest.fixture(params=["tcp", "quic"])
def transport(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test over TCP and again over QUIC: nodes from fast_settings() use it."""
    helpers.TRANSPORT[0] = request.param
    try:
        yield request.param
    finally:
        helpers.TRANSPORT[0] = "tcp"
