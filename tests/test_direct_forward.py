"""Issue 12: clicks forwarded without a task (`Forwarder.forward_now`).

On a kept-alive client connection whose backend has an idle pooled connection, the
lean click protocol forwards a GET from inside `data_received` and relays a whole
answer from inside the backend connection's `data_received`. Everything else finishes
in a task, with `handle_lean`'s answers and bounds. Each path is driven here through a
real edge (TLS from Pebble's certificate) against a scripted raw backend: a whole answer,
a body still arriving, no answer (the answer timeout and the forward deadline), a kept-
alive backend connection closed without an answer (retried), a malformed answer, the
client leaving, and the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from types import SimpleNamespace
from typing import Any

import pytest
from support.clicks import certify
from support.edge import EdgeHandle
from test_click_protocol import Conn, _clicks, lean_conn

from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer
from proxy.http import click_protocol, forward
from proxy.http.backends import BackendPool
from proxy.http.forward import Forwarder, _DirectForward
from proxy.http.lean_client import header_block

REDIRECT = b"HTTP/1.1 302 Found\r\nLocation: https://shop.test/x\r\nContent-Length: 0\r\n\r\n"


ODD_ANSWERS = [
    b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 302 Trouv\xe9\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 302 Found\r\nLocation: /caf\xc3\xa9\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 302 Found\r\nLocation: /caf\xe9\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 302 Found\r\nX-\xe9: 1\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 302 Found\r\nLocation: /x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 302 Found\r\nLocation:\r\n /folded\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 302 Found\r\nLocation: /x\rX-B: y\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 302 Found\nLocation: /x\nContent-Length: 0\n\n",
    b"HTTP/1.1 302\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 302 Found\r\nLocation: /x\x00y\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 302 Found\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
]


# What each becomes (its status line's start; the rest is compared between the two ways)
ODD_EXPECTED = [
    b"HTTP/1.1 999 Odd\r\n",
    b"HTTP/1.1 302 Trouv\r\n",  # aiohttp drops the reason's non-UTF-8 byte
    b"HTTP/1.1 302 Found\r\nLocation: /caf\xc3\xa9\r\n",
    b"HTTP/1.1 302 Found\r\nLocation: /caf\r\n",  # and a field value's (a surrogate)
    b"HTTP/1.1 502 ",
    b"HTTP/1.1 502 ",  # two Content-Length fields
    b"HTTP/1.1 302 Found\r\nLocation: /folded\r\n",
    b"HTTP/1.1 502 ",  # a bare CR
    b"HTTP/1.1 302 Found\r\n",  # bare LFs
    b"HTTP/1.1 302 \r\n",
    b"HTTP/1.1 502 ",  # NUL
    b"HTTP/1.1 204 No Content\r\n",
    b"HTTP/1.1 502 ",  # Transfer-Encoding and Content-Length
]


class _Backend(asyncio.Protocol):
    """Answers by path: a 302 by default; `/hang` never; `/close-once` closes the
    connection without an answer the first time; `/garbage` is not HTTP; `/half` sends
    its body in two parts 0.3 s apart; `/slow` answers after 0.5 s."""

    seen: dict[str, int]
    heads: dict[str, bytes]  # the last request head seen per path
    connections: list[_Backend]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""
        self.closed = asyncio.get_running_loop().create_future()
        self.connections.append(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode().partition("?")[0]
            self.seen[path] = self.seen.get(path, 0) + 1
            self.heads[path] = head
            self.answer(path)

    def answer(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        if path == "/hang":
            return
        if path == "/close-once" and self.seen[path] == 1:
            self.transport.close()
        elif path == "/garbage":
            self.transport.write(b"HTTP/1.1 2x0 What\r\nContent-Length: zero\r\n\r\n")
        elif path == "/control":  # a control byte in a field's value
            self.transport.write(REDIRECT.replace(b"/x\r\n", b"/x\x01y\r\n"))
        elif path.startswith("/odd/"):  # an odd answer head, by number
            self.transport.write(ODD_ANSWERS[int(path[5:])])
        elif path == "/control-half":  # the same, its body still arriving
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nX-A: a\x7fb\r\nContent-Length: 10\r\n\r\nfirst"
            )
            loop.call_later(0.3, self.transport.write, b"-last")
        elif path == "/half":
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
            loop.call_later(0.3, self.transport.write, b"-last")
        elif path == "/slow":
            loop.call_later(0.5, self.transport.write, REDIRECT)
        else:
            self.transport.write(REDIRECT)


@contextlib.asynccontextmanager
async def _scripted_backend() -> AsyncIterator[tuple[str, list[_Backend], dict[str, int]]]:
    """A `_Backend` server on loopback: its URL, its connections and the paths they saw."""
    connections: list[_Backend] = []
    seen: dict[str, int] = {}
    heads: dict[str, bytes] = {}

    def factory() -> _Backend:
        protocol = _Backend()
        protocol.seen, protocol.heads, protocol.connections = seen, heads, connections
        return protocol

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", connections, seen
    finally:
        server.close()
        for conn in connections:
            conn.transport.abort()
        await server.wait_closed()


@pytest.fixture
async def backend() -> AsyncIterator[tuple[str, list[_Backend]]]:
    """This module's backend (the edge fixtures take its URL)."""
    async with _scripted_backend() as (url, connections, _seen):
        yield url, connections


