"""Issue 8, part 5: the maintenance loop wakes when a renewal is due, not at its next poll.

Pebble issues 90-second certificates here; the renewal interval stays at its default
(60 s), so only the wake-up (sleep until the earliest due time, woken early by a new
certificate) can renew within a few seconds of the due time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.edge import FakeClock, client_context
from support.pebble import running_pebble
from support.renewal import Edge, new_edge_config, served_serial

from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer

VALIDITY = 90
HOSTS = 3
LATE_AT_MOST = 3.0  # seconds after the planned moment


@pytest.fixture
def pebble_90s(
    dns_server: DNSServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PebbleServer]:
    with running_pebble(
        tmp_path_factory.mktemp("pebble-90s"), dns_server, validity_seconds=VALIDITY
    ) as server:
        yield server


async def test_renewal_happens_within_seconds_of_its_due_time(
    tmp_path: Path, pebble_90s: PebbleServer, dns_server: DNSServer, backend
) -> None:
    config, key_text, ip, target = new_edge_config(tmp_path, pebble_90s, dns_server, backend[0])
    config.renewal.interval_seconds = 60.0  # the safety net only; the default
    edge = await Edge(config, key_text, FakeClock(), ip).start()
    store = await edge.open_store()
    try:
        hosts = [f"links.wake{i}-{ip.split('.')[-1]}.test" for i in range(HOSTS)]
        first: dict[str, str] = {}
        for host in hosts:
            await store.add_domain(host, "acct")
            dns_server.set_cname(host, target)
            first[host] = await served_serial(ip, edge.https_port, host, client_context(pebble_90s))
        # a new certificate wakes the loop, which plans it at once (not a minute later)
        deadline = time.monotonic() + 5
        plans = {}
        while len(plans) < HOSTS:
            assert time.monotonic() < deadline, plans
            for host in hosts:
                plan = await store.get_renewal(host)
                if plan is not None:
                    plans[host] = plan
            await asyncio.sleep(0.1)

        lateness: dict[str, float] = {}
        deadline = time.time() + VALIDITY
        while len(lateness) < HOSTS:
            assert time.time() < deadline, lateness
            for host in hosts:
                if host in lateness:
                    continue
                events = [e for e in await store.list_events(host) if e.kind == "renewed"]
                if events:
                    lateness[host] = events[-1].at - plans[host].due_at
            await asyncio.sleep(0.2)
        print("renewed after the due time by", {h: round(v, 2) for h, v in lateness.items()})
        for host in hosts:
            assert 0 <= lateness[host] < LATE_AT_MOST, lateness
            renewed = await store.get_certificate(host)
            assert renewed is not None and renewed.serial != first[host]
            served = await served_serial(ip, edge.https_port, host, client_context(pebble_90s))
            assert served == renewed.serial
            kinds = [e.kind for e in await store.list_events(host)]
            assert "renewal_failed" not in kinds
        assert edge.worker.maintainer is not None
        # woken by due times and new certificates, not polling: a handful of passes
        assert edge.worker.maintainer.passes < 12 * HOSTS
    finally:
        await store.close()
        await edge.stop()
