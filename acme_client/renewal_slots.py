"""Leveling renewals over time: pure functions, no I/O.

A uniformly random moment in each certificate's window (acme_client.renewal) spreads a
burst of certificates issued together over that window only: a platform that brings
200,000 hosts in one day renews them 60 days later within 7.5 days, every 60 days,
at several times the fleet's mean rate. The CA's rate limits and the edge's own order
limiters then push renewals late, toward the end of the safe window.

Leveling instead places each new plan in the least loaded 3-hour slot of a wider
window, counting the plans already in the store (``RenewalStore.renewal_load``):

- the window ends where the ratio rule's window ends (1/3 of the lifetime left, 1/2
  for short-lived certificates): a leveled renewal is never later than the
  unleveled one could be;
- it starts at :data:`LEVEL_EARLIEST_SHARE` of the lifetime after issuance (15 days
  for 90-day certificates): renewing early costs one more order, never safety;
- among the slots whose load is within :data:`LEVEL_TOLERANCE` of the least loaded
  one, the *latest* wins, so a fleet without bursts renews at its ratio bound (as
  long a lifetime used as possible) and only a burst spills into earlier slots;
- the moment inside the chosen slot is uniformly random (jitter: certificates placed
  in the same slot by several workers do not hit the CA in the same second).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .renewal import RenewalWindow, ratio_window

SLOT_SECONDS = 3 * 3600.0  # the unit renewals are leveled over (issue 11: orders per 3 h)
LEVEL_EARLIEST_SHARE = 1 / 6  # of the lifetime: the earliest a leveled renewal may be
LEVEL_TOLERANCE = 0.05  # slots within 5 % (+1) of the least loaded count as least loaded
LEVEL_MIN_SLOTS = 8  # a window shorter than this (a day) keeps the plain ratio pick


def leveling_window(not_before: float, not_after: float, now: float) -> RenewalWindow:
    """Where a leveled renewal may go: from 1/6 of the lifetime (or `now`, if later) to
    the end of the ratio rule's window. Empty (start == end) when that end has passed:
    the renewal is due now. Worth leveling over only when :func:`levels`."""
    lifetime = max(not_after - not_before, 0.0)
    end = ratio_window(not_before, not_after).end
    start = max(not_before + lifetime * LEVEL_EARLIEST_SHARE, now)
    return RenewalWindow(start=min(start, end), end=end)


def levels(window: RenewalWindow, slot: float = SLOT_SECONDS) -> bool:
    """Whether a window is wide enough to level over; otherwise (short-lived
    certificates, a plan made late) the ratio rule's uniform pick stands."""
    return window.end - window.start >= LEVEL_MIN_SLOTS * slot


def slot_index(moment: float, slot: float = SLOT_SECONDS) -> int:
    """The slot a moment falls in, on a grid anchored at the epoch (every worker and the
    store agree on it without talking)."""
    return math.floor(moment / slot)


def pick_slot(loads: Sequence[int], tolerance: float = LEVEL_TOLERANCE) -> int:
    """The index of the latest slot among the least loaded ones (within tolerance).

    `loads` is the plans per slot across a window, earliest first; at least one."""
    if not loads:
        raise ValueError("no slot to pick from")
    bound = min(loads) * (1 + tolerance) + 1
    for index in range(len(loads) - 1, -1, -1):
        if loads[index] <= bound:
            return index
    raise AssertionError("the minimum is always within the bound")


@dataclass
class SlotLoad:
    """Plans per slot over a span of slots: a snapshot of ``renewal_load``, updated by
    the caller's own placements so one pass spreads its batch too."""

    first_slot: int
    counts: list[int]
    slot: float = SLOT_SECONDS
    placed: int = field(default=0)

    @property
    def start(self) -> float:
        return self.first_slot * self.slot

    @property
    def end(self) -> float:
        return (self.first_slot + len(self.counts)) * self.slot

    def covers(self, window: RenewalWindow) -> bool:
        return self.start <= window.start and window.end <= self.end

    def place(self, window: RenewalWindow, uniform: Callable[[], float] = random.random) -> float:
        """A moment in `window`: uniformly random within the latest least loaded slot,
        which then counts one more plan. A window outside the snapshot, or empty, gets
        the uniform pick (and counts nowhere)."""
        if window.end <= window.start or not self.covers(window):
            return window.pick(uniform)
        first = slot_index(window.start, self.slot) - self.first_slot
        last = min(slot_index(window.end, self.slot) - self.first_slot, len(self.counts) - 1)
        chosen = first + pick_slot(self.counts[first : last + 1])
        self.counts[chosen] += 1
        self.placed += 1
        slot_start = (self.first_slot + chosen) * self.slot
        low = max(slot_start, window.start)
        high = min(slot_start + self.slot, window.end)
        return low + uniform() * max(high - low, 0.0)


def span_slots(start: float, end: float, slot: float = SLOT_SECONDS) -> tuple[int, int]:
    """(first slot, number of slots) covering [start, end]."""
    first = slot_index(start, slot)
    return first, slot_index(end, slot) - first + 1
