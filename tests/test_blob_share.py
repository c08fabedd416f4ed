"""BlobShare's judgement of peers (tensord/cluster/sharing.py), in trio time: which answers make
a peer "too slow" for a blob. The whole of sharing runs against real daemons in test_share.py."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from tensord.cluster.holdings import Holdings
from tensord.cluster.piece_client import PieceUnavailable
from tensord.cluster.piece_server import NOT_YET_WAIT
from tensord.cluster.sharing import MAX_NOT_YET, BlobShare
from tensord.download.ranges import RangeSet
from tensord.wire.messages import BlobEntry

MiB = 1 << 20
DIGEST = "sha256:" + "ab" * 32


class QuietNetwork:
    """A PieceNetwork whose calls are never made in these tests."""

    node_id = "me"
    io_timeout = 5.0

    def __init__(self) -> None:
        self.holdings = Holdings(None)

    async def query(self, peer: str, digest: str) -> BlobEntry | None:
        raise AssertionError("not called")

    async def announce(self, peer: str, entry: BlobEntry) -> None:
        raise AssertionError("not called")

    async def fetch_range(self, peer: str, digest: str, offset: int, into: memoryview) -> None:
        raise AssertionError("not called")


def not_yet(peer: str) -> PieceUnavailable:
    return PieceUnavailable(f"peer {peer}: not yet", peer=peer, digest=DIGEST, code="not_yet")


async def test_not_yet_answers_that_arrive_together_count_as_one_round(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Four workers waiting on one busy owner hear ``not_yet`` at the same moment: that is one
    round of "nothing landed", not four; the owner is skipped only after MAX_NOT_YET rounds."""
    network = QuietNetwork()
    flight = network.holdings.begin(DIGEST, 64 * MiB, tmp_path / "b.incomplete", 4 * MiB)
    share = BlobShare(network, flight, lambda: ["h1"], RangeSet())
    for _ in range(4):
        share.fail("h1", not_yet("h1"))
    assert "h1" not in share.plan.failed
    for _ in range(MAX_NOT_YET - 2):
        await trio.sleep(NOT_YET_WAIT)
        share.fail("h1", not_yet("h1"))
        share.fail("h1", not_yet("h1"))
    assert "h1" not in share.plan.failed
    await trio.sleep(NOT_YET_WAIT)
    share.fail("h1", not_yet("h1"))
    assert "h1" in share.plan.failed
