"""Issue 2, scenarios 2 and 3: a burst of first clicks, and issuance never blocking others."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import urllib.parse

import aiohttp
import pytest
from support.clicks import certify, edge_store, get_status, new_host, url
from support.edge import EdgeHandle, client_context, register

from proxy.demo.client import StaticResolver
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer

BURST = 50


async def test_burst_of_first_connections_makes_one_order(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    host = new_host(edge, "burst")
    async with edge_store(edge) as store:
        await register(store, dns_server, host, edge.target)
    orders_before = pebble.order_count()
    assert edge.worker is not None and edge.worker.tls_listener is not None
    stats = edge.worker.tls_listener.stats
    started_before = stats.handshakes_started

    connector = aiohttp.TCPConnector(
        resolver=StaticResolver(edge.ip), ssl=client_context(pebble), force_close=True, limit=0
    )

    async def click(session: aiohttp.ClientSession, i: int) -> tuple[int, str]:
        async with session.get(url(edge, host, f"/c/burst{i}"), allow_redirects=False) as resp:
            await resp.read()
            return resp.status, resp.headers.get("Location", "")

    peak = 0

    async def sample_pending() -> None:
        nonlocal peak
        while True:
            peak = max(peak, stats.pending)
            await asyncio.sleep(0.002)

    sampler = asyncio.ensure_future(sample_pending())
    t0 = time.monotonic()
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            results = await asyncio.gather(*(click(session, i) for i in range(BURST)))
    finally:
        sampler.cancel()
    elapsed = time.monotonic() - t0

    assert [status for status, _ in results] == [302] * BURST
    assert {loc for _, loc in results} == {
        f"https://shop.example/landing/burst{i}?utm=mail" for i in range(BURST)
    }
    assert pebble.order_count() - orders_before == 1
    async with edge_store(edge) as store:
        kinds = [e.kind for e in await store.list_events(host)]
    assert kinds.count("order_started") == 1
    assert kinds.count("issued") == 1
    assert edge.worker.meter.value("certificates", "orders_started") == 1
    # 50 separate connections, 50 handshakes, none refused or timed out
    assert stats.handshakes_started - started_before == BURST
    assert stats.refused == stats.selection_timeouts == stats.handshake_failures == 0
    assert len([r for r in backend[1] if r.path_qs.startswith("/c/burst")]) == BURST
    # they really were waiting together on that one order
    assert peak >= BURST // 2, peak
    assert elapsed < 15, f"burst took {elapsed:.1f}s"


# -- slow ACME: a gated TCP pass-through in front of Pebble ----------------------------


class GatedProxy:
    """Forwards raw TCP bytes to Pebble; while the gate is closed, nothing moves."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.gate = asyncio.Event()
        self.gate.set()
        self.held = 0  # chunks that arrived while the gate was closed
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        self.gate.set()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        pumps = [
            asyncio.ensure_future(self._pump(reader, up_writer)),
            asyncio.ensure_future(self._pump(up_reader, writer)),
        ]
        for task in pumps:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.gather(*pumps, return_exceptions=True)
        for w in (writer, up_writer):
            w.close()
            self._writers.discard(w)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if not self.gate.is_set():
                    self.held += 1
                    await self.gate.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                writer.write_eof()


@pytest.fixture
async def gated_proxy(pebble: PebbleServer):
    parts = urllib.parse.urlsplit(pebble.directory_url)
    assert parts.hostname is not None and parts.port is not None
    proxy = GatedProxy((parts.hostname, parts.port))
    port = await proxy.start()
    yield proxy, port
    await proxy.close()


async def test_pebble_through_proxy_builds_urls_from_host_header(gated_proxy, pebble) -> None:
    """The premise of the slow-ACME test: Pebble's URLs follow the Host we connected to."""
    proxy, port = gated_proxy
    ctx = ssl.create_default_context(cafile=str(pebble.ca_bundle))  # covers 127.0.0.1
    connector = aiohttp.TCPConnector(ssl=ctx, force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(f"https://127.0.0.1:{port}/dir") as resp,
    ):
        directory = await resp.json()
    assert directory["newOrder"].startswith(f"https://127.0.0.1:{port}/")
    assert directory["newNonce"].startswith(f"https://127.0.0.1:{port}/")
    assert proxy.connections >= 1


async def test_pending_issuance_does_not_block_certified_hosts(
    edge_config: EdgeHandle, gated_proxy, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    proxy, port = gated_proxy
    edge = edge_config
    edge.config.acme.directory = f"https://127.0.0.1:{port}/dir"
    await edge.start()  # gate open: the ACME client fetches the directory now
    try:
        host_a = await certify(edge, pebble, dns_server)
        assert proxy.connections >= 1, "the order for A did not go through the proxy"
        host_b = new_host(edge, "slow")
        async with edge_store(edge) as store:
            await register(store, dns_server, host_b, edge.target)
        orders_before = pebble.order_count()

        proxy.gate.clear()
        first_b = asyncio.ensure_future(get_status(edge, pebble, host_b, "/c/b1"))
        try:
            async with asyncio.timeout(10):
                while proxy.held == 0:  # B's ACME traffic is now stuck in the proxy
                    assert not first_b.done(), first_b
                    await asyncio.sleep(0.01)
            assert edge.worker is not None and edge.worker.tls_listener is not None
            assert edge.worker.tls_listener.stats.pending >= 1

            durations = []
            for i in range(20):
                t0 = time.monotonic()
                assert (
                    await asyncio.wait_for(get_status(edge, pebble, host_a, f"/c/a{i}"), 5) == 302
                )
                durations.append(time.monotonic() - t0)
            assert not first_b.done(), "B finished while its ACME traffic was held"
            assert max(durations) < 2, durations
            async with edge_store(edge) as store:
                assert await store.get_certificate(host_b) is None
        finally:
            proxy.gate.set()
        assert await asyncio.wait_for(first_b, 30) == 302
        assert pebble.order_count() - orders_before == 1
        async with edge_store(edge) as store:
            cert = await store.get_certificate(host_b)
        assert cert is not None and cert.names == (host_b,)
    finally:
        await edge.stop()
