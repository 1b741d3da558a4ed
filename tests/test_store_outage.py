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
import copy as copying
import logging
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import aiohttp.abc
import pytest
from support.clicks import new_host
from support.edge import ADMIN_TOKEN, EdgeHandle, client_context, enable_admin
from support.net import free_port
from support.renewal import served_serial

from certstore import SCHEMES, DomainState, Store, StoredCertificate, open_store
from certstore.crypto import Sealer, generate_key_text, parse_key_text
from certstore.errors import StoreUnavailable
from certstore.readthrough import (
    HostSnapshot,
    LocalCopy,
    ReadThroughStore,
    needs_read_through,
    role_methods,
)
from proxy.app import wiring
from proxy.app.health import readiness
from proxy.app.wiring import EdgeWorker
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer

KEY = parse_key_text(generate_key_text(), "test")
LOSS_DELAY = 0.3  # how long a call takes to find the database gone (PostgreSQL: ~2-3 s)


class FlakyStore:
    """A store whose database can be switched off: every call then waits `delay` and
    raises StoreUnavailable. Counts the calls that reached it."""

    def __init__(self, inner: Store, switch: Switch) -> None:
        self._inner = inner
        self._switch = switch
        self.calls = 0
        self.names: Counter[str] = Counter()  # the calls that reached it, by method

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)
        if name in ("close", "events_pushed"):  # not coroutines: never reach the database
            return method

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            self.names[name] += 1
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


async def test_an_unusable_copy_path_leaves_the_circuit_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inner = await open_store(tmp_path / "primary.db", KEY)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    store = await ReadThroughStore.open(inner, KEY, str(blocker / "copy.db"), 10)
    try:
        assert store.copy is None
        assert "running without it" in caplog.text
        assert await cast(Store, store).last_event_id() == 0
    finally:
        await store.close()


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


async def test_the_click_paths_reads_are_handed_to_the_copy_not_read_again(
    wrapped: Wrapped,
) -> None:
    """A cold lookup reads the certificate and the domain (at once, as the click path
    does); the host's snapshot takes those two and reads only the options and files."""
    host = "links.once.test"
    await registered(wrapped, host, files=True)
    store = wrapped.store
    before = Counter(wrapped.flaky.names)
    cert, domain = await asyncio.gather(store.get_certificate(host), store.get_domain(host))
    assert cert is not None and domain is not None
    await store.settle()
    assert wrapped.flaky.names - before == Counter(
        get_certificate=1, get_domain=1, get_options=1, list_host_files=1
    )
    wrapped.switch.down = True  # and the copy holds the host whole
    copied = await store.get_certificate(host)
    assert copied is not None and copied.key_pem == cert.key_pem
    assert (await store.get_domain(host)) == domain
    found = await store.get_host_file(host, "assetlinks.json")
    assert found is not None and found.content == b"[]"


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


# -- two workers on one store and one local copy: real Pebble, DNS, TLS clients -----------

SYNC = 1.0  # lifecycle.sync_seconds (the default)
BOUND = 10.0  # generous bound for effects; the measured delays are printed, not asserted


class Outage:
    """How a test takes the store's database away and brings it back (blocking calls)."""

    def __init__(self, stop: Callable[[], None], start: Callable[[], None]) -> None:
        self.stop = stop
        self.start = start


@dataclass
class Pair:
    a: EdgeHandle  # worker slot 0: the admin API
    b: EdgeHandle  # another worker on the same store and the same local copy
    api: str
    outage: Outage
    key: bytes
    copy_path: Path

    def workers(self) -> list[EdgeWorker]:
        assert self.a.worker is not None and self.b.worker is not None
        return [self.a.worker, self.b.worker]

    def circuits_down(self) -> list[bool]:
        return [w.read_through.circuit.down for w in self.workers() if w.read_through]

    async def client_store(self) -> Store:
        """A separate client of the same store (the test's own view, not a worker's)."""
        return await open_store(self.a.config.store.location(), self.key)