def _forwarder(edge: EdgeHandle) -> Forwarder:
    assert edge.worker is not None and edge.worker.forwarder is not None
    return edge.worker.forwarder


async def _ready(edge: EdgeHandle, pebble: PebbleServer, dns: DNSServer) -> tuple[str, Conn]:
    """A host with its certificate and a client connection whose click went the lean
    way, so that the backend has a pooled idle connection for the next one."""
    host = await certify(edge, pebble, dns)
    conn = await lean_conn(edge, pebble, host)
    direct = _clicks(edge).stats.direct
    assert (await conn.get(host, "/c/warm")).startswith(b"HTTP/1.1 302 ")
    assert _clicks(edge).stats.direct == direct + 1, "the second click went without a task"
    return host, conn


async def _drained(forwarder: Forwarder) -> None:
    for _ in range(200):
        if forwarder.in_flight() == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{forwarder.in_flight()} forwards still in flight")


async def test_whole_answers_are_relayed_from_the_backend_connection(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    host, conn = await _ready(edge, pebble, dns_server)
    clicks = _clicks(edge)
    try:
        direct, lean = clicks.stats.direct, clicks.stats.lean
        for i in range(5):
            answer = await conn.get(host, f"/c/{i}?utm=1")
            assert answer.startswith(b"HTTP/1.1 302 Found\r\n"), answer
            assert b"\r\nLocation: https://shop.test/x\r\n" in answer
            assert b"\r\nServer: linkedge\r\n" in answer
        assert clicks.stats.direct == direct + 5
        assert clicks.stats.lean == lean + 5
        assert _forwarder(edge).in_flight() == 0
    finally:
        conn.close()


async def test_a_repeated_header_block_is_forwarded_from_the_connections_memo(
    edge: EdgeHandle,
    pebble: PebbleServer,
    dns_server: DNSServer,
    backend: tuple[str, list[_Backend]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the forwarded block is made once per distinct header block on a connection; what
    # the backend gets is the same as when it is made for every click
    built: list[str] = []

    def counted(headers: Any) -> str:
        block = header_block(headers)
        built.append(block)
        return block

    host, conn = await _ready(edge, pebble, dns_server)
    monkeypatch.setattr(forward, "header_block", counted)
    heads = backend[1][0].heads
    try:
        for path, extra in [
            ("/m/1", "Cookie: a=1\r\n"),  # a new block: made
            ("/m/2", "Cookie: a=1\r\n"),  # the same: reused
            ("/m/3", "Cookie: a=2\r\n"),  # changed: made again
            ("/m/4", "Cookie: a=2\r\n"),
        ]:
            assert (await conn.get(host, path, extra)).startswith(b"HTTP/1.1 302 "), path
        # absolute-form: the target's authority is the Host, whatever the Host field says
        await conn.send(f"GET https://{host}/m/5 HTTP/1.1\r\nHost: other.test\r\n\r\n".encode())
        assert (await conn.response()).startswith(b"HTTP/1.1 302 ")
        assert (await conn.get(host, "/m/6", "Cookie: a=2\r\n")).startswith(b"HTTP/1.1 302 ")
    finally:
        conn.close()
    assert len(built) == 3  # /m/1, /m/3, /m/5 (never kept)

    def fields(path: str) -> list[bytes]:
        return heads[path].split(b"\r\n")[1:]

    assert fields("/m/1") == fields("/m/2") != fields("/m/3") == fields("/m/4") == fields("/m/6")
    assert b"Cookie: a=1" in fields("/m/1") and b"Cookie: a=2" in fields("/m/3")
    assert fields("/m/1")[0] == f"Host: {host}".encode()
    assert f"X-Forwarded-Host: {host}".encode() in fields("/m/1")
    assert fields("/m/5")[0] == f"Host: {host}".encode()
    assert b"other.test" not in heads["/m/5"] and b"Cookie" not in heads["/m/5"]


async def test_a_body_still_arriving_is_streamed_by_a_task(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    host, conn = await _ready(edge, pebble, dns_server)
    direct = _clicks(edge).stats.direct
    try:
        answer = await conn.get(host, "/half")
        assert _clicks(edge).stats.direct == direct + 1
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert answer.endswith(b"\r\n\r\nfirst-last")
        assert (await conn.get(host, "/c/after")).startswith(b"HTTP/1.1 302 ")  # kept alive
        await _drained(_forwarder(edge))
    finally:
        conn.close()


async def test_a_pooled_connection_closed_without_an_answer_is_retried(
    edge: EdgeHandle,
    pebble: PebbleServer,
    dns_server: DNSServer,
    backend: tuple[str, list[_Backend]],
) -> None:
    host, conn = await _ready(edge, pebble, dns_server)
    try:
        before, direct = len(backend[1]), _clicks(edge).stats.direct
        answer = await conn.get(host, "/close-once")
        assert answer.startswith(b"HTTP/1.1 302 "), answer
        assert _clicks(edge).stats.direct == direct + 1
        assert len(backend[1]) == before + 1  # the retry went on a new backend connection
        assert backend[1][0].seen["/close-once"] == 2
        await _drained(_forwarder(edge))
    finally:
        conn.close()


async def test_a_malformed_answer_is_a_502_and_its_connection_closed(
    edge: EdgeHandle,
    pebble: PebbleServer,
    dns_server: DNSServer,
    backend: tuple[str, list[_Backend]],
) -> None:
    host, conn = await _ready(edge, pebble, dns_server)
    try:
        direct = _clicks(edge).stats.direct
        answer = await conn.get(host, "/garbage")
        assert _clicks(edge).stats.direct == direct + 1
        assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), answer
        assert b"the tracking backend is unavailable" in answer
        assert backend[1][0].seen["/garbage"] == 1  # not sent twice
        await asyncio.wait_for(asyncio.gather(*(c.closed for c in backend[1])), 5)
        await _drained(_forwarder(edge))
    finally:
        conn.close()


@pytest.mark.parametrize(
    "way", ["direct", "direct, body arriving", "HEAD in a task", "aiohttp's", "aiohttp's HEAD"]
)
async def test_an_answer_with_a_control_byte_in_its_head_is_a_502(
    edge: EdgeHandle,
    pebble: PebbleServer,
    dns_server: DNSServer,
    backend: tuple[str, list[_Backend]],
    caplog: pytest.LogCaptureFixture,
    way: str,
) -> None:
    """aiohttp's answer parser lets a control byte in a field through; relayed, it would
    be a header injection, and aiohttp's serializer refuses it. Whichever way the click
    goes, the client gets the 502 of a malformed answer, and no traceback is logged."""
    host, conn = await _ready(edge, pebble, dns_server)
    clicks = _clicks(edge)
    try:
        if way.startswith("aiohttp's"):
            clicks.access_logged = lambda: True  # every new connection is aiohttp's
            conn.close()
            conn = await Conn.open(edge, pebble, host)
        direct = clicks.stats.direct
        path = "/control-half" if "arriving" in way else "/control"
        if way.endswith("HEAD") or way.startswith("HEAD"):
            answer = await conn.head(host, path)
        else:
            answer = await conn.get(host, path)
        assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), answer
        assert b"\x01" not in answer and b"\x7f" not in answer
        assert clicks.stats.direct == direct + way.startswith("direct")
        assert "a control character in the answer's head" in caplog.text
        assert "Traceback" not in caplog.text and "Error handling request" not in caplog.text
    finally:
        clicks.access_logged = lambda: False
        conn.close()


@pytest.mark.parametrize("limit", ["timeout", "deadline"])
async def test_no_answer_in_time_is_a_504(
    edge_config: EdgeHandle,
    pebble: PebbleServer,
    dns_server: DNSServer,
    backend: tuple[str, list[_Backend]],
    limit: str,
) -> None:
    # the earlier of the backend's answer timeout and the forward deadline ends it
    edge_config.config.backend.timeout = 1.0 if limit == "timeout" else 30
    edge_config.config.backend.deadline = 1.0 if limit == "deadline" else 30
    await edge_config.start()
    try:
        host, conn = await _ready(edge_config, pebble, dns_server)
        forwarder = _forwarder(edge_config)
        deadlines, direct = forwarder.stats.deadlines, _clicks(edge_config).stats.direct
        loop = asyncio.get_running_loop()
        started = loop.time()
        answer = await conn.get(host, "/hang")
        elapsed = loop.time() - started
        conn.close()
        assert answer.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n"), answer
        assert 0.9 < elapsed < 2.5
        assert forwarder.stats.deadlines == deadlines + (limit == "deadline")
        assert _clicks(edge_config).stats.direct == direct + 1
        hung = [c for c in backend[1] if c.seen.get("/hang")]
        await asyncio.wait_for(asyncio.gather(*(c.closed for c in hung)), 5)
        await _drained(forwarder)
    finally:
        await edge_config.stop()


async def test_a_client_leaving_closes_the_backend_connection(
    edge: EdgeHandle,
    pebble: PebbleServer,
    dns_server: DNSServer,
    backend: tuple[str, list[_Backend]],
) -> None:
    host, conn = await _ready(edge, pebble, dns_server)
    forwarder = _forwarder(edge)
    cancelled, direct = forwarder.stats.cancelled, _clicks(edge).stats.direct
    await conn.send(f"GET /hang HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    for _ in range(200):
        if forwarder.in_flight():
            break
        await asyncio.sleep(0.02)
    assert forwarder.in_flight() == 1
    assert _clicks(edge).stats.direct == direct + 1
    conn.writer.transport.abort()
    await _drained(forwarder)
    assert forwarder.stats.cancelled == cancelled + 1
    hung = [c for c in backend[1] if c.seen.get("/hang")]
    await asyncio.wait_for(asyncio.gather(*(c.closed for c in hung)), 5)


async def test_the_drain_finishes_a_click_in_flight(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    host, conn = await _ready(edge, pebble, dns_server)
    clicks = _clicks(edge)
    try:
        direct = clicks.stats.direct
        await conn.send(f"GET /slow HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        forwarder = _forwarder(edge)
        for _ in range(200):
            if forwarder.in_flight():
                break
            await asyncio.sleep(0.02)
        assert clicks.stats.direct == direct + 1
        assert edge.worker is not None
        drain = asyncio.ensure_future(edge.worker.drain(10))
        answer = await conn.response()  # in flight: answered, then closed
        assert answer.startswith(b"HTTP/1.1 302 ")
        assert await conn.closed_by_server()
        await asyncio.wait_for(drain, 15)
    finally:
        conn.close()


async def test_two_backends_still_take_turns(
    edge_config: EdgeHandle,
    pebble: PebbleServer,
    dns_server: DNSServer,
    backend: tuple[str, list[_Backend]],
) -> None:
    # a second backend of the same kind: clicks without a task keep the round robin
    async with _scripted_backend() as (second, _connections, seen):
        edge_config.config.backend.urls = [backend[0], second]
        await edge_config.start()
        try:
            host, conn = await _ready(edge_config, pebble, dns_server)
            first_seen = backend[1][0].seen
            before = (first_seen.get("/c/turn", 0), seen.get("/c/turn", 0))
            direct = _clicks(edge_config).stats.direct
            for _ in range(6):
                assert (await conn.get(host, "/c/turn")).startswith(b"HTTP/1.1 302 ")
            conn.close()
            turns = (first_seen["/c/turn"] - before[0], seen["/c/turn"] - before[1])
            assert turns == (3, 3)
            assert _clicks(edge_config).stats.direct == direct + 6
        finally:
            await edge_config.stop()


# -- the hand-over to a task, with fakes: the client may leave before that task runs ------


class _FakeProtocol:
    def __init__(self) -> None:
        self.lost: list[Callable[[], object]] = []

    def call_when_lost(self, callback: Callable[[], object]) -> Callable[[], None]:
        self.lost.append(callback)
        return lambda: self.lost.remove(callback) if callback in self.lost else None

    def leave(self) -> None:
        for callback in list(self.lost):
            callback()


class _FakeLean:
    timeout = 30.0

    def __init__(self) -> None:
        self.released: list[object] = []
        self.discarded: list[object] = []

    def answer(self, message: object, payload: object) -> object:
        return (message, payload)

    def release(self, conn: object) -> None:
        self.released.append(conn)

    def discard(self, conn: object) -> None:
        self.discarded.append(conn)


class _FakeRespond:
    started = False
    status = 0

    def __init__(self) -> None:
        self.relayed: list[object] = []

    def relay_complete(self, answer: object) -> bool:
        return False  # the body is still arriving

    async def relay(self, answer: object) -> None:
        self.relayed.append(answer)

    async def edge(self, response: object) -> None:
        raise AssertionError("no edge answer expected")

    def cut(self) -> None:
        raise AssertionError("no cut expected")


class _FakeClick:
    def __init__(self) -> None:
        self.adopted: list[Callable[[], Coroutine[Any, Any, bool]]] = []

    def done(self) -> None:
        raise AssertionError("not answered whole")

    def adopt(self, rest: Callable[[], Coroutine[Any, Any, bool]]) -> None:
        self.adopted.append(rest)

    def retry(self) -> None:
        raise AssertionError("no retry expected")


def _direct(
    protocol: _FakeProtocol,
) -> tuple[Forwarder, _DirectForward, _FakeLean, _FakeRespond, _FakeClick, list[int]]:
    forwarder = Forwarder(BackendPool(["http://127.0.0.1:9"]))
    lean, respond, click, ended = _FakeLean(), _FakeRespond(), _FakeClick(), [0]
    request = SimpleNamespace(protocol=protocol, method="GET", raw_path="/c/1")
    forward = _DirectForward(
        forwarder,
        lean,  # type: ignore[arg-type]
        request,  # type: ignore[arg-type]
        respond,  # type: ignore[arg-type]
        click,
        "src",
        lambda: ended.__setitem__(0, ended[0] + 1),
    )
    forwarder._admit("src")  # as forward_now does before `begin`
    forward.begin(object())  # type: ignore[arg-type]
    return forwarder, forward, lean, respond, click, ended


async def test_a_client_leaving_before_the_relay_task_runs_releases_everything() -> None:
    protocol = _FakeProtocol()
    forwarder, forward, lean, respond, click, ended = _direct(protocol)
    forward.answered(object(), object())  # type: ignore[arg-type]
    assert len(click.adopted) == 1 and forwarder.in_flight() == 1
    protocol.leave()  # the task is cancelled before its first step: `rest` never runs
    assert len(lean.discarded) == 1 and not lean.released
    assert forwarder.in_flight() == 0 and ended == [1]
    assert forwarder.stats.cancelled == 1


async def test_the_relay_task_takes_over_the_client_watch() -> None:
    protocol = _FakeProtocol()
    forwarder, forward, lean, respond, click, ended = _direct(protocol)
    forward.answered(object(), object())  # type: ignore[arg-type]
    task = asyncio.ensure_future(click.adopted[0]())
    assert await task is True
    assert len(respond.relayed) == 1 and len(lean.released) == 1 and not lean.discarded
    assert forwarder.in_flight() == 0 and ended == [1]
    protocol.leave()  # afterwards: nothing more happens
    assert not lean.discarded and ended == [1] and forwarder.stats.cancelled == 0


@pytest.mark.parametrize("where", ["forward", "relay"])
async def test_a_bug_outside_a_task_is_a_500_not_a_stuck_connection(
    edge: EdgeHandle,
    pebble: PebbleServer,
    dns_server: DNSServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    where: str,
) -> None:
    # as a bug in a task's forward is (logged, a 500): one raised from a data_received
    host, conn = await _ready(edge, pebble, dns_server)
    forwarder = _forwarder(edge)

    def broken(*_args: object) -> bool:
        raise RuntimeError("a bug")

    if where == "forward":
        monkeypatch.setattr(forwarder, "forward_now", broken)
    else:
        monkeypatch.setattr(click_protocol._Responder, "relay_complete", broken)
    try:
        await conn.send(f"GET /c/bug HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        answer = await conn.response()  # nothing was written before the bug: the 500
        assert answer.startswith(b"HTTP/1.1 500 Internal Server Error\r\n"), answer
        assert await conn.closed_by_server()
    finally:
        conn.close()
    assert "Error handling request (lean click)" in caplog.text
    assert "RuntimeError: a bug" in caplog.text
    await _drained(forwarder)
    assert edge.worker is not None and edge.worker.forwarding is not None
    assert not any(edge.worker.forwarding._active.values())  # a reload need not wait


@pytest.mark.parametrize("number", range(len(ODD_ANSWERS)))
async def test_odd_answer_heads_get_the_same_answer_both_ways_and_no_traceback(
    edge: EdgeHandle,
    pebble: PebbleServer,
    dns_server: DNSServer,
    backend: tuple[str, list[_Backend]],
    caplog: pytest.LogCaptureFixture,
    number: int,
) -> None:
    """Each odd answer head is relayed or refused (502) alike by the lean path and by
    aiohttp's handler, never with a traceback."""
    host, conn = await _ready(edge, pebble, dns_server)
    clicks = _clicks(edge)
    heads = []
    try:
        for aiohttps in (False, True):
            if aiohttps:  # every new connection is aiohttp's
                clicks.access_logged = lambda: True
                conn.close()
                conn = await Conn.open(edge, pebble, host)
            await conn.send(f"GET /odd/{number} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            head = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 10)
            heads.append(re.sub(rb"\r\nDate: [^\r]*", b"", head))
    finally:
        clicks.access_logged = lambda: False
        conn.close()
    lean, theirs = heads
    assert lean == theirs
    assert lean.startswith(ODD_EXPECTED[number]), lean
    assert "Traceback" not in caplog.text, caplog.text
