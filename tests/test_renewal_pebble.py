"""Issue 5 against real Pebble: background renewal, badNonce storms, a CA outage,
several workers, revalidated caches. This Pebble issues 1-hour certificates and
rejects half of all nonces; a FakeClock moves the edges' time forward."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.edge import FakeClock, client_context
from support.pebble import running_pebble
from support.renewal import Edge, new_edge_config, served_serial

from certstore import Store
from certstore.errors import StoreUnavailable
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer

VALIDITY = 3600


@pytest.fixture(scope="module")
def short_pebble(
    dns_server: DNSServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PebbleServer]:
    with running_pebble(
        tmp_path_factory.mktemp("pebble-short"),
        dns_server,
        validity_seconds=VALIDITY,
        nonce_reject_percent=50,
    ) as server:
        yield server


async def _edge(
    tmp_path: Path, pebble: PebbleServer, dns: DNSServer, backend_url: str, clock: FakeClock
) -> Edge:
    config, key_text, ip, _ = new_edge_config(tmp_path, pebble, dns, backend_url)
    return await Edge(config, key_text, clock, ip).start()


async def _cnamed_host(edge: Edge, store: Store, dns: DNSServer, label: str) -> str:
    """A host registered in the store and CNAME'd to the edge: its first click orders."""
    host = f"links.{label}-{edge.ip.split('.')[-1]}.test"
    await store.add_domain(host, "acct")
    dns.set_cname(host, edge.config.edge.cname_target)
    return host