async def start_pair(edge_config: EdgeHandle, tmp_path: Path, outage: Outage) -> Pair:
    a = edge_config
    config = a.config
    config.store.local_copy = str(tmp_path / "local-copy.db")
    config.lifecycle.sync_seconds = SYNC
    config.tls.revalidate_seconds = 3.0  # revalidations keep failing during the outage
    api = enable_admin(a, tmp_path)
    b_config = copying.deepcopy(config)
    b_config.listen.https = f"{a.ip}:{free_port(a.ip)}"  # its own port: a handshake picks it
    b_config.admin.listen = ""
    b = EdgeHandle(ip=a.ip, target=a.target, config=b_config, key_text=a.key_text)
    await a.start()
    b.worker = EdgeWorker(b_config, primary=False)
    try:
        await b.worker.start()
    except BaseException:
        await a.stop()
        raise
    pair = Pair(a, b, api, outage, parse_key_text(a.key_text, "test"), tmp_path / "local-copy.db")
    assert all(w.read_through is not None for w in pair.workers())
    return pair


@pytest.fixture
async def flaky_pair(
    edge_config: EdgeHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Pair]:
    """Two workers on SQLite behind FlakyStore (wrapped as a remote store would be)."""
    switch = Switch()
    real_open = wiring.open_store

    async def flaky_open(config: Any, clock: Callable[[], float] = time.time) -> Store:
        return cast(Store, FlakyStore(await real_open(config, clock), switch))

    monkeypatch.setattr(wiring, "open_store", flaky_open)
    monkeypatch.setattr(wiring, "needs_read_through", lambda _url: True)

    def stop() -> None:
        switch.down = True

    def start() -> None:
        switch.down = False

    pair = await start_pair(edge_config, tmp_path, Outage(stop, start))
    try:
        yield pair
    finally:
        switch.down = False
        await pair.b.stop()
        await pair.a.stop()


@pytest.fixture
async def pg_pair(edge_config: EdgeHandle, tmp_path: Path, request: Any) -> AsyncIterator[Pair]:
    """Two workers on a real PostgreSQL that the test stops and starts."""
    if "postgresql" not in SCHEMES:
        pytest.skip("the PostgreSQL store backend is not in this tree yet")
    postgres = request.getfixturevalue("postgres")
    edge_config.config.store.url = postgres.url(postgres.create_database())
    stopped = [False]

    def stop() -> None:
        stopped[0] = True
        postgres.stop()

    def start() -> None:
        postgres.start()
        stopped[0] = False

    pair = await start_pair(edge_config, tmp_path, Outage(stop, start))
    try:
        yield pair
    finally:
        if stopped[0]:  # the session's server is never left stopped
            postgres.start()
        await pair.b.stop()
        await pair.a.stop()


@dataclass
class ClickLog:
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    slowest: float = 0.0


