"""Issue 12: the lean client's connection slots (`proxy/http/lean_client._Slots`).

`Forwarder.forward_now` takes a slot without awaiting; `exchange` waits for one, bounded.
Waiters are served first come, first served, never overtaken by a taker that does not
wait, and a waiter cancelled just as it was handed a slot passes it on.
"""

from __future__ import annotations

import asyncio

from proxy.http.lean_client import _Slots


async def test_taking_without_a_wait_stops_at_the_size() -> None:
    slots = _Slots(2)
    assert slots.take_now() and slots.take_now()
    assert not slots.take_now()
    slots.give()
    assert slots.take_now()


async def test_waiters_come_first_and_in_order() -> None:
    slots = _Slots(1)
    assert slots.take_now()
    order: list[int] = []

    async def wait(n: int) -> None:
        await slots.take()
        order.append(n)

    waiters = [asyncio.ensure_future(wait(n)) for n in range(3)]
    await asyncio.sleep(0)
    slots.give()  # to the first waiter, not to whoever asks next without waiting
    assert not slots.take_now()
    await asyncio.sleep(0)
    slots.give()
    await asyncio.sleep(0)
    slots.give()
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2]
    assert not slots.take_now()  # the last waiter holds the one slot
    slots.give()
    assert slots.take_now()


async def test_a_waiter_cancelled_as_it_gets_a_slot_passes_it_on() -> None:
    slots = _Slots(1)
    assert slots.take_now()
    first = asyncio.ensure_future(slots.take())
    second = asyncio.ensure_future(slots.take())
    await asyncio.sleep(0)
    slots.give()  # handed to `first` ...
    first.cancel()  # ... which is cancelled before it runs
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.wait_for(second, 1)  # the slot went on to `second`
    assert not slots.take_now()
    slots.give()
    assert slots.take_now()


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    slots = _Slots(1)
    assert slots.take_now()
    waiter = asyncio.ensure_future(slots.take())
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    slots.give()
    assert slots.take_now()  # the slot was not handed to the cancelled waiter
