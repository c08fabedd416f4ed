"""pytest configuration: trio mode is set in setup.cfg; shared helpers live in tests/support/."""

import pytest


@pytest.fixture(params=["tcp", "quic"])
def transport(request: pytest.FixtureRequest) -> str:
    """Run the test over TCP and again over QUIC: the test passes it to
    ``fast_settings(transport=...)`` (nothing global changes)."""
    param: str = request.param
    return param
