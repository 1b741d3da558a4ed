"""Issue 9: memory returns after a burst of connections closes.

pymalloc hands a 1 MiB arena back to the OS only when every block in it is free, and
CPython keeps some freed objects for reuse instead of freeing them (free lists). After a
burst, those kept are scattered over the arenas the burst allocated and keep them all.
`MemoryTrimmer` (proxy/tls/connections.py) empties the lists once connections have
stopped closing. tracemalloc tells which blocks allocated at a given line are still
allocated, free-list entries included.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import Iterator

import pytest

from proxy.tls import connections
from proxy.tls.connections import ConnectionStats, MemoryTrimmer, empty_free_lists


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def allocated_by(function: object) -> int:
    """Blocks still allocated whose allocation happened in `function`'s code."""
    code = function.__code__  # type: ignore[attr-defined]
    return sum(
        stat.count
        for stat in tracemalloc.take_snapshot().statistics("lineno")
        if stat.traceback[0].filename == code.co_filename
        and code.co_firstlineno <= stat.traceback[0].lineno <= code.co_firstlineno + 3
    )


def make_tuples() -> list[tuple[int, ...]]:
    return [tuple(range(n % 4 + 1)) for n in range(4000)]


def await_iterators(future: asyncio.Future[None]) -> list[object]:
    return [future.__await__() for _ in range(600)]


async def test_freed_tuples_and_await_iterators_kept_for_reuse_are_freed(traced: None) -> None:
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    gc.collect()  # the lists start empty: what they keep next is ours
    tuples = make_tuples()
    iterators = await_iterators(future)
    del tuples, iterators
    # what the interpreter and the C asyncio module keep for reuse (2,000 tuples of
    # each length, 255 iterators)
    assert allocated_by(make_tuples) >= 1000
    assert allocated_by(await_iterators) >= 255

    empty_free_lists(loop)

    assert allocated_by(make_tuples) == 0
    assert allocated_by(await_iterators) == 0


class FallingStats(ConnectionStats):
    """Open connections as a burst closes: each look finds fewer, down to `floor`."""

    def __init__(self, counts: list[int]) -> None:
        super().__init__()
        self._counts = counts
        self.looks = 0

    @property  # type: ignore[override]
    def open(self) -> int:
        count = self._counts[min(self.looks, len(self._counts) - 1)]
        self.looks += 1
        return count

    @open.setter
    def open(self, value: int) -> None:
        pass  # the dataclass's __init__ sets it


async def test_release_waits_until_connections_stop_closing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 10,000 open; the first look after the interval finds 6,000 (a burst is closing),
    # then fewer at each look until none are left.
    stats = FallingStats([10_000, 6_000, 3_000, 1_000, 0])
    released = asyncio.get_running_loop().create_future()
    seen_at_release: list[int] = []

    def fake_empty(loop: asyncio.AbstractEventLoop) -> None:
        seen_at_release.append(stats.looks)
        if not released.done():
            released.set_result(None)

    monkeypatch.setattr(connections, "empty_free_lists", fake_empty)
    trimmer = MemoryTrimmer(stats, interval=0.05, min_closed=500, settle=0.001)
    trimmer._trim = None  # this test is about when, not glibc
    trimmer.start()
    try:
        await asyncio.wait_for(released, 10)
    finally:
        await trimmer.close()
    # looked until two looks in a row found 0 (the 5th and 6th), then released once
    assert seen_at_release == [6]
    assert trimmer.releases == 1


async def test_a_burst_between_two_looks_is_released_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 2,000 connections open and close within one interval: no look sees them open,
    # but the high-water mark does (bench_burst_memory.py's 6 s bursts were missed
    # whenever they fell between two of the default 10 s looks)
    stats = ConnectionStats()
    monkeypatch.setattr(connections, "empty_free_lists", lambda loop: None)
    trimmer = MemoryTrimmer(stats, interval=0.2, min_closed=500, settle=0.001)
    trimmer._trim = None
    trimmer.start()
    try:
        await asyncio.sleep(0.05)  # after the trimmer's first reading, before its look
        stats.open = stats.peak_open = 2_000
        stats.open = 0
        for _ in range(100):
            if trimmer.releases:
                break
            await asyncio.sleep(0.02)
        assert trimmer.releases == 1
        stats.open = stats.peak_open = 300  # fewer than min_closed: no release for them
        stats.open = 0
        await asyncio.sleep(0.5)
        assert trimmer.releases == 1
    finally:
        await trimmer.close()
