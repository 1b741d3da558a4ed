"""Issue 9: pooled backend connections cannot be held by one client.

Slow request bodies, `Expect: 100-continue` towards a backend that never answers
`100`, clients that leave mid-forward and slow backends are all bounded; one
source's forwards are capped, so clicks from others keep getting the backend's
answer. Real edge worker, real backends, raw sockets from distinct loopback
sources.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from support.edge import EdgeHandle
from support.net import client_source

from proxy.demo.backend import HEALTH_PATH, RecordedRequest
from proxy.http.forward import Forwarder

HOST = "links.bounds.test"
ATTACKER, CLICKER = client_source(2), client_source(3)
PER_SOURCE = 32
BODY_TIMEOUT = 1.5


def forwarder(edge: EdgeHandle) -> Forwarder:
    assert edge.worker is not None and edge.worker.forwarder is not None
    return edge.worker.forwarder


async def connect(
    edge: EdgeHandle, source: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(edge.ip, edge.http_port, local_addr=(source, 0))


async def read_response(reader: asyncio.StreamReader, timeout: float = 5) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await asyncio.wait_for(reader.readexactly(length), timeout)
    return status, body


async def click(edge: EdgeHandle, source: str, path: str = "/c/ok") -> tuple[int, float]:
    started = time.monotonic()
    reader, writer = await connect(edge, source)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        status, _ = await read_response(reader)
    finally:
        writer.close()
    return status, time.monotonic() - started


def slow_post(length: int = 1000, sent: int = 10, expect: bool = False) -> bytes:
    head = f"POST /echo HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {length}\r\n"
    if expect:
        return (head + "Expect: 100-continue\r\n\r\n").encode()
    return (head + "\r\n").encode() + b"x" * sent


async def wait_until(predicate, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


class StubbornBackend:
    """An HTTP/1.1 backend that never sends `100 Continue`: a request with
    `Expect: 100-continue` waits for a body forever (as some servers do);
    others get their body echoed."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.waiting_for_body = 0
        self._server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> StubbornBackend:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"GET " + HEALTH_PATH.encode()):
                    self.heads.append(head)
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if b"\r\nexpect:" in head.lower():
                    self.waiting_for_body += 1
                body = await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


def tighten(edge: EdgeHandle) -> None:
    backend = edge.config.backend
    backend.max_per_source = PER_SOURCE
    backend.body_timeout = BODY_TIMEOUT
    backend.deadline = 10
    backend.connect_timeout = 1


@pytest.fixture
async def edge_up(edge_config: EdgeHandle) -> AsyncIterator[EdgeHandle]:
    tighten(edge_config)
    await edge_config.start()
    try:
        yield edge_config
    finally:
        await edge_config.stop()


@pytest.fixture
async def patient_edge(edge_config: EdgeHandle) -> AsyncIterator[EdgeHandle]:
    """Body reads may take 30 s: the attack below outlasts no timeout."""
    tighten(edge_config)
    edge_config.config.backend.body_timeout = 30
    await edge_config.start()
    try:
        yield edge_config
    finally:
        await edge_config.stop()


async def test_300_slow_bodies_from_one_source_leave_the_backend_to_the_others(
    patient_edge: EdgeHandle, backend: tuple[str, list[RecordedRequest]]
) -> None:
    """300 POSTs whose bodies stall, from one source: at most PER_SOURCE of them reach the
    backend (the rest get 429 at once); clicks from another source keep getting the
    backend's 302 quickly; when the attacker leaves, its forwards end at once."""
    edge_up = patient_edge
    fwd = forwarder(edge_up)
    attack = []
    try:
        for _ in range(300):
            reader, writer = await connect(edge_up, ATTACKER)
            writer.write(slow_post())
            attack.append((reader, writer))
        await wait_until(lambda: fwd.stats.per_source_limited == 300 - PER_SOURCE)
        assert fwd.in_flight(ATTACKER) == PER_SOURCE
        refused = 0
        for reader, _ in attack:
            with contextlib.suppress(TimeoutError):
                status, _ = await read_response(reader, 0.05)
                assert status == 429
                refused += 1
        assert refused == 300 - PER_SOURCE
        for n in range(20):
            status, elapsed = await click(edge_up, CLICKER, f"/c/other{n}")
            assert status == 302
            assert elapsed < 1.0
        assert fwd.in_flight(ATTACKER) == PER_SOURCE  # still holding theirs meanwhile
    finally:
        for _, writer in attack:
            writer.close()
    await wait_until(lambda: fwd.in_flight() == 0, timeout=1.0)
    assert fwd.stats.cancelled >= PER_SOURCE
    assert (await click(edge_up, ATTACKER))[0] == 302  # the source may click again


