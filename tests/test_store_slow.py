"""A slow store call is not an outage (issue 11's fleet findings).

In a busy worker a statement or a pool acquire can time out while PostgreSQL idles; the
read-through circuit must not refuse every click for it. Only a fresh connection that
fails too opens the circuit. Also here: the follower's long waits while the store
pushes, and the lease refresher retrying soon after a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from support.postgres import PostgresServer

from certstore import Store, StoreSlow, StoreUnavailable, generate_key_text, open_store
from certstore.crypto import parse_key_text
from certstore.postgres.schema import RATE_LOCK_CLASS
from certstore.readthrough import ReadThroughStore, StoreCircuit
from proxy.hosts import state_sync
from proxy.tls import certificates

KEY = parse_key_text(generate_key_text(), "test")
GUARD = 60.0  # only keeps a broken backend from hanging the suite; never a timing goal


@pytest.fixture
def url(postgres: PostgresServer) -> str:
    return postgres.url(postgres.create_database())


@pytest.fixture
async def wrapped(url: str) -> AsyncIterator[ReadThroughStore]:
    # a short statement bound: the blocked call below gives up soon (no timing asserted)
    primary = await open_store(url, KEY, statement_timeout=0.5)
    store = ReadThroughStore(primary, None, retry_seconds=0.1)
    yield store
    await store.close()


@contextlib.asynccontextmanager
async def rate_bucket_locked(url: str, bucket: str) -> AsyncIterator[None]:
    """Hold the bucket's advisory lock from another session: a take waits for it."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SELECT pg_advisory_lock($1, hashtext($2))", RATE_LOCK_CLASS, bucket)
        yield
    finally:
        await conn.close()


async def test_a_statement_timeout_fails_the_call_but_does_not_open_the_circuit(
    url: str, wrapped: ReadThroughStore
) -> None:
    async with rate_bucket_locked(url, "orders"):
        with pytest.raises(StoreSlow):
            await asyncio.wait_for(wrapped.as_store().take_rate_token("orders", 5, 60), GUARD)
    checker = wrapped.circuit._checker
    if checker is not None:
        await asyncio.wait_for(checker, GUARD)  # the fresh-connection check ran and passed
    assert wrapped.circuit.slow_calls == 1
    assert not wrapped.circuit.down
    assert wrapped.circuit.outages == 0
    assert await wrapped.as_store().take_rate_token("orders", 5, 60) is not None  # usable at once


async def test_a_slow_call_opens_the_circuit_when_a_fresh_connection_fails_too() -> None:
    answers: list[BaseException | None] = [StoreUnavailable("connection refused")]

    async def reachable() -> None:
        answer = answers.pop(0) if answers else None
        if answer is not None:
            raise answer

    async def probe() -> int:
        return 0

    circuit = StoreCircuit(probe, retry_seconds=0.01, reachable=reachable)
    try:
        circuit.lost(StoreSlow("statement timed out"))
        assert circuit._checker is not None
        await asyncio.wait_for(circuit._checker, GUARD)
        assert circuit.outages == 1  # the fresh connection failed: an outage after all
        assert circuit.slow_calls == 1
        assert "a fresh connection failed too" in circuit.reason
    finally:
        await circuit.close()


def test_store_timeouts_are_configurable() -> None:
    from proxy.app.config import StoreConfig

    config = StoreConfig()
    assert config.timeout_seconds > config.connect_timeout_seconds > 0


# -- the event followers wait long while the store pushes ---------------------------------


class _Pushed:
    def __init__(self, pushed: bool) -> None:
        self.pushed = pushed

    def events_pushed(self) -> bool:
        return self.pushed


def test_followers_wait_long_only_while_events_are_pushed() -> None:
    assert state_sync.follow_wait(_Pushed(True), 1.0) == state_sync.PUSHED_WAIT_SECONDS
    assert state_sync.follow_wait(_Pushed(False), 1.0) == 1.0


async def test_a_listening_postgres_store_says_it_pushes(url: str) -> None:
    store_pg = await open_store(url, KEY)
    try:
        await _pushes(store_pg)
    finally:
        await store_pg.close()


async def _pushes(store_pg: Store) -> None:
    await asyncio.wait_for(store_pg.wait_for_events(0, 0.01), GUARD)  # starts the listener
    for _ in range(500):  # connected within a moment; bounded only against a hang
        if store_pg.events_pushed():
            break
        await asyncio.sleep(0.02)
    assert store_pg.events_pushed()


# -- the lease refresher retries soon after a failure --------------------------------------


class _FlakyLeases:
    """Refreshes fail `failures` times, then succeed."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.refreshes = 0

    async def try_acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        self.refreshes += 1
        if self.failures > 0:
            self.failures -= 1
            raise StoreUnavailable("refused")
        return True


async def test_a_failed_lease_refresh_is_retried_soon_not_a_third_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def recorded(delay: float, *args: Any) -> None:
        delays.append(delay)
        if len(delays) >= 5:
            raise asyncio.CancelledError
        await real_sleep(0)

    monkeypatch.setattr(certificates.asyncio, "sleep", recorded)
    store = _FlakyLeases(failures=2)
    with pytest.raises(asyncio.CancelledError):
        await certificates._refresh_lease(store, "issue:a.test", "me", 30.0)
    # a third of the lease, then 0.5 s and 1 s after the two failures, then a third again
    assert delays[:4] == [10.0, 0.5, 1.0, 10.0]
    assert store.refreshes == 4


class _TakenOver:
    """The lease is granted once; its first refresh finds another holder."""

    def __init__(self) -> None:
        self.released = 0

    async def try_acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        self.calls = getattr(self, "calls", 0) + 1
        return self.calls == 1

    async def release_lease(self, name: str, holder: str) -> None:
        self.released += 1


async def test_a_lease_taken_over_stops_the_work_under_it() -> None:
    store = _TakenOver()
    never = asyncio.Event()
    reached_end = False

    async def order() -> None:
        nonlocal reached_end
        async with certificates.kept_lease(store, "issue:a.test", "me", 0.3) as held:
            assert held
            await never.wait()  # an order step that would outlive the lease
            reached_end = True

    with pytest.raises(certificates.LeaseLost):
        await asyncio.wait_for(order(), GUARD)
    assert not reached_end
    assert store.released == 0  # not ours any more: nothing to release


# -- an idle worker's CA prober does not read the breaker every tick ------------------------


class _CountingBreakers:
    def __init__(self) -> None:
        self.reads = 0
        self.states: dict[str, Any] = {}

    async def get_ca_breaker(self, directory_url: str) -> Any:
        self.reads += 1
        return self.states.get(directory_url)

    async def put_ca_breaker(self, state: Any) -> None:
        self.states[state.directory_url] = state

    async def claim_ca_probe(self, directory_url: str, now: float, next_probe_at: float) -> bool:
        return True


async def test_the_prober_trusts_a_closed_breaker_it_just_saw() -> None:
    from acme_client.breaker import BreakerSettings, CaBreaker

    store = _CountingBreakers()
    breaker = CaBreaker(store, "https://ca.test/dir", BreakerSettings())
    probes: list[int] = []

    async def probe() -> None:
        probes.append(1)

    for _ in range(20):  # 20 ticks of an idle worker's prober
        assert await breaker.probe_if_due(probe) is None
    assert store.reads == 1  # the first tick read it closed; the others trusted that
    await breaker.record_failure("CA down")  # this process opens it: the prober reads again
    reads = store.reads
    await breaker.probe_if_due(probe)
    assert store.reads > reads
