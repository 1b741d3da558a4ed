"""Several backends: selection and health (unit), failover and recovery through the edge."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable

import pytest
from support.clicks import certify, url
from support.edge import EdgeHandle, https_session
from support.net import free_port

from proxy.app.config import Config, ConfigError, check_backends
from proxy.demo.backend import RecordedRequest, start_backend
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer
from proxy.http.backends import BackendPool, HealthSettings

# -- unit: selection and thresholds ------------------------------------------------------


def test_round_robin_over_healthy_backends() -> None:
    pool = BackendPool(["http://a", "http://b/", "http://c"])
    a, b, c = pool.backends
    assert b.base == "http://b"
    assert [pool.candidates()[0] for _ in range(6)] == [a, b, c, a, b, c]
    assert pool.candidates() == [a, b, c]  # the rest follow, for failover
    assert pool.candidates() == [b, c, a]
    pool.connect_failed(b, "refused")
    assert [pool.candidates() for _ in range(3)] == [[c, a], [a, c], [c, a]]
    pool.connect_failed(a, "refused")
    pool.connect_failed(c, "refused")
    assert pool.candidates() == []


def test_single_backend() -> None:
    pool = BackendPool(["http://only"])
    (only,) = pool.backends
    assert pool.candidates() == [only]
    pool.connect_failed(only, "refused")
    assert pool.candidates() == []


def test_health_thresholds() -> None:
    pool = BackendPool(["http://a"], HealthSettings(healthy_after=2, unhealthy_after=3))
    (a,) = pool.backends
    for passed in (False, False, True, False, False):  # a pass resets the count
        pool.record_check(a, passed)
    assert a.healthy
    pool.record_check(a, False)
    assert not a.healthy
    pool.record_check(a, True)
    pool.record_check(a, False)
    pool.record_check(a, True)
    assert not a.healthy  # passes must be consecutive too
    pool.record_check(a, True)
    assert a.healthy
    pool.connect_failed(a, "refused")  # passive: out at once
    assert not a.healthy
    pool.record_check(a, True)
    assert not a.healthy
    pool.record_check(a, True)
    assert a.healthy


def test_backend_config() -> None:
    config = Config()
    config.backend.url = "http://127.0.0.1:1"
    check_backends(config)
    assert config.backend.backend_urls() == ["http://127.0.0.1:1"]
    config.backend.urls = ["http://127.0.0.1:2", "http://127.0.0.1:3"]
    with pytest.raises(ConfigError, match="not both"):
        check_backends(config)
    config.backend.url = ""
    check_backends(config)
    assert config.backend.backend_urls() == config.backend.urls
    for bad, message in (
        (["ftp://x"], "http:// or https://"),
        (["http://a", "http://a"], "twice"),
        ([], "required"),
    ):
        config.backend.urls = bad
        with pytest.raises(ConfigError, match=message):
            check_backends(config)
    config.backend.urls = ["http://a"]
    config.backend.healthy_after = 0
    with pytest.raises(ConfigError, match="at least 1"):
        check_backends(config)


# -- through the edge --------------------------------------------------------------------


class Backends:
    """Two recording backends on fixed ports that can be stopped and started again."""

    def __init__(self) -> None:
        self.ports = [free_port(), free_port()]
        self.recorded: list[list[RecordedRequest]] = [[], []]
        self._runners: list[object | None] = [None, None]

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    async def start(self, i: int) -> None:
        runner, _ = await start_backend(port=self.ports[i], recorded=self.recorded[i])
        self._runners[i] = runner

    async def stop(self, i: int) -> None:
        runner = self._runners[i]
        if runner is not None:
            await runner.cleanup()  # type: ignore[attr-defined]
            self._runners[i] = None

    def paths(self, i: int) -> list[str]:
        return [r.raw_path for r in self.recorded[i]]


@pytest.fixture
async def two() -> AsyncIterator[Backends]:
    backends = Backends()
    await backends.start(0)
    await backends.start(1)
    try:
        yield backends
    finally:
        await backends.stop(0)
        await backends.stop(1)


async def wait_until(condition: Callable[[], bool], timeout: float = 15) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def click(edge: EdgeHandle, pebble: PebbleServer, host: str, path: str) -> int:
    async with (
        https_session(edge, pebble) as session,
        session.get(url(edge, host, path), allow_redirects=False) as resp,
    ):
        await resp.read()
        return resp.status


async def test_failover_recovery_and_all_down(
    edge_config: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, two: Backends
) -> None:
    backend = edge_config.config.backend
    backend.url = ""
    backend.urls = two.urls
    backend.health_interval = 0.1
    backend.health_timeout = 1.0
    backend.healthy_after = 2
    backend.unhealthy_after = 2
    edge = edge_config
    await edge.start()
    try:
        assert edge.worker is not None and edge.worker.backends is not None
        pool = edge.worker.backends
        host = await certify(edge, pebble, dns_server)

        # both up: round robin
        for i in range(4):
            assert await click(edge, pebble, host, f"/c/both{i}") == 302
        assert len([p for p in two.paths(0) if p.startswith("/c/both")]) == 2
        assert len([p for p in two.paths(1) if p.startswith("/c/both")]) == 2

        # one stopped: every click still answered, by the other one
        await two.stop(0)
        for i in range(4):
            assert await click(edge, pebble, host, f"/c/one{i}") == 302
        assert [p for p in two.paths(1) if p.startswith("/c/one")] == [
            f"/c/one{i}" for i in range(4)
        ]
        assert not pool.backends[0].healthy

        # back again: the health checks take it back, and it gets clicks again
        await two.start(0)
        await wait_until(lambda: pool.backends[0].healthy)
        for i in range(4):
            assert await click(edge, pebble, host, f"/c/again{i}") == 302
        assert len([p for p in two.paths(0) if p.startswith("/c/again")]) == 2

        # all down: 502, and once both are known down, no connect is even tried
        await two.stop(0)
        await two.stop(1)
        assert await click(edge, pebble, host, "/c/down0") == 502
        await wait_until(lambda: not any(b.healthy for b in pool.backends))
        # Something now accepts on backend 0's port but never answers: a request sent
        # there would hang for backend.timeout (5 s); the client gives up after 3 s.
        with socket.socket() as blackhole:
            blackhole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            blackhole.bind(("127.0.0.1", two.ports[0]))
            blackhole.listen(16)
            async with asyncio.timeout(3):
                for i in range(3):
                    assert await click(edge, pebble, host, f"/c/down{i + 1}") == 502
    finally:
        await edge.stop()


async def test_post_fails_over_only_before_anything_was_sent(
    edge_config: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, two: Backends
) -> None:
    """A refused connect moves a POST to the other backend, body intact; a POST that
    reached a backend which then hung up is answered 502 and never re-sent."""
    backend = edge_config.config.backend
    backend.url = ""
    backend.urls = two.urls
    backend.health_interval = 60  # only the first check at start; passive marking decides
    backend.unhealthy_after = 2
    edge = edge_config
    await edge.start()
    try:
        assert edge.worker is not None and edge.worker.backends is not None
        pool = edge.worker.backends
        host = await certify(edge, pebble, dns_server)
        await two.stop(0)
        body = b"List-Unsubscribe=One-Click&id=" + bytes(range(256)) * 100
        async with https_session(edge, pebble) as session:
            for i in range(2):  # one of the two starts its rotation at the stopped backend
                async with session.post(url(edge, host, f"/echo?post={i}"), data=body) as resp:
                    assert resp.status == 200
        assert not pool.backends[0].healthy  # a connect was refused: passive marking
        posts = [r for r in two.recorded[1] if r.raw_path.startswith("/echo?post=")]
        assert [r.body for r in posts] == [body, body]

        # backend 0 now reads the request and hangs up without an answer
        received: list[bytes] = []

        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            received.append(await reader.read(65536))
            writer.close()

        server = await asyncio.start_server(hang_up, "127.0.0.1", two.ports[0])
        try:
            pool.backends[0].healthy = True  # as if the checks had taken it back
            before = len(two.recorded[1])
            statuses = []
            async with https_session(edge, pebble) as session:
                for i in range(2):
                    async with session.post(url(edge, host, f"/echo?hang={i}"), data=b"x") as r:
                        statuses.append(r.status)
        finally:
            server.close()
            await server.wait_closed()
        assert sorted(statuses) == [200, 502]
        assert len(received) == 1 and received[0].startswith(b"POST /echo?hang=")
        hung = received[0].split(b" ")[1].decode()
        assert hung not in [r.raw_path for r in two.recorded[1][before:]]  # not re-sent
    finally:
        await edge.stop()
