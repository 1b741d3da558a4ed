"""Cost of the hot path: CertificateManager.context_for on a cached host.

Run from a checkout root:  python tests/benchmarks/context_hit.py
(works against the code before and after issue 5, to compare the two).
"""

from __future__ import annotations

import asyncio
import ssl
import statistics
import time

from proxy.tls.certificates import CertificateManager, ManagerSettings

HOSTS = 1000
CALLS = 200_000


class _Store:
    async def certificate_serial(self, hostname: str) -> str:
        return ""

    async def get_domain(self, hostname: str) -> None:
        return None


async def main() -> None:
    manager = CertificateManager(_Store(), None, None, ManagerSettings(), lifecycle=None)  # type: ignore[arg-type]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    far = time.time() + 86400
    hosts = [f"h{i}.bench.test" for i in range(HOSTS)]
    for host in hosts:
        manager._contexts.put(host, ctx, far)
    for host in hosts:  # steady state: first revalidation done
        await manager.context_for(host)
    await asyncio.sleep(0.05)
    for host in hosts:
        manager._contexts.put(host, ctx, far)
        entry = getattr(manager._contexts, "entry", None)
        if entry is not None:
            entry(host, time.time()).checked_at = time.time()
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        for i in range(CALLS):
            await manager.context_for(hosts[i % HOSTS])
        runs.append((time.perf_counter() - started) / CALLS * 1e9)
    print(f"context_for cache hit: median {statistics.median(runs):.0f} ns (runs {runs[0]:.0f}..)")


asyncio.run(main())
