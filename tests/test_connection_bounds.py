"""Issue 9: established connections are bounded in time and number, per source and in total.

Real edge workers on loopback; sources are distinct loopback addresses (support.net's
client_source: 127.0.99.x, where no test server listens).
Small limits and timeouts are configured so every case ends within seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
from support.clicks import certify, get_status, read_to_close
from support.edge import EdgeHandle, client_context
from support.net import client_source

from proxy.app.config import Config, ConfigError, check_backends, check_listen, load_config
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer
from proxy.tls.accept import DescriptorBudget, descriptor_budget
from proxy.tls.connections import ConnectionStats

IDLE = 1.5
HEADERS = 1.0


@dataclasses.dataclass
class Bounded:
    edge: EdgeHandle
    pebble: PebbleServer
    host: str

    @property
    def stats(self) -> ConnectionStats:
        assert self.edge.worker is not None and self.edge.worker.connections is not None
        return self.edge.worker.connections.stats

    def count(self, source: str) -> int:
        assert self.edge.worker is not None and self.edge.worker.connections is not None
        return self.edge.worker.connections.source_count(source)

    async def plain(self, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(
            self.edge.ip, self.edge.http_port, local_addr=(source, 0)
        )

    async def tls(self, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(
            self.edge.ip,
            self.edge.https_port,
            local_addr=(source, 0),
            ssl=client_context(self.pebble),
            server_hostname=self.host,
        )

    def request(self, path: str = "/c/x") -> bytes:
        return f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode()

    async def wait_open(self, source: str, n: int) -> None:
        async with asyncio.timeout(10):
            while self.count(source) != n:
                await asyncio.sleep(0.01)


@pytest.fixture
async def bounded(edge_config: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer):
    listen = edge_config.config.listen
    listen.idle_timeout = IDLE
    listen.header_timeout = HEADERS
    listen.max_connections_per_source = 6
    listen.max_connections = 16
    await edge_config.start()
    try:
        host = await certify(edge_config, pebble, dns_server)
        yield Bounded(edge_config, pebble, host)
    finally:
        await edge_config.stop()


async def one_response(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await asyncio.wait_for(reader.readexactly(length), 5)
    return head


async def trickle(writer: asyncio.StreamWriter, data: bytes, every: float) -> None:
    try:
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(every)
    except (ConnectionError, OSError):
        pass


@pytest.mark.parametrize("listener", ["http", "https"])
async def test_slowloris_is_closed_at_the_header_deadline(bounded: Bounded, listener: str) -> None:
    """Headers trickled a byte every 0.2 s: closed HEADERS after the first byte, although
    bytes keep coming (an idle timer alone would be reset or be far later)."""
    opener = bounded.plain if listener == "http" else bounded.tls
    reader, writer = await opener(client_source(2))
    before = bounded.stats.header_timeouts
    sender = asyncio.ensure_future(trickle(writer, bounded.request() * 10, 0.2))
    try:
        await bounded.wait_open(client_source(2), 1)
        data, _how, elapsed = await read_to_close(reader, HEADERS + 4)
    finally:
        sender.cancel()
        writer.close()
    assert data == b""
    assert HEADERS - 0.3 < elapsed < HEADERS + 1.0
    assert bounded.stats.header_timeouts == before + 1
    assert await get_status(bounded.edge, bounded.pebble, bounded.host) == 302


@pytest.mark.parametrize("listener", ["http", "https"])
async def test_idle_connections_are_closed_after_the_idle_timeout(
    bounded: Bounded, listener: str
) -> None:
    opener = bounded.plain if listener == "http" else bounded.tls
    # never sends a request
    silent_reader, silent_writer = await opener(client_source(2))
    # one request, then keeps the connection open
    reader, writer = await opener(client_source(2))
    try:
        writer.write(bounded.request())
        assert (await one_response(reader)).startswith(b"HTTP/1.1 302")
        started = time.monotonic()
        results = await asyncio.gather(
            read_to_close(silent_reader, IDLE + 4), read_to_close(reader, IDLE + 4)
        )
    finally:
        silent_writer.close()
        writer.close()
    assert [data for data, _, _ in results] == [b"", b""]
    assert time.monotonic() - started < IDLE + 1.0
    assert max(elapsed for _, _, elapsed in results) > IDLE - 0.3


async def test_over_the_per_source_cap_the_oldest_idle_connection_is_closed(
    bounded: Bounded,
) -> None:
    """Cap 6 per source: a 7th connection closes the source's oldest *idle* one, not a
    busy one and not the newcomer; other sources are untouched."""
    source, other = client_source(2), client_source(3)
    neighbour = await bounded.plain(other)
    conns = []
    for _ in range(6):
        conns.append(await bounded.plain(source))
        await bounded.wait_open(source, len(conns))
    # the oldest is busy sending headers; the second oldest is idle after a request
    conns[0][1].write(b"GET /c/slow HTTP/1.1\r\n")
    conns[1][1].write(bounded.request())
    assert (await one_response(conns[1][0])).startswith(b"HTTP/1.1 302")
    before = bounded.stats.evicted_source
    newcomer = await bounded.plain(source)
    try:
        # conns[2] is the oldest idle one (conns[1] became idle later, after its request)
        data, _how, elapsed = await read_to_close(conns[2][0], 3)
        assert data == b"" and elapsed < 1.0
        assert bounded.stats.evicted_source == before + 1
        assert bounded.count(source) == 6
        newcomer[1].write(bounded.request())
        assert (await one_response(newcomer[0])).startswith(b"HTTP/1.1 302")
        neighbour[1].write(bounded.request())
        assert (await one_response(neighbour[0])).startswith(b"HTTP/1.1 302")
    finally:
        for _, writer in [*conns, newcomer, neighbour]:
            writer.close()


async def test_over_the_worker_cap_another_source_is_never_refused(bounded: Bounded) -> None:
    """16 connections per worker: a full worker closes an idle connection of the source
    holding the most, and serves the newcomer from another source."""
    hog = [client_source(2), client_source(3), client_source(4)]  # 6 + 6 + 4 = 16
    held = []
    for source, n in zip(hog, (6, 6, 4), strict=True):
        for _ in range(n):
            held.append(await bounded.plain(source))
        await bounded.wait_open(source, n)
    assert bounded.stats.open == 16
    before = bounded.stats.evicted_total
    try:
        for i in range(3):  # three newcomers from three more sources, over TLS too
            reader, writer = await bounded.tls(client_source(5 + i))
            held.append((reader, writer))
            writer.write(bounded.request())
            assert (await one_response(reader)).startswith(b"HTTP/1.1 302")
        assert bounded.stats.evicted_total == before + 3
        assert bounded.stats.open <= 16
        # taken from the two largest sources, never from the small one
        assert bounded.count(client_source(4)) == 4
        assert bounded.count(client_source(2)) + bounded.count(client_source(3)) == 9
    finally:
        for _, writer in held:
            writer.close()


async def test_tls_connections_of_one_source_are_capped_after_the_handshake(
    bounded: Bounded,
) -> None:
    """Idle TLS connections beyond the per-source cap evict that source's oldest."""
    source = client_source(2)
    held = []
    try:
        for _ in range(10):
            held.append(await bounded.tls(source))
            await asyncio.sleep(0.01)
        async with asyncio.timeout(5):
            while bounded.count(source) > 6:
                await asyncio.sleep(0.01)
        closed = [r for r, _ in held[:4] if (await read_to_close(r, 2))[0] == b"" and r.at_eof()]
        assert len(closed) == 4  # the four oldest
        reader, writer = held[-1]
        writer.write(bounded.request())
        assert (await one_response(reader)).startswith(b"HTTP/1.1 302")
        assert await get_status(bounded.edge, bounded.pebble, bounded.host) == 302
    finally:
        for _, writer in held:
            writer.close()


