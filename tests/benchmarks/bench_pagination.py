"""Measure host listing with 100,000 hosts: keyset pages vs. OFFSET (not a pytest test).

/work/venv/bin/python tests/benchmarks/bench_pagination.py
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_pagination_scale import bulk_insert  # noqa: E402

from certstore import DomainState, open_store  # noqa: E402

HOSTS = 100_000
RUNS = 50


def median_ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:.2f} ms"


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        key = os.urandom(32)
        await (await open_store(path, key)).close()
        names = bulk_insert(path, HOSTS)
        store = await open_store(path, key)
        cases = {
            "keyset first page (100)": dict(after=None, limit=100),
            "keyset page after host 99,000 (100)": dict(after=names[99_000], limit=100),
            "keyset page, state=active, after 99,000": dict(
                after=names[99_000], limit=100, state=DomainState.ACTIVE
            ),
        }
        for label, kwargs in cases.items():
            samples = []
            for _ in range(RUNS):
                started = time.perf_counter()
                await store.list_domains_page(**kwargs)  # type: ignore[arg-type]
                samples.append(time.perf_counter() - started)
            print(f"{label:45s} {median_ms(samples)}")
        samples = []
        for _ in range(RUNS):
            started = time.perf_counter()
            await store.count_domains_by_state()
            samples.append(time.perf_counter() - started)
        print(f"{'count by state (status page header)':45s} {median_ms(samples)}")
        await store.close()
        db = sqlite3.connect(path)
        samples = []
        for _ in range(RUNS):
            started = time.perf_counter()
            db.execute("SELECT * FROM domains ORDER BY hostname LIMIT 100 OFFSET 99000").fetchall()
            samples.append(time.perf_counter() - started)
        print(f"{'for comparison: OFFSET 99,000 (not used)':45s} {median_ms(samples)}")
        db.close()


if __name__ == "__main__":
    asyncio.run(main())
