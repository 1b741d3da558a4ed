"""Cost of what the edge answers itself, per request, against reading the store instead.

Run from a checkout root:  PYTHONPATH=. python tests/benchmarks/bench_host_policy.py

One process, a real SQLite store (WAL, like the edge's) with 1,000 hosts, each with
options, a certificate and an apple-app-site-association file. Reported, as the
median of 5 runs, in microseconds per request:
* policy on a click (cache hit): Host normalisation + HostPolicy.answer (-> forward)
* HSTS hook on an HTTPS response (cache hit)
* association file answered from memory (200 and 304)
* the same facts read from SQLite per request (what the cache avoids): the view's three
  reads, and the file's one
"""

from __future__ import annotations

import asyncio
import os
import ssl
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from certstore import StoredCertificate, open_store
from proxy.hosts.association_files import APPLE, etag
from proxy.http.host_policy import HostPolicy
from proxy.http.host_views import HostViews
from proxy.wire.hostnames import host_header_name

HOSTS = 1000
CALLS = 50_000
STORE_CALLS = 2_000
ROUNDS = 5
AASA = b'{"applinks": {"details": [{"appIDs": ["ABCDE12345.com.shop.app"], "components": []}]}}'


async def per_call(calls: int, step: Callable[[int], Awaitable[object]]) -> float:
    """Median over rounds of the time per call, in microseconds."""
    results = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for i in range(calls):
            await step(i)
        results.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(results)


async def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="linkedge-bench-policy-"))
    store = await open_store(work / "store.db", os.urandom(32))
    now = time.time()
    hosts = [f"links.h{i}.bench.test" for i in range(HOSTS)]
    for host in hosts:
        await store.add_domain(host, "acct")
        await store.put_options(host, {"hsts_max_age": 600, "https_upgrade": True})
        await store.put_host_file(host, APPLE, AASA, etag(AASA))
        await store.put_certificate(
            StoredCertificate(host, b"-", b"-", (host,), now - 60, now + 86400, "bench", now)
        )
    views = HostViews(store)
    policy = HostPolicy(views)
    tls = ssl.create_default_context()
    clicks = [
        make_mocked_request(
            "GET", "/c/abc?x=1", headers={"Host": h.upper() + ":443"}, sslcontext=tls
        )
        for h in hosts
    ]
    files = [
        make_mocked_request("GET", "/.well-known/apple-app-site-association", headers={"Host": h})
        for h in hosts
    ]
    conditional = [
        make_mocked_request(
            "GET",
            "/.well-known/apple-app-site-association",
            headers={"Host": h, "If-None-Match": etag(AASA)},
        )
        for h in hosts
    ]
    for i in range(HOSTS):  # warm: one store read per host
        await policy.answer(files[i], hosts[i])
    reads_before = views.store_reads
    response = web.Response(status=302)

    async def click(i: int) -> object:
        request = clicks[i % HOSTS]
        return await policy.answer(request, host_header_name(request.headers["Host"]))

    async def hsts(i: int) -> object:
        return await policy._add_headers(clicks[i % HOSTS], response)

    async def serve_file(i: int) -> object:
        return await policy.answer(files[i % HOSTS], hosts[i % HOSTS])

    async def serve_304(i: int) -> object:
        return await policy.answer(conditional[i % HOSTS], hosts[i % HOSTS])

    async def store_view(i: int) -> object:
        host = hosts[i % HOSTS]
        await store.get_domain(host)
        await store.get_options(host)
        return await store.certificate_validity([host])

    async def store_file(i: int) -> object:
        return await store.get_host_file(hosts[i % HOSTS], APPLE)

    assert await click(0) is None and (await serve_file(0)).status == 200  # type: ignore[union-attr]
    assert (await serve_304(0)).status == 304  # type: ignore[union-attr]
    await hsts(0)
    assert response.headers["Strict-Transport-Security"] == "max-age=600"
    results = {
        "policy on a click, cache hit (forwarded)": await per_call(CALLS, click),
        "HSTS hook on an HTTPS response": await per_call(CALLS, hsts),
        "association file from memory, 200": await per_call(CALLS, serve_file),
        "association file from memory, 304": await per_call(CALLS, serve_304),
        "SQLite per request instead: the view (3 reads)": await per_call(STORE_CALLS, store_view),
        "SQLite per request instead: the file (1 read)": await per_call(STORE_CALLS, store_file),
    }
    assert views.store_reads == reads_before, "the measured paths must not read the store"
    print(f"{HOSTS} hosts, median of {ROUNDS} rounds, µs per request (one core, one process):")
    for name, value in results.items():
        print(f"  {name:50s} {value:8.1f}")
    await store.close()


if __name__ == "__main__":
    asyncio.run(main())
