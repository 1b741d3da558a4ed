"""ConnectionLimits' caps when closed connections go away late (unit tests).

A transport lets go of a connection a turn or two of the loop after `abort`; a busy
worker accepts many connections before that. Each one over a cap must close another
connection, not the same one again (issue 9's descriptor bound; test_descriptor_limit
showed it against a real edge process on a busy machine: 1,024 descriptors in use,
`open` at 898 of a 432 cap).
"""

from __future__ import annotations

from typing import Any

from proxy.tls.connections import ConnectionLimits, ConnectionSettings


class _Conn:
    """A connection as ConnectionLimits sees one; `abort` only marks it closing, as a
    transport does until its `connection_lost` runs on a later turn of the loop."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.transport: Any = object()
        self.aborted = 0

    def stage(self) -> int:
        return 0  # idle: waiting for a request

    def abort(self) -> None:
        self.aborted += 1


def _limits(max_total: int, max_per_source: int) -> ConnectionLimits:
    return ConnectionLimits(ConnectionSettings(max_total=max_total, max_per_source=max_per_source))


def test_a_burst_over_the_total_cap_closes_a_different_connection_each_time() -> None:
    limits = _limits(max_total=10, max_per_source=1000)
    conns = [_Conn(f"192.0.2.{i % 3}") for i in range(40)]
    for conn in conns:  # nothing closes in between: the loop is busy accepting
        limits.opened(conn)  # type: ignore[arg-type]
    closed = [c for c in conns if c.aborted]
    assert all(c.aborted == 1 for c in closed)
    assert len(closed) == 30
    assert limits.stats.open == 10
    assert limits.stats.evicted_total == 30
    # the newest ten stay; the rest went, oldest first within each source
    assert not any(c.aborted for c in conns[-10:])

    for conn in closed:  # their connection_lost, late: counted once only
        limits.closed(conn)  # type: ignore[arg-type]
    assert limits.stats.open == 10
    for conn in conns[-10:]:
        limits.closed(conn)  # type: ignore[arg-type]
    assert limits.stats.open == 0


def test_a_burst_over_the_per_source_cap_closes_its_oldest_ones() -> None:
    limits = _limits(max_total=1000, max_per_source=5)
    hog = [_Conn("198.51.100.7") for _ in range(20)]
    other = _Conn("203.0.113.9")
    for conn in hog[:10]:
        limits.opened(conn)  # type: ignore[arg-type]
    limits.opened(other)  # type: ignore[arg-type]
    for conn in hog[10:]:
        limits.opened(conn)  # type: ignore[arg-type]
    assert [c.aborted for c in hog] == [1] * 15 + [0] * 5
    assert other.aborted == 0
    assert limits.source_count("198.51.100.7") == 5
    assert limits.stats.open == 6
    assert limits.stats.evicted_source == 15