async def test_a_stalled_body_gets_408_after_the_body_timeout(edge_up: EdgeHandle) -> None:
    reader, writer = await connect(edge_up, ATTACKER)
    try:
        started = time.monotonic()
        writer.write(slow_post())
        status, _ = await read_response(reader, BODY_TIMEOUT + 3)
        elapsed = time.monotonic() - started
    finally:
        writer.close()
    assert status == 408
    assert BODY_TIMEOUT - 0.2 < elapsed < BODY_TIMEOUT + 1.0
    assert forwarder(edge_up).stats.body_timeouts == 1
    assert forwarder(edge_up).in_flight() == 0


async def test_the_forward_deadline_bounds_a_slow_backend(edge_config: EdgeHandle) -> None:
    tighten(edge_config)
    edge_config.config.backend.timeout = 30  # per read: would wait the backend's 20 s
    edge_config.config.backend.deadline = 1.0
    await edge_config.start()
    try:
        status, elapsed = await click(edge_config, CLICKER, "/slow?seconds=20")
        assert status == 504
        assert 0.8 < elapsed < 2.0
        assert forwarder(edge_config).stats.deadlines == 1
    finally:
        await edge_config.stop()


async def test_a_client_that_leaves_cancels_its_forward(edge_up: EdgeHandle) -> None:
    fwd = forwarder(edge_up)
    reader, writer = await connect(edge_up, CLICKER)
    writer.write(f"GET /slow?seconds=20 HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    await wait_until(lambda: fwd.in_flight(CLICKER) == 1)
    writer.close()
    await wait_until(lambda: fwd.in_flight() == 0, timeout=1.0)
    assert fwd.stats.cancelled == 1


async def test_expect_100_continue_is_answered_by_the_edge_and_never_forwarded(
    edge_config: EdgeHandle,
) -> None:
    """The backend never sends 100: the edge answers it itself, streams the body, and
    the backend sees no Expect. 40 clients that take the 100 and never send their body
    (then leave) hold nothing once gone."""
    async with StubbornBackend() as stubborn:
        edge_config.config.backend.url = stubborn.url
        tighten(edge_config)
        edge_config.config.backend.body_timeout = 30  # only the client's leaving ends them
        await edge_config.start()
        try:
            fwd = forwarder(edge_config)
            reader, writer = await connect(edge_config, CLICKER)
            writer.write(slow_post(5, expect=True))
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"hello")
            assert await read_response(reader) == (200, b"hello")
            writer.close()
            assert stubborn.heads and all(b"expect" not in h.lower() for h in stubborn.heads)
            assert stubborn.waiting_for_body == 0

            attack = []
            for _ in range(40):
                reader, writer = await connect(edge_config, ATTACKER)
                writer.write(slow_post(5, expect=True))
                attack.append((reader, writer))
            await wait_until(lambda: fwd.in_flight(ATTACKER) == PER_SOURCE)
            for n in range(5):
                status, elapsed = await click(edge_config, CLICKER, f"/c/{n}")
                assert (status, elapsed < 1.0) == (200, True)
            for _, writer in attack:
                writer.close()
            await wait_until(lambda: fwd.in_flight() == 0, timeout=1.0)
            assert stubborn.waiting_for_body == 0
        finally:
            await edge_config.stop()
