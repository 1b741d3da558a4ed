"""Issue 12: the lean click protocol (`proxy/http/click_protocol.py`, `listen.lean_clicks`).

Its answers are aiohttp's, byte for byte (only Date may differ): each request is sent
once to the lean path and once on a connection handed to aiohttp at once, over TLS and
plain HTTP, against a backend answering 302s with cookies, chunked bodies, 204, 304, a
large streamed body and its own Server and HSTS fields. Then what it hands to aiohttp
(a body, pipelining, a head in two pieces) on a kept-alive connection, and the bounds
it keeps itself: the idle timeout, the per-source cap, the client leaving mid-forward,
the drain on SIGTERM.
The rest of the suite runs with it on (the default); tests/test_lean_clicks_off.py runs
the forwarding tests again with it off.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import socket
import ssl
from collections.abc import AsyncIterator

import pytest
from aiohttp import HttpVersion11, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParser
from hypothesis import example, given, settings
from hypothesis import strategies as st
from support.clicks import certify
from support.edge import EdgeHandle, client_context

from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer
from proxy.http import click_protocol
from proxy.http.click_protocol import ClickPaths
from proxy.http.host_views import HostView

BIG = 300_000


async def _click(request: web.Request) -> web.Response:
    response = web.Response(
        status=302, text="redirecting\n", headers={"Location": "https://shop.test/landing?a=1"}
    )
    response.headers.add("Set-Cookie", "a=1; Path=/")
    response.headers.add("Set-Cookie", "b=2; Path=/; HttpOnly")
    return response


async def _chunked(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"X-Kind": "chunked"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    for i in range(3 if request.method == "GET" else 0):  # aiohttp would send HEAD a body
        await response.write(b"part %d\n" % i)
        await asyncio.sleep(0.01)
    await response.write_eof()
    return response


async def _big(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = BIG
    await response.prepare(request)
    for _ in range(BIG // 10_000 if request.method == "GET" else 0):
        await response.write(b"y" * 10_000)
    await response.write_eof()
    return response


async def _own_fields(request: web.Request) -> web.Response:
    return web.Response(
        text="mine\n",
        headers={"Server": "backend/1.0", "Strict-Transport-Security": "max-age=1; preload"},
    )


async def _empty(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={"X-Kind": "empty"})


async def _not_modified(request: web.Request) -> web.Response:
    return web.Response(status=304, headers={"ETag": '"v1"'})


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("s", "5")))
    return web.Response(text="late\n")


@pytest.fixture
async def backend() -> AsyncIterator[tuple[str, list[object]]]:
    """This module's backend (the edge fixtures take its URL)."""
    app = web.Application()
    app.router.add_get("/c/{id}", _click)
    app.router.add_get("/chunked", _chunked)
    app.router.add_get("/big", _big)
    app.router.add_get("/own", _own_fields)
    app.router.add_get("/empty", _empty)
    app.router.add_get("/notmod", _not_modified)
    app.router.add_get("/slow", _slow)
    app.router.add_route("*", "/echo", _echo)
    app.router.add_get("/healthz", _ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", []
    await runner.cleanup()


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.Response(text=f"{request.method} {request.path_qs} {body.decode()}\n")


# -- a small HTTP/1.1 client that keeps the bytes ------------------------------------------


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(
        cls, edge: EdgeHandle, pebble: PebbleServer, host: str, *, tls: bool = True
    ) -> Conn:
        ctx: ssl.SSLContext | None = client_context(pebble) if tls else None
        port = edge.https_port if tls else edge.http_port
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(edge.ip, port, ssl=ctx, server_hostname=host if tls else None),
            10,
        )
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, *, head_request: bool = False) -> bytes:
        """One whole response as received (head and framed body)."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        status = int(head.split(b" ", 2)[1])
        fields = head.lower()
        if head_request or status in (204, 304) or 100 <= status < 200:
            return head
        match = re.search(rb"\r\ncontent-length: *(\d+)", fields)
        if match:
            body = await asyncio.wait_for(self.reader.readexactly(int(match.group(1))), 10)
            return head + body
        assert b"\r\ntransfer-encoding: chunked" in fields, head
        body = b""
        while True:
            size_line = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), 10)
            size = int(size_line.strip(), 16)
            chunk = await asyncio.wait_for(self.reader.readexactly(size + 2), 10)
            body += size_line + chunk
            if size == 0:
                return head + body

    async def get(self, host: str, path: str, extra: str = "") -> bytes:
        await self.send(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
        return await self.response()

    async def head(self, host: str, path: str) -> bytes:
        await self.send(f"HEAD {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        return await self.response(head_request=True)

    async def closed_by_server(self, timeout: float = 15) -> bool:
        try:
            data = await asyncio.wait_for(self.reader.read(1), timeout)
        except (ConnectionError, ssl.SSLError):
            return True
        return data == b""

    def close(self) -> None:
        self.writer.close()


def _without_date(response: bytes) -> bytes:
    return re.sub(rb"\r\nDate: [^\r]*", b"\r\nDate: -", response)


def _clicks(edge: EdgeHandle) -> ClickPaths:
    assert edge.worker is not None and edge.worker.clicks is not None, "lean clicks are off"
    return edge.worker.clicks


PATHS = ["/c/abc?utm=1&x=%2F", "/chunked", "/big", "/own", "/empty", "/notmod"]
HEAD_PATHS = ["/c/h", "/chunked", "/big", "/empty"]


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
async def test_lean_answers_are_aiohttps_byte_for_byte(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, tls: bool
) -> None:
    host = await certify(edge, pebble, dns_server)
    async with _hsts(edge, host, 600):  # the edge's HSTS replaces the backend's (HTTPS)
        clicks = _clicks(edge)
        conn = await lean_conn(edge, pebble, host, tls=tls)
        try:
            lean_before, handed_before = clicks.stats.lean, clicks.stats.handed_off
            direct_before = clicks.stats.direct
            lean = [await conn.get(host, path) for path in PATHS]
            for path in HEAD_PATHS:
                lean.append(await conn.head(host, path))
            lean.append(await conn.get(host, "/c/last", "Connection: close\r\n"))
            assert await conn.closed_by_server()
        finally:
            conn.close()
        # all on one lean connection
        assert clicks.stats.lean - lean_before == len(PATHS) + len(HEAD_PATHS) + 1
        assert clicks.stats.handed_off == handed_before
        # the GETs without a task (Forwarder.forward_now: a pooled backend connection is
        # idle), but for at most one whose host view the event feed made the worker forget
        assert clicks.stats.direct - direct_before >= len(PATHS)

        # the same requests through aiohttp: every connection handed to it at once
        clicks.access_logged = lambda: True
        try:
            plain_conn = await Conn.open(edge, pebble, host, tls=tls)
            try:
                reference = [await plain_conn.get(host, path) for path in PATHS]
                for path in HEAD_PATHS:
                    reference.append(await plain_conn.head(host, path))
                reference.append(await plain_conn.get(host, "/c/last", "Connection: close\r\n"))
                assert await plain_conn.closed_by_server()
            finally:
                plain_conn.close()
        finally:
            clicks.access_logged = lambda: False
        assert clicks.stats.lean - lean_before == len(PATHS) + len(HEAD_PATHS) + 1
        assert clicks.stats.handed_off == handed_before + 1
    names = [*PATHS, *(f"HEAD {p}" for p in HEAD_PATHS), "close"]
    for path, mine, theirs in zip(names, lean, reference, strict=True):
        assert _without_date(mine) == _without_date(theirs), path
    first = lean[0]
    assert first.startswith(b"HTTP/1.1 302 Found\r\n")
    assert first.count(b"\r\nSet-Cookie: ") == 2
    assert (b"\r\nStrict-Transport-Security: max-age=600\r\n" in lean[3]) == tls
    assert b"preload" not in lean[3] and b"\r\nServer: backend/1.0\r\n" in lean[3]
    assert len(lean[2]) > BIG
    assert b"\r\nConnection: close\r\n" in lean[-1]


class _hsts:
    """The host's hsts_max_age option for the duration, through the store and the event
    feed, and the host's view in memory again afterwards (a host not in memory is
    aiohttp's: its view is read there)."""

    def __init__(self, edge: EdgeHandle, host: str, seconds: int) -> None:
        self.edge, self.host, self.seconds = edge, host, seconds

    async def __aenter__(self) -> None:
        await self._set(self.seconds)

    async def __aexit__(self, *exc: object) -> None:
        await self._set(None)

    async def _set(self, seconds: int | None) -> None:
        assert self.edge.worker is not None and self.edge.worker.host_views is not None
        views = self.edge.worker.host_views
        await views.get(self.host)
        store = await self.edge.open_store()
        try:
            await store.put_options(self.host, {"hsts_max_age": seconds, "https_upgrade": False})
        finally:
            await store.close()
        view = await settled(self.edge, self.host)
        assert view is not None and view.hsts_max_age == seconds


