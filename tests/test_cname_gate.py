"""Issue 8, part 1: the gate follows the documented CNAME rule, through real first clicks.

Real edge, real DNS server, real Pebble. A CNAME to another name fails whatever that
name's addresses are (shared LB / anycast addresses prove nothing); A/AAAA records
straight at the edge's addresses, without a CNAME, pass with a warning unless
`checks.issue_via_address` is off.
"""

from __future__ import annotations

import ssl

import pytest
from support.clicks import edge_store, get_status, new_host, ssl_error_text
from support.edge import EdgeHandle, client_context, tls_handshake

from certstore import Domain, DomainState
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer
from proxy.hosts.checks import CheckResult
from proxy.hosts.lifecycle import load_report


async def _refused_without_order(
    edge: EdgeHandle, pebble: PebbleServer, host: str, text: str, orders_before: int
) -> tuple[Domain, CheckResult]:
    """The first click was refused, no order reached Pebble or the store, the host is
    still pending: its stored domain and cname result."""
    assert "unrecognized" in text, text
    assert pebble.order_count() == orders_before
    assert await _orders_for(edge, host) == 0
    async with edge_store(edge) as store:
        domain = await store.get_domain(host)
    assert domain is not None and domain.state is DomainState.PENDING
    report = load_report(domain)
    assert report is not None
    cname = report.get("cname")
    assert cname is not None
    return domain, cname


async def _orders_for(edge: EdgeHandle, host: str) -> int:
    async with edge_store(edge) as store:
        events = await store.list_events(host, limit=100)
    return sum(1 for e in events if e.kind in ("order_started", "issued"))


async def _refused(edge: EdgeHandle, pebble: PebbleServer, host: str) -> str:
    with pytest.raises(ssl.SSLError) as info:
        await tls_handshake(edge.ip, edge.https_port, host, client_context(pebble), timeout=15)
    return ssl_error_text(info.value)


async def test_cname_to_another_name_on_the_edges_addresses_is_refused(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    host = new_host(edge, "links")
    other = f"other-cdn-{edge.ip.split('.')[-1]}.example"
    dns_server.set_cname(host, other)
    dns_server.set_a(other, [edge.ip])  # a shared address: the other name lands on us
    async with edge_store(edge) as store:
        await store.add_domain(host, "acct-test")
    orders_before = pebble.order_count()

    text = await _refused(edge, pebble, host)  # the first click

    assert edge.worker is not None and edge.worker.manager is not None
    assert edge.worker.meter.value("certificates", "orders_started") == 0
    domain, cname = await _refused_without_order(edge, pebble, host, text, orders_before)
    assert (cname.state.value, cname.code) == ("fail", "elsewhere")
    assert f"points at {other}, not {edge.target}" in cname.reason
    assert domain.cname_target_seen == other


async def test_a_records_at_the_edge_without_cname_are_issued_with_a_warning(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    host = new_host(edge, "links")
    dns_server.set_a(host, [edge.ip])  # no CNAME: the edge's own address
    async with edge_store(edge) as store:
        await store.add_domain(host, "acct-test")

    assert await get_status(edge, pebble, host) == 302  # the first click gets a certificate

    assert await _orders_for(edge, host) >= 1
    async with edge_store(edge) as store:
        domain = await store.get_domain(host)
        cert = await store.get_certificate(host)
    assert cert is not None and cert.names == (host,)
    assert domain is not None and domain.state is DomainState.ACTIVE
    report = load_report(domain)
    assert report is not None
    cname = report.get("cname")
    assert cname is not None and (cname.state.value, cname.code) == ("warn", "via_address")
    assert f"point a CNAME at {edge.target}" in cname.reason


@pytest.fixture
async def strict_edge(edge_config: EdgeHandle):
    edge_config.config.checks.issue_via_address = False
    await edge_config.start()
    yield edge_config
    await edge_config.stop()


async def test_a_records_at_the_edge_are_refused_when_issue_via_address_is_off(
    strict_edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    edge = strict_edge
    host = new_host(edge, "links")
    dns_server.set_a(host, [edge.ip])
    async with edge_store(edge) as store:
        await store.add_domain(host, "acct-test")
    orders_before = pebble.order_count()

    text = await _refused(edge, pebble, host)

    domain, cname = await _refused_without_order(edge, pebble, host, text, orders_before)
    assert (cname.state.value, cname.code) == ("fail", "via_address")
    assert f"only to hosts with a CNAME to {edge.target}" in cname.reason