async def test_renewal_in_background_replaces_the_served_certificate(
    tmp_path: Path, short_pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    clock = FakeClock()
    edge = await _edge(tmp_path, short_pebble, dns_server, backend[0], clock)
    store = await edge.open_store()
    try:
        host = await _cnamed_host(edge, store, dns_server, "renew")
        first = await edge.served_serial(host, short_pebble)
        orders = short_pebble.order_count()

        # planned by its order, under its lease (Maintainer.plan_new): nothing to visit
        assert await edge.run_maintenance() == 0
        cert = await store.get_certificate(host)
        plan = await store.get_renewal(host)
        assert cert is not None and plan is not None and plan.source == "ratio"
        lifetime = cert.not_after - cert.not_before
        # under 10 days: due with half the lifetime left, spread over the quarter before
        assert cert.not_after - lifetime * 0.625 <= plan.due_at <= cert.not_after - lifetime / 2
        assert await edge.run_maintenance() == 0  # nothing due: no visit, no order
        assert short_pebble.order_count() == orders

        clock.advance_to(plan.due_at + 1)
        assert await edge.run_maintenance() == 1
        renewed = await store.get_certificate(host)
        assert renewed is not None and renewed.serial != first
        assert short_pebble.order_count() == orders + 1
        assert await edge.served_serial(host, short_pebble) == renewed.serial
        kinds = [e.kind for e in await store.list_events(host)]
        assert "renewed" in kinds and "renewal_failed" not in kinds
        new_plan = await store.get_renewal(host)
        # planned from the new certificate (Pebble's real time; our clock is ahead of it)
        assert new_plan is not None and new_plan.last_error is None
        assert renewed.not_before < new_plan.due_at < renewed.not_after
    finally:
        await store.close()
        await edge.stop()


async def test_a_plan_the_order_could_not_write_is_made_by_the_next_visit(
    tmp_path: Path,
    short_pebble: PebbleServer,
    dns_server: DNSServer,
    backend,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store refuses the plan written under the order's lease (Maintainer.plan_new):
    the certificate is still stored and served, and the maintenance visit plans it."""
    clock = FakeClock()
    edge = await _edge(tmp_path, short_pebble, dns_server, backend[0], clock)
    store = await edge.open_store()
    try:
        host = await _cnamed_host(edge, store, dns_server, "unplanned")
        assert edge.worker is not None and edge.worker.maintainer is not None
        worker_store = edge.worker.maintainer._store  # noqa: SLF001 (the worker's own)
        refused: list[str] = []

        async def put_renewal_down(plan: object) -> None:
            refused.append(getattr(plan, "hostname", "?"))
            raise StoreUnavailable("store down for this write")

        monkeypatch.setattr(worker_store, "put_renewal", put_renewal_down)
        serial = await edge.served_serial(host, short_pebble)
        assert refused == [host]
        cert = await store.get_certificate(host)
        assert cert is not None and cert.serial == serial
        assert await store.get_renewal(host) is None

        monkeypatch.undo()
        assert await edge.run_maintenance() == 1  # the visit the plan would have saved
        plan = await store.get_renewal(host)
        assert plan is not None and plan.source == "ratio"
        assert cert.not_before < plan.due_at < cert.not_after
        assert await edge.served_serial(host, short_pebble) == serial
    finally:
        await store.close()
        await edge.stop()


async def test_renewal_skipped_when_cname_moved_keeps_serving(
    tmp_path: Path, short_pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    clock = FakeClock()
    edge = await _edge(tmp_path, short_pebble, dns_server, backend[0], clock)
    store = await edge.open_store()
    try:
        host = await _cnamed_host(edge, store, dns_server, "moved")
        serial = await edge.served_serial(host, short_pebble)
        await edge.run_maintenance()
        plan = await store.get_renewal(host)
        assert plan is not None
        dns_server.set_cname(host, "cdn.elsewhere.test")
        orders = short_pebble.order_count()
        clock.advance_to(plan.due_at + 1)
        await edge.run_maintenance()
        assert short_pebble.order_count() == orders
        skipped = [e for e in await store.list_events(host) if e.kind == "renewal_skipped"]
        assert len(skipped) == 1 and "cdn.elsewhere.test" in skipped[0].detail
        plan = await store.get_renewal(host)
        assert plan is not None and plan.last_error and "cdn.elsewhere.test" in plan.last_error
        assert plan.next_check_at >= clock() + edge.config.renewal.skip_recheck_seconds - 1
        assert await edge.served_serial(host, short_pebble) == serial
    finally:
        await store.close()
        await edge.stop()


async def test_host_on_the_edges_own_address_is_renewed(
    tmp_path: Path, short_pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    # no CNAME, A records at the edge: issued on that ground (checks.issue_via_address,
    # on by default), so it must be renewed on it too, not skipped until it expires
    clock = FakeClock()
    edge = await _edge(tmp_path, short_pebble, dns_server, backend[0], clock)
    store = await edge.open_store()
    try:
        host = f"links.by-address-{edge.ip.split('.')[-1]}.test"
        await store.add_domain(host, "acct")
        dns_server.set_a(host, [edge.ip])
        first = await edge.served_serial(host, short_pebble)
        await edge.run_maintenance()
        plan = await store.get_renewal(host)
        assert plan is not None
        orders = short_pebble.order_count()
        clock.advance_to(plan.due_at + 1)
        await edge.run_maintenance()
        kinds = [e.kind for e in await store.list_events(host)]
        assert "renewal_skipped" not in kinds and "renewed" in kinds, kinds
        assert short_pebble.order_count() == orders + 1
        renewed = await store.get_certificate(host)
        assert renewed is not None and renewed.serial != first
    finally:
        await store.close()
        await edge.stop()


async def test_ca_down_during_renewal_then_back(
    tmp_path: Path, short_pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    clock = FakeClock()
    edge = await _edge(tmp_path, short_pebble, dns_server, backend[0], clock)
    store = await edge.open_store()
    try:
        host = await _cnamed_host(edge, store, dns_server, "outage")
        old_root = client_context(short_pebble)  # Pebble makes a new root when restarted
        serial = await edge.served_serial(host, short_pebble)
        await edge.run_maintenance()
        plan = await store.get_renewal(host)
        assert plan is not None
        clock.advance_to(plan.due_at + 1)

        short_pebble.stop()
        try:
            await edge.run_maintenance()
            plan = await store.get_renewal(host)
            assert plan is not None and plan.last_error and "unreachable" in plan.last_error
            assert plan.last_error.startswith("CA unavailable")
            # the CA's failure, not the host's (issue 8): no backoff step; retried as soon
            # as the CA's breaker lets a probe through, spread over a few seconds
            assert await store.get_backoff(host) is None
            assert clock() < plan.next_check_at < clock() + 20
            kinds = [e.kind for e in await store.list_events(host)]
            assert "order_deferred" in kinds and "renewal_failed" not in kinds
            # the current certificate is still served, from cache and from a fresh worker
            assert await served_serial(edge.ip, edge.https_port, host, old_root) == serial
            edge.worker.manager.forget(host)  # type: ignore[union-attr]
            assert await served_serial(edge.ip, edge.https_port, host, old_root) == serial
            assert await edge.run_maintenance() == 0  # not due again yet
        finally:
            short_pebble.start()  # same ports; Pebble forgot our account

        clock.advance_to(plan.next_check_at + 1)
        assert await edge.run_maintenance() == 1
        renewed = await store.get_certificate(host)
        assert renewed is not None and renewed.serial != serial
        assert await edge.served_serial(host, short_pebble) == renewed.serial
        assert await store.get_backoff(host) is None
        kinds = [e.kind for e in await store.list_events(None, limit=200)]
        assert "acme_account_registered" in kinds
    finally:
        await store.close()
        await edge.stop()


async def test_two_workers_renew_once_and_both_serve_the_new_certificate(
    tmp_path: Path, short_pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    clock = FakeClock()
    config_a, key_text, ip_a, target = new_edge_config(
        tmp_path, short_pebble, dns_server, backend[0]
    )
    config_b, _, ip_b, _ = new_edge_config(
        tmp_path, short_pebble, dns_server, backend[0], key_text=key_text
    )
    config_b.edge.cname_target = target  # same fleet, same store, another address
    a = await Edge(config_a, key_text, clock, ip_a).start()
    b = await Edge(config_b, key_text, clock, ip_b).start()
    store = await a.open_store()
    try:
        host = f"links.pair-{ip_a.split('.')[-1]}.test"
        await store.add_domain(host, "acct")
        dns_server.set_cname(host, target)
        first = await a.served_serial(host, short_pebble)
        assert await b.served_serial(host, short_pebble) == first  # from the store
        await a.run_maintenance()
        plan = await store.get_renewal(host)
        assert plan is not None
        clock.advance_to(plan.due_at + 1)
        orders = short_pebble.order_count()
        await asyncio.gather(a.run_maintenance(), b.run_maintenance())
        assert short_pebble.order_count() == orders + 1
        renewed = await store.get_certificate(host)
        assert renewed is not None and renewed.serial != first
        events = await store.list_events(host)
        assert [e.kind for e in events].count("renewal_started") == 1

        # The worker that did not renew still has the old context cached. After
        # revalidate_seconds one handshake triggers a background comparison with the
        # store (that handshake may still get the old certificate); later ones get the new.
        clock.advance(config_b.tls.revalidate_seconds + 1)
        for edge in (a, b):
            seen = [await edge.served_serial(host, short_pebble)]
            for _ in range(50):
                if seen[-1] == renewed.serial:
                    break
                await asyncio.sleep(0.05)
                seen.append(await edge.served_serial(host, short_pebble))
            assert seen[-1] == renewed.serial
            assert set(seen) <= {first, renewed.serial}
    finally:
        await store.close()
        await a.stop()
        await b.stop()


async def test_every_issuance_succeeds_while_half_the_nonces_are_rejected(
    tmp_path: Path,
    short_pebble: PebbleServer,
    dns_server: DNSServer,
    backend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="acme.client")  # it logs every CA response
    clock = FakeClock()
    edge = await _edge(tmp_path, short_pebble, dns_server, backend[0], clock)
    store = await edge.open_store()
    try:
        n = edge.ip.split(".")[-1]
        hosts = [f"links.nonce{i}-{n}.test" for i in range(8)]
        for host in hosts:
            await store.add_domain(host, "acct")
            dns_server.set_cname(host, edge.config.edge.cname_target)
        serials = await asyncio.gather(*(edge.served_serial(h, short_pebble) for h in hosts))
        assert len(set(serials)) == len(hosts)
        rejected = sum("error:badNonce" in r.getMessage() for r in caplog.records)
        assert rejected >= 8  # Pebble did reject many; every order still went through
        for host in hosts:
            kinds = [e.kind for e in await store.list_events(host)]
            assert "issued" in kinds and "issuance_failed" not in kinds
    finally:
        await store.close()
        await edge.stop()
