"""Fleet figures: three edge nodes (two workers each) on one PostgreSQL store.

Run:  PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_fleet.py [--quick] [--store sqlite]

The fleet is tests/support/fleet.py's (real `linkedge serve` processes on 127.0.0.2,
.3, .4, Pebble with PEBBLE_VA_NOSLEEP, the test DNS server, the sample backend, a
throwaway PostgreSQL from Debian's server). Reported, each as min / median / p95 / max:

* fleet start: from launching the three nodes at once to every worker ready;
* first click, one at a time: N new hosts, host i clicked on node i mod 3 while the
  CA validates through node i+1 (connect to the 302, the ACME order included);
* first click, a burst: M new hosts clicked all at once over the nodes, the CA
  validating through any of them (the fleet target's A records list all three);
  failed clicks are counted (the store's timeouts can fire in a busy worker);
* one host, many first clicks: K clicks at once on one new host over the three
  nodes, R times: orders per host (Pebble's count and the store's `order_started`);
* a change reaching every node: R times, a host served (and cached) by every node is
  suspended through one node's admin API; per node, the time until its handshakes
  are refused (6 in a row, so both workers have it), and the slowest node per
  repetition; the same for the resumption (served again).

Numbers depend on the machine's load (2 shared cores here): compare within a run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: `support`

from support.fleet import Fleet, running_backend, running_fleet  # noqa: E402
from support.pebble import running_pebble  # noqa: E402

from proxy.demo.dnsserver import DNSServer  # noqa: E402


def summary(values: Sequence[float], unit: str = "ms", scale: float = 1000.0) -> str:
    if not values:
        return "no values"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]
    parts = [ordered[0], statistics.median(ordered), p95, ordered[-1]]
    shown = " / ".join(f"{v * scale:.0f}" for v in parts)
    return f"{shown} {unit} (min / median / p95 / max, n={len(values)})"


def new_host(label: str) -> str:
    return f"{label}.b{uuid.uuid4().hex[:12]}.test"


@contextlib.contextmanager
def store_url(kind: str, workdir: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite://{workdir / 'fleet.db'}"
        return
    from support.postgres import running_postgres

    with running_postgres() as postgres:
        yield postgres.url(postgres.create_database("fleet"))


async def first_clicks_sequential(fleet: Fleet, hosts: list[str]) -> list[float]:
    async with fleet.store() as store:
        await fleet.register(store, *hosts)
    times = []
    for i, host in enumerate(hosts):
        fleet.validate_via(fleet.nodes[(i + 1) % 3])
        click = await fleet.click(fleet.nodes[i % 3], host)
        assert click.status == 302, (host, click)
        times.append(click.seconds)
    return times


async def first_clicks_burst(
    fleet: Fleet, hosts: list[str]
) -> tuple[list[float], float, list[str]]:
    async with fleet.store() as store:
        await fleet.register(store, *hosts)
    fleet.validate_via(*fleet.nodes)
    started = time.monotonic()
    clicks = await asyncio.gather(
        *(fleet.click(fleet.nodes[i % 3], h) for i, h in enumerate(hosts))
    )
    wall = time.monotonic() - started
    failed = [c.error or str(c.status) for c in clicks if c.status != 302]
    return [c.seconds for c in clicks if c.status == 302], wall, failed


async def one_host_many_clicks(fleet: Fleet, k: int, reps: int) -> tuple[list[int], list[int]]:
    pebble_orders: list[int] = []
    store_orders: list[int] = []
    fleet.validate_via(*fleet.nodes)
    for r in range(reps):
        host = new_host(f"same{r}")
        async with fleet.store() as store:
            await fleet.register(store, host)
            before = fleet.pebble.order_count()
            clicks = await asyncio.gather(
                *(fleet.click(fleet.nodes[i % 3], host, f"/c/{i}") for i in range(k))
            )
            assert all(c.status == 302 for c in clicks), [c for c in clicks if c.status != 302]
            pebble_orders.append(fleet.pebble.order_count() - before)
            events = await store.list_events(host, limit=1000)
            store_orders.append(sum(1 for e in events if e.kind == "order_started"))
    return pebble_orders, store_orders


async def change_reaches_nodes(
    fleet: Fleet, reps: int
) -> tuple[list[float], list[float], list[float], list[float], list[float]]:
    """(suspension per node, suspension slowest node, resumption per node, slowest,
    the admin API's answer times)."""
    host = new_host("switch")
    async with fleet.store() as store:
        await fleet.register(store, host)
    fleet.validate_via(*fleet.nodes)
    for node in fleet.nodes:  # every worker of every node has it cached
        for _ in range(8):
            assert (await fleet.click(node, host)).status == 302
    suspended_each: list[float] = []
    suspended_all: list[float] = []
    resumed_each: list[float] = []
    resumed_all: list[float] = []
    api_times: list[float] = []
    for r in range(reps):
        via = fleet.nodes[r % 3]
        for action, each, slowest in (
            ("suspend", suspended_each, suspended_all),
            ("resume", resumed_each, resumed_all),
        ):
            async with fleet.admin(via) as api:
                # the nodes are watched from before the request: a change that reaches
                # them before the API has answered is timed as such
                since = time.monotonic()
                watchers = [
                    asyncio.ensure_future(
                        fleet.until(n, host, refused=action == "suspend", within=30, since=since)
                    )
                    for n in fleet.nodes
                ]
                async with api.post(f"/v1/hosts/{host}/{action}", json={}) as resp:
                    assert resp.status == 200, (resp.status, await resp.text())
                answered = time.monotonic() - since
                times = await asyncio.gather(*watchers)
            api_times.append(answered)
            assert all(t is not None for t in times), (action, times)
            reached = [t for t in times if t is not None]
            each.extend(reached)
            slowest.append(max(reached))
    return suspended_each, suspended_all, resumed_each, resumed_all, api_times


async def run(args: argparse.Namespace, fleet: Fleet, start_seconds: float) -> None:
    print(f"fleet: {len(fleet.nodes)} nodes x {fleet.workers} workers, store {args.store}")
    print(f"fleet start (all workers ready):      {start_seconds:.1f} s")
    mark = await fleet.mark()
    one_by_one = [new_host(f"seq{i}") for i in range(args.hosts)]
    at_once = [new_host(f"burst{i}") for i in range(args.burst)]
    seq = await first_clicks_sequential(fleet, one_by_one)
    print(f"first click, one at a time:           {summary(seq)}")
    burst, wall, failed = await first_clicks_burst(fleet, at_once)
    print(f"first click, {args.burst} at once:{' ' * 14}{summary(burst)}; all in {wall:.1f} s")
    if failed:
        print(f"  {len(failed)} of them failed, e.g. {failed[0][-100:]}")
    async with fleet.store() as store:
        orders = await fleet.orders(store, [*one_by_one, *at_once], mark)
    n = len(one_by_one) + len(at_once)
    print(
        f"orders per new host:                  Pebble {orders.pebble_orders / n:.2f},"
        f" store {orders.store_started / n:.2f}, certificates {orders.pebble_certificates / n:.2f}"
    )
    pebble_orders, store_orders = await one_host_many_clicks(fleet, args.same, args.reps_same)
    print(
        f"{args.same} first clicks on one host, x{args.reps_same}:    orders per host"
        f" Pebble {pebble_orders}, store {store_orders}"
    )
    s_each, s_all, r_each, r_all, api = await change_reaches_nodes(fleet, args.reps)
    print(f"admin API answers suspend/resume:     {summary(api)}")
    print(f"suspension reaches a node:            {summary(s_each)}")
    print(f"suspension reaches every node:        {summary(s_all)}")
    print(f"resumption reaches a node:            {summary(r_each)}")
    print(f"resumption reaches every node:        {summary(r_all)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer hosts and repetitions")
    p.add_argument("--store", choices=["postgresql", "sqlite"], default="postgresql")
    p.add_argument("--hosts", type=int, help="new hosts clicked one at a time (30; quick 9)")
    p.add_argument("--burst", type=int, help="new hosts clicked at once (60; quick 15)")
    p.add_argument("--same", type=int, default=30, help="first clicks on one host (30)")
    p.add_argument("--reps-same", type=int, help="hosts for --same (5; quick 2)")
    p.add_argument("--reps", type=int, help="suspend/resume repetitions (20; quick 5)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, store)")
    args = p.parse_args(argv)
    args.hosts = args.hosts or (9 if args.quick else 30)
    args.burst = args.burst or (15 if args.quick else 60)
    args.reps_same = args.reps_same or (2 if args.quick else 5)
    args.reps = args.reps or (5 if args.quick else 20)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="linkedge-bench-fleet-"))
    with (
        DNSServer() as dns,
        running_pebble(workdir / "pebble", dns) as pebble,
        store_url(args.store, workdir) as url,
        running_backend() as backend_url,
    ):
        started = time.monotonic()
        with running_fleet(workdir / "fleet", pebble, dns, backend_url, url) as fleet:
            asyncio.run(run(args, fleet, time.monotonic() - started))
    if args.keep:
        print(f"work dir kept: {workdir}")
    else:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
