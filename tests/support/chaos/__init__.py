"""Faults and bad input against real tensord nodes: the scenarios of the reliability report.

Every scenario is an async function, parametrised by size, count or duration, that returns
result rows (:class:`rows.Row`): the fault, how many times it was tried, the outcome, the bytes
re-sent, data lost (must be 0), duplicates (must be 0). ``scenarios.py`` names them and holds
two parameter tables: ``QUICK``, which ``tests/test_reliability.py`` runs so that CI covers every
scenario, and ``FULL``, which ``make chaos`` (``bench/chaos.py``, the runner that writes
docs/RELIABILITY.md) runs. This package imports nothing from ``bench/``.

The receivers are real ``tensord serve`` subprocesses (``tests/support/daemons.py``) with their
on-disk store, so "what the receiver stored" is read back from the store's files and compared by
SHA-256 with what was sent, and arrivals are counted in the daemon's own log ("tensor arrived:
'name'") to find duplicates. Faults come from the test-owned proxies
``tests/support/tcp_proxy.py`` (cuts at byte offsets, flipped bytes inside chunk payloads, a lost
``Stored``, throttling) and ``tests/support/udp_proxy.py``, from ``kill -9``, from a tmpfs that
fills up, and from network namespaces joined by a veth pair.

Modules, one theme each: ``common`` (digests, arrivals, watermarks, a receiver daemon),
``rows``, ``transfers`` (cuts, kills, restarts, a lost confirmation, the retry budget,
partials), ``disks``, ``load``, ``bad_input``, ``netns``, ``quic``, and the attacks of issue 12
(``attacks`` with ``attacks_target``, ``attacks_peer``, ``attacks_services``).
"""
