"""`asyncio.timeout` for long limits on the click path, without a timer per use.

`asyncio.timeout` arms a `TimerHandle` each time: an allocation, a push onto the loop's
heap and, since a click nearly always ends long before its limit, a cancelled handle
left in that heap. A keep-alive click used two (its forward deadline, the backend's
answer): 15 % of its instructions (callgrind, `tests/benchmarks/bench_click_micro.py`).

Here a use costs two dict operations. Each limit is rounded up to a tick
(`resolution`, 0.1 s) and kept in that tick's bucket; one timer per `CoarseTimeouts`
wakes at the earliest tick that has entries and cancels their tasks. So an operation
times out between its limit and its limit plus one tick: fine for limits of seconds,
not for sub-second ones. The semantics are `asyncio.timeout`'s: the task is cancelled,
and the `async with` turns that cancellation into `TimeoutError` unless someone else
cancelled the task too.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType
from typing import Protocol

RESOLUTION = 0.1  # seconds per tick
_EARLY = 1e-6  # a sweep this much before a tick's moment still takes the tick


class CoarseTimeouts:
    """The deadlines of one event loop's operations (made and used on that loop)."""

    def __init__(self, resolution: float = RESOLUTION) -> None:
        self._resolution = resolution
        self._buckets: dict[int, dict[Expiring, None]] = {}  # tick -> its entries
        self._handle: asyncio.TimerHandle | None = None
        self._armed_tick = 0

    def timeout(self, seconds: float) -> CoarseTimeout:
        return CoarseTimeout(self, seconds)

    def add(self, entry: Expiring, loop: asyncio.AbstractEventLoop, seconds: float) -> int:
        """`entry.expire()` once `seconds` have passed (within a tick after), unless
        `remove(entry, tick)` with the tick returned comes first: a deadline for work
        that is not a task, the object being its own callback (no call object per use)."""
        return self._add(entry, loop, loop.time() + seconds)

    def remove(self, entry: Expiring, tick: int) -> None:
        self._remove(entry, tick)

    def pending(self) -> int:
        """Operations with a deadline right now (for tests)."""
        return sum(len(bucket) for bucket in self._buckets.values())

    def _add(self, entry: Expiring, loop: asyncio.AbstractEventLoop, when: float) -> int:
        tick = math.ceil(when / self._resolution)
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = {}
        bucket[entry] = None
        if self._handle is None or tick < self._armed_tick:
            self._arm(loop, tick)
        return tick

    def _remove(self, entry: Expiring, tick: int) -> None:
        bucket = self._buckets.get(tick)
        if bucket is not None:
            bucket.pop(entry, None)
            if not bucket:
                del self._buckets[tick]
        # the timer stays armed: when it fires with nothing due, it re-arms (cheaper
        # than cancelling a handle per click)

    def _arm(self, loop: asyncio.AbstractEventLoop, tick: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_tick = tick
        self._handle = loop.call_at(tick * self._resolution, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._handle = None
        # in seconds, as `_arm` computed the moment: `floor(time / resolution)` can come
        # out one tick short at that very moment (floating point), and the loop may run
        # a timer up to its clock resolution early; either only re-armed for the same
        # moment, a few callbacks more
        now = loop.time() + _EARLY
        for tick in sorted(t for t in self._buckets if t * self._resolution <= now):
            for entry in list(self._buckets.pop(tick)):
                entry.expire()
        if self._buckets:
            self._arm(loop, min(self._buckets))


class Expiring(Protocol):
    def expire(self) -> None: ...  # its limit has passed (called once, then forgotten)


class CoarseTimeout:
    __slots__ = ("_owner", "_seconds", "_task", "_cancelling", "_tick", "expired")

    def __init__(self, owner: CoarseTimeouts, seconds: float) -> None:
        self._owner = owner
        self._seconds = seconds
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._tick: int | None = None
        self.expired = False

    async def __aenter__(self) -> CoarseTimeout:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("CoarseTimeout should be used inside a task")
        loop = task.get_loop()
        self._task = task
        self._cancelling = task.cancelling()
        self._tick = self._owner._add(self, loop, loop.time() + self._seconds)  # noqa: SLF001
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._tick is not None:
            self._owner._remove(self, self._tick)  # noqa: SLF001
            self._tick = None
        if self.expired:
            assert self._task is not None
            # as asyncio.timeout: ours unless the task was also cancelled by someone else
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc

    def expire(self) -> None:
        self._tick = None
        self.expired = True
        assert self._task is not None
        self._task.cancel()


__all__ = ["CoarseTimeout", "CoarseTimeouts", "Expiring", "RESOLUTION"]
