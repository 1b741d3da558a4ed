"""Measure `store migrate` (certstore.transfer): hosts per second into SQLite and PostgreSQL.

.venv/bin/python tests/benchmarks/bench_migrate.py [--hosts 20000] [--no-postgres]
    [--no-sqlite] [--first-only]

A SQLite source with N hosts (each with a certificate, nine in ten with a renewal plan,
every third with options and a file, every tenth with a backoff) is copied into a new
SQLite file and into a throwaway PostgreSQL (tests/support/postgres.py); for each
target: the first copy, a second run (nothing to write: the idempotent re-check) and
the verified counts, as wall time and hosts/s. The source is filled through the
single-host methods, so the same script measures older versions of the copy too.
Not a pytest test; the machine is small and shared, so read the figures as orders of
magnitude, and compare versions as ratios from one side-by-side run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.postgres import running_postgres  # noqa: E402

from certstore import (  # noqa: E402
    AcmeAccount,
    HostBackoff,
    RenewalPlan,
    Store,
    StoredCertificate,
    open_store,
)
from certstore.transfer import (  # noqa: E402
    CONCURRENCY,
    compare,
    copy_store,
    inventory,
)


async def fill(store: Store, hosts: int) -> None:
    await store.save_account(AcmeAccount("https://ca.test/dir", "https://ca.test/acct/1", b"k"))

    async def one(i: int) -> None:
        host = f"h{i:07d}.shop.test"
        await store.add_domain(host, f"acct-{i % 50}")
        chain = b"-----BEGIN CERTIFICATE-----\n" + os.urandom(900) + b"\n-----END-----\n"
        await store.put_certificate(
            StoredCertificate(host, chain, os.urandom(240), (host,), 1.5, 2e9, "CA", 1.25, f"{i:x}")
        )
        if i % 10:  # most certificates have a renewal plan
            await store.put_renewal(RenewalPlan(host, 1.9e9 + i, 1.8e9 + i, "ratio"))
        if i % 3 == 0:
            await store.put_options(host, {"hsts_max_age": i})
            await store.put_host_file(host, "assetlinks.json", b"[%d]" % i, f'"e{i}"')
        if i % 10 == 0:
            await store.put_backoff(HostBackoff(host, 1, 2e9, "x"))

    for start in range(0, hosts, 200):
        await asyncio.gather(*(one(i) for i in range(start, min(hosts, start + 200))))


async def measure(label: str, source: Store, target: Store, hosts: int, first_only: bool) -> None:
    t0 = time.perf_counter()
    first = await copy_store(source, target, source_id="bench")
    t1 = time.perf_counter()
    assert first.new == hosts, first.written
    if first_only:
        print(f"{label:<22} {'first copy':<11} {t1 - t0:8.1f} s  {hosts / (t1 - t0):8.0f} hosts/s")
        return
    second = await copy_store(source, target, source_id="bench")
    t2 = time.perf_counter()
    counts = await asyncio.gather(inventory(source), inventory(target))
    t3 = time.perf_counter()
    assert first.new == hosts and second.changes == 0, (first.written, second.written)
    assert not compare(*counts), compare(*counts)
    for what, seconds in (("first copy", t1 - t0), ("second run", t2 - t1), ("counts", t3 - t2)):
        print(f"{label:<22} {what:<11} {seconds:8.1f} s  {hosts / seconds:8.0f} hosts/s")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=20_000)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--no-sqlite", action="store_true", help="no SQLite -> SQLite copy")
    parser.add_argument(
        "--first-only", action="store_true", help="the first copy only (no second run, counts)"
    )
    args = parser.parse_args()
    key = os.urandom(32)
    with tempfile.TemporaryDirectory() as tmp:
        source = await open_store(Path(tmp) / "source.db", key)
        t0 = time.perf_counter()
        await fill(source, args.hosts)
        print(f"source: {args.hosts} hosts filled in {time.perf_counter() - t0:.1f} s")
        print(f"(concurrency {CONCURRENCY} hosts per page, {os.cpu_count()} CPUs)")
        if not args.no_sqlite:
            target = await open_store(Path(tmp) / "target.db", key)
            await measure("sqlite -> sqlite", source, target, args.hosts, args.first_only)
            await target.close()
        if not args.no_postgres:
            with running_postgres() as server:
                target = await open_store(
                    server.url(server.create_database()),
                    key,
                    pool_size=CONCURRENCY,
                )
                await measure("sqlite -> postgresql", source, target, args.hosts, args.first_only)
                await target.close()
        await source.close()


if __name__ == "__main__":
    asyncio.run(main())
