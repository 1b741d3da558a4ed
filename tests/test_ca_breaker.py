"""Issue 8, part 3 (units): the per-CA circuit breaker, sans-IO and through the store;
which errors are the CA's; part 6 (units): kept leases, dead holders, orders in flight."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from acme_client import (
    AcmeError,
    AcmeUnavailable,
    AuthorizationFailed,
    BreakerSettings,
    CaBreaker,
    CaUnavailable,
    IssuanceTimeout,
    OrderLimitReached,
    RateLimited,
    is_ca_failure,
)
from acme_client.breaker import CLOSED, HALF_OPEN, OPEN, decide, transition_failure
from acme_client.breaker import transition_success as closed_again
from certstore import (
    CaBreakerState,
    Store,
    generate_key_text,
    open_store,
)
from certstore.crypto import parse_key_text
from proxy.tls.certificates import kept_lease

URL = "https://ca.test/dir"
SETTINGS = BreakerSettings(failure_threshold=2, probe_seconds=4.0)


def half() -> float:
    return 0.5


# -- the state machine (pure) ------------------------------------------------------


def test_breaker_opens_after_threshold_and_probes_with_jitter() -> None:
    state = CaBreakerState(URL)
    assert decide(state, 100.0).allowed
    state = transition_failure(state, 100.0, "unreachable", SETTINGS, half)
    assert state.state == CLOSED and state.failures == 1
    assert decide(state, 100.0).allowed  # below the threshold: still closed

    state = transition_failure(state, 101.0, "unreachable", SETTINGS, half)
    assert state.state == OPEN and state.opened_at == 101.0
    assert state.next_probe_at == 101.0 + 4.0  # jitter 0.5 -> exactly the interval
    refused = decide(state, 102.0)
    assert not refused.allowed and not refused.probe
    assert refused.retry_at == 105.0
    assert "unavailable" in refused.reason and "unreachable" in refused.reason
    assert decide(state, 105.0) == decide(state, 105.0)
    assert decide(state, 105.0).probe

    # jitter spreads probes over ±25 % of the interval
    low = transition_failure(CaBreakerState(URL, failures=5), 0.0, "x", SETTINGS, lambda: 0.0)
    high = transition_failure(CaBreakerState(URL, failures=5), 0.0, "x", SETTINGS, lambda: 1.0)
    assert (low.next_probe_at, high.next_probe_at) == (3.0, 5.0)
    # a rate-limited CA is not probed again before it said
    held = transition_failure(
        CaBreakerState(URL, failures=1), 0.0, "rateLimited", SETTINGS, half, 60
    )
    assert held.state == OPEN and held.next_probe_at == 60.0


def test_failed_probe_reopens_keeping_the_outage_start_and_success_closes() -> None:
    state = transition_failure(CaBreakerState(URL, failures=1), 10.0, "down", SETTINGS, half)
    probing = CaBreakerState(
        URL, HALF_OPEN, state.failures, state.opened_at, state.next_probe_at, "down"
    )
    again = transition_failure(probing, 20.0, "still down", SETTINGS, half)
    assert again.state == OPEN and again.opened_at == 10.0 and again.next_probe_at == 24.0
    assert again.last_error == "still down" and again.failures == 3
    assert closed_again(again) == CaBreakerState(URL)
    assert decide(closed_again(again), 20.0).allowed


def test_which_failures_are_the_cas() -> None:
    assert is_ca_failure(AcmeUnavailable("ACME server unreachable"))
    assert is_ca_failure(CaUnavailable("breaker open"))
    assert is_ca_failure(RateLimited("the CA's rate limit"))
    # the host's own problems, and our own limiter's decisions, are not
    assert not is_ca_failure(AuthorizationFailed("links.x: http-01 failed"))
    assert not is_ca_failure(OrderLimitReached("300 orders in 3 h"))
    assert not is_ca_failure(IssuanceTimeout("not before the deadline"))
    assert not is_ca_failure(AcmeError("order became invalid"))


# -- through the store -----------------------------------------------------------


KEY_TEXT = generate_key_text()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await open_store(tmp_path / "s.db", parse_key_text(KEY_TEXT, "t"))
    yield s
    await s.close()


async def test_breaker_is_shared_and_one_worker_claims_each_probe(store: Store) -> None:
    now = [1000.0]
    a = CaBreaker(store, URL, BreakerSettings(probe_seconds=2.0), lambda: now[0], half)
    b = CaBreaker(store, URL, BreakerSettings(probe_seconds=2.0), lambda: now[0], half)
    await a.check()
    await a.record_failure("ACME server https://ca.test/dir unreachable: [Errno 111]")
    with pytest.raises(CaUnavailable, match="Errno 111") as info:
        await b.check()  # the other worker sees the open breaker at once
    assert info.value.retry_at == 1002.0

    now[0] = 1002.0
    await b.check()  # b's order is the probe: the next one moves on
    with pytest.raises(CaUnavailable, match="unavailable") as info:
        await a.check()
    assert info.value.retry_at == 1004.0
    await b.record_success()
    await a.check()
    state = await store.get_ca_breaker(URL)
    assert state is not None and state.state == CLOSED and state.failures == 0


async def test_background_probe_closes_the_breaker(store: Store) -> None:
    now = [50.0]
    breaker = CaBreaker(store, URL, BreakerSettings(probe_seconds=2.0), lambda: now[0], half)
    assert await breaker.probe_if_due(_never_called) is None  # closed: nothing to do
    await breaker.record_failure("down")
    assert await breaker.probe_if_due(_never_called) is None  # not due yet

    async def failing() -> None:
        raise AcmeUnavailable("still down")

    now[0] = 52.0
    assert await breaker.probe_if_due(failing) is False
    state = await breaker.state()
    assert state.state == OPEN and state.next_probe_at == 54.0 and "still down" in state.last_error
    now[0] = 54.0
    calls: list[int] = []

    async def answering() -> None:
        calls.append(1)

    assert await breaker.probe_if_due(answering) is True
    assert calls == [1] and (await breaker.state()).state == CLOSED


async def _never_called() -> None:
    raise AssertionError("no probe expected")


async def test_state_changes_reach_the_metrics_gauge(store: Store) -> None:
    from prometheus_client import REGISTRY

    from proxy.app import metrics

    def gauge(state: str) -> float | None:
        return REGISTRY.get_sample_value(
            "linkedge_acme_ca_breaker_state", {"ca": "test-ca", "state": state}
        )

    now = [10.0]
    breaker = CaBreaker(
        store,
        URL,
        BreakerSettings(probe_seconds=2.0),
        lambda: now[0],
        half,
        on_change=lambda state: metrics.set_ca_breaker_state("test-ca", state),
    )
    await breaker.record_failure("down")
    assert gauge("open") == 1 and gauge("closed") == 0
    now[0] = 12.0
    await breaker.check()  # the probe
    await breaker.record_success()
    assert gauge("open") == 0 and gauge("closed") == 1


# -- part 6: leases and orders in flight -------------------------------------------


async def test_kept_lease_is_refreshed_while_held_and_released_after(
    store: Store,
) -> None:
    async with kept_lease(store, "issue:a.test", "me", 0.3) as held:
        assert held
        await asyncio.sleep(0.6)  # twice the ttl: still ours because it is refreshed
        assert not await store.try_acquire_lease("issue:a.test", "other", 10)
    assert await store.try_acquire_lease("issue:a.test", "other", 10)  # released
    async with kept_lease(store, "issue:a.test", "me", 10) as held:
        assert not held


# -- part 5: how long the maintenance loop sleeps ------------------------------------


class _Earliest:
    def __init__(self) -> None:
        self.at: float | None = None
        self.passes = 0

    async def next_maintenance_at(self) -> float | None:
        return self.at

    async def hosts_needing_maintenance(self, now: float, limit: int) -> list[str]:
        self.passes += 1
        return []


class _Limits:
    async def prune(self) -> None:
        pass


class _Manager:
    holder = "node:1:test"
    limits = _Limits()


async def test_maintenance_sleeps_until_the_earliest_due_time_and_wakes_early() -> None:
    from proxy.tls.maintenance import Maintainer, MaintenanceSettings

    store = _Earliest()
    now = 1000.0
    maintainer = Maintainer(
        store,  # type: ignore[arg-type]
        _Manager(),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        "edge.test",
        MaintenanceSettings(interval_seconds=60.0),
        clock=lambda: now,
        uniform=lambda: 0.5,
    )
    assert await maintainer._sleep_for(0) == 60.0  # nothing stored: the safety net
    store.at = now + 7.0
    assert await maintainer._sleep_for(1) == pytest.approx(7.025)
    store.at = now + 3600.0
    assert await maintainer._sleep_for(1) == 60.0  # never longer than the interval
    store.at = now - 5.0  # due, but another worker holds the lease: not a busy loop
    assert await maintainer._sleep_for(0) == 1.0
    assert await maintainer._sleep_for(3) == 0.25

    # the loop: one pass, then asleep until woken by a stored certificate
    store.at = None
    maintainer.start()
    await asyncio.sleep(0.8)  # the start-up jitter (< 1 s), then the first pass
    assert store.passes == 1
    maintainer.wake("a.test")
    await asyncio.sleep(0.1)
    assert store.passes == 2
    await maintainer.close()
