"""Order limiters and per-host backoff (acme_client.limits) on a real SQLite store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from acme_client import LimitSettings, OrderLimitReached, OrderLimits, registered_domain
from acme_client.limits import backoff_delay
from certstore import Store, generate_key_text, open_store
from certstore.crypto import parse_key_text

KEY = parse_key_text(generate_key_text(), "test")


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store_path(tmp_path: Path) -> Path:
    return tmp_path / "limits.db"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(store_path: Path, clock: Clock) -> AsyncIterator[Store]:
    s = await open_store(store_path, KEY, clock=clock)
    yield s
    await s.close()


def test_registered_domain_uses_the_public_suffix_list() -> None:
    assert registered_domain("links.shop.com") == "shop.com"
    assert registered_domain("a.b.links.shop.co.uk") == "shop.co.uk"
    assert registered_domain("links.someone.github.io") == "someone.github.io"  # private suffix
    assert registered_domain("click.xn--bcher-kva.de") == "xn--bcher-kva.de"


def test_backoff_schedule_is_1_10_100_minutes_then_daily() -> None:
    steps = [backoff_delay(n, 60, 86400) for n in range(0, 7)]
    assert steps == [0, 60, 600, 6000, 60000, 86400, 86400]


async def test_per_domain_limit_counts_the_registered_domain(store: Store, clock: Clock) -> None:
    limits = OrderLimits(store, LimitSettings(per_domain=2, per_domain_window_seconds=100), clock)
    await limits.before_new_order("a.shop.co.uk")
    await limits.before_new_order("b.c.shop.co.uk")
    with pytest.raises(OrderLimitReached, match="shop.co.uk") as refused:
        await limits.before_new_order("links.shop.co.uk")
    assert refused.value.retry_at == clock.now + 100
    await limits.before_new_order("links.other.co.uk")  # another customer's budget
    clock.now += 101
    await limits.before_new_order("links.shop.co.uk")  # the window slid


async def test_global_limit_refunds_the_domain_token(store: Store, clock: Clock) -> None:
    limits = OrderLimits(
        store, LimitSettings(orders_per_window=2, orders_window_seconds=50, per_domain=5), clock
    )
    await limits.before_new_order("a.one.test")
    await limits.before_new_order("a.two.test")
    with pytest.raises(OrderLimitReached, match="orders_per_window"):
        await limits.before_new_order("a.three.test")
    assert (await store.rate_usage("domain:three.test", 1e9))[0] == 0  # refunded
    await limits.before_new_order("a.one.test", exempt=True)  # ARI renewal: no token
    assert (await store.rate_usage("orders", 50))[0] == 2


async def test_failed_authorizations_are_capped_per_hour(store: Store, clock: Clock) -> None:
    limits = OrderLimits(store, LimitSettings(failed_authz_per_hour=5), clock)
    host = "links.broken.test"
    verdict = await limits.check_host(host)
    assert verdict.allowed and verdict.authz_budget == 5
    await limits.record_failed_authorizations(host, 3)
    await store.clear_backoff(host)
    assert (await limits.check_host(host)).authz_budget == 2
    clock.now += 10
    await limits.record_failed_authorizations(host, 2)
    verdict = await limits.check_host(host)
    assert not verdict.allowed and "5 failed authorizations" in verdict.reason
    assert verdict.retry_at == clock.now - 10 + 3600  # when the oldest leaves the hour
    clock.now += 3595  # the first three have left the hour, the last two have not
    assert (await limits.check_host(host)).authz_budget == 3


async def test_limits_and_backoff_survive_a_restart(store_path: Path, clock: Clock) -> None:
    settings = LimitSettings(orders_per_window=1, orders_window_seconds=3600)
    first = await open_store(store_path, KEY, clock=clock)
    limits = OrderLimits(first, settings, clock)
    await limits.before_new_order("a.shop.test")
    backoff = await limits.record_failure("a.shop.test", "http-01 failed", 1)
    assert backoff.failures == 1 and backoff.next_attempt_at == clock.now + 60
    await first.close()

    second = await open_store(store_path, KEY, clock=clock)  # a new process
    try:
        limits = OrderLimits(second, settings, clock)
        verdict = await limits.check_host("a.shop.test")
        assert not verdict.allowed and "http-01 failed" in verdict.reason
        with pytest.raises(OrderLimitReached):
            await limits.before_new_order("b.other.test")
        clock.now += 61
        assert (await limits.check_host("a.shop.test")).allowed
        again = await limits.record_failure("a.shop.test", "still broken", 1)
        assert again.failures == 2 and again.next_attempt_at == clock.now + 600
        await limits.record_success("a.shop.test")
        assert await second.get_backoff("a.shop.test") is None
    finally:
        await second.close()


async def test_two_processes_cannot_both_take_the_last_token(
    store_path: Path, clock: Clock
) -> None:
    stores = [await open_store(store_path, KEY, clock=clock) for _ in range(2)]
    try:
        results = await asyncio.gather(
            *(s.take_rate_token("orders", 10, 100) for s in stores for _ in range(10))
        )
        assert sum(r is not None for r in results) == 10
    finally:
        for s in stores:
            await s.close()
