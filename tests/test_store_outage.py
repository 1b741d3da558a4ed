"""Issue 11: the database is not in the click path.

While a remote store cannot be reached, every worker keeps serving what it has cached or
can read from its node's local copy (`certstore/readthrough.py`), answers the challenges
it knows, refuses new hosts at once with a logged reason, and recovers by itself.

The first tests drive the wrapper over a real SQLite store behind `FlakyStore`, a switch
that makes every call wait a moment and raise StoreUnavailable, as the PostgreSQL backend
does with its database down. The edge tests run two workers on one store and one local
copy, with real Pebble, DNS and TLS clients: first behind that switch, then on a real
PostgreSQL that is stopped for 30 s (when the PostgreSQL backend is present).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from certstore import DomainState, Store, StoredCertificate, open_store
from certstore.crypto import Sealer, generate_key_text, parse_key_text
from certstore.errors import StoreUnavailable
from certstore.readthrough import (
    HostSnapshot,
    LocalCopy,
    ReadThroughStore,
    needs_read_through,
    role_methods,
)

KEY = parse_key_text(generate_key_text(), "test")
LOSS_DELAY = 0.3  # how long a call takes to find the database gone (PostgreSQL: ~2-3 s)


class FlakyStore:
    """A store whose database can be switched off: every call then waits `delay` and
    raises StoreUnavailable. Counts the calls that reached it."""

    def __init__(self, inner: Store, switch: Switch) -> None:
        self._inner = inner
        self._switch = switch
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)
        if name == "close":
            return method

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self._switch.down:
                await asyncio.sleep(self._switch.delay)
                raise StoreUnavailable("connection refused (database down)")
            return await method(*args, **kwargs)

        return call


@dataclass
class Switch:
    down: bool = False
    delay: float = LOSS_DELAY


@dataclass
class Wrapped:
    store: ReadThroughStore
    inner: Store
    flaky: FlakyStore
    switch: Switch
    copy_path: Path


@pytest.fixture
async def wrapped(tmp_path: Path) -> AsyncIterator[Wrapped]:
    inner = await open_store(tmp_path / "primary.db", KEY)
    switch = Switch()
    flaky = FlakyStore(inner, switch)
    copy_path = tmp_path / "copy.db"
    store = await ReadThroughStore.open(
        cast(Store, flaky), KEY, str(copy_path), 50, retry_seconds=0.1
    )
    try:
        yield Wrapped(store, inner, flaky, switch, copy_path)
    finally:
        await store.close()


def certificate(host: str, serial: str = "0a") -> StoredCertificate:
    now = time.time()
    return StoredCertificate(
        hostname=host,
        chain_pem=b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        key_pem=b"-----BEGIN PRIVATE KEY-----\nSECRET-KEY-MATERIAL\n-----END PRIVATE KEY-----\n",
        names=(host,),
        not_before=now - 60,
        not_after=now + 3600,
        issuer="Test CA",
        created_at=now,
        serial=serial,
        directory_url="https://ca.test/dir",
    )


async def registered(w: Wrapped, host: str, *, files: bool = False) -> None:
    await w.inner.add_domain(host, "acct")
    await w.inner.transition_domain(host, {DomainState.PENDING}, DomainState.ACTIVE, "test")
    await w.inner.put_certificate(certificate(host))
    await w.inner.put_options(host, {"https_upgrade": True})
    if files:
        await w.inner.put_host_file(host, "assetlinks.json", b"[]", '"e1"')


async def until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_only_remote_stores_are_wrapped() -> None:
    assert needs_read_through("postgresql://u@db/linkedge")
    assert not needs_read_through("sqlite:///var/lib/linkedge/linkedge.db")
    assert not needs_read_through("/var/lib/linkedge/linkedge.db")


async def test_every_role_method_goes_through_the_circuit(wrapped: Wrapped) -> None:
    missing = [m for m in role_methods() if not hasattr(ReadThroughStore, m)]
    assert not missing
    assert "events_after" in role_methods() and "try_acquire_lease" in role_methods()
    store = cast(Store, wrapped.store)
    assert await store.last_event_id() == await wrapped.inner.last_event_id()
    wrapped.switch.down = True
    with pytest.raises(StoreUnavailable):
        await store.try_acquire_lease("x", "me", 5)
    reached = wrapped.flaky.calls
    for _ in range(20):  # the circuit is open: nothing waits on the dead database
        with pytest.raises(StoreUnavailable):
            await store.events_after(0)
        with pytest.raises(StoreUnavailable):
            await store.record_event("h.test", "x", "y")
    # only the circuit's background probe (every 0.1 s) reached the store meanwhile
    assert wrapped.flaky.calls - reached <= 3


async def test_click_path_reads_answer_from_the_copy_while_the_store_is_away(
    wrapped: Wrapped, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="certstore.readthrough")
    host, other = "links.known.test", "links.never-read.test"
    await registered(wrapped, host, files=True)
    await registered(wrapped, other)
    store = wrapped.store
    assert (await store.get_domain(host)) is not None  # one read copies the whole host
    await store.settle()

    wrapped.switch.down = True
    domain = await store.get_domain(host)  # finds out (LOSS_DELAY), then the copy answers
    assert domain is not None and domain.state is DomainState.ACTIVE
    cert = await store.get_certificate(host)
    assert cert is not None and cert.key_pem == certificate(host).key_pem
    assert await store.certificate_serial(host) == "0a"
    assert host in await store.certificate_validity([host])
    assert await store.get_options(host) == {"https_upgrade": True}
    found = await store.get_host_file(host, "assetlinks.json")
    assert found is not None and found.content == b"[]"
    assert await store.get_host_file(host, "apple-app-site-association") is None
    # a host the copy does not hold: the copy cannot tell "new" from "unknown"
    with pytest.raises(StoreUnavailable, match="not in the local copy"):
        await store.get_certificate(other)
    with pytest.raises(StoreUnavailable):
        await cast(Store, store).put_options(host, {})

    wrapped.switch.down = False
    await until(lambda: not store.circuit.down)
    assert await store.get_certificate(other) is not None
    lines = [r for r in caplog.records if r.name == "certstore.readthrough"]
    assert [r.levelname for r in lines] == ["WARNING", "INFO"], [r.getMessage() for r in lines]
    assert "unreachable" in lines[0].getMessage()
    assert "reachable again" in lines[1].getMessage()
    assert store.circuit.last_outage_seconds is not None


async def test_the_private_key_is_sealed_in_the_copy_and_a_foreign_key_empties_it(
    wrapped: Wrapped,
) -> None:
    host = "links.sealed.test"
    await registered(wrapped, host)
    await wrapped.store.get_certificate(host)
    await wrapped.store.settle()
    raw = b"".join(p.read_bytes() for p in wrapped.copy_path.parent.glob("copy.db*") if p.is_file())
    assert b"BEGIN CERTIFICATE" in raw  # the chain is public
    assert b"SECRET-KEY-MATERIAL" not in raw and b"PRIVATE KEY" not in raw
    other = LocalCopy(str(wrapped.copy_path), Sealer(parse_key_text(generate_key_text(), "x")), 5)
    try:
        assert other.host_count() == 0  # sealed with another store key: not served, emptied
    finally:
        other.close()


async def test_events_take_suspended_and_removed_hosts_out_of_the_copy(wrapped: Wrapped) -> None:
    store, inner = wrapped.store, wrapped.inner
    suspended, removed = "links.suspended.test", "links.removed.test"
    for host in (suspended, removed):
        await registered(wrapped, host)
        await store.get_domain(host)
    await store.settle()
    await inner.transition_domain(suspended, {DomainState.ACTIVE}, DomainState.SUSPENDED, "op")
    await inner.remove_domain(removed)
    for host in (suspended, removed):
        store.host_changed(host)  # what the event follower does for their events
    await store.settle()

    wrapped.switch.down = True
    with pytest.raises(StoreUnavailable):
        await store.get_domain(removed)
    domain = await store.get_domain(suspended)
    assert domain is not None and domain.state is DomainState.SUSPENDED  # copied again


async def test_the_copy_is_bounded_least_recently_used_first(tmp_path: Path) -> None:
    copy = LocalCopy(str(tmp_path / "copy.db"), Sealer(KEY), max_hosts=10)
    try:
        inner = await open_store(tmp_path / "p.db", KEY)
        try:
            for i in range(30):
                host = f"h{i:02d}.test"
                await inner.add_domain(host, "acct")
                domain = await inner.get_domain(host)
                assert domain is not None
                copy.put_host(HostSnapshot(domain, certificate(host), None), now=1000.0 + i)
                if i == 5:
                    copy.host("h00.test", now=2000.0)  # used lately: stays
        finally:
            await inner.close()
        copy.evict(3000.0)
        assert copy.host_count() <= 10
        assert copy.host("h00.test", 3000.0) is not None
        assert copy.host("h29.test", 3000.0) is not None
        assert copy.host("h01.test", 3000.0) is None
    finally:
        copy.close()


async def test_challenges_known_locally_are_answered_while_the_store_is_away(
    wrapped: Wrapped,
) -> None:
    store = wrapped.store
    await store.put_challenge("tok-written", "tok-written.thumb", "h.test")
    await wrapped.inner.put_challenge("tok-read", "tok-read.thumb", "h.test")
    assert await store.get_challenge("tok-read") == "tok-read.thumb"
    await store.put_alpn_challenge("h.test", "alpn-auth")
    await store.settle()
    wrapped.switch.down = True
    assert await store.get_challenge("tok-written") == "tok-written.thumb"
    assert await store.get_challenge("tok-read") == "tok-read.thumb"
    assert await store.get_alpn_challenge("h.test") == "alpn-auth"
    with pytest.raises(StoreUnavailable):
        await store.get_challenge("tok-unknown")
