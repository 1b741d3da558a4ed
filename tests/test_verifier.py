"""Background verification and the lifecycle, end to end: real DNS changes, Pebble, the edge.

The verifier's loop is off in these edges (verify.poll_seconds = 0); the tests run its
passes themselves and move a fake clock, so schedules and grace periods need no waiting.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.edge import EdgeHandle, FakeClock, client_context, https_session, tls_handshake

from certstore import DomainState, Store, open_store
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer
from proxy.hosts.checks import CheckSettings, HostChecker
from proxy.hosts.lifecycle import Lifecycle
from proxy.hosts.schedule import Schedule
from proxy.hosts.verifier import Verifier, VerifierSettings

S = DomainState
DAY = 86400.0


@pytest.fixture
async def clocked_edge(edge_config: EdgeHandle) -> AsyncIterator[tuple[EdgeHandle, FakeClock]]:
    clock = FakeClock()
    edge_config.config.verify.give_up_days = 3
    edge_config.config.lifecycle.moved_grace_days = 2
    await edge_config.start(clock)
    yield edge_config, clock
    await edge_config.stop()


def host_name(edge: EdgeHandle, label: str) -> str:
    return f"links.{label}-{edge.ip.split('.')[-1]}.test"


async def run_pass(edge: EdgeHandle) -> int:
    assert edge.worker is not None and edge.worker.verifier is not None
    checked = await edge.worker.verifier.run_once()
    assert edge.worker.state_sync is not None
    await edge.worker.state_sync.poll()  # what every worker does each lifecycle.sync_seconds
    return checked


async def state_kinds(store: Store, host: str) -> list[tuple[str | None, str | None]]:
    return [
        (e.from_state, e.to_state)
        for e in reversed(await store.list_events(host))
        if e.kind == "state"
    ]


async def test_cname_added_late_gets_a_certificate_without_any_click(
    clocked_edge, pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    edge, clock = clocked_edge
    host = host_name(edge, "late")
    store = await edge.open_store()
    await store.add_domain(host, "acct")
    orders = pebble.order_count()

    assert await run_pass(edge) == 1  # a new host is due at once
    domain = await store.get_domain(host)
    assert domain is not None and domain.state is S.PENDING
    assert "does not exist in DNS" in (domain.last_check_reason or "")
    assert domain.next_check_at == pytest.approx(clock() + 60, abs=5)
    assert await run_pass(edge) == 0  # not due again yet

    dns_server.set_cname(host, edge.target)  # the customer finally adds the CNAME
    clock.advance(61)
    assert await run_pass(edge) == 1
    domain = await store.get_domain(host)
    assert domain is not None and domain.state is S.ACTIVE, domain
    assert pebble.order_count() - orders == 1
    assert backend[1] == []  # nobody clicked
    assert await state_kinds(store, host) == [("pending", "verified"), ("verified", "active")]
    report = {c["name"]: c["state"] for c in __import__("json").loads(domain.last_report)["checks"]}
    assert report == {"cname": "pass", "caa": "pass", "https": "pass"}
    # and the first click is served from the stored certificate
    async with https_session(edge, pebble) as session:
        async with session.get(f"https://{host}:{edge.https_port}/c/1", allow_redirects=False) as r:
            assert r.status == 302
    assert pebble.order_count() - orders == 1
    await store.close()


async def test_cname_removed_moves_then_retires_after_grace(
    clocked_edge, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    edge, clock = clocked_edge
    host = host_name(edge, "moving")
    store = await edge.open_store()
    await store.add_domain(host, "acct")
    dns_server.set_cname(host, edge.target)
    await run_pass(edge)
    assert (await store.get_domain(host)).state is S.ACTIVE  # type: ignore[union-attr]

    dns_server.remove(host)  # the customer deletes the record
    clock.advance(edge.config.verify.active_interval_seconds + 1)
    await run_pass(edge)
    moved = await store.get_domain(host)
    assert moved is not None and moved.state is S.MOVED
    assert "no longer reaches the edge" in moved.state_reason
    ctx = client_context(pebble)
    obj = await tls_handshake(edge.ip, edge.https_port, host, ctx)  # still served in grace
    assert obj is not None

    clock.advance(2 * DAY + 1)
    await run_pass(edge)
    retired = await store.get_domain(host)
    assert retired is not None and retired.state is S.FAILED and retired.next_check_at is None
    assert retired.state_reason.startswith("retired")
    assert await store.get_certificate(host) is None
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        await tls_handshake(edge.ip, edge.https_port, host, ctx)
    assert await state_kinds(store, host) == [
        ("pending", "verified"),
        ("verified", "active"),
        ("active", "moved"),
        ("moved", "failed"),
    ]
    await store.close()


async def test_cname_pointed_elsewhere_then_back(
    clocked_edge, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    edge, clock = clocked_edge
    host = host_name(edge, "flip")
    store = await edge.open_store()
    await store.add_domain(host, "acct")
    dns_server.set_cname(host, edge.target)
    await run_pass(edge)
    orders = pebble.order_count()

    dns_server.set_cname(host, "other-esp.example.test")
    clock.advance(edge.config.verify.active_interval_seconds + 1)
    await run_pass(edge)
    moved = await store.get_domain(host)
    assert moved is not None and moved.state is S.MOVED
    assert "points at other-esp.example.test" in moved.state_reason

    dns_server.set_cname(host, edge.target)
    clock.advance(3600 + 1)
    await run_pass(edge)
    back = await store.get_domain(host)
    assert back is not None and back.state is S.ACTIVE and "CNAME is back" in back.state_reason
    assert pebble.order_count() == orders  # the kept certificate is used, no new order
    await store.close()


async def test_caa_forbidding_the_ca_blocks_issuance(
    clocked_edge, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    edge, clock = clocked_edge
    host = host_name(edge, "caa")
    parent = host.split(".", 1)[1]
    store = await edge.open_store()
    await store.add_domain(host, "acct")
    dns_server.set_cname(host, edge.target)
    dns_server.set_caa(parent, [(0, "issue", "digicert.com")])
    orders = pebble.order_count()
    await run_pass(edge)
    pending = await store.get_domain(host)
    assert pending is not None and pending.state is S.PENDING
    assert "caa: CAA at" in (pending.last_check_reason or "") and "digicert.com" in (
        pending.last_check_reason or ""
    )
    assert pebble.order_count() == orders  # no order the CA would refuse anyway

    dns_server.set_caa(parent, [(0, "issue", "letsencrypt.org")])
    clock.advance(61)
    await run_pass(edge)
    assert (await store.get_domain(host)).state is S.ACTIVE  # type: ignore[union-attr]
    await store.close()


async def test_servfail_is_unknown_never_a_failure(
    clocked_edge, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    edge, clock = clocked_edge
    host = host_name(edge, "servfail")
    store = await edge.open_store()
    await store.add_domain(host, "acct")
    dns_server.set_cname(host, edge.target)
    await run_pass(edge)
    dns_server.set_servfail(host)
    try:
        clock.advance(edge.config.verify.active_interval_seconds + 1)
        await run_pass(edge)
        domain = await store.get_domain(host)
        assert domain is not None and domain.state is S.ACTIVE
        assert "will retry" in (domain.last_check_reason or "")
        assert await tls_handshake(edge.ip, edge.https_port, host, client_context(pebble))
    finally:
        dns_server.set_servfail(host, on=False)
    await store.close()


async def test_pending_host_is_given_up_after_configured_days(
    clocked_edge, dns_server: DNSServer
) -> None:
    edge, clock = clocked_edge
    host = host_name(edge, "never")
    store = await edge.open_store()
    await store.add_domain(host, "acct")
    checks = 0
    for _ in range(200):  # the Cloudflare-like backoff: 1 min doubling to 1 h, for 3 days
        checks += await run_pass(edge)
        domain = await store.get_domain(host)
        assert domain is not None
        if domain.next_check_at is None:
            break
        clock.offset += max(0.0, domain.next_check_at - clock()) + 0.5
    assert domain.state is S.FAILED and domain.state_reason.startswith("gave up after 3 days")
    assert 70 < checks < 80  # 7 backed-off checks in the first 2 h, then hourly
    assert await run_pass(edge) == 0
    await store.close()


async def test_suspension_in_another_process_reaches_this_worker(
    clocked_edge, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    edge, _clock = clocked_edge
    host = host_name(edge, "sync")
    store = await edge.open_store()
    await store.add_domain(host, "acct")
    dns_server.set_cname(host, edge.target)
    await run_pass(edge)
    ctx = client_context(pebble)
    assert await tls_handshake(edge.ip, edge.https_port, host, ctx)  # cached in the worker now
    other = await edge.open_store()  # "another process": its own connection
    await other.transition_domain(host, [S.ACTIVE], S.SUSPENDED, "abuse report")
    await other.close()
    await run_pass(edge)
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        await tls_handshake(edge.ip, edge.https_port, host, ctx)
    await store.close()


async def test_each_due_check_runs_once_across_workers(
    tmp_path: Path, dns_server: DNSServer
) -> None:
    key = os.urandom(32)
    path = tmp_path / "shared.db"
    setup = await open_store(path, key)
    hosts = [f"links.once{i}.test" for i in range(12)]
    for host in hosts:
        await setup.add_domain(host, "acct")
        dns_server.set_cname(host, "elsewhere.once.test")
    dns_server.reset_counts()

    async def worker() -> Verifier:
        store = await open_store(path, key)  # one connection per "process"
        checker = HostChecker(
            CheckSettings(
                edge_target="edge-once.linkedge.test", nameservers=(dns_server.nameserver,)
            )
        )
        return Verifier(
            store, checker, Lifecycle(store, Schedule()), VerifierSettings(concurrency=6)
        )

    workers = [await worker() for _ in range(3)]
    done = await asyncio.gather(*(w.run_once() for w in workers))
    assert sum(done) == len(hosts) == sum(w.stats.runs for w in workers)
    for host in hosts:
        assert dns_server.query_count(host, "CAA") == 1, host
    await setup.close()
    for w in workers:
        await w._store.close()  # type: ignore[attr-defined]
