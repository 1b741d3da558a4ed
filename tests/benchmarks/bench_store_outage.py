"""Database outages against two workers on PostgreSQL: clicks served, recovery, and how soon
a suspension made after the database returns reaches both workers (not a pytest test).

/work/venv/bin/python tests/benchmarks/bench_store_outage.py [--rounds 5] [--outage 30]

Each round: clicks run (a new TLS connection each, both workers, hosts they have cached
plus one only the node's local copy holds for worker B) while PostgreSQL is stopped for
`--outage` seconds; it is started again; when both workers' circuits have closed, one
host is suspended through the admin API and the time until each worker refuses it is
measured. Issue 11's goals: 0 failed clicks, the suspension everywhere within 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.edge import new_edge  # noqa: E402
from support.pebble import running_pebble  # noqa: E402
from support.postgres import running_postgres  # noqa: E402
from test_store_outage import (  # noqa: E402
    ClickLog,
    Outage,
    Pair,
    handshake_outcome,
    keep_clicking,
    registered_host,
    start_pair,
    suspend,
)

from certstore import SCHEMES  # noqa: E402
from proxy.demo.backend import start_backend  # noqa: E402
from proxy.demo.dnsserver import DNSServer  # noqa: E402
from proxy.demo.pebble import PebbleServer  # noqa: E402


async def until(predicate, bound: float) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    while not await predicate():
        if time.monotonic() - started > bound:
            raise RuntimeError("not within the bound")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def one_round(
    pair: Pair, pebble: PebbleServer, clicked: list[str], victim: str, outage: float
) -> dict[str, float]:
    log = ClickLog()
    done = asyncio.Event()
    clicker = asyncio.ensure_future(keep_clicking(pair, pebble, clicked, done, log))
    await asyncio.sleep(0.5)
    before = log.ok
    try:
        await asyncio.to_thread(pair.outage.stop)
        lost = time.monotonic()
        detect = await until(lambda: _value(all(pair.circuits_down())), outage + 10)
        await asyncio.sleep(max(0.0, outage - (time.monotonic() - lost)))
        during = log.ok - before
    finally:
        await asyncio.to_thread(pair.outage.start)
    recover = await until(lambda: _value(not any(pair.circuits_down())), 30)
    done.set()
    await clicker
    suspended_at = time.monotonic()
    await suspend(pair, victim)
    reached = []
    for edge in (pair.a, pair.b):
        await until(lambda e=edge: _refused(e, victim, pebble), 10)
        reached.append(time.monotonic() - suspended_at)
    return {
        "served": during,
        "failed": len(log.failed),
        "slowest": log.slowest,
        "detect": detect,
        "recover": recover,
        "suspension_a": reached[0],
        "suspension_b": reached[1],
    }


async def _value(value: bool) -> bool:
    return value


async def _refused(edge, host: str, pebble: PebbleServer) -> bool:  # type: ignore[no-untyped-def]
    return (await handshake_outcome(edge, host, pebble)).startswith("refused")


async def main(rounds: int, outage: float) -> None:
    if "postgresql" not in SCHEMES:
        raise SystemExit("the PostgreSQL store backend is not in this tree")
    with (
        tempfile.TemporaryDirectory(prefix="linkedge-bench-outage-") as tmp,
        DNSServer() as dns,
        running_pebble(Path(tmp) / "pebble", dns) as pebble,
        running_postgres() as postgres,
    ):
        runner, backend_url = await start_backend()
        edge = new_edge(Path(tmp), pebble, dns, backend_url)
        edge.config.store.url = postgres.url(postgres.create_database())
        pair = await start_pair(edge, Path(tmp), Outage(postgres.stop, postgres.start))
        store = await pair.client_store()
        try:
            victims = [await registered_host(pair, store, dns, f"v{i}") for i in range(rounds)]
            kept = await registered_host(pair, store, dns, "kept")
            copied = await registered_host(pair, store, dns, "copied")
            for host in [*victims, kept]:
                for worker in (pair.a, pair.b):
                    await handshake_outcome(worker, host, pebble)
            await handshake_outcome(pair.a, copied, pebble)  # B has it from the copy only
            await asyncio.sleep(3)
            results = []
            for i, victim in enumerate(victims):
                clicked = [kept, copied, *victims[i:]]
                result = await one_round(pair, pebble, clicked, victim, outage)
                results.append(result)
                print(
                    f"round {i + 1}: {result['served']:.0f} clicks during {outage:g} s, "
                    f"{result['failed']:.0f} failed (slowest {result['slowest']:.2f} s); "
                    f"loss seen in {result['detect']:.2f} s; recovered {result['recover']:.2f} s"
                    f" after the restart; suspension reached A {result['suspension_a']:.2f} s,"
                    f" B {result['suspension_b']:.2f} s"
                )
            worst = [max(r["suspension_a"], r["suspension_b"]) for r in results]
            print(
                f"\n{rounds} outages of {outage:g} s: clicks served "
                f"{sum(r['served'] for r in results):.0f}, failed "
                f"{sum(r['failed'] for r in results):.0f}; recovery median "
                f"{statistics.median(r['recover'] for r in results):.2f} s; suspension on "
                f"both workers median {statistics.median(worst):.2f} s, max {max(worst):.2f} s "
                f"({sum(w <= 1.0 for w in worst)}/{rounds} within 1 s)"
            )
        finally:
            await store.close()
            await pair.b.stop()
            await pair.a.stop()
            await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--outage", type=float, default=30.0, help="seconds PostgreSQL is down")
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.outage))