async def click_status(session: aiohttp.ClientSession, edge: EdgeHandle, host: str) -> str:
    try:
        async with session.get(
            f"https://{host}:{edge.https_port}/c/outage", allow_redirects=False
        ) as resp:
            await resp.read()
            return str(resp.status)
    except (aiohttp.ClientError, ssl.SSLError, OSError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"


async def keep_clicking(
    pair: Pair, pebble: PebbleServer, hosts: list[str], done: asyncio.Event, log: ClickLog
) -> None:
    """A new TLS connection per click, round robin over both workers and the hosts."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            resolver=_Static(pair.a.ip), ssl=client_context(pebble), force_close=True
        ),
        timeout=aiohttp.ClientTimeout(total=30),
    ) as session:
        while not done.is_set():
            for edge in (pair.a, pair.b):
                for host in hosts:
                    started = time.monotonic()
                    status = await click_status(session, edge, host)
                    log.slowest = max(log.slowest, time.monotonic() - started)
                    if status == "302":
                        log.ok += 1
                    else:
                        log.failed.append(f"{host} on {edge.https_port}: {status}")


class _Static(aiohttp.abc.AbstractResolver):
    def __init__(self, ip: str) -> None:
        self._ip = ip

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[dict[str, Any]]:
        return [
            {
                "hostname": host,
                "host": self._ip,
                "port": port,
                "family": 2,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        return None


async def handshake_outcome(edge: EdgeHandle, host: str, pebble: PebbleServer) -> str:
    try:
        return await served_serial(edge.ip, edge.https_port, host, client_context(pebble))
    except ssl.SSLError as exc:
        return f"refused: {exc.reason}"
    except (OSError, TimeoutError) as exc:
        return f"failed: {exc}"


async def waited(predicate: Callable[[], Awaitable[bool]], bound: float = BOUND) -> float:
    """Poll until true; the seconds it took (the test fails beyond `bound`)."""
    started = time.monotonic()
    while not await predicate():
        assert time.monotonic() - started < bound, "not within the bound"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def suspend(pair: Pair, host: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{pair.api}/v1/hosts/{host}/suspend",
            json={"reason": "outage test"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()


async def registered_host(pair: Pair, store: Store, dns: DNSServer, label: str) -> str:
    host = new_host(pair.a, label)
    await store.add_domain(host, "acct-test")
    dns.set_cname(host, pair.a.target)
    return host


async def run_outage(
    pair: Pair,
    pebble: PebbleServer,
    dns: DNSServer,
    caplog: pytest.LogCaptureFixture,
    seconds: float,
) -> None:
    caplog.set_level(logging.INFO)
    store = await pair.client_store()
    try:
        cached = await registered_host(pair, store, dns, "cached")
        copied = await registered_host(pair, store, dns, "copied")
        fresh = await registered_host(pair, store, dns, "fresh")  # never read before
        # `cached`: clicked on both workers (their TLS and host caches hold it);
        # `copied`: clicked on A only, so B can only have it from the node's local copy
        serial = await handshake_outcome(pair.a, cached, pebble)
        assert not serial.startswith(("refused", "failed")), serial
        assert await handshake_outcome(pair.b, cached, pebble) == serial
        assert not (await handshake_outcome(pair.a, copied, pebble)).startswith("refused")
        await asyncio.sleep(3 * SYNC)  # both follow the issuance events (the copy too)
        for worker in pair.workers():
            assert worker.read_through is not None
            await worker.read_through.settle()
        assert pair.b.worker is not None and pair.b.worker.manager is not None
        assert pair.b.worker.manager.cached_context(copied) is None
        view = LocalCopy(str(pair.copy_path), Sealer(pair.key), 10)
        try:  # what the copy holds: every host read once, certificate included
            for host in (cached, copied):
                snap = view.host(host, time.time())
                assert snap is not None and snap.certificate is not None, host
            assert view.host(fresh, time.time()) is None
        finally:
            view.close()

        log = ClickLog()
        done = asyncio.Event()
        clicker = asyncio.ensure_future(keep_clicking(pair, pebble, [cached, copied], done, log))
        await asyncio.sleep(0.5)
        before = log.ok
        lost_at = time.monotonic()
        try:
            await asyncio.to_thread(pair.outage.stop)
            detect = await waited(lambda: _true(all(pair.circuits_down())), bound=seconds)
            # a new host: refused at once, with the reason logged
            refusals = []
            for _ in range(3):
                started = time.monotonic()
                outcome = await handshake_outcome(pair.b, fresh, pebble)
                refusals.append(time.monotonic() - started)
                assert outcome.startswith("refused: ") and "INTERNAL_ERROR" in outcome, outcome
                await asyncio.sleep(1.1)  # past the 1 s refusal memory: the store path again
            lines = [r.getMessage() for r in caplog.records if f"refused {fresh}" in r.getMessage()]
            assert lines and "store unavailable" in lines[0], lines
            ready, checks = await readiness(pair.workers()[0])
            assert ready and checks["store"].startswith("degraded: "), checks
            await asyncio.sleep(max(0.0, seconds - (time.monotonic() - lost_at)))
            during = log.ok - before
        finally:
            await asyncio.to_thread(pair.outage.start)
        back_at = time.monotonic()
        recover = await waited(lambda: _true(not any(pair.circuits_down())), bound=30)
        done.set()
        await clicker
        assert not log.failed, log.failed[:10]
        assert pair.b.worker.read_through is not None
        assert pair.b.worker.read_through.copy_reads > 0  # `copied` came from the copy on B

        # recovered by itself: the new host is now ordered and served
        first = await waited(
            lambda: _not_refused(handshake_outcome(pair.b, fresh, pebble)), bound=30
        )
        # a suspension made now reaches both workers
        suspended_at = time.monotonic()
        await suspend(pair, cached)
        delays = []
        for edge in (pair.a, pair.b):
            await waited(lambda e=edge: _refused(handshake_outcome(e, cached, pebble)))
            delays.append(time.monotonic() - suspended_at)

        circuit = [r for r in caplog.records if r.name == "certstore.readthrough"]
        losses = [r for r in circuit if "the store is unreachable:" in r.getMessage()]
        recoveries = [r for r in circuit if "reachable again" in r.getMessage()]
        assert len(losses) >= 2 and len(losses) == len(recoveries), (losses, recoveries)
        assert all(r.levelname == "WARNING" for r in losses)
        ours = ("proxy.", "certstore.", "acme_client.", "linkedge")
        tracebacks = [r for r in caplog.records if r.exc_info]
        assert not [r.getMessage() for r in tracebacks if r.name.startswith(ours)]
        foreign = sorted({r.name for r in tracebacks})  # a driver's own (e.g. asyncpg's pool)
        print(
            f"\noutage {seconds:.0f} s: {during} clicks served during it, {len(log.failed)} "
            f"failed ({log.ok} in all, slowest {log.slowest:.2f} s); store loss noticed by "
            f"both workers in {detect:.2f} s; new host refused in "
            + ", ".join(f"{t * 1000:.0f}" for t in refusals)
            + f" ms; recovered {recover:.2f} s after the database returned; new host "
            f"served {first:.2f} s later; suspension reached A in {delays[0]:.2f} s, B in "
            f"{delays[1]:.2f} s; losses logged {len(losses)}, recoveries {len(recoveries)}; "
            f"tracebacks logged by other libraries: {len(tracebacks)} {foreign}"
        )
        del back_at
    finally:
        await store.close()


async def _true(value: bool) -> bool:
    return value


async def _refused(outcome: Awaitable[str]) -> bool:
    return (await outcome).startswith("refused")


async def _not_refused(outcome: Awaitable[str]) -> bool:
    return not (await outcome).startswith(("refused", "failed"))


async def test_an_outage_behind_the_switch_costs_no_click(
    flaky_pair: Pair, pebble: PebbleServer, dns_server: DNSServer, caplog: pytest.LogCaptureFixture
) -> None:
    await run_outage(flaky_pair, pebble, dns_server, caplog, seconds=8)


async def test_postgresql_stopped_for_30_s_costs_no_click_on_cached_hosts(
    pg_pair: Pair, pebble: PebbleServer, dns_server: DNSServer, caplog: pytest.LogCaptureFixture
) -> None:
    await run_outage(pg_pair, pebble, dns_server, caplog, seconds=30)


async def restart_during_an_order(pair: Pair, pebble: PebbleServer, dns: DNSServer) -> None:
    """The database restarts right after an order was recorded, before the CA validates."""
    store = await pair.client_store()
    try:
        host = await registered_host(pair, store, dns, "inflight")
        orders_before = pebble.order_count()
        finalized_before = pebble.log_text().count("POST /finalize-order/")
        a = pair.a.worker
        assert a is not None and a.read_through is not None
        through = a.read_through
        real_put = through.put_pending_order  # type: ignore[attr-defined]
        restarted: list[float] = []

        async def put_then_restart(order: Any) -> None:
            await real_put(order)
            if not restarted:  # the order is at the CA and in the store: now the fail-over
                started = time.monotonic()
                await asyncio.to_thread(pair.outage.stop)
                await asyncio.sleep(1.0)  # down long enough for every worker to notice
                await asyncio.to_thread(pair.outage.start)
                restarted.append(time.monotonic() - started)

        through.put_pending_order = put_then_restart  # type: ignore[attr-defined]
        first = await handshake_outcome(pair.a, host, pebble)  # may be refused: store away
        took = await waited(lambda: _not_refused(handshake_outcome(pair.a, host, pebble)), 30)
        assert restarted, "the restart did not happen during the order"
        serial = await handshake_outcome(pair.a, host, pebble)
        # one order at the CA, one certificate: the order in flight was resumed, not repeated
        assert pebble.order_count() - orders_before == 1
        assert pebble.log_text().count("POST /finalize-order/") - finalized_before == 1
        cert = await store.get_certificate(host)
        assert cert is not None and cert.serial == serial
        assert await store.get_pending_order(host) is None
        issued = [e for e in await store.list_events(host) if e.kind == "issued"]
        assert len(issued) == 1, issued
        # no event lost: the other worker follows the feed from its cursor, past the restart
        await asyncio.sleep(3 * SYNC)
        assert await handshake_outcome(pair.b, host, pebble) == serial
        assert pair.b.worker is not None and pair.b.worker.state_sync is not None
        follower = pair.b.worker.state_sync
        assert follower._cursor == await store.last_event_id()  # noqa: SLF001
        print(
            f"\nrestart took {restarted[0]:.2f} s during the order; first click: {first[:60]};"
            f" served {took:.2f} s later, one order, one certificate"
        )
    finally:
        await store.close()


async def test_a_restart_behind_the_switch_during_an_order_orders_once(
    flaky_pair: Pair, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    await restart_during_an_order(flaky_pair, pebble, dns_server)


async def test_a_postgresql_restart_during_an_order_orders_once_and_loses_no_event(
    pg_pair: Pair, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    await restart_during_an_order(pg_pair, pebble, dns_server)
