"""Issue 11: the leveling renewal scheduler (acme_client.renewal_slots, RenewalPlanner).

Pure slot choice first, then the planner against a real store: a burst of certificates
issued together is planned over many slots, never after the ratio rule's bound.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from acme_client.renewal import RenewalWindow, ratio_window
from acme_client.renewal_slots import (
    LEVEL_EARLIEST_SHARE,
    SLOT_SECONDS,
    SlotLoad,
    leveling_window,
    levels,
    pick_slot,
    slot_index,
    span_slots,
)
from certstore import RenewalPlan, generate_key_text, open_store
from certstore.crypto import parse_key_text
from proxy.tls.maintenance import RenewalPlanner

DAY = 86400.0
LIFETIME = 90 * DAY


def test_pick_slot_prefers_the_latest_of_the_least_loaded() -> None:
    assert pick_slot([0]) == 0
    assert pick_slot([0, 0, 0]) == 2  # an even load: as late as allowed
    assert pick_slot([5, 0, 3, 0, 9]) == 3
    assert pick_slot([100, 104, 120]) == 1  # within 5 % (+1) of the least loaded
    assert pick_slot([1, 2, 3]) == 1  # min 1: bound 2.05
    with pytest.raises(ValueError):
        pick_slot([])


def test_leveling_window_ends_at_the_ratio_bound_and_starts_at_a_sixth() -> None:
    issued = 1_000_000.0
    window = leveling_window(issued, issued + LIFETIME, now=issued)
    assert window.end == ratio_window(issued, issued + LIFETIME).end == issued + 60 * DAY
    assert window.start == issued + LIFETIME * LEVEL_EARLIEST_SHARE == issued + 15 * DAY
    assert levels(window)
    # planned late: never before now; past the bound: empty, due at the bound
    late = leveling_window(issued, issued + LIFETIME, now=issued + 40 * DAY)
    assert late.start == issued + 40 * DAY and late.end == issued + 60 * DAY
    past = leveling_window(issued, issued + LIFETIME, now=issued + 70 * DAY)
    assert past.start == past.end == issued + 60 * DAY and not levels(past)
    # a short-lived certificate: too narrow to level, the ratio pick stands
    assert not levels(leveling_window(issued, issued + 3600, now=issued))


def test_slot_load_fills_a_burst_from_the_bound_backwards_within_the_window() -> None:
    first, count = span_slots(0.0, 20 * SLOT_SECONDS)
    load = SlotLoad(first, [0] * count)
    window = RenewalWindow(2 * SLOT_SECONDS, 10 * SLOT_SECONDS + 100.0)
    rnd = random.Random(1)
    moments = [load.place(window, rnd.random) for _ in range(90)]
    assert all(window.start <= m <= window.end for m in moments)
    per_slot = Counter(slot_index(m) for m in moments)
    # 9 slots touch the window (2..10): 90 plans spread ~10 each (the tolerance lets a
    # later slot take 1 + 5 % more than the least loaded), none piled up
    assert set(per_slot) == set(range(2, 11))
    assert max(per_slot.values()) - min(per_slot.values()) <= 2
    assert load.placed == 90 and sum(load.counts) == 90
    # the partial last slot only offers its part inside the window
    assert all(m <= window.end for m in moments if slot_index(m) == 10)


def test_slot_load_goes_around_a_loaded_slot_and_keeps_jitter() -> None:
    load = SlotLoad(0, [0, 0, 50, 0])
    window = RenewalWindow(0.0, 4 * SLOT_SECONDS - 1)
    moments = [load.place(window, random.Random(i).random) for i in range(6)]
    assert {slot_index(m) for m in moments} == {0, 1, 3}
    assert len(set(moments)) == 6  # random moments inside the slots
    # outside the snapshot: the uniform pick, counted nowhere
    outside = RenewalWindow(10 * SLOT_SECONDS, 20 * SLOT_SECONDS)
    assert outside.start <= load.place(outside, lambda: 0.5) <= outside.end
    assert load.placed == 6


@pytest.fixture
async def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    now = [1_700_000_000.0]
    s = await open_store(
        f"sqlite:///{tmp_path / 's.db'}",
        parse_key_text(generate_key_text(), "t"),
        clock=lambda: now[0],
    )
    yield s, now
    await s.close()


async def test_planner_spreads_a_burst_that_the_ratio_rule_piles_up(store) -> None:  # type: ignore[no-untyped-def]
    s, now = store
    issued = now[0]
    uniform = RenewalPlanner(s, lambda: now[0], random.Random(2).random, level=False)
    leveled = RenewalPlanner(s, lambda: now[0], random.Random(2).random)
    plain = [await uniform.due_at(issued, issued + LIFETIME) for _ in range(2000)]
    # the existing fleet: 2000 plans, a uniform spread over the ratio window (7.5 days)
    for i, due in enumerate(plain):
        await s.put_renewal(RenewalPlan(f"old{i}.test", due, due, "ratio"))
    burst = [await leveled.due_at(issued, issued + LIFETIME) for _ in range(2000)]
    bound = ratio_window(issued, issued + LIFETIME).end
    assert all(issued + 15 * DAY <= due <= bound for due in burst)
    assert leveled.reads == 1  # one read of the store's load for the whole burst
    both = Counter(slot_index(d) for d in plain + burst)
    plain_only = Counter(slot_index(d) for d in plain)
    # the burst went around the existing plans: the peak per slot did not grow
    assert max(both.values()) <= max(plain_only.values()) + 2
    assert len({slot_index(d) for d in burst}) > 2 * len(plain_only)


async def test_planner_rereads_the_load_after_its_cache_time(store) -> None:  # type: ignore[no-untyped-def]
    s, now = store
    planner = RenewalPlanner(s, lambda: now[0], random.Random(3).random, cache_seconds=60)
    issued = now[0]
    first = await planner.due_at(issued, issued + LIFETIME)
    bound = ratio_window(issued, issued + LIFETIME).end
    assert bound - SLOT_SECONDS < first <= bound  # an empty store: at the bound
    # another worker fills the bound's slot meanwhile
    for i in range(5):
        await s.put_renewal(RenewalPlan(f"w{i}.test", bound - 1, bound - 1, "ratio"))
    now[0] += 61
    second = await planner.due_at(issued, issued + LIFETIME)
    assert planner.reads == 2
    assert slot_index(second) == slot_index(bound) - 1


async def test_planner_levels_on_fresh_counts_after_plans_are_dropped(store) -> None:  # type: ignore[no-untyped-def]
    """Certificates re-issued out of turn drop their plans: a planner told so reads the
    load again, instead of piling the re-issued burst onto the slots past the dropped
    plans (which its snapshot still counts)."""
    s, now = store
    issued = now[0]
    bound = ratio_window(issued, issued + LIFETIME).end
    last = slot_index(bound)
    # the bound's slot holds 3 plans, the 2 slots before it 2 each
    for i, slot in enumerate([last, last, last, last - 1, last - 1, last - 2, last - 2]):
        moment = slot * SLOT_SECONDS + 1
        await s.put_renewal(RenewalPlan(f"p{i}.test", moment, moment, "ratio"))
    planner = RenewalPlanner(s, lambda: now[0], random.Random(4).random, cache_seconds=DAY)
    first = await planner.due_at(issued, issued + LIFETIME)
    assert slot_index(first) == last - 3  # the three latest slots are the loaded ones
    for i in range(3):  # re-issued: the bound's plans leave the window (planned again later)
        await s.put_renewal(RenewalPlan(f"p{i}.test", issued, issued, "ratio"))
    planner.invalidate()
    second = await planner.due_at(issued, issued + LIFETIME)
    assert planner.reads == 2
    assert slot_index(second) == last  # the emptied slot at the bound, seen at once


async def test_short_lived_certificates_keep_the_ratio_pick(store) -> None:  # type: ignore[no-untyped-def]
    s, now = store
    planner = RenewalPlanner(s, lambda: now[0], lambda: 0.0)
    issued = now[0]
    due = await planner.due_at(issued, issued + 6 * 3600)
    assert due == ratio_window(issued, issued + 6 * 3600).start
    assert planner.reads == 0
