"""Issue 2, scenario 7: hostile or broken bytes on the TLS port.

Each connection must be ended by the server, cleanly and within a bounded time,
and the edge must keep serving real clients meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
import time

import aiohttp
import pytest
from support.clicks import certify, get_status, python_hello, read_to_close, url
from support.edge import EdgeHandle, client_context
from support.net import client_source

from proxy.demo.client import StaticResolver
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer
from proxy.wire.clienthello import DECODE_ERROR, UNRECOGNIZED_NAME, alert_record, parse_client_hello

HELLO_TIMEOUT = 1.0


@dataclasses.dataclass
class Served:
    edge: EdgeHandle
    pebble: PebbleServer
    host: str  # a certified host

    @property
    def stats(self):
        assert self.edge.worker is not None and self.edge.worker.tls_listener is not None
        return self.edge.worker.tls_listener.stats

    def snapshot(self) -> dict[str, int]:
        return {k: v for k, v in dataclasses.asdict(self.stats).items() if isinstance(v, int)}

    def delta(self, before: dict[str, int]) -> dict[str, int]:
        now = self.snapshot()
        return {k: now[k] - before[k] for k in now if now[k] != before[k]}

    async def still_serving(self) -> None:
        t0 = time.monotonic()
        assert await get_status(self.edge, self.pebble, self.host) == 302
        assert time.monotonic() - t0 < 1.0


@pytest.fixture
async def served(edge_config: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer):
    edge_config.config.tls.hello_timeout = HELLO_TIMEOUT
    await edge_config.start()
    try:
        host = await certify(edge_config, pebble, dns_server)
        yield Served(edge_config, pebble, host)
    finally:
        await edge_config.stop()


async def send_and_wait_for_close(
    served: Served, payload: bytes, *, half_close: bool = False, timeout: float = 5.0
) -> tuple[bytes, str, float]:
    reader, writer = await asyncio.open_connection(served.edge.ip, served.edge.https_port)
    try:
        writer.write(payload)
        await writer.drain()
        if half_close:
            writer.write_eof()
        return await read_to_close(reader, timeout)
    finally:
        writer.close()


# -- hand-built ClientHello with an arbitrary SNI ---------------------------------------


def _vec(n: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(n, "big") + payload


def hand_hello(sni: bytes) -> bytes:
    """A minimal TLS 1.2-style ClientHello record carrying `sni` unchecked."""
    server_name = _vec(2, b"\x00" + _vec(2, sni))
    extensions = b"\x00\x00" + _vec(2, server_name)
    body = (
        b"\x03\x03"
        + bytes(range(32))
        + _vec(1, b"")
        + _vec(2, b"\x13\x01\xc0\x2b")
        + _vec(1, b"\x00")
        + _vec(2, extensions)
    )
    message = b"\x01" + _vec(3, body)
    return b"\x16\x03\x01" + _vec(2, message)


def test_hand_built_hello_is_understood() -> None:
    """The builder is sound: a normal name parses, so the oversized case tests the size."""
    hello = parse_client_hello(hand_hello(b"links.example.test"))
    assert hello is not None and hello.server_name == "links.example.test"


# -- the cases ---------------------------------------------------------------------------


async def test_plain_http_on_tls_port(served: Served) -> None:
    before = served.snapshot()
    data, how, elapsed = await send_and_wait_for_close(served, b"GET / HTTP/1.1\r\n\r\n")
    assert (data, how) == (b"", "eof")
    assert elapsed < HELLO_TIMEOUT  # rejected on the first bytes, not by the timeout
    assert served.delta(before) == {"accepted": 1, "bad_hello": 1}
    await served.still_serving()


async def test_truncated_client_hello_then_close(served: Served) -> None:
    """The peer's FIN is noticed behind the unread half hello (POLLRDHUP), not at the timeout."""
    hello = python_hello(served.host)
    before = served.snapshot()
    data, how, _elapsed = await send_and_wait_for_close(
        served, hello[: len(hello) // 2], half_close=True
    )
    assert (data, how) == (b"", "eof")
    # counted as abandoned, which only the FIN check does: a timeout would count hello_timeouts
    assert served.delta(before) == {"accepted": 1, "hello_abandoned": 1}
    await served.still_serving()


async def test_truncated_client_hello_then_reset(served: Served) -> None:
    hello = python_hello(served.host)
    before = served.snapshot()
    sock = socket.create_connection((served.edge.ip, served.edge.https_port))
    sock.sendall(hello[:40])
    async with asyncio.timeout(10):
        while served.stats.awaiting_hello == 0:
            await asyncio.sleep(0.01)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST
    async with asyncio.timeout(10):
        while served.stats.pending:
            await asyncio.sleep(0.01)
    # abandoned, not timed out: the reset was noticed while waiting
    assert served.delta(before) == {"accepted": 1, "hello_abandoned": 1}
    await served.still_serving()


async def test_garbage_after_record_header(served: Served) -> None:
    before = served.snapshot()
    payload = b"\x16\x03\x01\x00\x40" + bytes(range(200, 256)) + b"\xff" * 8
    data, how, elapsed = await send_and_wait_for_close(served, payload)
    assert data == alert_record(DECODE_ERROR)
    assert how == "eof"
    assert elapsed < HELLO_TIMEOUT
    assert served.delta(before) == {"accepted": 1, "bad_hello": 1}
    await served.still_serving()


async def test_oversized_sni(served: Served) -> None:
    name = (("a" * 60 + ".") * 5 + "test").encode()
    assert len(name) > 255
    before = served.snapshot()
    data, how, elapsed = await send_and_wait_for_close(served, hand_hello(name))
    assert data == alert_record(DECODE_ERROR)
    assert how == "eof"
    assert elapsed < HELLO_TIMEOUT
    assert served.delta(before) == {"accepted": 1, "bad_hello": 1}
    await served.still_serving()


async def test_sni_that_is_no_hostname(served: Served) -> None:
    """Parses as TLS but is no name we could certify: unrecognized_name, nothing ordered."""
    orders = served.pebble.order_count()
    before = served.snapshot()
    name = ("b" * 64 + ".test").encode()  # a 64-byte label
    data, how, _elapsed = await send_and_wait_for_close(served, hand_hello(name))
    assert data == alert_record(UNRECOGNIZED_NAME)
    assert how == "eof"
    assert served.delta(before) == {"accepted": 1, "refused": 1}
    assert served.pebble.order_count() == orders
    await served.still_serving()


async def test_trickled_client_hello_hits_hello_timeout(served: Served) -> None:
    hello = python_hello(served.host)
    before = served.snapshot()
    reader, writer = await asyncio.open_connection(served.edge.ip, served.edge.https_port)

    async def trickle() -> int:
        sent = 0
        try:
            for byte in hello:
                writer.write(bytes([byte]))
                await writer.drain()
                sent += 1
                await asyncio.sleep(0.3)
        except (ConnectionError, OSError):
            pass
        return sent

    trickler = asyncio.ensure_future(trickle())
    try:
        # real clients are served while the trickle is going on
        await served.still_serving()
        data, how, elapsed = await read_to_close(reader, HELLO_TIMEOUT + 3)
    finally:
        trickler.cancel()
        writer.close()
    assert data == b""
    assert how in ("eof", "reset")
    assert HELLO_TIMEOUT - 0.2 < elapsed < HELLO_TIMEOUT + 1.0
    delta = served.delta(before)
    assert delta.get("hello_timeouts") == 1
    assert delta.get("handshakes_started") == 1  # the request made during the trickle
    await served.still_serving()


async def test_many_silent_connections_are_bounded_by_hello_timeout(served: Served) -> None:
    count = 100
    sources = [f"127.0.0.{n}" for n in (2, 3, 4, 5)]  # 25 each: under the per-source cap
    before = served.snapshot()
    conns = [
        await asyncio.open_connection(
            served.edge.ip, served.edge.https_port, local_addr=(sources[i % 4], 0)
        )
        for i in range(count)
    ]
    try:
        await asyncio.sleep(0.1)
        assert served.stats.pending >= count
        await served.still_serving()
        results = await asyncio.gather(
            *(read_to_close(reader, HELLO_TIMEOUT + 3) for reader, _ in conns)
        )
    finally:
        for _, writer in conns:
            writer.close()
    assert {(data, how) for data, how, _ in results} == {(b"", "eof")}
    assert max(elapsed for _, _, elapsed in results) < HELLO_TIMEOUT + 1.0
    assert served.stats.pending == 0
    delta = served.delta(before)
    assert delta["accepted"] == count + 1
    assert delta["hello_timeouts"] == count
    await served.still_serving()


async def test_one_source_cannot_hold_more_than_its_share_of_pending_slots(served: Served) -> None:
    """Default tls.max_pending_per_source (64): a 65th connection of the source evicts its
    oldest waiting one, so a real client behind the same address (NAT) still gets through."""
    cap = served.edge.config.tls.max_pending_per_source
    assert cap == 64
    before = served.snapshot()

    async def silent(source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(
            served.edge.ip, served.edge.https_port, local_addr=(source, 0)
        )

    held = []
    for _ in range(cap):
        held.append(await silent(client_source(5)))
        await asyncio.sleep(0.002)  # accepted in this order: the first is the oldest
    async with asyncio.timeout(10):
        while served.stats.awaiting_hello < cap:
            await asyncio.sleep(0.01)
    extra = [await silent(client_source(5)) for _ in range(5)]
    other = await silent(client_source(6))
    try:
        # the five oldest end long before the 1 s hello timeout: evicted, not timed out
        evicted = await asyncio.gather(*(read_to_close(r, 5) for r, _ in held[:5]))
        assert {(data, how) for data, how, _ in evicted} == {(b"", "eof")}
        assert max(elapsed for _, _, elapsed in evicted) < HELLO_TIMEOUT
        assert served.stats.per_source_limited - before["per_source_limited"] == 5
        assert served.stats.hello_timeouts == before["hello_timeouts"]
        assert served.stats.awaiting_hello == cap + 1  # the source's 64 and the other's one
        await served.still_serving()  # a third source is served meanwhile
        # a real client from the same, saturated source gets its handshake and its answer
        connector = aiohttp.TCPConnector(
            resolver=StaticResolver(served.edge.ip),
            ssl=client_context(served.pebble),
            local_addr=(client_source(5), 0),
        )
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(url(served.edge, served.host, "/c/x"), allow_redirects=False) as resp,
        ):
            assert resp.status == 302
        results = await asyncio.gather(
            *(read_to_close(r, HELLO_TIMEOUT + 3) for r, _ in [*held[5:], *extra, other])
        )
    finally:
        for _, writer in [*held, *extra, other]:
            writer.close()
    assert {(data, how) for data, how, _ in results} == {(b"", "eof")}
    delta = served.delta(before)
    # the browser's connection evicted one more silent one; the rest timed out
    assert delta["per_source_limited"] == 6
    assert delta["hello_timeouts"] == cap + 5 + 1 - 6
    assert served.stats.pending == 0
    await served.still_serving()
