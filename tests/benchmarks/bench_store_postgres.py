"""The PostgreSQL store's own figures, next to SQLite's in the same run.

    .venv/bin/python tests/benchmarks/bench_store_postgres.py [--rounds 200]

- wake-up: store object A waits in `wait_for_events`, object B records an event; the time
  from B's call to A's return (LISTEN/NOTIFY on PostgreSQL, the 50 ms poll on SQLite);
- a host lookup (`get_domain`) and an event append (`record_event`), sequential;
- concurrent event appends from 2 store objects x 8 tasks (the commit-order lock's cost);
- how long a call takes to raise StoreUnavailable when the server is stopped (refused) and
  when it accepts connections but never answers (the connect bound).

A throwaway PostgreSQL (tests/support/postgres.py) on loopback; everything stops at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from support.postgres import running_postgres  # noqa: E402

from certstore import Store, StoreUnavailable, generate_key_text, open_store  # noqa: E402
from certstore.crypto import parse_key_text  # noqa: E402

KEY = parse_key_text(generate_key_text(), "bench")


def ms(values: list[float]) -> str:
    values = sorted(values)
    p95 = values[int(len(values) * 0.95) - 1]
    return (
        f"median {statistics.median(values) * 1e3:7.2f} ms  p95 {p95 * 1e3:7.2f} ms"
        f"  max {values[-1] * 1e3:7.2f} ms"
    )


async def wakeups(a: Store, b: Store, rounds: int) -> list[float]:
    out = []
    for i in range(rounds):
        cursor = await a.last_event_id()
        waiter = asyncio.create_task(a.wait_for_events(cursor, 10))
        await asyncio.sleep(0.005)  # let it park
        start = time.perf_counter()
        await b.record_event(f"w{i}.test", "bench", "-")
        await waiter
        out.append(time.perf_counter() - start)
    return out


async def sequential(store: Store, rounds: int) -> tuple[list[float], list[float]]:
    for i in range(rounds):
        await store.add_domain(f"h{i}.bench.test", "acct")
    lookups, appends = [], []
    for i in range(rounds):
        start = time.perf_counter()
        await store.get_domain(f"h{i}.bench.test")
        lookups.append(time.perf_counter() - start)
        start = time.perf_counter()
        await store.record_event(f"h{i}.bench.test", "bench", "-")
        appends.append(time.perf_counter() - start)
    return lookups, appends


async def concurrent_appends(stores: list[Store], per_task: int) -> float:
    async def task(s: Store, n: int) -> None:
        for i in range(per_task):
            await s.record_event(f"c{n}.test", "bench", str(i))

    start = time.perf_counter()
    await asyncio.gather(*(task(s, n) for s in stores for n in range(8)))
    return len(stores) * 8 * per_task / (time.perf_counter() - start)


async def unavailable_after(url: str) -> float:
    start = time.perf_counter()
    try:
        await open_store(url, KEY)
    except StoreUnavailable:
        return time.perf_counter() - start
    raise AssertionError("the store opened")


async def run(rounds: int) -> None:
    with running_postgres() as pg, tempfile.TemporaryDirectory() as tmp:
        urls = {"postgres": pg.url(pg.create_database()), "sqlite": f"sqlite://{tmp}/b.db"}
        for name, url in urls.items():
            a, b = await open_store(url, KEY), await open_store(url, KEY)
            try:
                await a.wait_for_events(0, 0.5)  # the listener is up
                print(f"{name:8} wake-up        {ms(await wakeups(a, b, rounds))}")
                lookups, appends = await sequential(a, rounds)
                print(f"{name:8} get_domain     {ms(lookups)}")
                print(f"{name:8} record_event   {ms(appends)}")
                rate = await concurrent_appends([a, b], max(rounds // 8, 5))
                print(f"{name:8} 16 concurrent appenders: {rate:8.0f} events/s")
            finally:
                await a.close()
                await b.close()
        url = urls["postgres"]
        pg.stop()
        try:
            print(f"stopped server: StoreUnavailable after {await unavailable_after(url):.3f} s")
        finally:
            pg.start()
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
            port = silent.getsockname()[1]
            mute = f"postgresql://u:p@127.0.0.1:{port}/db"
            print(f"silent server:  StoreUnavailable after {await unavailable_after(mute):.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(run(args.rounds))


if __name__ == "__main__":
    main()
