"""Issue 2, scenario 4: who gets no certificate, how they are told, and what it costs."""

from __future__ import annotations

import asyncio
import ssl

import pytest
from support.clicks import certify, edge_store, get_status, new_host, ssl_error_text
from support.edge import EdgeHandle, client_context, register, tls_handshake

from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer


async def run_tool(*args: str, timeout: float = 10) -> tuple[int, bytes, bytes]:
    """Run a command line client without blocking the event loop the edge runs on."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err


async def expect_refusal(edge: EdgeHandle, pebble: PebbleServer, host: str | None) -> str:
    """A real TLS handshake that must fail; returns the lower-cased error text."""
    ctx = client_context(pebble)
    if host is None:
        ctx.check_hostname = False
    with pytest.raises(ssl.SSLError) as info:
        await tls_handshake(edge.ip, edge.https_port, host, ctx, timeout=10)
    return ssl_error_text(info.value)


def listener_stats(edge: EdgeHandle):
    assert edge.worker is not None and edge.worker.tls_listener is not None
    return edge.worker.tls_listener.stats


async def test_unregistered_host_is_refused_with_unrecognized_name(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    host = new_host(edge, "stranger")
    dns_server.set_cname(host, edge.target)  # even pointing at us does not make it ours
    orders_before = pebble.order_count()
    refused_before = listener_stats(edge).refused

    text = await expect_refusal(edge, pebble, host)
    assert "unrecognized_name" in text or "unrecognized name" in text, text
    # a second attempt is answered from the negative cache, the same way
    text = await expect_refusal(edge, pebble, host)
    assert "unrecognized" in text, text

    assert pebble.order_count() == orders_before
    assert listener_stats(edge).refused - refused_before == 2
    assert dns_server.query_count(host) == 0  # unregistered: not even a DNS lookup
    async with edge_store(edge) as store:
        assert await store.get_domain(host) is None


async def test_unregistered_host_refused_for_openssl_s_client(
    edge: EdgeHandle, pebble: PebbleServer
) -> None:
    """Another TLS stack reads the same alert."""
    host = new_host(edge, "s-client")
    code, _out, err = await run_tool(
        "openssl",
        "s_client",
        "-connect",
        f"{edge.ip}:{edge.https_port}",
        "-servername",
        host,
        "-CAfile",
        str(pebble.root_path),
    )
    assert code != 0
    assert b"alert unrecognized name" in err or b"alert number 112" in err, err


async def test_wrong_cname_is_refused_without_repeating_dns(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    host = new_host(edge, "elsewhere")
    async with edge_store(edge) as store:
        await store.add_domain(host, "acct-test")
        registered = await store.last_event_id()
    dns_server.set_cname(host, "other.cdn.test")
    # the worker applies the registration first: its event (rightly) drops any cached
    # decision about the host, which would otherwise race with the refusal cached below
    assert edge.worker is not None and edge.worker.state_sync is not None
    for _ in range(200):
        if edge.worker.state_sync.cursor >= registered:
            break
        await asyncio.sleep(0.05)
    assert edge.worker.state_sync.cursor >= registered
    orders_before = pebble.order_count()

    text = await expect_refusal(edge, pebble, host)
    assert "unrecognized" in text, text
    queries = dns_server.query_count(host)
    assert queries >= 1  # one live check was made ...
    for _ in range(10):
        text = await expect_refusal(edge, pebble, host)
        assert "unrecognized" in text, text
    assert dns_server.query_count(host) == queries  # ... and not repeated in the window
    assert pebble.order_count() == orders_before

    async with edge_store(edge) as store:
        domain = await store.get_domain(host)
        kinds = [e.kind for e in await store.list_events(host)]
    assert domain is not None and domain.state.value == "pending"
    assert domain.cname_target_seen == "other.cdn.test"
    assert domain.last_check_reason is not None and "other.cdn.test" in domain.last_check_reason
    assert kinds.count("refused") == 1  # later attempts hit the negative cache
    assert "order_started" not in kinds


async def test_fixed_cname_becomes_issuable_after_refusal_window(
    edge_config: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    window = 1.0
    edge_config.config.tls.refusal_cache_seconds = window
    edge_config.config.tls.pending_recheck_seconds = window
    await edge_config.start()
    edge = edge_config
    try:
        host = new_host(edge, "fixed")
        async with edge_store(edge) as store:
            await store.add_domain(host, "acct-test")
        dns_server.set_cname(host, "other.cdn.test")
        orders_before = pebble.order_count()

        assert "unrecognized" in await expect_refusal(edge, pebble, host)
        queries = dns_server.query_count(host)
        dns_server.set_cname(host, edge.target)  # the customer fixes the record
        # still inside the window: refused from memory, no DNS
        assert "unrecognized" in await expect_refusal(edge, pebble, host)
        assert dns_server.query_count(host) == queries
        assert pebble.order_count() == orders_before

        await asyncio.sleep(window + 0.2)
        assert await get_status(edge, pebble, host) == 302
        assert dns_server.query_count(host) > queries
        assert pebble.order_count() - orders_before == 1
        async with edge_store(edge) as store:
            domain = await store.get_domain(host)
        assert domain is not None and domain.state.value == "active"
        assert domain.cname_target_seen == edge.target
    finally:
        await edge.stop()


async def test_pending_host_gets_one_dns_check_per_recheck_interval(
    edge_config: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    """The negative cache is short; the live-check interval (kept in the store) is not."""
    edge_config.config.tls.refusal_cache_seconds = 0.2
    edge_config.config.tls.pending_recheck_seconds = 60
    await edge_config.start()
    edge = edge_config
    try:
        host = new_host(edge, "recheck")
        async with edge_store(edge) as store:
            await store.add_domain(host, "acct-test")
        dns_server.set_cname(host, "other.cdn.test")
        assert "unrecognized" in await expect_refusal(edge, pebble, host)
        queries = dns_server.query_count(host)
        assert queries >= 1
        for _ in range(3):
            await asyncio.sleep(0.25)  # past the negative cache each time
            assert "unrecognized" in await expect_refusal(edge, pebble, host)
        assert dns_server.query_count(host) == queries
        async with edge_store(edge) as store:
            kinds = [e.kind for e in await store.list_events(host)]
            domain = await store.get_domain(host)
        assert domain is not None and domain.last_check_at is not None  # shared by workers
        assert kinds.count("refused") == 4  # each one decided again, from the store
    finally:
        await edge.stop()


async def test_no_sni_is_refused_with_handshake_failure(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    await certify(edge, pebble, dns_server)  # there is a certificate it could have used
    orders_before = pebble.order_count()
    before = listener_stats(edge).refused
    text = await expect_refusal(edge, pebble, None)
    assert "handshake_failure" in text or "handshake failure" in text, text
    assert listener_stats(edge).refused - before == 1
    assert pebble.order_count() == orders_before


async def test_no_sni_refused_for_openssl_s_client(edge: EdgeHandle) -> None:
    code, _out, err = await run_tool(
        "openssl", "s_client", "-connect", f"{edge.ip}:{edge.https_port}", "-noservername"
    )
    assert code != 0
    assert b"alert handshake failure" in err or b"alert number 40" in err, err


async def test_stored_certificate_served_while_dns_is_down(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    host = await certify(edge, pebble, dns_server)
    await edge.stop()
    dns_server.set_servfail(host)
    dns_server.set_servfail(edge.target)
    try:
        queries = dns_server.query_count(host)
        orders_before = pebble.order_count()
        await edge.start()  # a fresh worker: empty memory, certificate only in the store
        assert edge.worker is not None and edge.worker.manager is not None
        assert edge.worker.manager.cached_contexts == 0
        obj = await tls_handshake(edge.ip, edge.https_port, host, client_context(pebble))
        assert obj is not None
        assert await get_status(edge, pebble, host) == 302
        assert pebble.order_count() == orders_before
        assert dns_server.query_count(host) == queries
    finally:
        dns_server.set_servfail(host, False)
        dns_server.set_servfail(edge.target, False)


async def test_registered_host_with_dns_down_is_refused_not_ordered(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    """SERVFAIL is "unknown", never "verified": no order on a guess."""
    host = new_host(edge, "servfail")
    async with edge_store(edge) as store:
        await register(store, dns_server, host, edge.target)
    dns_server.set_servfail(host)
    try:
        orders_before = pebble.order_count()
        assert "unrecognized" in await expect_refusal(edge, pebble, host)
        assert pebble.order_count() == orders_before
        async with edge_store(edge) as store:
            domain = await store.get_domain(host)
        assert domain is not None and domain.state.value == "pending"
        assert domain.last_check_reason is not None and "retry" in domain.last_check_reason
    finally:
        dns_server.set_servfail(host, False)
