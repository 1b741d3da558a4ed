"""Forwarding through the edge over HTTPS (Pebble certificates, real clients)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import aiohttp
import pytest
from support.clicks import certify, edge_store, url
from support.edge import EdgeHandle, client_context, https_session
from support.net import free_port

from proxy.demo.backend import RecordedRequest
from proxy.demo.client import StaticResolver
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer


def headers_of(seen: RecordedRequest) -> list[tuple[str, str]]:
    return [(k.lower(), v) for k, v in seen.headers]


def header_values(seen: RecordedRequest, name: str) -> list[str]:
    return [v for k, v in headers_of(seen) if k == name.lower()]


async def raw_https(
    edge: EdgeHandle, pebble: PebbleServer, host: str, request: bytes
) -> tuple[bytes, bytes]:
    """Send hand-written HTTP/1.1 over a real TLS connection; (head, body) of the reply."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            edge.ip, edge.https_port, ssl=client_context(pebble), server_hostname=host
        ),
        10,
    )
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await asyncio.wait_for(reader.readexactly(length), 10) if length else b""
        return head, body
    finally:
        writer.close()


async def test_client_forwarding_headers_are_replaced(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    host = await certify(edge, pebble, dns_server)
    recorded: list[RecordedRequest] = backend[1]
    recorded.clear()
    spoofed = {
        "X-Forwarded-For": "6.6.6.6, 7.7.7.7",
        "Forwarded": "for=6.6.6.6;proto=http;host=evil.test",
        "X-Forwarded-Proto": "http",
        "X-Forwarded-Host": "evil.test",
        "X-Real-IP": "6.6.6.6",
        "Cookie": "clk=abc; session=s1",
    }
    async with (
        https_session(edge, pebble) as session,
        session.get(
            url(edge, host, "/c/fwd?a=1&b=two"), headers=spoofed, allow_redirects=False
        ) as resp,
    ):
        assert resp.status == 302
    seen = recorded[-1]
    assert seen.path_qs == "/c/fwd?a=1&b=two"
    authority = f"{host}:{edge.https_port}"
    assert header_values(seen, "X-Forwarded-For") == ["127.0.0.1"]
    assert header_values(seen, "X-Forwarded-Proto") == ["https"]
    assert header_values(seen, "X-Forwarded-Host") == [authority]
    assert header_values(seen, "Forwarded") == [f'for=127.0.0.1;proto=https;host="{authority}"']
    assert header_values(seen, "X-Real-IP") == []
    assert header_values(seen, "Cookie") == ["clk=abc; session=s1"]  # passed through
    assert not any("6.6.6.6" in v or "evil.test" in v for _, v in seen.headers)


async def test_post_bodies_reach_the_backend_intact(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    host = await certify(edge, pebble, dns_server)
    recorded: list[RecordedRequest] = backend[1]
    form = b"List-Unsubscribe=One-Click&id=" + b"%00%FF" * 10
    big = bytes(i % 251 for i in range(900_000 + 17))  # the demo backend reads up to 1 MiB

    async def chunks():
        for i in range(0, len(big), 100_000):
            yield big[i : i + 100_000]
            await asyncio.sleep(0)

    async with https_session(edge, pebble) as session:
        async with session.post(
            url(edge, host, "/unsubscribe"),
            data=form,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ) as resp:
            assert resp.status == 200
            assert await resp.json() == {"unsubscribed": True, "length": len(form)}
        assert recorded[-1].body == form
        assert header_values(recorded[-1], "Content-Type") == ["application/x-www-form-urlencoded"]
        # a body of known length keeps its Content-Length framing
        assert header_values(recorded[-1], "Content-Length") == [str(len(form))]
        assert header_values(recorded[-1], "Transfer-Encoding") == []

        # a large body of unknown length (chunked upload) to /echo
        async with session.post(url(edge, host, "/echo?x=1"), data=chunks()) as resp:
            assert resp.status == 200
            echoed = await resp.json()
        assert echoed["method"] == "POST" and echoed["path_qs"] == "/echo?x=1"
        seen = recorded[-1]
        # relayed as a stream (chunked), not buffered up into one Content-Length body
        assert header_values(seen, "Transfer-Encoding") == ["chunked"]
        assert header_values(seen, "Content-Length") == []
        assert len(seen.body) == len(big)
        assert hashlib.sha256(seen.body).digest() == hashlib.sha256(big).digest()

        # PUT with a text body, echoed back byte for byte
        text = "héllo wörld\n" * 1000
        async with session.put(url(edge, host, "/echo"), data=text.encode()) as resp:
            assert (await resp.json())["body"] == text


async def test_head_is_relayed(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    host = await certify(edge, pebble, dns_server)
    recorded: list[RecordedRequest] = backend[1]
    async with https_session(edge, pebble) as session:
        async with session.head(url(edge, host, "/c/h1"), allow_redirects=False) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == "https://shop.example/landing/h1?utm=mail"
            assert await resp.read() == b""
        async with session.head(url(edge, host, "/echo")) as resp:
            assert resp.status == 200
            assert int(resp.headers["Content-Length"]) > 0  # the GET's length, no body
            assert await resp.read() == b""
    assert [r.method for r in recorded[-2:]] == ["HEAD", "HEAD"]

    # and for curl, which is strict about HEAD framing
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "-I",
        "--max-time",
        "10",
        "--cacert",
        str(pebble.root_path),
        "--resolve",
        f"{host}:{edge.https_port}:{edge.ip}",
        url(edge, host, "/c/curl1"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err
    assert out.startswith(b"HTTP/1.1 302")
    assert b"location: https://shop.example/landing/curl1?utm=mail" in out.lower()


async def test_hop_by_hop_headers_are_removed(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    host = await certify(edge, pebble, dns_server)
    recorded: list[RecordedRequest] = backend[1]
    request = (
        f"GET /echo HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "Connection: x-foo, X-Bar, keep-alive\r\n"
        "X-Foo: secret-for-the-proxy\r\n"
        "X-Bar: 1\r\n"
        "Keep-Alive: timeout=5\r\n"
        "Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        "TE: trailers\r\n"
        "X-Kept: yes\r\n"
        "\r\n"
    ).encode()
    head, body = await raw_https(edge, pebble, host, request)
    assert head.startswith(b"HTTP/1.1 200"), head
    seen = recorded[-1]
    names = {k for k, _ in headers_of(seen)}
    for hop in ("x-foo", "x-bar", "keep-alive", "proxy-authorization", "te"):
        assert hop not in names, (hop, seen.headers)
    assert header_values(seen, "X-Kept") == ["yes"]
    assert "secret-for-the-proxy" not in str(json.loads(body)["headers"])


async def test_backend_down_gives_fast_502(
    edge_config: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    edge_config.config.backend.url = f"http://127.0.0.1:{free_port()}"  # nobody listens
    edge = edge_config
    await edge.start()
    try:
        with pytest.raises(AssertionError):  # the first click is a 502 too
            await certify(edge, pebble, dns_server)
        host = (await _only_domain(edge)).hostname
        async with https_session(edge, pebble) as session:
            t0 = time.monotonic()
            async with session.get(url(edge, host, "/c/down"), allow_redirects=False) as resp:
                body = await resp.read()
                elapsed = time.monotonic() - t0
                assert resp.status == 502
                assert resp.headers["Content-Type"].startswith("text/plain")
                assert resp.headers.get("Cache-Control") == "no-store"
        assert elapsed < 1.0
        assert 0 < len(body) < 200 and b"Bad Gateway" in body
    finally:
        await edge.stop()


async def test_slow_backend_gives_504(
    edge_config: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    edge_config.config.backend.timeout = 1
    edge = edge_config
    await edge.start()
    try:
        host = await certify(edge, pebble, dns_server)
        async with https_session(edge, pebble) as session:
            t0 = time.monotonic()
            async with session.get(url(edge, host, "/slow?seconds=3")) as resp:
                body = await resp.read()
                elapsed = time.monotonic() - t0
                assert resp.status == 504
        assert 0.9 < elapsed < 2.5
        assert 0 < len(body) < 200 and b"Gateway Timeout" in body
        # a fast request right after is fine
        async with (
            https_session(edge, pebble) as session,
            session.get(url(edge, host, "/slow?seconds=0.1")) as resp,
        ):
            assert resp.status == 200
    finally:
        await edge.stop()


async def _only_domain(edge: EdgeHandle):
    async with edge_store(edge) as store:
        domains = await store.list_domains()
        assert len(domains) == 1
        cert = await store.get_certificate(domains[0].hostname)
    assert cert is not None  # issued on the first click even though the backend is down
    return domains[0]


# -- byte for byte, both directions ------------------------------------------------------


async def test_request_target_host_and_headers_pass_byte_for_byte(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    """What the backend reads is what the client wrote: target, header order, repeated
    fields, values; Host normalised (lower case). Only the forwarding fields are added,
    at the end.

    Names are case-insensitive (RFC 9110 §5.1); aiohttp's parser writes the names it
    knows in their usual spelling (cookie -> Cookie) and keeps the case of all others.
    """
    host = await certify(edge, pebble, dns_server)
    recorded: list[RecordedRequest] = backend[1]
    targets = [
        "/c/a%2Fb/./x/../%7e;p=1?q=%20+%2B&&x=%zz&u=%E2%82%AC",  # yarl would normalise this
        "//c//double?a=1&a=2&",
        "/echo?",  # the one deviation: an empty query's "?" is dropped (yarl, aiohttp client)
    ]
    fields = (
        "User-Agent: MobileMail/1.0 CFNetwork/1410.0.3 Darwin/22.6.0\r\n"
        "cookie: clk=abc; session=s1\r\n"
        "X-lower-UPPER: 1\r\n"
        "Accept-Language: de-CH, en;q=0.5\r\n"
        "X-Dup: first\r\n"
        "X-Dup: second\r\n"
    )
    for target in targets:
        request = f"GET {target} HTTP/1.1\r\nHost: {host.upper()}\r\n{fields}\r\n".encode()
        head, _ = await raw_https(edge, pebble, host, request)
        assert head.startswith(b"HTTP/1.1 ")
        seen = recorded[-1]
        assert seen.raw_path == target.removesuffix("?")
        sent = [tuple(line.split(": ", 1)) for line in fields.strip().split("\r\n")]
        sent[1] = ("Cookie", sent[1][1])
        # Host is the one normalised value the edge decided with (issue 9), in its place
        assert seen.headers[: len(sent) + 1] == [("Host", host), *sent]
        added = [k for k, _ in seen.headers[len(sent) + 1 :]]
        assert added == ["X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "Forwarded"]
    assert recorded[0].path_qs != targets[0]  # the recorder's own view is normalised


async def test_response_headers_and_set_cookies_are_relayed_untouched(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    """Response fields as the backend sent them (case, order, repeated Set-Cookie); the
    edge adds nothing (no Age, Via or cache fields) and caches nothing."""
    host = await certify(edge, pebble, dns_server)
    recorded: list[RecordedRequest] = backend[1]
    target = "/cookies?name=a&name=b&name=c"
    request = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    via_edge, body = await raw_https(edge, pebble, host, request)
    reader, writer = await asyncio.open_connection(*backend[0].removeprefix("http://").split(":"))
    writer.write(request)
    direct = await reader.read()
    writer.close()
    direct_head = direct.split(b"\r\n\r\n", 1)[0]

    def fields(head: bytes) -> list[bytes]:
        return [line for line in head.split(b"\r\n")[1:] if not line.startswith(b"Date:")]

    assert via_edge.split(b"\r\n", 1)[0] == b"HTTP/1.1 200 OK"
    assert fields(via_edge.rstrip(b"\r\n")) == fields(direct_head)
    assert [f for f in fields(direct_head) if f.startswith(b"Set-Cookie")] == [
        b"Set-Cookie: a=1; Path=/; Secure",
        b"Set-Cookie: b=1; Path=/; Secure",
        b"Set-Cookie: c=1; Path=/; Secure",
    ]
    assert body == b"cookies\n"
    # not cached: the same request again reaches the backend again
    await raw_https(edge, pebble, host, request)
    assert [r.raw_path for r in recorded].count(target) == 3


async def test_redirect_is_relayed_not_followed(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    host = await certify(edge, pebble, dns_server)
    recorded: list[RecordedRequest] = backend[1]
    request = f"GET /c/r%20x?utm=1 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    for _ in range(2):
        head, body = await raw_https(edge, pebble, host, request.encode())
        lines = head.split(b"\r\n")
        assert lines[0] == b"HTTP/1.1 302 Found"
        assert b"Location: https://shop.example/landing/r%20x?utm=mail" in lines
        assert b"Cache-Control: no-store" in lines
        assert b"Set-Cookie: clk=r%20x; Path=/; HttpOnly" in lines
        assert body == b"Redirecting to landing page r%20x\n"
    assert [r.raw_path for r in recorded[-2:]] == ["/c/r%20x?utm=1"] * 2  # nothing followed


async def test_head_of_a_large_download_keeps_the_backend_connection_usable(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    host = await certify(edge, pebble, dns_server)
    async with https_session(edge, pebble) as session:
        for _ in range(3):  # HEAD, then GETs on the pooled backend connection
            async with session.head(url(edge, host, "/big?bytes=300000")) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Length"] == "300000"
                assert await resp.read() == b""
            async with session.get(url(edge, host, "/big?bytes=70000")) as resp:
                assert len(await resp.read()) == 70000


# -- trusted forwarders ------------------------------------------------------------------


async def test_forwarding_chain_kept_only_from_trusted_forwarders(
    edge_config: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    """listen.forwarded_trusted = 127.0.0.5/32 (say, a CDN): its chain gets the client
    appended; the same headers from 127.0.0.6 are dropped and rebuilt."""
    edge_config.config.listen.forwarded_trusted = ["127.0.0.5/32"]
    edge = edge_config
    await edge.start()
    try:
        host = await certify(edge, pebble, dns_server)
        recorded: list[RecordedRequest] = backend[1]
        incoming = {
            "X-Forwarded-For": "203.0.113.1, 198.51.100.2",
            "Forwarded": "for=203.0.113.1;proto=https",
            "X-Forwarded-Proto": "https",
            "X-Real-IP": "203.0.113.1",
        }
        for source in ("127.0.0.5", "127.0.0.6"):
            connector = aiohttp.TCPConnector(
                resolver=StaticResolver(edge.ip),
                ssl=client_context(pebble),
                local_addr=(source, 0),
            )
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.get(
                    url(edge, host, f"/c/from-{source}"), headers=incoming, allow_redirects=False
                ) as resp,
            ):
                assert resp.status == 302
        trusted, untrusted = recorded[-2:]
        authority = f"{host}:{edge.https_port}"
        assert header_values(trusted, "X-Forwarded-For") == ["203.0.113.1, 198.51.100.2, 127.0.0.5"]
        assert header_values(trusted, "Forwarded") == [
            f'for=203.0.113.1;proto=https, for=127.0.0.5;proto=https;host="{authority}"'
        ]
        assert header_values(trusted, "X-Real-IP") == ["203.0.113.1"]
        assert header_values(untrusted, "X-Forwarded-For") == ["127.0.0.6"]
        assert header_values(untrusted, "Forwarded") == [
            f'for=127.0.0.6;proto=https;host="{authority}"'
        ]
        assert header_values(untrusted, "X-Real-IP") == []
        assert not any("203.0.113.1" in v for _, v in untrusted.headers)
    finally:
        await edge.stop()
