"""Issue 2, scenarios 1 and 5: the first HTTPS click on a new host, then restart."""

from __future__ import annotations

from support.edge import EdgeHandle, https_session, register

from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer


async def test_first_click_gets_certificate_and_302(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    host = f"links.shop1-{edge.ip.split('.')[-1]}.test"
    store = await edge.open_store()
    await register(store, dns_server, host, edge.target)
    orders_before = pebble.order_count()

    async with https_session(edge, pebble) as session:
        url = f"https://{host}:{edge.https_port}/c/abc123?x=1"
        async with session.get(url, allow_redirects=False, headers={"User-Agent": "UA/1"}) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == "https://shop.example/landing/abc123?utm=mail"
            assert "clk=abc123" in resp.headers["Set-Cookie"]
        async with session.get(url, allow_redirects=False) as resp:
            assert resp.status == 302

    assert pebble.order_count() - orders_before == 1
    cert = await store.get_certificate(host)
    assert cert is not None and cert.names == (host,)
    seen = backend[1][0]
    headers = dict(seen.headers)
    assert seen.path_qs == "/c/abc123?x=1"
    assert headers["Host"] == f"{host}:{edge.https_port}"
    assert headers["User-Agent"] == "UA/1"
    assert headers["X-Forwarded-Proto"] == "https"
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    kinds = [e.kind for e in await store.list_events(host)]
    assert kinds.count("order_started") == 1 and "issued" in kinds
    await store.close()
