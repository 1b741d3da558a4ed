"""Issue 9: requests are strict, and a client never gets a 500.

One normalised Host for every decision (400 for anything that is not `host[:port]`),
421 when Host names another host than the TLS connection's certificate, absolute-form
targets forwarded as path and query, `Server: linkedge` on the edge's own answers,
one 404 text for association files. Real edge, real Pebble, raw sockets.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from support.clicks import certify, new_host
from support.edge import EdgeHandle, client_context
from support.net import free_port
from test_tracked_links import (  # noqa: F401  (setup is a fixture)
    AASA,
    ASSETLINKS_PATH,
    Reply,
    Setup,
    call,
    https,
    plain_get,
    raw_http,
    set_options,
    setup,
    upload,
)

from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer
from proxy.hosts.association_files import APPLE

AASA_PATH = "/.well-known/apple-app-site-association"


@pytest.fixture
async def strict(setup: Setup) -> Setup:  # noqa: F811
    """test_tracked_links' edge with the admin API (hosts, files, options)."""
    return setup


def parse_reply(data: bytes) -> Reply:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    pairs = [(k.strip().lower(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:])]
    return Reply(int(lines[0].split()[1]), dict(pairs), pairs, body)


async def raw_tls(edge: EdgeHandle, pebble: PebbleServer, sni: str | None, request: bytes) -> Reply:
    """One hand-written request over TLS (SNI as given; None sends none)."""
    ctx = client_context(pebble)
    if sni is None:
        ctx.check_hostname = False
    reader, writer = await asyncio.open_connection(
        edge.ip, edge.https_port, ssl=ctx, server_hostname=sni
    )
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return parse_reply(data)


