"""Forwarding through the edge over HTTPS (Pebble certificates, real clients)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import pytest
from conftest import EdgeHandle, client_context, free_port, https_session
from helpers_edge import certify, edge_store, url

from proxy.demo.backend import RecordedRequest
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
