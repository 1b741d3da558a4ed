"""The storage contract (certstore.ports), run against every backend in support/store_backends.

Every behaviour the edge relies on from its store is asserted here through the protocols
only: a new backend is done when this file passes for it.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from support.store_backends import BACKENDS, Backend, make_backend, writer_process

from certstore import (
    AcmeAccount,
    CaBreakerState,
    Domain,
    DomainExists,
    DomainState,
    HostBackoff,
    HostFile,
    HostImport,
    HostRecord,
    PendingOrder,
    RenewalPlan,
    Sealer,
    Store,
    StoredCertificate,
    StoreError,
    StoreKeyError,
    generate_key_text,
    open_store,
    process_alive,
)
from certstore.crypto import parse_key_text
from certstore.factory import sqlite_path

S = DomainState
ROOT = Path(__file__).resolve().parent.parent


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    # only the PostgreSQL param starts (or reuses) the session's server
    server = request.getfixturevalue("postgres") if request.param == "postgres" else None
    return make_backend(request.param, tmp_path, server)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(backend: Backend, clock: Clock) -> AsyncIterator[Store]:
    s = await backend.open(clock=clock)
    yield s
    await s.close()


def cert(host: str, key: bytes = b"key-1", not_after: float = 2e9) -> StoredCertificate:
    return StoredCertificate(host, b"chain", key, (host,), 0.0, not_after, "ca", 5.0, "0a", "d")


async def kinds(store: Store, after: int) -> list[tuple[str | None, str]]:
    return [(e.hostname, e.kind) for e in await store.events_after(after)]


# -- hosts: a state change and its event are one step -----------------------------------


async def test_transition_is_compare_and_set_with_its_event(store: Store, clock: Clock) -> None:
    await store.add_domain("links.a.test", "acct")
    clock.now += 1
    assert await store.transition_domain("links.a.test", [S.PENDING], S.VERIFIED, "cname ok")
    # compare-and-set: a stale writer changes nothing and logs nothing
    assert not await store.transition_domain("links.a.test", [S.PENDING], S.FAILED, "stale")
    assert not await store.transition_domain("links.gone.test", [S.PENDING], S.FAILED, "x")
    assert await store.transition_domain("links.a.test", [S.VERIFIED], S.ACTIVE, "issued")
    # the same state again: reason and schedule change, no event
    assert await store.transition_domain(
        "links.a.test", [S.ACTIVE], S.ACTIVE, "again", next_check_at=None
    )
    events = [e for e in await store.list_events("links.a.test") if e.kind == "state"]
    assert [(e.from_state, e.to_state, e.detail) for e in reversed(events)] == [
        ("pending", "verified", "cname ok"),
        ("verified", "active", "issued"),
    ]
    assert events[0].at == clock.now
    domain = await store.get_domain("links.a.test")
    assert domain is not None and domain.state is S.ACTIVE and domain.state_reason == "again"
    assert domain.next_check_at is None and domain.state_changed_at == clock.now


async def test_a_change_and_its_event_land_together_or_not_at_all(
    backend: Backend, store: Store
) -> None:
    await store.add_domain("links.a.test", "acct")
    await store.put_host_file("links.a.test", "assetlinks.json", b"[]", '"e1"')
    before = await store.last_event_id()
    async with backend.failing_event_log():
        with pytest.raises(Exception):  # noqa: B017 - whatever the backend raises
            await store.transition_domain("links.a.test", [S.PENDING], S.SUSPENDED, "op")
        with pytest.raises(Exception):  # noqa: B017
            await store.add_domain("links.b.test", "acct")
        with pytest.raises(Exception):  # noqa: B017
            await store.put_options("links.a.test", {"hsts_max_age": 1})
        with pytest.raises(Exception):  # noqa: B017
            await store.put_host_file("links.a.test", "assetlinks.json", b"[1]", '"e2"')
        with pytest.raises(Exception):  # noqa: B017
            await store.delete_host_file("links.a.test", "assetlinks.json")
        with pytest.raises(Exception):  # noqa: B017
            await store.remove_domain("links.a.test")
    # none of the changes happened, and no event was logged
    assert await store.last_event_id() == before
    domain = await store.get_domain("links.a.test")
    assert domain is not None and domain.state is S.PENDING
    assert await store.get_domain("links.b.test") is None
    assert await store.get_options("links.a.test") is None
    file = await store.get_host_file("links.a.test", "assetlinks.json")
    assert file is not None and file.content == b"[]"
    # and with a working log every one of them lands with its event
    assert await store.transition_domain("links.a.test", [S.PENDING], S.SUSPENDED, "op")
    assert await kinds(store, before) == [("links.a.test", "state")]


async def test_every_event_the_store_emits_itself(store: Store) -> None:
    """The table in certstore.ports.EventLog, kind by kind."""
    start = await store.last_event_id()
    await store.add_domain("links.a.test", "acct")
    await store.put_options("links.a.test", {"https_upgrade": True})
    await store.put_host_file("links.a.test", "assetlinks.json", b"[]", '"e1"')
    assert await store.delete_host_file("links.a.test", "assetlinks.json")
    assert not await store.delete_host_file("links.a.test", "assetlinks.json")  # no event
    await store.transition_domain("links.a.test", [S.PENDING], S.VERIFIED, "ok")
    await store.put_certificate(cert("links.a.test"))  # no event unless the caller gives one
    await store.update_checks("links.a.test", reason="x", passed=True)  # no event
    assert await store.remove_domain("links.a.test")
    assert not await store.remove_domain("links.a.test")  # no event
    events = await store.events_after(start)
    assert [e.kind for e in events] == [
        "registered",
        "options_changed",
        "file_updated",
        "file_deleted",
        "state",
        "removed",
    ]
    assert events[0].detail == "account acct"
    assert events[1].detail == '{"https_upgrade": true}'
    assert "assetlinks.json" in events[2].detail and '"e1"' in events[2].detail
    documented = (ROOT / "certstore" / "ports.py").read_text()
    for event in events:
        assert f"``{event.kind}``" in documented  # documented in the EventLog contract


async def test_registration_removal_and_what_goes_with_it(store: Store, clock: Clock) -> None:
    domain = await store.add_domain("a.shop.test", "acct1")
    assert domain.state is S.PENDING and domain.created_at == clock.now
    assert domain.next_check_at == clock.now  # checked at once
    assert not domain.may_issue
    with pytest.raises(DomainExists):
        await store.add_domain("a.shop.test", "acct2")
    assert (await store.get_domain("a.shop.test")).account == "acct1"  # type: ignore[union-attr]

    await store.put_certificate(cert("a.shop.test"))
    await store.put_challenge("t1", "ka", "a.shop.test")
    await store.put_alpn_challenge("a.shop.test", "kb")
    await store.put_options("a.shop.test", {"hsts_max_age": 5})
    await store.put_host_file("a.shop.test", "assetlinks.json", b"[]", '"e"')
    await store.put_renewal(RenewalPlan("a.shop.test", 1.0, 2.0, "ratio"))
    assert [x.hostname for x in await store.list_domains()] == ["a.shop.test"]
    assert await store.remove_domain("a.shop.test")
    assert await store.get_domain("a.shop.test") is None
    assert await store.get_certificate("a.shop.test") is None
    assert await store.get_challenge("t1") is None
    assert await store.get_alpn_challenge("a.shop.test") is None
    assert await store.get_options("a.shop.test") is None
    assert await store.list_host_files("a.shop.test") == []
    assert await store.get_renewal("a.shop.test") is None
    assert not await store.remove_domain("a.shop.test")


async def test_check_results_and_schedule(store: Store, clock: Clock) -> None:
    await store.add_domain("a.shop.test", "acct")
    clock.now += 1
    await store.update_checks(
        "a.shop.test",
        report={"cname": "pass"},
        cname_target_seen="edge.test",
        reason="ok",
        passed=True,
        next_check_at=clock.now + 60,
    )
    clock.now += 1
    for _ in range(2):
        await store.update_checks(
            "a.shop.test", reason="gone", passed=False, cname_target_seen=None
        )
    d = await store.get_domain("a.shop.test")
    assert d is not None and d.state is S.PENDING  # results never change the state
    assert d.verified_at == clock.now - 1  # not overwritten by a failed check
    assert d.last_check_at == clock.now and d.last_check_reason == "gone"
    assert d.failed_checks == 2 and d.cname_target_seen is None
    assert d.next_check_at == clock.now - 1 + 60  # kept
    assert d.last_report == '{"cname": "pass"}'
    # an amendment (passed=None) touches only what it names
    await store.update_checks("a.shop.test", report={"https": "fail"}, reason="https: no")
    await store.update_checks("a.shop.test", passed=False, reset_failures=True)
    d = await store.get_domain("a.shop.test")
    assert d is not None and d.last_report == '{"https": "fail"}' and d.failed_checks == 0
    assert d.last_check_reason == "https: no" and d.verified_at == clock.now - 1
    # the background schedule
    await store.add_domain("b.shop.test", "acct")
    await store.add_domain("c.shop.test", "acct")
    await store.update_checks("c.shop.test", next_check_at=None)  # no background checks
    assert await store.due_for_check(clock.now, 10) == ["b.shop.test"]
    assert await store.due_for_check(clock.now + 100, 10) == ["b.shop.test", "a.shop.test"]
    assert await store.due_for_check(clock.now + 100, 1) == ["b.shop.test"]


async def test_keyset_pages_visit_every_host_once_in_order(store: Store) -> None:
    names = [f"h{i:03d}-{c}.shop.test" for i in range(0, 60, 3) for c in "ab"]
    names += ["xn--bcher-kva.test", "a.test", "z-9.test", "0.test", "a-b.test"]
    for n, host in enumerate(names):
        await store.add_domain(host, "acct-even" if n % 2 == 0 else "acct-odd")
    assert await store.transition_domain("a.test", [S.PENDING], S.VERIFIED, "ok")

    async def walk(limit: int, insert: bool = False, **filters: Any) -> list[str]:
        seen: list[str] = []
        after = None
        while True:
            page = await store.list_domains_page(after=after, limit=limit, **filters)
            assert len(page) <= limit
            if not page:
                return seen
            seen += [d.hostname for d in page]
            after = page[-1].hostname
            if insert and after.startswith("h"):
                insert = False  # hosts registered meanwhile: those after the cursor show up
                await store.add_domain("zz-added.test", "acct-odd")
                await store.add_domain("added.test", "acct-odd")  # before the cursor: not

    everything = await walk(7, insert=True)
    assert everything == sorted(names + ["zz-added.test"])
    assert len(set(everything)) == len(everything)
    assert await walk(1000) == sorted(names + ["zz-added.test", "added.test"])
    odd = await walk(4, account="acct-odd")
    assert odd == sorted(
        [h for n, h in enumerate(names) if n % 2] + ["zz-added.test", "added.test"]
    )
    assert await walk(3, state=S.VERIFIED) == ["a.test"]
    assert await walk(3, account="nobody") == []


async def test_counts_by_state(store: Store) -> None:
    for host in ("a.test", "b.test", "c.test"):
        await store.add_domain(host, "acct")
    await store.transition_domain("a.test", [S.PENDING], S.VERIFIED, "ok")
    assert await store.count_domains_by_state() == {S.PENDING: 2, S.VERIFIED: 1}


# -- options and files -------------------------------------------------------------------


async def test_options_and_files_round_trip(store: Store, clock: Clock) -> None:
    await store.add_domain("a.test", "acct")
    assert await store.get_options("a.test") is None
    await store.put_options("a.test", {"hsts_max_age": 60, "https_upgrade": True})
    assert await store.get_options("a.test") == {"hsts_max_age": 60, "https_upgrade": True}
    content = bytes(range(256)) * 4  # bytes, not text
    stored = await store.put_host_file("a.test", "b-kind", content, '"e1"')
    await store.put_host_file("a.test", "a-kind", b"{}", '"e2"')
    got = await store.get_host_file("a.test", "b-kind")
    assert got == stored and got.content == content and got.updated_at == clock.now
    assert [f.kind for f in await store.list_host_files("a.test")] == ["a-kind", "b-kind"]
    assert await store.get_host_file("a.test", "c-kind") is None


# -- certificates and sealed keys ------------------------------------------------------


async def test_certificate_and_account_round_trip(store: Store) -> None:
    first = StoredCertificate("c.test", b"chain", b"key-1", ("c.test",), 10, 20, "ca", 5)
    await store.put_certificate(first)
    got = await store.get_certificate("c.test")
    assert got == first
    assert "key-1" not in repr(got)
    await store.put_renewal(RenewalPlan("c.test", 1.0, 2.0, "ratio"))
    await store.put_certificate(
        StoredCertificate("c.test", b"chain2", b"key-2", ("c.test",), 15, 25, "ca", 6, "ff", "d")
    )
    got = await store.get_certificate("c.test")
    assert got is not None and got.key_pem == b"key-2" and got.not_after == 25
    assert got.is_valid_at(15) and not got.is_valid_at(25)
    assert await store.get_renewal("c.test") is None  # a new certificate, a new plan
    assert await store.certificate_serial("c.test") == "ff"
    assert await store.certificate_validity(["c.test", "x.test"]) == {"c.test": (15, 25, "ca")}
    assert [c.hostname for c in await store.list_certificates()] == ["c.test"]
    assert await store.delete_certificate("c.test")
    assert not await store.delete_certificate("c.test")
    assert await store.get_certificate("c.test") is None

    await store.save_account(AcmeAccount("https://ca/dir", "https://ca/acct/1", b"acct-key"))
    account = await store.get_account("https://ca/dir")
    assert account == AcmeAccount("https://ca/dir", "https://ca/acct/1", b"acct-key")
    await store.save_account(AcmeAccount("https://ca/dir", "https://ca/acct/2", b"acct-key2"))
    assert (await store.get_account("https://ca/dir")).uri == "https://ca/acct/2"  # type: ignore[union-attr]
    assert await store.get_account("https://other/dir") is None


async def test_sealed_keys_are_never_readable_without_the_key(
    backend: Backend, store: Store
) -> None:
    secret = b"-----BEGIN PRIVATE KEY-----\nTHE-CERT-KEY-0123456789abcdef\n-----END..."
    account_secret = b"THE-ACCOUNT-KEY-0123456789abcdef"
    order_secret = b"THE-ORDER-KEY-0123456789abcdef"
    await store.put_certificate(cert("a.test", secret))
    await store.save_account(AcmeAccount("https://ca/dir", "https://ca/acct/1", account_secret))
    await store.put_pending_order(
        PendingOrder("b.test", "https://ca/dir", "https://ca/o/1", "a", order_secret, ("b",), 1)
    )
    await store.close()
    raw = backend.persisted_bytes()
    assert b"chain" in raw  # looking at the right bytes: the public chain is in clear
    for clear in (secret, account_secret, order_secret, b"THE-CERT-KEY", b"PRIVATE KEY"):
        assert clear not in raw
    with pytest.raises(StoreKeyError):  # a wrong key never opens the store
        await backend.open(key=parse_key_text(generate_key_text(), "t"))
    reopened = await backend.open()  # the right one does, and opens the keys
    try:
        got = await reopened.get_certificate("a.test")
        assert got is not None and got.key_pem == secret
        order = await reopened.get_pending_order("b.test")
        assert order is not None and order.key_pem == order_secret
    finally:
        await reopened.close()


def test_sealing_is_bound_to_the_key_and_the_row() -> None:
    key = parse_key_text(generate_key_text(), "t")
    sealer = Sealer(key)
    sealed = sealer.seal(b"secret", Sealer.row("cert", "a.test"))
    assert b"secret" not in sealed
    assert sealer.open(sealed, Sealer.row("cert", "a.test")) == b"secret"
    with pytest.raises(StoreKeyError):  # copied onto another row
        sealer.open(sealed, Sealer.row("cert", "b.test"))
    with pytest.raises(StoreKeyError):
        Sealer(parse_key_text(generate_key_text(), "t")).open(sealed, Sealer.row("cert", "a.test"))
    with pytest.raises(StoreKeyError):
        sealer.open(sealed[:-1] + bytes([sealed[-1] ^ 1]), Sealer.row("cert", "a.test"))
    sealer.verify_key_check(sealer.key_check())
    with pytest.raises(StoreKeyError, match="does not match"):
        Sealer(parse_key_text(generate_key_text(), "t")).verify_key_check(sealer.key_check())


# -- challenges --------------------------------------------------------------------------


async def test_challenges(store: Store) -> None:
    assert await store.get_challenge("tok") is None
    await store.put_challenge("tok", "tok.thumb", "a.test")
    assert await store.get_challenge("tok") == "tok.thumb"
    await store.put_challenge("tok", "tok.thumb2", "a.test")  # replace
    assert await store.get_challenge("tok") == "tok.thumb2"
    await store.delete_challenge("tok")
    assert await store.get_challenge("tok") is None
    await store.delete_challenge("tok")  # idempotent

    assert await store.get_alpn_challenge("a.test") is None
    await store.put_alpn_challenge("a.test", "ka1")
    await store.put_alpn_challenge("a.test", "ka2")  # one per name
    assert await store.get_alpn_challenge("a.test") == "ka2"
    await store.delete_alpn_challenge("a.test")
    await store.delete_alpn_challenge("a.test")
    assert await store.get_alpn_challenge("a.test") is None


async def test_challenges_are_shared_by_every_connection(backend: Backend, store: Store) -> None:
    other = await backend.open()
    try:
        await store.put_challenge("tok", "tok.thumb", "a.test")
        assert await other.get_challenge("tok") == "tok.thumb"
        await other.delete_challenge("tok")
        assert await store.get_challenge("tok") is None
    finally:
        await other.close()


# -- coordination: leases -------------------------------------------------------------


async def test_lease_acquire_expiry_takeover_refresh(store: Store, clock: Clock) -> None:
    assert await store.try_acquire_lease("issue:a.test", "w1", ttl=10)
    assert not await store.try_acquire_lease("issue:a.test", "w2", ttl=10)
    assert await store.try_acquire_lease("issue:b.test", "w2", ttl=10)  # per name
    clock.now += 5
    assert await store.try_acquire_lease("issue:a.test", "w1", ttl=10)  # refresh: until +15
    clock.now += 9  # past the first expiry, before the refreshed one
    assert not await store.try_acquire_lease("issue:a.test", "w2", ttl=10)
    await store.release_lease("issue:a.test", "w2")  # not the holder: no effect
    assert not await store.try_acquire_lease("issue:a.test", "w2", ttl=10)
    clock.now += 1  # exactly at expiry: lapsed
    assert await store.try_acquire_lease("issue:a.test", "w2", ttl=10)  # takeover
    assert not await store.try_acquire_lease("issue:a.test", "w1", ttl=10)
    await store.release_lease("issue:a.test", "w1")  # the old holder cannot free it
    assert not await store.try_acquire_lease("issue:a.test", "w1", ttl=10)
    await store.release_lease("issue:a.test", "w2")
    assert await store.try_acquire_lease("issue:a.test", "w1", ttl=10)


async def test_one_of_many_concurrent_callers_gets_a_lease(backend: Backend) -> None:
    stores = [await backend.open() for _ in range(3)]
    try:
        for round_ in range(5):
            name = f"issue:race{round_}.test"
            won = await asyncio.gather(
                *(
                    s.try_acquire_lease(name, f"w{i}-{j}", 30)
                    for i, s in enumerate(stores)
                    for j in range(4)
                )
            )
            assert sum(won) == 1
    finally:
        for s in stores:
            await s.close()


async def test_leases_of_a_dead_process_are_released(backend: Backend, store: Store) -> None:
    code = (
        "import asyncio, os, signal, sys\n"
        "from certstore import open_store\n"
        "from certstore.crypto import parse_key_text\n"
        "async def main():\n"
        f"    s = await open_store({backend.url!r}, parse_key_text({backend.key_text!r}, 't'))\n"
        "    assert await s.try_acquire_lease('issue:dead.test', 'child', 600)\n"
        "    assert await s.try_acquire_lease('check:dead.test', 'child', 600)\n"
        "    print(os.getpid(), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "asyncio.run(main())\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert not process_alive(int(child.stdout.split()[0]))
    assert await store.try_acquire_lease("issue:mine.test", "me", 600)  # a live holder
    assert not await store.try_acquire_lease("issue:dead.test", "me", 600)  # still held
    assert sorted(await store.release_dead_leases()) == ["check:dead.test", "issue:dead.test"]
    assert await store.try_acquire_lease("issue:dead.test", "me", 600)
    assert await store.release_dead_leases() == []  # ours stay: we are alive
    assert not await store.try_acquire_lease("issue:mine.test", "other", 600)
    assert process_alive(os.getpid())


# -- coordination: rate log, backoff, breaker, orders in flight --------------------------


async def test_rate_log_sliding_windows(store: Store, clock: Clock) -> None:
    first = await store.take_rate_token("orders", 3, 100)
    assert first is not None
    clock.now += 10
    assert await store.take_rate_token("orders", 3, 100) is not None
    assert await store.take_rate_token("other", 1, 100) is not None  # per bucket
    clock.now += 10
    await store.add_rate_event("orders")  # unconditional use counts too
    assert await store.take_rate_token("orders", 3, 100) is None  # full
    assert await store.rate_usage("orders", 100) == (3, clock.now - 20)
    assert await store.rate_usage("orders", 15) == (2, clock.now - 10)
    await store.refund_rate_token(first)
    assert (await store.rate_usage("orders", 100))[0] == 2
    assert await store.take_rate_token("orders", 3, 100) is not None
    assert await store.take_rate_token("orders", 3, 100) is None
    clock.now += 90  # the use at exactly now - window has left the window
    assert (await store.rate_usage("orders", 100))[0] == 2
    assert await store.take_rate_token("orders", 3, 100) is not None
    assert await store.rate_usage("empty", 100) == (0, None)
    await store.prune_rate_log(clock.now - 1)
    assert await store.rate_usage("orders", 10_000) == (1, clock.now)


async def test_two_callers_cannot_both_take_the_last_token(backend: Backend) -> None:
    a, b = await backend.open(), await backend.open()
    try:
        for round_ in range(10):
            bucket = f"last:{round_}"
            for _ in range(4):
                assert await a.take_rate_token(bucket, 5, 3600) is not None
            got = await asyncio.gather(
                *(s.take_rate_token(bucket, 5, 3600) for s in (a, b, a, b, b, a))
            )
            assert sum(t is not None for t in got) == 1
            assert (await b.rate_usage(bucket, 3600))[0] == 5
    finally:
        await a.close()
        await b.close()


async def test_backoff(store: Store) -> None:
    from certstore import HostBackoff

    assert await store.get_backoff("a.test") is None
    await store.put_backoff(HostBackoff("a.test", 1, 60.0, "invalid"))
    await store.put_backoff(HostBackoff("a.test", 2, 600.0, "invalid again"))
    assert await store.get_backoff("a.test") == HostBackoff("a.test", 2, 600.0, "invalid again")
    await store.clear_backoff("a.test")
    assert await store.get_backoff("a.test") is None


async def test_ca_breaker_probe_is_claimed_exactly_once(backend: Backend, clock: Clock) -> None:
    url = "https://ca/dir"
    stores = [await backend.open(clock=clock) for _ in range(3)]
    a = stores[0]
    try:
        assert await a.get_ca_breaker(url) is None
        assert not await a.claim_ca_probe(url, clock.now, clock.now + 5)  # no breaker
        opened = CaBreakerState(url, "open", 1, clock.now, clock.now + 2, "down")
        await a.put_ca_breaker(opened)
        assert await stores[1].get_ca_breaker(url) == opened
        assert not await a.claim_ca_probe(url, clock.now, clock.now + 5)  # not due yet
        for round_ in range(3):
            clock.now += 3
            claims = await asyncio.gather(
                *(s.claim_ca_probe(url, clock.now, clock.now + 2) for s in stores for _ in range(3))
            )
            assert sum(claims) == 1, round_
            state = await a.get_ca_breaker(url)
            assert state is not None and state.state == "half_open"
            assert state.next_probe_at == clock.now + 2
        await a.put_ca_breaker(CaBreakerState(url, "closed"))
        clock.now += 100
        assert not await a.claim_ca_probe(url, clock.now, clock.now + 2)  # closed: no probe
    finally:
        for s in stores:
            await s.close()


async def test_a_certificate_and_its_event_are_stored_together(store: Store) -> None:
    # issue 9 (crash safety): the issuer passes its "issued" event with the certificate,
    # so a process killed between the two cannot leave a certificate no event tells of
    await store.add_domain("links.a.test", "acct")
    start = await store.last_event_id()
    await store.put_certificate(cert("links.a.test"), event=("issued", "serial 01"))
    stored = await store.get_certificate("links.a.test")
    assert stored is not None and stored.serial == cert("links.a.test").serial
    events = await store.events_after(start)
    assert [(e.hostname, e.kind, e.detail) for e in events] == [
        ("links.a.test", "issued", "serial 01")
    ]
    await store.put_certificate(cert("links.a.test", b"key-2"))  # no event given: none
    assert len(await store.events_after(start)) == 1


async def test_storing_the_certificate_ends_the_pending_order(store: Store) -> None:
    order = PendingOrder(
        "a.test", "https://ca/dir", "https://ca/o/1", "https://ca/acct/1", b"k", ("a.test",), 1.0
    )
    await store.put_pending_order(order)
    assert await store.get_pending_order("a.test") == order
    assert "b'k'" not in repr(order)  # never the key
    await store.delete_pending_order("a.test", "https://ca/o/other")  # not this order
    assert await store.get_pending_order("a.test") == order
    await store.put_certificate(cert("a.test"))
    assert await store.get_pending_order("a.test") is None
    # replacing a certificate ends a newer order too; another host's order stays
    await store.put_pending_order(order)
    other = PendingOrder("b.test", "https://ca/dir", "https://ca/o/2", "a", b"k", ("b.test",), 2)
    await store.put_pending_order(other)
    await store.put_certificate(cert("a.test", b"key-2"))
    assert await store.get_pending_order("a.test") is None
    assert await store.get_pending_order("b.test") == other
    await store.delete_pending_order("b.test", "https://ca/o/2")
    assert await store.get_pending_order("b.test") is None


# -- renewal plans and read models -------------------------------------------------------


async def test_renewal_plans_and_maintenance_queue(store: Store, clock: Clock) -> None:
    assert await store.next_maintenance_at() is None
    await store.put_certificate(cert("a.test", not_after=clock.now + 100))
    await store.put_certificate(cert("b.test", not_after=clock.now + 50))
    assert await store.next_maintenance_at() == 0  # a certificate without a plan
    await store.put_renewal(RenewalPlan("a.test", clock.now + 10, clock.now + 5, "ratio"))
    assert await store.hosts_needing_maintenance(clock.now, 10) == ["b.test"]
    await store.put_renewal(RenewalPlan("b.test", clock.now + 20, clock.now + 30, "ari", "x"))
    assert await store.next_maintenance_at() == clock.now + 5
    assert await store.hosts_needing_maintenance(clock.now + 40, 10) == ["a.test", "b.test"]
    assert await store.get_renewal("b.test") == RenewalPlan(
        "b.test", clock.now + 20, clock.now + 30, "ari", "x"
    )
    assert len(await store.list_renewals()) == 2
    assert await store.renewal_summary(clock.now + 15, 1) == {
        "due": 1,
        "overdue": 1,
        "failing": 1,
    }
    assert [h for h, *_ in await store.soonest_expiries(5)] == ["b.test", "a.test"]
    summary = await store.certificate_summary(clock.now, 60)
    assert summary == {"valid": 1, "expiring": 1, "expired": 0, "soonest_expiry": clock.now + 50}


# -- event log ---------------------------------------------------------------------------


async def test_events_newest_first_and_read_after_a_cursor(store: Store, clock: Clock) -> None:
    start = await store.last_event_id()
    for i, kind in enumerate(["one", "two", "three"]):
        clock.now += 1
        await store.record_event("e.test" if i != 1 else "f.test", kind, f"d{i}")
    await store.record_event(None, "global", "-")
    assert [e.kind for e in await store.list_events("e.test")] == ["three", "one"]
    events = await store.list_events()
    assert [e.kind for e in events] == ["global", "three", "two", "one"]
    assert [e.id for e in events] == sorted((e.id for e in events), reverse=True)
    assert [e.kind for e in await store.list_events(limit=2)] == ["global", "three"]
    after = await store.events_after(start)
    assert [e.kind for e in after] == ["one", "two", "three", "global"]
    assert after[0].at == clock.now - 2 and after[3].hostname is None
    assert [e.kind for e in await store.events_after(after[1].id, limit=1)] == ["three"]
    assert await store.last_event_id() == after[-1].id
    assert await store.events_after(after[-1].id) == []
    assert await store.get_meta("cursor") is None
    await store.put_meta("cursor", "12")
    await store.put_meta("cursor", "13")
    assert await store.get_meta("cursor") == "13"


async def test_a_follower_misses_nothing_while_many_connections_write(backend: Backend) -> None:
    """Ids in commit order: a follower reading `events_after(cursor)` while other
    connections commit events concurrently ends up with every event exactly once. (With
    ids in insert order a later id can commit first; the follower moves its cursor past
    it and never sees the earlier one.)"""
    writers = [await backend.open() for _ in range(3)]
    follower = await backend.open()
    per_task, tasks_per_store = 25, 4
    seen: list[int] = []
    done = asyncio.Event()

    async def write(store: Store, task: int) -> None:
        for i in range(per_task):
            if i % 5 == 0:  # events from triggers take part too
                await store.put_options(f"t{task}.test", {"hsts_max_age": i})
            else:
                await store.record_event(f"t{task}.test", "contract_write", str(i))

    async def follow(cursor: int) -> None:
        while True:
            finished = done.is_set()  # read once more after the writers are done
            for event in await follower.events_after(cursor):
                seen.append(event.id)
                cursor = event.id
            if finished:
                return
            await asyncio.sleep(0)

    try:
        start = await follower.last_event_id()
        reader = asyncio.create_task(follow(start))
        await asyncio.gather(
            *(
                write(s, n * tasks_per_store + t)
                for n, s in enumerate(writers)
                for t in range(tasks_per_store)
            )
        )
        done.set()
        await reader
        everything = [e.id for e in await follower.events_after(start, limit=10_000)]
        assert len(everything) == len(writers) * tasks_per_store * per_task
        assert seen == everything  # nothing skipped, nothing twice, in id order
    finally:
        for s in (*writers, follower):
            await s.close()


async def test_wait_for_events_is_woken_by_another_store_object(backend: Backend) -> None:
    waiter, writer = await backend.open(), await backend.open()
    try:
        await writer.record_event(None, "contract_first", "-")
        cursor = await waiter.last_event_id()
        # events after the cursor exist already: no wait at all
        await asyncio.wait_for(waiter.wait_for_events(cursor - 1, 3600), 60)
        for round_ in range(3):
            cursor = await waiter.last_event_id()
            # an hour's timeout: returning at all means the write woke it (the guard
            # below only keeps a broken backend from hanging the suite)
            woken = asyncio.create_task(waiter.wait_for_events(cursor, 3600))
            await asyncio.sleep(0.2)  # typically parked by now (not required)
            await writer.record_event(f"r{round_}.test", "contract_wake", "-")
            await asyncio.wait_for(woken, 60)
            assert await waiter.events_after(cursor) != []
    finally:
        await waiter.close()
        await writer.close()


# -- several processes at once -------------------------------------------------------------


async def test_concurrent_writers_in_two_processes(backend: Backend) -> None:
    hosts, limit = 40, 50
    setup = await backend.open()
    await setup.close()  # created and migrated before the writers start
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=writer_process, args=(backend.url, backend.key_text, w, hosts, limit))
        for w in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        await asyncio.to_thread(p.join, 120)
    assert [p.exitcode for p in procs] == [0, 0]  # no "database is locked", no other error
    store = await backend.open()
    try:
        domains = await store.list_domains()
        assert len(domains) == 2 * hosts
        events = await store.events_after(0, limit=10_000)
        assert sum(e.kind == "registered" for e in events) == 2 * hosts
        assert sum(e.kind == "options_changed" for e in events) == 2 * hosts
        assert sum(e.kind == "contract_write" for e in events) == 2 * hosts
        assert len({e.id for e in events}) == len(events)
        assert (await store.rate_usage("contract:orders", 3600))[0] == limit  # not one more
        assert await store.get_meta("contract:counter") == str(2 * hosts)  # nothing lost
    finally:
        await store.close()


# -- opening a store ---------------------------------------------------------------------


def test_store_urls() -> None:
    assert sqlite_path("sqlite:///var/lib/linkedge/linkedge.db") == "/var/lib/linkedge/linkedge.db"
    assert sqlite_path("sqlite://localhost/srv/a.db") == "/srv/a.db"
    assert sqlite_path("sqlite:data/a.db") == "data/a.db"
    assert sqlite_path("SQLITE:///x%20y.db") == "/x y.db"
    assert sqlite_path("sqlite::memory:") == ":memory:"
    assert sqlite_path("/var/lib/linkedge/linkedge.db") == "/var/lib/linkedge/linkedge.db"
    assert sqlite_path(Path("rel/a.db")) == "rel/a.db"
    for bad in ("sqlite://host/a.db", "sqlite:///", "sqlite:", ""):
        with pytest.raises(StoreError):
            sqlite_path(bad)


async def test_unknown_scheme_names_the_supported_ones() -> None:
    with pytest.raises(StoreError, match=r"'mysql'.*supported: sqlite:, postgresql:"):
        await open_store("mysql://db/linkedge", parse_key_text(generate_key_text(), "t"))


async def test_a_bare_path_and_its_url_open_the_same_store(tmp_path: Path) -> None:
    key = parse_key_text(generate_key_text(), "t")
    path = tmp_path / "same.db"
    first = await open_store(str(path), key)
    await first.add_domain("a.test", "acct")
    await first.close()
    second = await open_store(f"sqlite://{path}", key)
    try:
        assert await second.get_domain("a.test") is not None
    finally:
        await second.close()


def test_nothing_outside_certstore_names_a_backend_class() -> None:
    allowed = {ROOT / "tests" / "support" / "store_backends.py"}
    backend_classes = ("SQLite" + "Store", "Postgres" + "Store")  # spelt apart: not named here
    offenders = []
    for package in ("proxy", "acme_client", "tests"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            if path not in allowed and any(name in text for name in backend_classes):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


# -- copying a store: restore_domain and list_accounts (certstore.transfer) ---------------


def restored(host: str, **changes: Any) -> Domain:
    """A record as another store holds it: every field set, times as time.time() gives them
    (a backend must keep them exactly, or every copy would see them differ)."""
    fields: dict[str, Any] = {
        "hostname": host,
        "account": "acct-r",
        "state": S.ACTIVE,
        "cname_target_seen": "edge.linkedge.test",
        "verified_at": 1764489601.1234567,
        "last_check_at": 1764489602.7654321,
        "last_check_reason": "cname ok",
        "created_at": 1700000000.0000123,
        "state_reason": "certificate issued",
        "state_changed_at": 1764489603.5,
        "next_check_at": 1764576003.25,
        "failed_checks": 2,
        "last_report": '{"checks": []}',
    }
    fields.update(changes)
    return Domain(**fields)


async def test_restore_domain_inserts_the_record_exactly_and_announces_it(store: Store) -> None:
    record = restored("links.r.test")
    before = await store.last_event_id()
    assert await store.restore_domain(record)  # True: the host was new
    assert await store.get_domain("links.r.test") == record  # every field, not the clock's
    events = await store.events_after(before)
    assert [(e.hostname, e.kind) for e in events] == [("links.r.test", "registered")]
    assert events[0].at == record.created_at
    assert [d.hostname for d in await store.list_domains_page()] == ["links.r.test"]
    assert await store.count_domains_by_state() == {S.ACTIVE: 1}
    # the same record again: nothing changes, nothing is emitted
    after_first = await store.last_event_id()
    assert not await store.restore_domain(record)
    assert await store.last_event_id() == after_first
    assert await store.get_domain("links.r.test") == record
    # unset optional fields are restored as unset
    bare = restored(
        "links.bare.test",
        state=S.PENDING,
        cname_target_seen=None,
        verified_at=None,
        last_check_at=None,
        last_check_reason=None,
        state_changed_at=None,
        next_check_at=None,
        failed_checks=0,
        last_report=None,
    )
    assert await store.restore_domain(bare)
    assert await store.get_domain("links.bare.test") == bare


async def test_restore_domain_overwrites_an_existing_host(store: Store, clock: Clock) -> None:
    await store.add_domain("links.r.test", "acct")
    await store.put_options("links.r.test", {"hsts_max_age": 5})
    await store.put_certificate(cert("links.r.test"))
    before = await store.last_event_id()
    record = restored("links.r.test", account="acct-other", state=S.SUSPENDED)
    assert not await store.restore_domain(record)  # False: it existed
    assert await store.get_domain("links.r.test") == record
    # a change of state is an event like any other; no `registered` for a known host
    events = await store.events_after(before)
    assert [(e.kind, e.from_state, e.to_state, e.detail) for e in events] == [
        ("state", "pending", "suspended", record.state_reason)
    ]
    assert events[0].at == record.state_changed_at
    # the host's other records are not the restore's business
    assert await store.get_options("links.r.test") == {"hsts_max_age": 5}
    assert await store.get_certificate("links.r.test") == cert("links.r.test")
    # the same state with other fields: overwritten without an event
    quieter = restored("links.r.test", state=S.SUSPENDED, failed_checks=0, state_reason="x")
    mark = await store.last_event_id()
    assert not await store.restore_domain(quieter)
    assert await store.get_domain("links.r.test") == quieter
    assert await store.last_event_id() == mark
    # a restored host is a host: it moves on through the lifecycle and can be removed
    clock.now = 1764600000.0
    assert await store.transition_domain("links.r.test", [S.SUSPENDED], S.VERIFIED, "op")
    assert await store.remove_domain("links.r.test")
    assert await store.get_certificate("links.r.test") is None


async def test_a_restore_and_its_event_land_together_or_not_at_all(
    backend: Backend, store: Store
) -> None:
    await store.add_domain("links.old.test", "acct")
    before = await store.get_domain("links.old.test")
    async with backend.failing_event_log():
        with pytest.raises(Exception):  # noqa: B017 - whatever the backend raises
            await store.restore_domain(restored("links.new.test"))
        with pytest.raises(Exception):  # noqa: B017
            await store.restore_domain(restored("links.old.test", state=S.ACTIVE))
    assert await store.get_domain("links.new.test") is None
    assert await store.get_domain("links.old.test") == before


async def test_list_accounts_every_directory_with_its_key(backend: Backend, store: Store) -> None:
    assert await store.list_accounts() == []
    second = AcmeAccount("https://ca-b.test/dir", "https://ca-b.test/acct/9", b"key-b")
    first = AcmeAccount("https://ca-a.test/dir", "https://ca-a.test/acct/1", b"key-a")
    await store.save_account(second)
    await store.save_account(first)
    assert await store.list_accounts() == [first, second]  # by directory URL, keys opened
    replaced = AcmeAccount("https://ca-a.test/dir", "https://ca-a.test/acct/2", b"key-a2")
    await store.save_account(replaced)
    assert await store.list_accounts() == [replaced, second]
    await store.close()
    assert b"key-a2" not in backend.persisted_bytes()  # listed in clear, stored sealed
    again = await backend.open()
    try:
        assert await again.list_accounts() == [replaced, second]
    finally:
        await again.close()


# -- renewal load per slot and the maintenance queue at scale (issue 11) -----------------


async def test_renewal_load_counts_plans_per_slot(store: Store, clock: Clock) -> None:
    assert await store.renewal_load(0.0, 100.0, 10.0) == [0] * 10
    assert await store.renewal_load(50.0, 50.0, 10.0) == []
    for host, due in [("a.test", 0.0), ("b.test", 9.99), ("c.test", 10.0), ("d.test", 35.0)]:
        await store.put_renewal(RenewalPlan(host, due, due + 1000, "ratio"))
    await store.put_renewal(RenewalPlan("e.test", 100.0, 1.0, "ari"))  # at `end`: outside
    await store.put_renewal(RenewalPlan("f.test", -0.5, 1.0, "ari"))  # before `start`
    assert await store.renewal_load(0.0, 100.0, 10.0) == [2, 1, 0, 1, 0, 0, 0, 0, 0, 0]
    # a partial last slot is a whole slot: [30, 40) holds d.test
    assert await store.renewal_load(10.0, 35.0, 10.0) == [1, 0, 1]
    # a plan that moves leaves its old slot
    await store.put_renewal(RenewalPlan("d.test", 55.0, 55.0, "ratio"))
    assert await store.renewal_load(30.0, 60.0, 10.0) == [0, 0, 1]
    await store.put_certificate(cert("a.test"))  # a new certificate drops its plan
    assert await store.renewal_load(0.0, 10.0, 10.0) == [1]


async def test_maintenance_queue_follows_certificates_and_plans(store: Store, clock: Clock) -> None:
    await store.put_certificate(cert("a.test", not_after=clock.now + 100))
    await store.put_renewal(RenewalPlan("a.test", clock.now + 10, clock.now + 10, "ratio"))
    assert await store.hosts_needing_maintenance(clock.now, 10) == []
    assert await store.next_maintenance_at() == clock.now + 10
    await store.put_certificate(cert("a.test", not_after=clock.now + 200))  # renewed
    assert await store.hosts_needing_maintenance(clock.now, 10) == ["a.test"]
    assert await store.next_maintenance_at() == 0
    await store.put_renewal(RenewalPlan("a.test", clock.now + 20, clock.now + 20, "ratio"))
    assert await store.hosts_needing_maintenance(clock.now + 30, 10) == ["a.test"]
    # a plan without a certificate (written after a purge) is never a host to visit
    await store.put_renewal(RenewalPlan("gone.test", 1.0, 1.0, "ratio"))
    assert await store.hosts_needing_maintenance(clock.now + 30, 10) == ["a.test"]
    assert await store.next_maintenance_at() == clock.now + 20
    assert await store.delete_certificate("a.test")
    assert await store.hosts_needing_maintenance(clock.now + 30, 10) == []
    assert await store.next_maintenance_at() is None
    await store.add_domain("b.test", "acct")
    await store.put_certificate(cert("b.test"))
    await store.put_certificate(cert("c.test"))
    assert await store.remove_domain("b.test")  # takes its certificate with it
    assert await store.hosts_needing_maintenance(clock.now, 1) == ["c.test"]
    assert await store.hosts_needing_maintenance(clock.now, 10) == ["c.test"]


async def test_counts_by_state_follow_every_change(store: Store, clock: Clock) -> None:
    assert await store.count_domains_by_state() == {}
    for host in ("a.test", "b.test", "c.test"):
        await store.add_domain(host, "acct")
    assert await store.count_domains_by_state() == {S.PENDING: 3}
    assert await store.transition_domain("a.test", [S.PENDING], S.VERIFIED, "ok")
    assert await store.transition_domain("a.test", [S.VERIFIED], S.ACTIVE, "issued")
    assert await store.transition_domain("b.test", [S.PENDING], S.PENDING, "again")  # same
    assert not await store.transition_domain("c.test", [S.ACTIVE], S.SUSPENDED, "no")
    assert await store.count_domains_by_state() == {S.PENDING: 2, S.ACTIVE: 1}
    assert await store.remove_domain("a.test")
    assert await store.remove_domain("b.test")
    assert not await store.remove_domain("b.test")
    assert await store.count_domains_by_state() == {S.PENDING: 1}


async def test_renewal_load_on_the_schedulers_grid_follows_every_change(
    store: Store, clock: Clock
) -> None:
    slot = 3 * 3600.0  # the leveling scheduler's grid (acme_client.renewal_slots)
    base = 1_700_006_400.0  # a multiple of 3 h
    assert base % slot == 0
    for i, offset in enumerate([0.0, 1.0, slot - 1, slot, 5 * slot + 7]):
        await store.put_renewal(RenewalPlan(f"p{i}.test", base + offset, 0.0, "ratio"))
    assert await store.renewal_load(base, base + 6 * slot, slot) == [3, 1, 0, 0, 0, 1]
    assert await store.renewal_load(base + slot, base + 2 * slot, slot) == [1]
    await store.put_renewal(RenewalPlan("p0.test", base + 2 * slot, 0.0, "ratio"))  # moved
    await store.put_renewal(RenewalPlan("p1.test", base + 1.0, 5.0, "ari", "x"))  # same slot
    assert await store.renewal_load(base, base + 3 * slot, slot) == [2, 1, 1]
    await store.add_domain("p2.test", "acct")
    await store.put_certificate(cert("p3.test"))  # a new certificate drops the plan
    assert await store.remove_domain("p2.test")  # and so does removing the host
    assert await store.renewal_load(base, base + 6 * slot, slot) == [1, 0, 1, 0, 0, 1]
    assert await store.renewal_load(base - 2 * slot, base, slot) == [0, 0]


async def test_a_plan_written_over_an_old_one_leaves_the_queue(store: Store, clock: Clock) -> None:
    await store.put_renewal(RenewalPlan("a.test", clock.now + 10, clock.now + 10, "ratio"))
    await store.put_certificate(cert("a.test"))  # drops the plan: the host waits for one
    assert await store.hosts_needing_maintenance(clock.now, 10) == ["a.test"]
    await store.put_renewal(RenewalPlan("a.test", clock.now + 10, clock.now + 10, "ratio"))
    await store.put_renewal(RenewalPlan("a.test", clock.now + 20, clock.now + 20, "ari"))
    assert await store.hosts_needing_maintenance(clock.now, 10) == []


# -- counters the gauges read (kept by the backend, whatever changes them) -----------------


async def test_certificate_summary_follows_every_change(store: Store, clock: Clock) -> None:
    hour = 3600.0
    now = 1_764_489_600.0 + 1234.5  # inside an hour, not on its edge
    clock.now = now

    async def summary(horizon: float = 0.0, at: float = now) -> tuple[int, int, int]:
        s = await store.certificate_summary(at, horizon)
        return s["valid"], s["expiring"], s["expired"]

    assert await summary(7 * 86400) == (0, 0, 0)
    assert (await store.certificate_summary(now, 0))["soonest_expiry"] is None
    # expiries around `now` in its own hour, the hours either side, far away
    for host, not_after in {
        "gone.test": now - 2 * hour,
        "just-gone.test": now - 1.0,
        "exactly-now.test": now,  # not_after <= now: expired
        "soon.test": now + 0.5,
        "next-hour.test": now + hour,
        "far.test": now + 30 * 86400,
    }.items():
        await store.put_certificate(cert(host, not_after=not_after))
    assert await summary() == (3, 0, 3)
    assert await summary(hour) == (1, 2, 3)
    assert await summary(30 * 86400) == (0, 3, 3)
    assert await summary(at=now - 1.5) == (5, 0, 1)  # another `now` in the same hour
    assert (await store.certificate_summary(now, 0))["soonest_expiry"] == now - 2 * hour
    # renewed: a new expiry (another hour, then the same hour), then replaced in place
    await store.put_certificate(cert("gone.test", not_after=now + 2 * hour))
    await store.put_certificate(cert("just-gone.test", not_after=now + 10.0))
    await store.put_certificate(cert("soon.test", key=b"key-2", not_after=now + 0.5))
    assert await summary(hour) == (2, 3, 1)
    assert await summary(3 * hour) == (1, 4, 1)
    # purged, and removed with its host
    assert await store.delete_certificate("far.test")
    await store.add_domain("next-hour.test", "acct")
    assert await store.remove_domain("next-hour.test")
    assert not await store.delete_certificate("far.test")
    assert await summary(3 * hour) == (0, 3, 1)
    for host in ("gone.test", "just-gone.test", "exactly-now.test", "soon.test"):
        assert await store.delete_certificate(host)
    assert await summary(7 * 86400) == (0, 0, 0)
    # on the edge of an hour
    edge = now - 1234.5
    await store.put_certificate(cert("edge.test", not_after=edge))
    assert await summary(at=edge) == (0, 0, 1)
    assert await summary(at=edge - 0.001) == (1, 0, 0)
    assert await summary(0.001, at=edge - 0.001) == (0, 1, 0)
    assert await store.delete_certificate("edge.test")
    assert (await store.certificate_summary(now, 0))["soonest_expiry"] is None


async def test_counts_by_state_follow_restores_and_imports(store: Store, clock: Clock) -> None:
    await store.add_domain("a.test", "acct")
    assert await store.restore_domain(restored("b.test", state=S.ACTIVE))
    assert not await store.restore_domain(restored("a.test", state=S.SUSPENDED))
    assert await store.count_domains_by_state() == {S.ACTIVE: 1, S.SUSPENDED: 1}
    await store.import_hosts(
        HostImport(
            new_domains=[restored("c.test", state=S.MOVED), restored("d.test", state=S.ACTIVE)],
            domains=[restored("a.test", state=S.ACTIVE), restored("b.test", state=S.FAILED)],
        )
    )
    assert await store.count_domains_by_state() == {S.ACTIVE: 2, S.FAILED: 1, S.MOVED: 1}
    assert await store.remove_domain("c.test")
    assert await store.count_domains_by_state() == {S.ACTIVE: 2, S.FAILED: 1}


# -- whole hosts in pages (copying a store) ------------------------------------------------


def whole_host(host: str, n: int) -> HostRecord:
    """A host with one of every record (n varies the content)."""
    return HostRecord(
        domain=restored(host),
        options={"hsts_max_age": n},
        files=(
            HostFile(host, "apple-app-site-association", b"{}", f'"a{n}"', 1764489600.25 + n),
            HostFile(host, "assetlinks.json", b"[%d]" % n, f'"b{n}"', 1764489601.5),
        ),
        certificate=cert(host, key=b"cert-key-%d" % n),
        renewal=RenewalPlan(host, 1769000000.5 + n, 1764500000.25, "ari", "ARI 503"),
        pending_order=PendingOrder(
            host,
            "https://ca.test/dir",
            f"https://ca.test/order/{n}",
            "https://ca.test/acct/1",
            b"order-key-%d" % n,
            (host,),
            1764489700.75,
        ),  # fmt: skip
        backoff=HostBackoff(host, 2, 1764493600.5, "rateLimited"),
    )


def everything(records: list[HostRecord]) -> HostImport:
    return HostImport(
        new_domains=[r.domain for r in records],
        options=[(r.hostname, r.options) for r in records if r.options is not None],
        files=[f for r in records for f in r.files],
        certificates=[r.certificate for r in records if r.certificate is not None],
        renewals=[r.renewal for r in records if r.renewal is not None],
        pending_orders=[r.pending_order for r in records if r.pending_order is not None],
        backoffs=[r.backoff for r in records if r.backoff is not None],
    )


async def test_export_and_import_whole_hosts(backend: Backend, store: Store) -> None:
    records = [whole_host(f"h{i}.test", i) for i in range(5)]
    before = await store.last_event_id()
    await store.import_hosts(everything(records))
    assert await store.export_hosts() == records  # every field as given, keys opened
    # each write's own events: registered, options, files at their time of upload
    events = await store.events_after(before, 1000)
    assert sorted((e.hostname, e.kind) for e in events) == sorted(
        [(r.hostname, "registered") for r in records]
        + [(r.hostname, "options_changed") for r in records]
        + [(r.hostname, "file_updated") for r in records for _ in r.files]
    )
    assert {e.at for e in events if e.kind == "file_updated"} == {
        f.updated_at for r in records for f in r.files
    }
    # pages by hostname: after, through, limit
    assert await store.export_hosts(after="h1.test", limit=2) == records[2:4]
    assert await store.export_hosts(after="h0.test", through="h2.test") == records[1:3]
    assert await store.export_hosts(after="h4.test") == []
    assert await store.count_host_records() == {
        "options": 5, "files": 10, "renewals": 5, "backoffs": 5, "pending_orders": 5,
    }  # fmt: skip
    # records of a host nobody registered are neither exported nor counted
    await store.put_certificate(cert("h2a.test"))
    await store.put_backoff(HostBackoff("h2a.test", 1, 1.0, "x"))
    assert [r.hostname for r in await store.export_hosts()] == [r.hostname for r in records]
    assert (await store.count_host_records())["backoffs"] == 5
    await store.close()
    raw = backend.persisted_bytes()
    assert b"cert-key-" not in raw and b"order-key-" not in raw  # sealed at rest


async def test_import_removes_replaces_and_orders_certificates_first(
    store: Store, clock: Clock
) -> None:
    old = whole_host("a.test", 1)
    await store.import_hosts(everything([old, whole_host("b.test", 2)]))
    before = await store.last_event_id()
    new_cert = cert("a.test", key=b"cert-key-new", not_after=3e9)
    new_plan = RenewalPlan("a.test", 5.0, 6.0, "ratio")
    new_order = PendingOrder(
        "a.test", "https://ca.test/dir", "https://ca.test/order/new", "https://ca.test/acct/1",
        b"order-key-new", ("a.test",), 7.0,
    )  # fmt: skip
    moved = restored("a.test", state=S.SUSPENDED, state_reason="op")
    await store.import_hosts(
        HostImport(
            domains=[moved],
            options=[("a.test", {"hsts_max_age": 0})],
            files_removed=[("a.test", "assetlinks.json")],
            # listed after its plan and order, applied before them (which it would drop)
            certificates=[new_cert],
            renewals=[new_plan],
            pending_orders=[new_order],
            backoffs_removed=["a.test"],
            certificates_removed=["b.test"],
            pending_orders_removed=[("b.test", "https://ca.test/order/2")],
        )
    )
    (a, b) = await store.export_hosts()
    assert a.domain == moved and a.options == {"hsts_max_age": 0}
    assert [f.kind for f in a.files] == ["apple-app-site-association"]
    assert (a.certificate, a.renewal, a.pending_order, a.backoff) == (
        new_cert, new_plan, new_order, None,
    )  # fmt: skip
    assert (b.certificate, b.renewal, b.pending_order) == (None, None, None)  # plan went too
    kinds = [(e.hostname, e.kind) for e in await store.events_after(before)]
    assert sorted(kinds) == [
        ("a.test", "file_deleted"), ("a.test", "options_changed"), ("a.test", "state"),
    ]  # fmt: skip
    # a "new" host that exists meanwhile is left alone, a changed one that is gone too
    await store.import_hosts(HostImport(new_domains=[restored("a.test")]))
    await store.import_hosts(HostImport(domains=[restored("gone.test")]))
    assert (await store.get_domain("a.test")) == moved
    assert await store.get_domain("gone.test") is None


async def test_an_import_lands_whole_or_not_at_all(backend: Backend, store: Store) -> None:
    await store.add_domain("a.test", "acct")
    domain = await store.get_domain("a.test")
    before = await store.last_event_id()
    async with backend.failing_event_log():
        with pytest.raises(Exception):  # noqa: B017 - whatever the backend raises
            # the host's record is overwritten (no event) before the options' event fails
            await store.import_hosts(
                HostImport(
                    domains=[restored("a.test", account="acct", state=S.PENDING)],
                    options=[("a.test", {"hsts_max_age": 1})],
                    certificates=[cert("a.test")],
                )
            )
    assert await store.get_domain("a.test") == domain
    assert await store.get_options("a.test") is None
    assert await store.get_certificate("a.test") is None
    assert await store.last_event_id() == before


async def test_a_store_says_whether_its_events_are_pushed(store: Store) -> None:
    await store.wait_for_events(await store.last_event_id(), 0.01)
    assert isinstance(store.events_pushed(), bool)  # a plain answer, never a coroutine
