"""An order's breaker checks reuse a closed state read a moment ago (acme_client.breaker)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from acme_client import breaker as breaker_module
from acme_client.breaker import OPEN, BreakerSettings, CaBreaker
from acme_client.errors import CaUnavailable
from certstore import Store, generate_key_text, open_store
from certstore.crypto import parse_key_text

URL = "https://ca.test/dir"


class CountingStore:
    """The real store, counting breaker reads."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.reads = 0

    async def get_ca_breaker(self, url: str):  # type: ignore[no-untyped-def]
        self.reads += 1
        return await self._store.get_ca_breaker(url)

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await open_store(tmp_path / "s.db", parse_key_text(generate_key_text(), "t"))
    yield s
    await s.close()


async def test_an_issuance_reads_a_closed_breaker_once(store: Store) -> None:
    counting = CountingStore(store)
    ca = CaBreaker(counting, URL, BreakerSettings())  # type: ignore[arg-type]
    await ca.check(claim=False)  # the look before the order
    await ca.check()  # the order's own check
    await ca.record_success()  # the order worked
    assert counting.reads == 1


async def test_another_workers_opening_is_seen_soon_and_failures_read_fresh(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(breaker_module, "CLOSED_REUSE_SECONDS", 0.05)
    here = CaBreaker(store, URL, BreakerSettings())
    other = CaBreaker(store, URL, BreakerSettings())
    await here.check()
    await other.record_failure("ACME server unreachable")  # another worker opens it
    await asyncio.sleep(0.06)
    with pytest.raises(CaUnavailable, match="unreachable"):
        await here.check()

    # a failure is always counted on the store's state, never on a remembered one
    await other.record_success()
    await here.check()
    await other.record_failure("down again")
    await here.record_failure("down here too")
    state = await store.get_ca_breaker(URL)
    assert state is not None and state.state == OPEN and state.failures == 2
