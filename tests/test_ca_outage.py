"""Issue 8, part 3 against real Pebble: a CA outage is the CA's failure, not the host's.

Each test runs its own Pebble, which it stops and starts. Pebble keeps accounts in
memory, so a restarted Pebble has forgotten ours (`accountDoesNotExist`: registered
again), and it makes a new root, so clients re-read it after a restart.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.edge import FakeClock, client_context, tls_handshake
from support.pebble import running_pebble
from support.renewal import Edge, new_edge_config, served_serial

from certstore import DomainState
from proxy.app.wiring import EdgeWorker
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer

SERVED_WITHIN = 5.0  # after the CA's return


@pytest.fixture
def own_pebble(
    dns_server: DNSServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PebbleServer]:
    with running_pebble(tmp_path_factory.mktemp("pebble-outage"), dns_server) as server:
        yield server


async def _refused_fast(ip: str, port: int, host: str, pebble: PebbleServer) -> float:
    started = time.monotonic()
    with pytest.raises(ssl.SSLError, match="INTERNAL_ERROR"):
        await tls_handshake(ip, port, host, client_context(pebble), timeout=30)
    return time.monotonic() - started


async def _served_after(ip: str, port: int, host: str, pebble: PebbleServer) -> tuple[str, float]:
    """Click every 100 ms until served; (serial, seconds it took)."""
    started = time.monotonic()
    while True:
        try:
            serial = await served_serial(ip, port, host, client_context(pebble))
            return serial, time.monotonic() - started
        except (ssl.SSLError, ConnectionError):
            if time.monotonic() - started > 30:
                raise
            await asyncio.sleep(0.1)


async def test_first_click_during_an_outage_fails_fast_then_is_served_when_the_ca_returns(
    tmp_path: Path,
    own_pebble: PebbleServer,
    dns_server: DNSServer,
    backend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config, key_text, ip, target = new_edge_config(tmp_path, own_pebble, dns_server, backend[0])
    config.renewal.interval_seconds = 60
    edge = await Edge(config, key_text, FakeClock(), ip).start()
    store = await edge.open_store()
    try:
        warm = f"links.warm-{ip.split('.')[-1]}.test"
        await store.add_domain(warm, "acct")
        dns_server.set_cname(warm, target)
        await served_serial(ip, edge.https_port, warm, client_context(own_pebble))

        own_pebble.stop()
        host = f"links.outage-{ip.split('.')[-1]}.test"
        await store.add_domain(host, "acct")
        dns_server.set_cname(host, target)
        caplog.set_level(logging.INFO)
        try:
            # the first refusal pays for finding out (the order's retries); later ones are fast
            first = await _refused_fast(ip, edge.https_port, host, own_pebble)
            assert first < config.tls.issuance_wait / 3
            times = []
            for _ in range(5):
                await asyncio.sleep(0.3)
                times.append(await _refused_fast(ip, edge.https_port, host, own_pebble))
            assert max(times) < 0.5, times
            print(f"refused in {first:.2f} s (first), then at most {max(times) * 1000:.0f} ms")
            # logged once per host per interval, with the reason
            lines = [r.getMessage() for r in caplog.records if host in r.getMessage()]
            refusals = [m for m in lines if "the CA is unavailable" in m]
            assert len(refusals) == 1, lines
            assert "unreachable" in refusals[0] or "unavailable" in refusals[0]
            assert any("circuit breaker open" in r.getMessage() for r in caplog.records)
            # not the host's failure: no backoff, not failed, no failed-issuance event
            assert await store.get_backoff(host) is None
            domain = await store.get_domain(host)
            assert domain is not None and domain.state is not DomainState.FAILED
            kinds = [e.kind for e in await store.list_events(host)]
            assert "issuance_failed" not in kinds and "order_deferred" in kinds
            # what the edge had keeps being served
            assert await served_serial(ip, edge.https_port, warm, client_context(own_pebble))
        finally:
            own_pebble.start()  # same ports, empty account store, new root
        back = time.monotonic()
        serial, _ = await _served_after(ip, edge.https_port, host, own_pebble)
        took = time.monotonic() - back
        print(f"served {took:.2f} s after the CA returned")
        assert took < SERVED_WITHIN
        cert = await store.get_certificate(host)
        assert cert is not None and cert.serial == serial
        kinds = [e.kind for e in await store.list_events(None, limit=500)]
        assert kinds.count("acme_account_registered") == 2  # the CA lost it: registered again
        assert any("answers again" in r.getMessage() for r in caplog.records)
    finally:
        await store.close()
        await edge.stop()


async def test_edge_starts_and_serves_while_the_ca_is_down(
    tmp_path: Path, own_pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    config, key_text, ip, target = new_edge_config(tmp_path, own_pebble, dns_server, backend[0])
    edge = await Edge(config, key_text, FakeClock(), ip).start()
    store = await edge.open_store()
    host = f"links.stored-{ip.split('.')[-1]}.test"
    try:
        await store.add_domain(host, "acct")
        dns_server.set_cname(host, target)
        old_root = client_context(own_pebble)
        serial = await served_serial(ip, edge.https_port, host, old_root)
        await edge.stop()

        # a fresh store with no ACME account at all, on another edge
        fresh_dir = tmp_path / "fresh"
        fresh_dir.mkdir()
        fresh_config, fresh_key, fresh_ip, fresh_target = new_edge_config(
            tmp_path, own_pebble, dns_server, backend[0], store_dir=fresh_dir
        )
        own_pebble.stop()
        try:
            started = time.monotonic()
            edge.worker = EdgeWorker(config, clock=edge.clock)
            await edge.worker.start()
            fresh = await Edge(fresh_config, fresh_key, FakeClock(), fresh_ip).start()
            assert time.monotonic() - started < 5.0  # nothing waits for the CA
            # the stored certificate is served, from the store (nothing cached yet)
            assert await served_serial(ip, edge.https_port, host, old_root) == serial
        finally:
            own_pebble.start()
        # the fresh store's edge registers its account lazily and issues
        other = f"links.fresh-{fresh_ip.split('.')[-1]}.test"
        fresh_store = await fresh.open_store()
        try:
            assert await fresh_store.get_account(own_pebble.directory_url) is None
            await fresh_store.add_domain(other, "acct")
            dns_server.set_cname(other, fresh_target)
            _, took = await _served_after(fresh_ip, fresh.https_port, other, own_pebble)
            assert took < SERVED_WITHIN
            assert await fresh_store.get_account(own_pebble.directory_url) is not None
        finally:
            await fresh_store.close()
            await fresh.stop()
    finally:
        await store.close()
        await edge.stop()