# -- the descriptor budget and the configuration -------------------------------------------


def test_descriptor_budget_keeps_the_reserve_free() -> None:
    budget = descriptor_budget(1024, reserve=385, accept_loops=1)
    assert budget.max_pending + budget.max_connections + budget.reserve <= 1024
    assert budget.max_connections >= 400
    two = descriptor_budget(65536, reserve=385, accept_loops=2)
    assert two.max_pending == 4096  # the default per accept loop, when there is room
    assert 2 * two.max_pending + two.max_connections + two.reserve <= 65536
    assert descriptor_budget(65536, reserve=385, accept_loops=1, max_connections=5000) == (
        DescriptorBudget(65536, 385, 4096, 5000)
    )


def test_connection_limits_are_validated() -> None:
    config = Config()
    config.listen.header_timeout = 0
    with pytest.raises(ConfigError, match="header_timeout"):
        check_listen(config)
    config = Config()
    config.listen.max_connections_per_source = 0
    with pytest.raises(ConfigError, match="max_connections_per_source"):
        check_listen(config)
    config = Config()
    config.backend.url = "http://127.0.0.1:1"
    config.backend.max_per_source = 0
    with pytest.raises(ConfigError, match="max_per_source"):
        check_backends(config)
    env = {"LINKEDGE_LISTEN_IDLE_TIMEOUT": "7.5", "LINKEDGE_BACKEND_DEADLINE": "12"}
    loaded = load_config(None, environ=env)
    assert (loaded.listen.idle_timeout, loaded.backend.deadline) == (7.5, 12.0)