async def test_host_is_validated_and_one_normalised_value_decides(
    strict: Setup, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    edge, api, recorded = strict.edge, strict.api, strict.recorded
    host = await certify(edge, pebble, dns_server)
    suspended = await certify(edge, pebble, dns_server)
    status, body = await call(api, "POST", f"/v1/hosts/{suspended}/suspend", json={})
    assert status == 200, body
    recorded.clear()

    # the example: a stray byte after the name skipped the suspension check
    # and reached the backend as the suspended host
    for bad in (
        f"{suspended}\xff",
        f"{suspended}:99999",
        f"{suspended}:",
        f"{suspended}:80:80",
        f"user@{suspended}",
        f"{suspended}/x",
        f"{suspended}..",
        "[::1",
        "[zz]:80",
        "a..b.test",
        "",
    ):
        request = f"GET /c/x HTTP/1.1\r\nHost: {bad}\r\nConnection: close\r\n\r\n".encode("latin-1")
        got = await raw_http(edge, request)
        assert got.status == 400, (bad, got)
        assert got.headers["server"] == "linkedge"
    got = await raw_http(edge, b"GET /c/x HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n")
    assert got.status == 400  # aiohttp's parser: still ours, no versions
    assert got.headers["server"] == "linkedge"
    assert recorded == []

    # every spelling of the suspended host is the suspended host
    for spelling in (suspended.upper(), f"{suspended}.", f"{suspended.upper()}.:80"):
        got = await raw_http(edge, plain_get(spelling, "/c/x"))
        assert got.status == 503, spelling
    # absolute-form: the target's authority is the host (RFC 9112 §3.2.2), not Host
    got = await raw_http(edge, plain_get(host, f"http://{suspended}/c/x"))
    assert got.status == 503
    assert recorded == []

    # forwarded: the normalised Host, and absolute-form as path and query
    got = await raw_http(edge, plain_get(f"{host.upper()}.:80", "/c/norm?a=1"))
    assert got.status == 302
    assert recorded[-1].raw_path == "/c/norm?a=1"
    assert dict(recorded[-1].headers)["Host"] == f"{host}:80"
    got = await raw_http(edge, plain_get("ignored.test", f"http://{host.upper()}/c/abs?q=%20x"))
    assert got.status == 302, got
    assert recorded[-1].raw_path == "/c/abs?q=%20x"
    assert dict(recorded[-1].headers)["Host"] == host
    # targets that are not a path or an http URL
    for target in (f"ftp://{host}/x", f"http://user@{host}/x", f"http://{host}:bad/x"):
        got = await raw_http(edge, plain_get(host, target))
        assert got.status == 400, target
    assert len(recorded) == 2


async def test_association_file_404_is_the_same_for_unknown_and_registered_hosts(
    strict: Setup, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    edge, api = strict.edge, strict.api
    host = await certify(edge, pebble, dns_server)
    await upload(api, host, APPLE, AASA)
    registered = await raw_http(edge, plain_get(host, ASSETLINKS_PATH))
    unknown = await raw_http(edge, plain_get(new_host(edge), ASSETLINKS_PATH))
    assert registered.status == unknown.status == 404
    assert registered.body == unknown.body == b"No assetlinks.json here.\n"
    assert registered.headers["server"] == unknown.headers["server"] == "linkedge"


async def test_host_naming_another_host_than_the_certificate_is_misdirected(
    strict: Setup, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    edge, api, recorded = strict.edge, strict.api, strict.recorded
    a = await certify(edge, pebble, dns_server)
    b = await certify(edge, pebble, dns_server)
    await upload(api, b, APPLE, AASA)
    await set_options(api, b, hsts_max_age=600)
    recorded.clear()

    # B's file and HSTS are never served under A's certificate
    for path in (AASA_PATH, "/c/x"):
        got = await https(edge, pebble, a, path, headers={"Host": b})
        assert got.status == 421, path
        assert "strict-transport-security" not in got.headers
        assert got.headers["server"] == "linkedge"
        assert AASA not in got.body
    got = await raw_tls(edge, pebble, a, plain_get(a, f"https://{b}{AASA_PATH}"))
    assert got.status == 421  # absolute-form naming B
    got = await raw_tls(edge, pebble, a, plain_get("[::1]:443", "/c/x"))
    assert got.status == 421
    assert recorded == []
    # the same host in another spelling is the same host
    got = await https(edge, pebble, a, "/c/x", headers={"Host": f"{a.upper()}.:{edge.https_port}"})
    assert got.status == 302
    assert (await https(edge, pebble, b, AASA_PATH)).body == AASA
    # ACME challenge paths are never misdirected (answered from the store, for any host)
    got = await https(
        edge, pebble, a, "/.well-known/acme-challenge/nosuchtoken", headers={"Host": b}
    )
    assert got.status == 404 and got.body == b"no such challenge\n"


async def test_clients_without_sni_must_name_the_no_sni_host(
    edge_config: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    edge = edge_config
    host = new_host(edge)
    edge.config.edge.no_sni_host = host
    await edge.start()
    try:
        await certify(edge, pebble, dns_server, host)
        other = await certify(edge, pebble, dns_server)
        got = await raw_tls(edge, pebble, None, plain_get(host, "/c/nosni"))
        assert got.status == 302
        got = await raw_tls(edge, pebble, None, plain_get(other, "/c/nosni"))
        assert got.status == 421
    finally:
        await edge.stop()


@pytest.fixture
async def server_backend():
    """A backend that names itself in Server (two spellings, on a 302 and a 200)."""

    async def named(_request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Server": "tracker/2.1", "Location": "/x"})

    async def other(_request: web.Request) -> web.StreamResponse:
        response = web.Response(text="ok")
        response.headers["Server"] = "kept-by-backend/9"
        return response

    app = web.Application()
    app.router.add_get("/named", named)
    app.router.add_get("/healthz", other)
    app.router.add_get("/other", other)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_server_header_names_no_versions_and_backends_own_is_relayed(
    edge_config: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, server_backend: str
) -> None:
    edge = edge_config
    edge.config.backend.url = server_backend
    edge.config.backend.health_path = "/healthz"
    await edge.start()
    try:
        host = new_host(edge)
        relayed = await raw_http(edge, plain_get(host, "/named"))
        assert relayed.status == 302 and relayed.headers["server"] == "tracker/2.1"
        other = await raw_http(edge, plain_get(host, "/other"))
        assert other.headers["server"] == "kept-by-backend/9"
        for request in (
            plain_get(host, "/.well-known/acme-challenge/x"),  # the edge's own 404
            plain_get(host, ASSETLINKS_PATH),
            b"GET /c/x HTTP/1.1\r\nHost: a b\r\n\r\n",  # the edge's 400
            b"BREW /c/x HTTP/1.1\r\nHost: a.test\r\nContent-Length: x\r\n\r\n",  # aiohttp's
        ):
            got = await raw_http(edge, request)
            assert got.headers["server"] == "linkedge", (request, got)
            assert "aiohttp" not in got.body.decode("latin-1").lower()
    finally:
        await edge.stop()
