"""Fixtures only: real Pebble, a real DNS server, a recording backend and edge workers.

What they are built from is in tests/support/ (test modules import that, never this
file). Every edge gets its own loopback address 127.0.0.N and its own target name
`edge-N.linkedge.test` (A -> 127.0.0.N). Pebble validates HTTP-01 on one fixed
port, so edges share that port number on distinct addresses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from support.edge import EdgeHandle, new_edge
from support.pebble import running_pebble
from support.postgres import PostgresServer, running_postgres

from proxy.demo.backend import RecordedRequest, start_backend
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer


@pytest.fixture(scope="session")
def dns_server() -> Iterator[DNSServer]:
    with DNSServer() as server:
        yield server


@pytest.fixture(scope="session")
def pebble(
    dns_server: DNSServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PebbleServer]:
    with running_pebble(tmp_path_factory.mktemp("pebble"), dns_server) as server:
        yield server


@pytest.fixture
async def backend() -> AsyncIterator[tuple[str, list[RecordedRequest]]]:
    recorded: list[RecordedRequest] = []
    runner, url = await start_backend(recorded=recorded)
    yield url, recorded
    await runner.cleanup()


@pytest.fixture
def edge_config(
    tmp_path: Path,
    pebble: PebbleServer,
    dns_server: DNSServer,
    backend: tuple[str, list[RecordedRequest]],
) -> EdgeHandle:
    return new_edge(tmp_path, pebble, dns_server, backend[0])


@pytest.fixture
async def edge(edge_config: EdgeHandle) -> AsyncIterator[EdgeHandle]:
    await edge_config.start()
    yield edge_config
    await edge_config.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL for the session; tests take a database each
    (`postgres.create_database()`)."""
    with running_postgres() as server:
        yield server