async def settled(edge: EdgeHandle, host: str) -> HostView | None:
    """The worker has applied every event so far (an issuance, an option changed: each
    makes it forget the host) and has the host's view in memory again: its clicks are
    lean (a host not in memory is aiohttp's, whose handler reads the view)."""
    assert edge.worker is not None and edge.worker.state_sync is not None
    assert edge.worker.host_views is not None
    await edge.worker.state_sync.poll()
    return await edge.worker.host_views.get(host)


async def lean_conn(edge: EdgeHandle, pebble: PebbleServer, host: str, *, tls: bool = True) -> Conn:
    """A connection whose first click was lean (the event feed's own poll may still make
    the worker forget the host once after `settled`: then that connection is aiohttp's)."""
    clicks = _clicks(edge)
    for _ in range(20):
        await settled(edge, host)
        before = clicks.stats.lean
        conn = await Conn.open(edge, pebble, host, tls=tls)
        assert (await conn.get(host, "/c/warm")).startswith(b"HTTP/1.1 302 ")
        if clicks.stats.lean == before + 1:
            return conn
        conn.close()
        await asyncio.sleep(0.1)
    raise AssertionError("no click was lean")


async def test_a_kept_alive_connection_goes_to_aiohttp_at_a_request_boundary(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    host = await certify(edge, pebble, dns_server)
    clicks = _clicks(edge)
    conn = await lean_conn(edge, pebble, host)
    try:
        lean_before, handed_before = clicks.stats.lean, clicks.stats.handed_off
        assert (await conn.get(host, "/c/1")).startswith(b"HTTP/1.1 302 ")
        assert (await conn.get(host, "/c/2")).startswith(b"HTTP/1.1 302 ")
        assert clicks.stats.lean == lean_before + 2
        # a body: aiohttp's from here on, on the same connection
        await conn.send(
            f"POST /echo?u=1 HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n\r\nhello".encode()
        )
        assert (await conn.response()).endswith(b"POST /echo?u=1 hello\n")
        assert clicks.stats.handed_off == handed_before + 1
        # pipelined GETs and a head in two pieces: answered in order, by aiohttp
        await conn.send(
            f"GET /c/3 HTTP/1.1\r\nHost: {host}\r\n\r\n"
            f"GET /c/4 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        )
        assert (await conn.response()).startswith(b"HTTP/1.1 302 ")
        assert (await conn.response()).startswith(b"HTTP/1.1 302 ")
        await conn.send(b"GET /c/5 HTTP/1.1\r\nHo")
        await asyncio.sleep(0.05)
        await conn.send(f"st: {host}\r\n\r\n".encode())
        assert (await conn.response()).startswith(b"HTTP/1.1 302 ")
        assert clicks.stats.lean == lean_before + 2
    finally:
        conn.close()

    # each kind of request that is not a lean click goes to aiohttp on its first bytes
    cases = [
        f"GET /c/6 HTTP/1.1\r\nHost: {host}\r\n\r\nGET /c/7 HTTP/1.1\r\nHost: {host}\r\n\r\n",
        f"GET /c/6 HTTP/1.0\r\nHost: {host}\r\n\r\n",
        f"GET /c/6 HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n",
        f"GET /c/6 HTTP/1.1\r\nHost: {host}\r\nExpect: 100-continue\r\n\r\n",
        "GET /c/6 HTTP/1.1\r\nHost: other.example.test\r\n\r\n",  # 421
        f"GET /.well-known/acme-challenge/abc HTTP/1.1\r\nHost: {host}\r\n\r\n",
        f"GET /.well-known/assetlinks.json HTTP/1.1\r\nHost: {host}\r\n\r\n",
        f"GET /c/6 HTTP/1.1\r\nHost: {host}\r\nHost: {host}\r\n\r\n",  # 400
        f"GET /c/\x01 HTTP/1.1\r\nHost: {host}\r\n\r\n",  # aiohttp's parser: 400
    ]
    for request in cases:
        lean_before, handed_before = clicks.stats.lean, clicks.stats.handed_off
        conn = await Conn.open(edge, pebble, host)
        try:
            await conn.send(request.encode())
            answer = await conn.response(head_request=request.startswith("HEAD"))
            assert answer.startswith(b"HTTP/1."), (request, answer)
        finally:
            conn.close()
        assert clicks.stats.lean == lean_before, request
        assert clicks.stats.handed_off == handed_before + 1, request


class _CountingParser:
    """A lean connection's request parser, counting the heads it is given."""

    def __init__(self, parser: object) -> None:
        self.parser = parser
        self.fed: list[bytes] = []

    def feed_data(self, data: bytes) -> object:
        self.fed.append(data)
        return self.parser.feed_data(data)  # type: ignore[attr-defined]


def _lean_protocols(edge: EdgeHandle) -> list[click_protocol.LeanClickProtocol]:
    assert edge.worker is not None and edge.worker.connections is not None
    by_source = edge.worker.connections._by_source  # noqa: SLF001
    protocols = [p for conns in by_source.values() for p in conns]
    return [p for p in protocols if isinstance(p, click_protocol.LeanClickProtocol)]


async def test_a_repeated_header_block_is_not_parsed_again(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    """A request whose header block is byte for byte the last lean click's needs only its
    request line read; a line outside the strict pattern, or another block, goes to
    aiohttp's parser, and what that parser refuses or what is not a lean click is still
    aiohttp's answer."""
    host = await certify(edge, pebble, dns_server)
    clicks = _clicks(edge)
    block = f"Host: {host}\r\nUser-Agent: repeat/1\r\nAccept: */*\r\n\r\n"
    conn = await lean_conn(edge, pebble, host)
    try:
        (protocol,) = _lean_protocols(edge)
        counting = protocol._parser = _CountingParser(protocol._parser)  # noqa: SLF001
        lean_before = clicks.stats.lean
        for n in range(3):  # the first is parsed, the two after it are not
            await conn.send(f"GET /echo?n={n} HTTP/1.1\r\n{block}".encode())
            assert (await conn.response()).endswith(f"GET /echo?n={n} \n".encode())
        await conn.send(f"HEAD /c/h HTTP/1.1\r\n{block}".encode())
        assert (await conn.response(head_request=True)).startswith(b"HTTP/1.1 302 Found\r\n")
        assert len(counting.fed) == 1 and counting.fed[0].startswith(b"GET /echo?n=0 ")
        assert clicks.stats.lean == lean_before + 4
        # another block (a Connection field): parsed, and its `close` is kept
        await conn.send(f"GET /echo?n=9 HTTP/1.1\r\nConnection: close\r\n{block}".encode())
        answer = await conn.response()
        assert b"\r\nConnection: close\r\n" in answer and answer.endswith(b"GET /echo?n=9 \n")
        assert len(counting.fed) == 2
        assert await conn.closed_by_server()
    finally:
        conn.close()

    # behind the same block, each line the pattern refuses is parsed; whatever is not a
    # lean click (a refused line, another version or method, an association file) is
    # handed to aiohttp on its first byte, as on a fresh connection
    not_lean = [
        ("GET /c/6 HTTP/1.0", b"HTTP/1.0 302 ", True),
        ("GET /c/\x01 HTTP/1.1", b"HTTP/1.0 400 ", True),  # aiohttp's parser error
        ("get /c/6 HTTP/1.1", b"HTTP/1.0 400 ", True),
        ("POST /echo HTTP/1.1", b"HTTP/1.1 200 ", True),
        ("GET /.well-known/assetlinks.json HTTP/1.1", b"HTTP/1.1 404 ", False),
    ]
    for line, status, parsed in not_lean:
        conn = await lean_conn(edge, pebble, host)
        try:
            (protocol,) = _lean_protocols(edge)
            await conn.send(f"GET /c/1 HTTP/1.1\r\n{block}".encode())
            assert (await conn.response()).startswith(b"HTTP/1.1 302 ")
            counting = protocol._parser = _CountingParser(protocol._parser)  # noqa: SLF001
            lean_before, handed_before = clicks.stats.lean, clicks.stats.handed_off
            await conn.send(f"{line}\r\n{block}".encode())
            answer = await conn.response()
            assert answer.startswith(status), (line, answer)
            assert len(counting.fed) == parsed, line
            assert clicks.stats.lean == lean_before, line
            assert clicks.stats.handed_off == handed_before + 1, line
        finally:
            conn.close()


_LINE_PIECES = st.sampled_from(["GET", "HEAD", "get", "POST", "GETS", "HEAD "])
_TARGETS = st.text(
    alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F) | st.sampled_from("é\u2028"),
    max_size=30,
)


@settings(max_examples=500, deadline=None)
@given(
    method=_LINE_PIECES,
    target=_TARGETS,
    slash=st.booleans(),
    version=st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/1.1 ", "HTTP/2.0", "http/1.1"]),
)
@example(method="GET", target="c/1?a=%2F&b=:@!$'()*+,;=~", slash=True, version="HTTP/1.1")
@example(method="HEAD", target="", slash=True, version="HTTP/1.1")
@example(method="GET", target="c/ 1", slash=True, version="HTTP/1.1")
@example(method="GET", target="c/1#top", slash=True, version="HTTP/1.1")
@example(method="GET", target="c/\x7f", slash=True, version="HTTP/1.1")
def test_a_request_line_read_alone_is_read_as_aiohttps_parser_reads_it(
    method: str, target: str, slash: bool, version: str
) -> None:
    """Whatever request line the lean pattern takes, aiohttp's parser takes too, as the
    same method, target and version: reading the line alone never accepts a request
    aiohttp would refuse, nor reads one differently."""
    line = f"{method} {'/' if slash else ''}{target} {version}".encode("utf-8", "surrogateescape")
    match = click_protocol._LEAN_REQUEST_LINE.fullmatch(line)  # noqa: SLF001
    if match is None:
        return  # the parser reads it (the path every first request takes)
    loop = asyncio.new_event_loop()
    try:
        parser = HttpRequestParser(
            BaseProtocol(loop), loop, 2**16, payload_exception=HttpProcessingError
        )
        messages, upgraded, tail = parser.feed_data(line + b"\r\nHost: a.test\r\n\r\n")
    finally:
        loop.close()
    assert len(messages) == 1 and not upgraded and not tail
    message = messages[0][0]
    assert (message.method, message.path) == (match[1].decode(), match[2].decode())
    assert message.version == HttpVersion11


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
async def test_lean_connections_have_tcp_keepalive_and_nodelay(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, tls: bool
) -> None:
    # the click protocol sets no socket option itself: the listening sockets' are
    # inherited (proxy/tls/accept.inherited_options), HTTP's through asyncio's server
    host = await certify(edge, pebble, dns_server)
    conn = await lean_conn(edge, pebble, host, tls=tls)
    try:
        socks = [p.transport.get_extra_info("socket") for p in _lean_protocols(edge) if p.transport]
        assert socks, "no lean connection open"
        for sock in socks:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        conn.close()


async def test_lean_connections_keep_the_idle_timeout_and_the_per_source_cap(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    host = await certify(edge, pebble, dns_server)  # Pebble's validations: not capped yet
    await settled(edge, host)
    clicks = _clicks(edge)
    assert edge.worker is not None and edge.worker.connections is not None
    limits = edge.worker.connections
    limits.settings = dataclasses.replace(limits.settings, max_per_source=2)
    stats = limits.stats
    lean_before = clicks.stats.lean
    # the source's third connection closes its least recently used idle one
    conns = [await lean_conn(edge, pebble, host, tls=False) for _ in range(2)]
    try:
        for i, c in enumerate(conns):
            assert (await c.get(host, f"/c/cap{i}")).startswith(b"HTTP/1.1 302 ")
        evicted = stats.evicted_source
        third = await lean_conn(edge, pebble, host, tls=False)
        conns.append(third)
        assert (await third.get(host, "/c/cap3")).startswith(b"HTTP/1.1 302 ")
        assert await conns[0].closed_by_server()
        assert stats.evicted_source == evicted + 1
        assert (await conns[1].get(host, "/c/still")).startswith(b"HTTP/1.1 302 ")
    finally:
        for c in conns:
            c.close()
    # the idle timeout: the edge closes a kept-alive connection after its click
    clicks.idle_timeout = 1.0  # what listen.idle_timeout sets
    conn = await lean_conn(edge, pebble, host)
    try:
        assert (await conn.get(host, "/c/idle")).startswith(b"HTTP/1.1 302 ")
        assert await conn.closed_by_server()
    finally:
        conn.close()
    assert clicks.stats.lean - lean_before >= 9


async def test_a_client_leaving_mid_forward_cancels_it(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    host = await certify(edge, pebble, dns_server)
    forwarder = edge.worker.forwarder if edge.worker is not None else None
    assert forwarder is not None
    cancelled = forwarder.stats.cancelled
    conn = await Conn.open(edge, pebble, host)
    await conn.send(f"GET /slow?s=20 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    for _ in range(200):  # the forward is at the backend
        if forwarder.in_flight():
            break
        await asyncio.sleep(0.02)
    assert forwarder.in_flight() == 1
    conn.writer.transport.abort()
    for _ in range(500):
        if not forwarder.in_flight():
            break
        await asyncio.sleep(0.02)
    assert forwarder.in_flight() == 0
    assert forwarder.stats.cancelled == cancelled + 1


async def test_drain_closes_idle_lean_connections_and_finishes_clicks_in_flight(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    host = await certify(edge, pebble, dns_server)
    clicks = _clicks(edge)
    idle = await lean_conn(edge, pebble, host)
    busy = await lean_conn(edge, pebble, host, tls=False)
    try:
        lean_before = clicks.stats.lean
        await busy.send(f"GET /slow?s=1 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        forwarder = edge.worker.forwarder if edge.worker is not None else None
        assert forwarder is not None
        for _ in range(200):  # the click is at the backend
            if forwarder.in_flight():
                break
            await asyncio.sleep(0.02)
        assert edge.worker is not None
        drain = asyncio.ensure_future(edge.worker.drain(10))
        assert await idle.closed_by_server()  # idle: closed at once
        answer = await busy.response()  # in flight: answered, then closed
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"late\n")
        assert await busy.closed_by_server()
        await asyncio.wait_for(drain, 15)
        assert clicks.stats.lean == lean_before + 1
    finally:
        idle.close()
        busy.close()
