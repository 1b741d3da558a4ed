"""Issue 12: `proxy/coarse_timeouts.py`, asyncio.timeout's semantics at a tick's resolution.

The click path's deadlines (the forward's, the backend answer's, the ClientHello's and
the certificate selection's) use it; the forwarding, hostile-client and TLS tests show
them end to end. Here: it fires within one tick of its limit, raises TimeoutError, leaves
nothing behind when the operation ends first, lets another cancellation through as a
cancellation, and wakes for a short limit registered after a long one.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from proxy.wire.coarse_timeouts import RESOLUTION, CoarseTimeouts


async def test_fires_within_a_tick_of_its_limit() -> None:
    timeouts = CoarseTimeouts()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with timeouts.timeout(0.3):
            await asyncio.sleep(5)
    took = loop.time() - started
    assert 0.3 <= took < 0.3 + RESOLUTION + 0.2  # + scheduling slack on a busy machine
    assert timeouts.pending() == 0


async def test_an_operation_that_ends_first_leaves_nothing() -> None:
    timeouts = CoarseTimeouts()
    for _ in range(100):
        async with timeouts.timeout(30) as entry:
            await asyncio.sleep(0)
        assert not entry.expired
    assert timeouts.pending() == 0
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_another_cancellation_stays_a_cancellation() -> None:
    timeouts = CoarseTimeouts()

    async def guarded() -> None:
        async with timeouts.timeout(30):
            await asyncio.sleep(5)

    task = asyncio.create_task(guarded())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert timeouts.pending() == 0


async def test_a_short_limit_after_a_long_one_is_kept() -> None:
    """The timer armed for the long limit must not delay the short one."""
    timeouts = CoarseTimeouts()
    loop = asyncio.get_running_loop()

    async def long_wait() -> None:
        async with timeouts.timeout(60):
            await asyncio.sleep(2)

    other = asyncio.create_task(long_wait())
    await asyncio.sleep(0.01)
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with timeouts.timeout(0.2), timeouts.timeout(30):  # nested, as the forward
            await asyncio.sleep(5)
    assert loop.time() - started < 0.2 + RESOLUTION + 0.2
    assert not other.done()  # the long one is still waiting, not cancelled
    await other
    assert timeouts.pending() == 0


async def test_many_expire_together() -> None:
    timeouts = CoarseTimeouts()

    async def guarded() -> str:
        try:
            async with timeouts.timeout(0.2):
                await asyncio.sleep(5)
        except TimeoutError:
            return "timed out"
        return "finished"

    results = await asyncio.gather(*(guarded() for _ in range(50)))
    assert results == ["timed out"] * 50
    assert timeouts.pending() == 0


class _Entry:
    expired = False

    def expire(self) -> None:
        self.expired = True


class _Clock:
    """What `_sweep` and `_arm` use of a loop, at a fixed time."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.armed: list[float] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, *_args: object) -> _Clock:
        self.armed.append(when)
        return self  # as the handle: `_arm` may cancel it

    def cancel(self) -> None:
        pass


def test_a_sweep_at_the_ticks_moment_takes_it() -> None:
    """43 * 0.1 / 0.1 is 42.99…: counted in ticks, the sweep at the very moment the timer
    was armed for found nothing due and re-armed for that moment."""
    tick = next(t for t in range(1, 1000) if math.floor(t * RESOLUTION / RESOLUTION) != t)
    timeouts = CoarseTimeouts()
    entry = _Entry()
    timeouts._buckets[tick] = {entry: None}  # type: ignore[dict-item]
    clock = _Clock(tick * RESOLUTION)
    timeouts._sweep(clock)  # type: ignore[arg-type]
    assert entry.expired
    assert clock.armed == []  # nothing left, nothing re-armed
    assert timeouts.pending() == 0


async def test_an_entry_expires_once_within_a_tick_unless_removed() -> None:
    timeouts = CoarseTimeouts()
    loop = asyncio.get_running_loop()
    started = loop.time()
    fired: list[float] = []

    class Timed:
        def expire(self) -> None:
            fired.append(loop.time() - started)

    timeouts.add(Timed(), loop, 0.2)
    removed = _Entry()
    tick = timeouts.add(removed, loop, 0.2)
    timeouts.remove(removed, tick)
    timeouts.remove(removed, tick)  # twice: nothing more
    assert timeouts.pending() == 1
    await asyncio.sleep(0.2 + RESOLUTION + 0.2)
    assert len(fired) == 1 and 0.2 <= fired[0] < 0.2 + RESOLUTION + 0.2
    assert not removed.expired
    assert timeouts.pending() == 0
