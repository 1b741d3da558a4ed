"""CPU per issued certificate: linkedge vs Caddy (on-demand TLS), side by side, one Pebble.

Run:  PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_issuance.py [--hosts 20] [--rounds 3]

Needs Debian `caddy` for the peer (`deploy/bootstrap.sh --bench`); without it only
linkedge (and its variants) are measured. Everything runs on loopback:

* DNS + Pebble (PEBBLE_VA_NOSLEEP: validation starts at once), the sample backend;
* linkedge in its own process (`proxy.app.wiring.run_worker`, one worker, SQLite store),
  HTTP-01, a fresh ECDSA P-256 key per certificate, P-256 account key;
* Caddy 2.6 (`on_demand_tls` + an `ask` endpoint served by this script, `key_type p256`,
  its HTTP port on Pebble's HTTP-01 port on its own loopback address);
* optional linkedge variants (`--variants`, as in bench_peers.py: `src=DIR` runs another
  source tree, e.g. the "before" of a change; `uvloop`; `section.key=value`), each its own
  process, its own loopback address and CNAME target.

A warm-up click per server first (account registration, directory, lazy imports: paid
once per process, not per certificate). Then, per round and per server (the order
rotates every round), N new host names are made known (linkedge: registered in the store
and CNAME'd to its target; Caddy: an A record, the ask endpoint says yes to all) and
clicked one after the other: each first click makes the server order, validate, download
and install a certificate, then answer the 302. The unit is the CPU time of the server's
whole process tree (utime + stime from /proc, all threads: linkedge's ACME steps run on a
thread pool, Caddy's on goroutines) over the burst, divided by N. The clicks themselves
(one full TLS handshake + a proxied 302 each, ~1 ms) are included for both.

Reported per server: median CPU ms per certificate over rounds with [min..max], user/sys,
first-click latency (median over all clicks), and the per-round ratio to Caddy and (for
variants) to linkedge. `--profile DIR` records one extra burst on linkedge with py-spy
(all threads, `--native` with `--native`) and prints where the CPU per certificate goes.
`--threads` splits each linkedge burst's CPU into the event loop's thread and the others;
`--count-store N` counts store calls and DNS lookups per first click on an in-process edge,
and the store calls of each host's second click.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import dataclasses
import json
import math
import os
import pickle
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_edge as be  # noqa: E402
import bench_peers as bp  # noqa: E402

SERVER_CPU = 0  # servers share this CPU; Pebble, DNS and this script use the others


class IssuanceBench(bp.PeerBench):
    def __init__(self, args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack):
        super().__init__(args, workdir, stack)
        self.targets: dict[str, str] = {}  # linkedge-like server -> its CNAME target
        self.store_paths: dict[str, str] = {}  # linkedge-like server -> its store
        self.latencies: dict[str, list[float]] = {}

    # -- servers -----------------------------------------------------------------

    def setup_linkedge(self) -> None:
        from proxy.app.config import LimitsConfig

        # The order limits are shared through the store by every linkedge process here
        # and would refuse orders past 300 per 3 h or 50 per domain: not what is measured.
        init = LimitsConfig.__init__
        defaults = init.__defaults__
        names = [f.name for f in dataclasses.fields(LimitsConfig)]
        assert defaults is not None and len(defaults) == len(names)
        raised = {"orders_per_window": 1_000_000, "per_domain": 1_000_000}
        init.__defaults__ = tuple(raised.get(n, d) for n, d in zip(names, defaults, strict=True))
        try:
            self.start_stack()  # its Config() takes the raised limits (pickled to the edge)
        finally:
            init.__defaults__ = defaults
        self.servers.append("linkedge")
        self.targets["linkedge"] = self.target
        self.store_paths["linkedge"] = self.config.store.path
        # the process's first order: account, directory, first use of everything
        self.results.setdefault("first_order_cpu_ms", {})["linkedge"] = self.burst(
            "linkedge", 1, "warm"
        )["cpu_ms"]

    def start_variant(self, spec: str, ip: str) -> None:
        """A further linkedge process: own address, own CNAME target, same store and CA."""
        index = len(self.targets)
        name = f"linkedge[{spec}]"
        config = copy.deepcopy(self.config)
        target = f"edge-v{index}.linkedge.test"
        self.dns.set_a(target, [ip])
        config.edge.cname_target = target
        # its own store: edges sharing one would check each other's names against their
        # own target (and share the order limits); nothing here is about sharing
        config.store.path = str(self.workdir / f"store-v{index}.db")
        self.store_paths[name] = config.store.path
        config.listen.https = f"{ip}:{be.free_port(ip)}"
        config.listen.http = f"{ip}:{self.pebble.http_port}"  # HTTP-01 reaches it there
        parts = [p for p in spec.split("+") if p]
        for part in parts:
            if "=" in part and not part.startswith("src="):
                path, value = part.split("=", 1)
                obj = config
                *head, last = path.split(".")
                for attr in head:
                    obj = getattr(obj, attr)
                old = getattr(obj, last)
                new = value in ("1", "true") if isinstance(old, bool) else type(old)(value)
                setattr(obj, last, new)
        log = self.workdir / f"edge-{index}.log"
        proc, _ = self.children.start_server(
            name, bp.edge_variant_main, spec, pickle.dumps(config), str(log)
        )
        self.pids[name] = int(proc.pid or 0)
        self.procs[name] = proc
        self.ports[name] = int(config.listen.https.rsplit(":", 1)[1])
        self.ips[name] = ip
        self.targets[name] = target
        self.servers.append(name)
        self.results.setdefault("first_order_cpu_ms", {})[name] = self.burst(name, 1, "warm")[
            "cpu_ms"
        ]

    def start_caddy(self) -> None:
        super().start_caddy()  # its first click is Caddy's warm-up (account registration)
        first = self.results.get("caddy_first_click")
        if first is not None:
            self.results.setdefault("first_order_cpu_ms", {})["caddy"] = first["cpu_ms"]

    def pin_servers(self) -> dict[str, list[int]]:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return {}
        mine, other = {cpus[SERVER_CPU]}, set(cpus) - {cpus[SERVER_CPU]}
        for name in self.servers:
            for pid in bp.tree_pids(self.pids[name]):
                with contextlib.suppress(OSError):
                    for task in os.listdir(f"/proc/{pid}/task"):
                        os.sched_setaffinity(int(task), mine)
        others = [os.getpid(), self.pids["backend"]]
        proc = getattr(self.pebble, "_proc", None)
        if proc is not None:
            others.append(proc.pid)
        for pid in others:
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task), other)
        return {"servers": sorted(mine), "pebble_backend_bench": sorted(other)}

    # -- one burst -----------------------------------------------------------------

    async def _register(self, hosts: list[str], target: str, path: str) -> None:  # type: ignore[override]
        from certstore import open_store
        from certstore.crypto import parse_key_text

        store = await open_store(path, parse_key_text(self.key_text, "bench"))
        try:
            for host in hosts:
                await store.add_domain(host, "acct-bench")
                self.dns.set_cname(host, target)
        finally:
            await store.close()

    def burst(self, server: str, n: int, tag: str) -> dict[str, Any]:
        """N first clicks on new names, back to back; the server tree's CPU over them."""
        label = re.sub(r"[^a-z0-9]+", "-", server.lower()).strip("-")[-30:]
        # one registered domain per host, as customers' own domains would be
        hosts = [f"links.{tag}-{k:03d}-{label}.test" for k in range(n)]
        # Sampled before the names exist: linkedge's verifier may notice a new name and
        # order its certificate before the click comes; that CPU is in the window too.
        c0 = self.server_cpu(server)
        t0_threads = thread_cpu(self.pids[server]) if self.args.threads else {}
        if server == "caddy":
            for host in hosts:
                self.dns.set_a(host, [bp.CADDY_IP])
        else:
            asyncio.run(self._register(hosts, self.targets[server], self.store_paths[server]))
        ctx = be.client_context(str(self.pebble.root_path))
        ip, port = self.ips[server], self.ports[server]
        took: list[float] = []
        t0 = time.perf_counter()
        for host in hosts:
            start = time.perf_counter()
            try:
                res = be.one_click(ctx, ip, port, host, be.FIRST_CLICK_TIMEOUT)
            except (OSError, ValueError) as exc:
                if server != "caddy":
                    print(self.edge_log_tail(), file=sys.stderr)
                raise RuntimeError(f"{server}: first click on {host} failed: {exc!r}") from exc
            if res["status"] != 302:
                raise RuntimeError(f"{server}: first click on {host}: HTTP {res['status']}")
            took.append(time.perf_counter() - start)
        wall = time.perf_counter() - t0
        c1 = self.server_cpu(server)
        if self.args.threads and server != "caddy":
            print_threads(server, t0_threads, thread_cpu(self.pids[server]), n)
        self.latencies.setdefault(server, []).extend(took)
        return {
            "server": server,
            "certificates": n,
            "cpu_ms": (c1.total - c0.total) * 1000 / n,
            "user_ms": (c1.utime - c0.utime) * 1000 / n,
            "sys_ms": (c1.stime - c0.stime) * 1000 / n,
            "first_click_s_median": statistics.median(took),
            "wall_s": wall,
        }

    def rounds(self) -> list[dict[str, Any]]:  # type: ignore[override]
        out: list[dict[str, Any]] = []
        n = len(self.servers)
        for r in range(self.args.rounds):
            order = self.servers[r % n :] + self.servers[: r % n]
            for server in order:
                res = self.burst(server, self.args.hosts, f"r{r}")
                res["round"] = r
                out.append(res)
                print(
                    f"  round {r} {server:32s} {res['cpu_ms']:6.1f} ms CPU per certificate "
                    f"(user {res['user_ms']:5.1f}, sys {res['sys_ms']:5.1f}), first click "
                    f"median {res['first_click_s_median'] * 1000:5.0f} ms",
                    flush=True,
                )
        return out

    # -- profile -------------------------------------------------------------------

    def profile_issuance(self, outdir: Path) -> dict[str, Any]:
        """py-spy on every linkedge process during one more burst (all threads)."""
        spy = be.find_py_spy()
        if spy is None:
            print("py-spy not found; no profile", file=sys.stderr)
            return {}
        outdir.mkdir(parents=True, exist_ok=True)
        found: dict[str, Any] = {}
        for server in [s for s in self.servers if s.startswith("linkedge")]:
            name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", server)
            folded = outdir / f"{name}-issuance.folded"
            cmd = [spy, "record", "--pid", str(self.pids[server]), "--rate", "1000"]
            cmd += ["--format", "raw", "--output", str(folded), "--threads"]
            # --nonblocking: the edge is not paused per sample (py-spy refuses it with --native)
            cmd.append("--native" if self.args.native else "--nonblocking")
            if self.args.gil:  # only the thread holding the GIL: Python's CPU, no GIL waits
                cmd.append("--gil")
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                time.sleep(1.0)  # py-spy attaches
                res = self.burst(server, self.args.profile_hosts, "prof")
                time.sleep(0.3)
                proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                proc.communicate(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if not folded.exists():
                continue
            found[server] = summarize_profile(folded, res["cpu_ms"])
            found[server]["cpu_ms"] = res["cpu_ms"]
            found[server]["file"] = str(folded)
            print_profile(server, found[server])
        return found


# ----------------------------------------------------------------------------------
# CPU per thread kind (`--threads`): which threads of the edge the CPU is spent on


def thread_cpu(pid: int) -> dict[str, float]:
    """Seconds of CPU (utime + stime) per thread of the tree, keyed "pid/tid name"."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for p in bp.tree_pids(pid):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{p}/task/{tid}/stat") as fh:
                    stat = fh.read()
                name = stat[stat.index("(") + 1 : stat.rindex(")")]
                fields = stat[stat.rindex(")") + 2 :].split()
                out[f"{p}/{tid} {name}"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def print_threads(server: str, before: dict[str, float], after: dict[str, float], n: int) -> None:
    """CPU ms per certificate: each process's main thread (the event loop) against its
    other threads (Python's threads carry no name of their own for /proc: the ACME pool,
    the store's, `to_thread`'s). Threads that ended during the burst are lost."""
    kinds: Counter[str] = Counter()
    for key, cpu in after.items():
        pid, tid = key.split(" ", 1)[0].split("/")
        kind = "main thread" if pid == tid else "other threads"
        kinds[kind] += cpu - before.get(key, 0.0)
    parts = ", ".join(f"{k} {v * 1000 / n:.1f}" for k, v in kinds.most_common() if v > 0)
    print(f"    {server} threads, CPU ms per certificate: {parts}", flush=True)


# ----------------------------------------------------------------------------------
# profile summary: where the CPU per certificate goes

# py-spy's idle detection does not work on this VM (a thread blocked in epoll_wait, a
# queue or a socket read is sampled as busy): samples whose innermost frame is one of
# these waits are dropped, the rest are scaled to the measured CPU per certificate.
IDLE_LEAVES = [
    ("_worker", "concurrent/futures/thread.py:8"),  # work_queue.get(block=True)
    ("_connection_worker_thread", "aiosqlite/core.py:59"),  # tx.get()
    ("select", "selectors.py"),
    ("_recv", "multiprocessing/connection.py"),  # the lifeline watcher
    ("_sleep_before", "acme_client/issuer.py"),  # time.sleep between polls
    ("sleep", "acme_client/"),
    ("read", "ssl.py"),  # requests waiting for the CA's answer
    ("recv_into", "ssl.py"),
    ("wait", "threading.py"),
    ("_wait_for_tstate_lock", "threading.py"),
]

_FRAME = tuple[str, str]


def _has(frames: list[_FRAME], func: str = "", file: str = "") -> bool:
    return any(func in f and file in p for f, p in frames)


# (bucket, predicate on the frame list) in order: the first matching bucket takes a sample
BUCKETS: list[tuple[str, Any]] = [
    (
        "store (certstore, aiosqlite)",
        lambda fs: _has(fs, "", "certstore/") or _has(fs, "", "aiosqlite/"),
    ),
    (
        "DNS checks (gate, verifier)",
        lambda fs: _has(fs, "", "dns/") or _has(fs, "", "proxy/hosts/"),
    ),
    ("TLS context build after issuance", lambda fs: _has(fs, "build_server_context")),
    ("certificate parsing (facts)", lambda fs: _has(fs, "certificate_facts")),
    ("key + CSR generation", lambda fs: _has(fs, "new_private_key_pem") or _has(fs, "make_csr")),
    ("ACME: JWS signing", lambda fs: _has(fs, "_wrap_in_jws") or _has(fs, "sign", "josepy/")),
    ("ACME: HTTP", lambda fs: _has(fs, "", "acme_client/network") or _has(fs, "", "requests/")),
    ("ACME: JSON (josepy)", lambda fs: _has(fs, "", "josepy/")),
    ("ACME: other", lambda fs: _has(fs, "", "acme/") or _has(fs, "", "acme_client/")),
    ("logging", lambda fs: _has(fs, "", "logging/")),
    (
        "TLS handshake + HTTP (clicks, HTTP-01)",
        lambda fs: _has(fs, "", "proxy/") or _has(fs, "", "aiohttp/"),
    ),
    ("event loop / threads", lambda fs: _has(fs, "", "asyncio/") or _has(fs, "", "threading")),
]


def _read_folded(path: Path) -> list[tuple[list[_FRAME], str, int]]:
    """(frames without line numbers, the leaf's 'file:line', count) per stack."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        leaf_where = ""
        for part in stack.split(";"):
            m = re.match(r"(.*?) \((.*?)(?::(\d+))?\)$", part)
            if m:
                frames.append((m.group(1), re.sub(r".*site-packages/", "", m.group(2))))
                leaf_where = f"{frames[-1][1]}:{m.group(3) or ''}"
            else:
                frames.append((part, ""))
                leaf_where = ""
        out.append((frames, leaf_where, int(count)))
    return out


def _idle(leaf: _FRAME, where: str) -> bool:
    func = leaf[0].rsplit(".", 1)[-1]
    return any(func == f and w in where for f, w in IDLE_LEAVES)


def summarize_profile(path: Path, cpu_ms: float) -> dict[str, Any]:
    stacks = _read_folded(path)
    busy = [(frames, c) for frames, where, c in stacks if not _idle(frames[-1], where)]
    total = sum(c for _, c in busy)
    if not total:
        return {"samples": 0}
    buckets: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    selftime: Counter[str] = Counter()
    for frames, count in busy:
        name = next((b for b, pred in BUCKETS if pred(frames)), "other")
        buckets[name] += count
        for func, file in set(frames):
            if not func.startswith(("process ", "thread ")):
                inclusive[f"{func} ({file})"] += count
        selftime[f"{frames[-1][0]} ({frames[-1][1]})"] += count

    def rows(counter: Counter[str], n: int) -> list[dict[str, Any]]:
        return [
            {"what": k, "pct": 100 * c / total, "ms": c / total * cpu_ms}
            for k, c in counter.most_common(n)
        ]

    return {
        "samples": total,
        "idle_samples_dropped": sum(c for _, _, c in stacks) - total,
        "buckets": rows(buckets, len(BUCKETS) + 1),
        "inclusive_top": rows(inclusive, 60),
        "self_top": rows(selftime, 30),
    }


def print_profile(server: str, p: dict[str, Any]) -> None:
    if not p.get("samples"):
        print(f"\nProfile {server}: no samples")
        return
    print(
        f"\nProfile {server}: {p['samples']} busy samples ({p['idle_samples_dropped']} idle "
        f"dropped), {p['cpu_ms']:.1f} ms CPU per certificate"
    )
    print("  by bucket (first match, in this order):")
    for row in p["buckets"]:
        print(f"    {row['pct']:5.1f}% {row['ms']:6.2f} ms  {row['what']}")
    print("  inclusive (callees included), top 40:")
    for row in p["inclusive_top"][:40]:
        print(f"    {row['pct']:5.1f}% {row['ms']:6.2f} ms  {row['what']}")
    print("  self, top 20:")
    for row in p["self_top"][:20]:
        print(f"    {row['pct']:5.1f}% {row['ms']:6.2f} ms  {row['what']}")


# ----------------------------------------------------------------------------------


def summarize(
    servers: list[str], results: list[dict[str, Any]], latencies: dict[str, list[float]]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    peers = [p for p in ("caddy",) if p in servers]
    for server in servers:
        mine = [x for x in results if x["server"] == server]
        if not mine:
            continue
        cpu = [x["cpu_ms"] for x in mine]
        row: dict[str, Any] = {
            "cpu_ms": statistics.median(cpu),
            "cpu_ms_min": min(cpu),
            "cpu_ms_max": max(cpu),
            "user_ms": statistics.median(x["user_ms"] for x in mine),
            "sys_ms": statistics.median(x["sys_ms"] for x in mine),
            "first_click_s_median": statistics.median(latencies[server]),
            "ratios": {},
        }
        others = [*peers, *(["linkedge"] if server.startswith("linkedge[") else [])]
        for peer in [p for p in others if p != server]:
            per_round = []
            for r in sorted({x["round"] for x in results}):
                a = [x for x in results if x["round"] == r and x["server"] == server]
                b = [x for x in results if x["round"] == r and x["server"] == peer]
                if a and b and b[0]["cpu_ms"] > 0:
                    per_round.append(a[0]["cpu_ms"] / b[0]["cpu_ms"])
            if per_round:
                row["ratios"][peer] = {
                    "median": statistics.median(per_round),
                    "min": min(per_round),
                    "max": max(per_round),
                }
        out[server] = row
    return out


def print_table(summary: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\nCPU per issued certificate ({args.hosts} back to back per round, median of "
        f"{args.rounds} rounds [min..max]; server process tree, all threads)"
    )
    print(
        f"  {'server':32s} {'CPU ms':>7s} {'[min..max]':>13s} {'user':>6s} {'sys':>6s} "
        f"{'click s':>7s}  ratio per round: median [min..max]"
    )
    for server, row in summary.items():
        span = f"[{row['cpu_ms_min']:.1f}..{row['cpu_ms_max']:.1f}]"
        ratios = "  ".join(
            f"/{p} {v['median']:.2f} [{v['min']:.2f}..{v['max']:.2f}]"
            for p, v in row["ratios"].items()
        )
        print(
            f"  {server:32s} {row['cpu_ms']:7.1f} {span:>13s} {row['user_ms']:6.1f} "
            f"{row['sys_ms']:6.1f} {row['first_click_s_median']:7.3f}  {ratios}"
        )


def _named_thread_cpu() -> dict[str, float]:
    """CPU seconds per thread of this process, by Python thread name (numbers dropped)."""
    import threading

    names = {t.native_id: re.sub(r"[_-]?\d+(_\d+)?$", "", t.name) for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: Counter[str] = Counter()
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
            out[names.get(int(tid), "?")] += (int(fields[11]) + int(fields[12])) / tick
    return dict(out)


def count_store_calls(n: int) -> int:
    """`--count-store N`: store calls per first-click issuance, by method and caller.

    An in-process edge (the test suite's, SQLite store) clicks one warm-up host, then N
    new hosts one after the other; every public coroutine method of the SQLite store
    counts its calls meanwhile (and 0.5 s after the last click, for what an issuance
    sets off). The caller is the first frame outside certstore. `last_event_id`,
    `events_after` and `wait_for_events` are the event-log follower's SQLite polls:
    time-based, not per issuance (PostgreSQL pushes instead).
    """
    import inspect
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: support
    from support.clicks import edge_store, get_status, new_host
    from support.edge import new_edge, register
    from support.pebble import running_pebble

    from certstore import generate_key_text, open_store
    from certstore.crypto import parse_key_text
    from proxy.demo.backend import start_backend
    from proxy.demo.dnsserver import DNSServer

    calls: Counter[str] = Counter()
    callers: Counter[str] = Counter()
    second: Counter[str] = Counter()  # calls during the hosts' second clicks
    after_first: list[bool] = []  # non-empty once the first clicks are counted
    counting = [False]

    def caller() -> str:
        frame = sys._getframe(2)
        while frame is not None:
            module = str(frame.f_globals.get("__name__", ""))
            if not module.startswith("certstore") and module != __name__:
                return f"{module}.{frame.f_code.co_name}"
            frame = frame.f_back  # type: ignore[assignment]
        return "?"

    def wrap(name: str, method: Any) -> Any:
        async def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            if counting[0] and after_first:  # the second clicks (see run)
                second[f"{name} <- {caller()}"] += 1
            elif counting[0]:
                calls[name] += 1
                callers[f"{name} <- {caller()}"] += 1
            return await method(self, *args, **kwargs)

        return counted

    async def backend_class() -> type:
        # the class open_store picks for the edge's SQLite store, found through the port
        # (no module outside certstore names a backend class)
        probe = await open_store("sqlite::memory:", parse_key_text(generate_key_text(), "bench"))
        await probe.close()
        return type(probe)

    backend = asyncio.run(backend_class())
    for name, method in list(vars(backend).items()):
        if not name.startswith("_") and name != "open" and inspect.iscoroutinefunction(method):
            setattr(backend, name, wrap(name, method))

    # DNS lookups too (dnspython's per-query cost is a part of the CPU per certificate)
    import dns.asyncresolver

    lookups: Counter[str] = Counter()
    resolve = dns.asyncresolver.Resolver.resolve

    async def counted_resolve(self: Any, qname: Any, rdtype: Any = "A", *a: Any, **k: Any) -> Any:
        if counting[0]:
            lookups[f"{rdtype} <- {caller()}"] += 1
        return await resolve(self, qname, rdtype, *a, **k)

    dns.asyncresolver.Resolver.resolve = counted_resolve  # type: ignore[method-assign]

    async def run(tmp: Path, pebble: Any, dns: Any) -> None:
        runner, url = await start_backend()
        edge = new_edge(tmp, pebble, dns, url)
        await edge.start()
        hosts = [new_host(edge) for _ in range(n + 1)]
        async with edge_store(edge) as store:
            for host in hosts:
                await register(store, dns, host, edge.target)
        assert await get_status(edge, pebble, hosts[0]) == 302  # warm-up: first order
        await asyncio.sleep(0.5)
        counting[0] = True
        before = _named_thread_cpu()
        for host in hosts[1:]:
            assert await get_status(edge, pebble, host) == 302
        await asyncio.sleep(0.5)
        counting[0] = False
        after = _named_thread_cpu()
        # each host's second click (a new connection, once the event follower has read
        # the issuance's own events): a cache hit unless something dropped the context
        after_first.append(True)
        counting[0] = True
        for host in hosts[1:]:
            assert await get_status(edge, pebble, host) == 302
        counting[0] = False
        spent = {k: v - before.get(k, 0.0) for k, v in after.items()}
        print("CPU ms per new host by thread (this process: edge, clicks, DNS server):")
        for name, cpu in sorted(spent.items(), key=lambda kv: -kv[1]):
            if cpu > 0:
                print(f"  {cpu * 1000 / n:6.2f}  {name}")
        await edge.stop()
        await runner.cleanup()

    with (
        tempfile.TemporaryDirectory() as tmp,
        DNSServer() as dns,
        running_pebble(Path(tmp) / "pebble", dns) as pebble,
    ):
        asyncio.run(run(Path(tmp), pebble, dns))
    polls = {"last_event_id", "events_after", "wait_for_events"}
    total = sum(calls.values()) / n
    print(f"store calls per new host: {total:.1f}")
    print(f"  without the event-log polls: {total - sum(calls[p] for p in polls) / n:.1f}")
    for key, count in callers.most_common():
        print(f"{count / n:6.1f}  {key}")
    print(f"store calls per host on its second click: {sum(second.values()) / n:.1f}")
    for key, count in second.most_common():
        print(f"{count / n:6.1f}  {key}")
    print(f"DNS lookups per new host: {sum(lookups.values()) / n:.1f}")
    for key, count in lookups.most_common():
        print(f"{count / n:6.1f}  {key}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hosts", type=int, default=20, help="certificates per server per round (20)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    p.add_argument("--peers", default="caddy", help="'caddy' or '' for none")
    p.add_argument("--variants", default="", help="comma list, as in bench_peers.py")
    p.add_argument("--json", type=Path)
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, store)")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="no CPU pinning")
    p.add_argument("--profile", type=Path, metavar="DIR", help="py-spy one more linkedge burst")
    p.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    p.add_argument("--gil", action="store_true", help="py-spy --gil (GIL holder only)")
    p.add_argument("--threads", action="store_true", help="CPU per thread kind per burst")
    p.add_argument("--profile-hosts", type=int, default=40, help="certificates profiled (40)")
    p.add_argument(
        "--count-store", type=int, metavar="N", help="only count store calls over N issuances"
    )
    args = p.parse_args(argv)
    if not 1 <= args.hosts <= 200 or not 1 <= args.rounds <= 20:
        p.error("--hosts 1..200, --rounds 1..20")
    args.clients = 0  # no load clients: the bench clicks itself, one at a time
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.count_store:
        return count_store_calls(args.count_store)
    signal.signal(signal.SIGTERM, be._raise_on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    results: dict[str, Any] = {"params": {k: str(v) for k, v in vars(args).items()}}
    try:
        with contextlib.ExitStack() as stack:
            workdir = stack.enter_context(be._workdir(args.keep))
            bench = IssuanceBench(args, workdir, stack)
            bench.results = results
            print("starting DNS, Pebble, backend, linkedge ...", flush=True)
            bench.setup_linkedge()
            for i, spec in enumerate(v for v in args.variants.split(",") if v):
                bench.start_variant(spec, bp.VARIANT_IPS[i])
            if "caddy" in args.peers.split(","):
                bench.start_caddy()
            results["pinning"] = bench.pin_servers() if args.pin else {}
            results["servers"] = bench.servers
            print(f"servers: {', '.join(bench.servers)}", flush=True)
            results["bursts"] = bench.rounds()
            results["summary"] = summarize(bench.servers, results["bursts"], bench.latencies)
            if args.profile is not None:
                results["profile"] = bench.profile_issuance(args.profile)
    except KeyboardInterrupt:
        print("interrupted; stopped all processes", file=sys.stderr)
        return 130
    print_table(results["summary"], args)
    first = results.get("first_order_cpu_ms", {})
    if first:
        print("  (each process's first order, not in the table: account registration and first")
        print(
            "   use of everything: " + ", ".join(f"{k} {v:.0f} ms" for k, v in first.items()) + ")"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0 if all(not math.isnan(r["cpu_ms"]) for r in results["summary"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
