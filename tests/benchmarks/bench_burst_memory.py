"""Side by side: memory of linkedge vs nginx vs Caddy under a burst, and per cached certificate.

Run:  PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_burst_memory.py
      [-c 2000] [-r 3] [--rounds 2] [--certs 150] [--variants src=/tmp/main-tree]

Needs Debian `nghttp2-client` (h2load), `caddy` and `nginx-light` (`deploy/bootstrap.sh
--bench`). The servers are bench_peers.py's (same backend, Pebble, DNS, nginx with
linkedge's certificate, Caddy with on-demand TLS), each its own process tree:

* **burst**: `h2load --h1 -c C -n C*R` over TLS 1.3 (each of C clients opens one
  connection at once and sends R requests on it, one at a time), against each server in
  turn. The server's peak RSS (its whole process tree) is sampled from /proc every 20 ms
  during the burst; `VmHWM` (reset before each burst through `clear_refs`) is reported
  too, summed over the tree. RSS right after the burst and `--settle` seconds later.
  Every request must come back a 3xx (h2load's counts are checked), else the run stops.
* **per certificate**: `--certs` new hosts per server, each clicked once (linkedge: a
  first click orders the certificate through Pebble and caches its TLS context; Caddy:
  on-demand TLS, the same), RSS delta / N after `--settle` seconds, measured after
  `--certs-warmup` other new hosts (not counted: the first orders' one-time growth, ~6 MiB
  on linkedge). Caddy's ACME client
  issues at most ~1 certificate per second, so N=150 takes ~2.5 min on Caddy; the whole
  run with the defaults stays under ~6 min.

The burst comes from one source (127.0.0.1), so linkedge's per-source caps, which
are there to stop one client from holding a worker's connections, would refuse most of
it: the measured linkedge has `listen.max_connections_per_source`,
`tls.max_pending_per_source` and `backend.max_per_source` raised above the burst (its
own process, a bench_peers variant; the defaults stay as they are). Descriptor limits:
h2load and the servers get the hard RLIMIT_NOFILE as their soft limit.

`--variants` adds more linkedge processes with the same caps, e.g.
`src=/tmp/main-tree` (a `git archive` of another commit) for a before/after in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_edge as be  # noqa: E402
import bench_peers as bp  # noqa: E402

PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
SAMPLE_SECONDS = 0.02
# The per-source caps raised above the burst (see above); bench_edge's shortened timeouts
# (hello 2 s, backend 5 s) back to their defaults; a backend connect timeout of 30 s:
# aiohttp counts the wait for one of the pool's 256 connections against it, so 2,000
# requests queued on a loaded 2-core machine got 502s after 5 s; and health checks of a
# loop this busy may take longer than 2 s (then the only backend was marked down).
BURST_CAPS = (
    "listen.max_connections_per_source={n}+tls.max_pending_per_source={n}"
    "+backend.max_per_source={n}+tls.hello_timeout=10"
    "+backend.timeout=30+backend.connect_timeout=30+backend.health_timeout=30"
)


# ----------------------------------------------------------------------------------
# memory of a process tree


def _statm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * PAGE_KIB


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _reset_hwm(pids: list[int]) -> None:
    for pid in pids:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")


class TreeSampler:
    """Samples a process tree's summed RSS and open descriptors until stopped."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak_kib = 0
        self.peak_fds = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            rss = fds = 0
            for pid in self.pids:
                with contextlib.suppress(OSError):
                    rss += _statm_rss_kib(pid)
                    fds += len(os.listdir(f"/proc/{pid}/fd"))
            self.peak_kib = max(self.peak_kib, rss)
            self.peak_fds = max(self.peak_fds, fds)
            self.samples += 1
            if self._stop.wait(SAMPLE_SECONDS):
                return


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ----------------------------------------------------------------------------------


class BurstBench(bp.PeerBench):
    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.burst_servers: list[str] = []  # what is measured (the capped linkedge, peers)
        self.labels: dict[str, str] = {}
        self.metrics_ports: dict[str, int] = {}
        self.burst_log: list[str] = []  # profiles written

    def start_capped(self, spec: str, ip: str) -> str:
        caps = BURST_CAPS.format(n=self.args.clients_burst * 2)
        metrics = be.free_port("127.0.0.1")  # its counters say why a burst was not served
        full = "+".join(p for p in (caps, f"metrics.listen=127.0.0.1:{metrics}", spec) if p)
        self.start_variant(full, ip)
        name = self.servers[-1]
        self.metrics_ports[name] = metrics
        label = "linkedge" if not spec else f"linkedge[{spec}]"
        self.labels[name] = label
        self.burst_servers.append(name)
        return name

    def label(self, name: str) -> str:
        return self.labels.get(name, name)

    def _popen(self, name: str, cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        if name == "nginx":  # its default accept queue (511) overflows under the burst
            conf = Path(cmd[-1])
            text = re.sub(r"(listen [0-9.:]+)( ssl)?;", r"\1\2 backlog=4096;", conf.read_text())
            conf.write_text(text)
        return super()._popen(name, cmd, **kw)

    # -- burst -------------------------------------------------------------------------

    def burst(self, server: str) -> dict[str, Any]:
        a = self.args
        h2load = shutil.which("h2load")
        assert h2load is not None
        ip, port, host = self.ips[server], self.ports[server], self.hosts[server]
        total = a.clients_burst * a.requests
        cmd = [
            h2load,
            "--h1",
            "-c",
            str(a.clients_burst),
            "-n",
            str(total),
            "-t",
            "1",
            "--connect-to",
            f"{ip}:{port}",
            f"https://{host}:{port}{be.CLICK_PATH}",
        ]
        pids = bp.tree_pids(self.pids[server])
        _reset_hwm(pids)
        before = sum(_statm_rss_kib(p) for p in pids)
        spy = self._profiler(server)
        cpu0 = self.server_cpu(server).total
        t0 = time.perf_counter()
        with TreeSampler(pids) as sampler:
            proc = subprocess.run(  # noqa: S603 (our own arguments)
                cmd, capture_output=True, text=True, timeout=300, preexec_fn=_raise_nofile
            )
        wall = time.perf_counter() - t0
        cpu = self.server_cpu(server).total - cpu0
        if spy is not None:
            spy.send_signal(2)  # py-spy writes its profile on SIGINT
            spy.wait(60)
        right_after = sum(_statm_rss_kib(p) for p in pids)
        hwm = sum(_status_kib(p, "VmHWM") for p in pids)
        out = proc.stdout
        counts = bp.h2load_counts(out)
        time.sleep(a.settle)
        settled = sum(_statm_rss_kib(p) for p in pids)
        tls = re.search(r"TLS Protocol: (\S+)", out)
        res = {
            "server": self.label(server),
            "before_kib": before,
            "peak_kib": sampler.peak_kib,
            "hwm_kib": hwm,
            "peak_fds": sampler.peak_fds,
            "after_kib": right_after,
            "settled_kib": settled,
            "wall_s": wall,
            "cpu_s": cpu,
            "samples": sampler.samples,
            "tls": tls.group(1) if tls else "",
            "h2load": out[out.find("finished in") :].strip(),
            **counts,
        }
        if server in self.metrics_ports:
            res["edge_counters"] = _edge_counters(self.metrics_ports[server])
        ok = counts.get("3xx", -1) == total and counts.get("succeeded", -1) == total
        if proc.returncode != 0 or not ok or res["tls"] != "TLSv1.3":
            print(out[-3000:], proc.stderr[-2000:], file=sys.stderr)
            if a.keep_going:
                return res
            raise RuntimeError(
                f"{server}: burst not fully served: {counts} tls={res['tls']} "
                f"edge counters: {res.get('edge_counters')}"
            )
        return res

    def _profiler(self, server: str) -> subprocess.Popen[bytes] | None:
        """py-spy on a linkedge process for the burst (--profile DIR), folded stacks."""
        spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
        if self.args.profile is None or spy is None or not server.startswith("linkedge"):
            return None
        self.args.profile.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.label(server))
        out = self.args.profile / f"burst-{name}-{len(self.burst_log)}.folded"
        self.burst_log.append(str(out))
        cmd = [spy, "record", "--pid", str(self.pids[server]), "--rate", "200"]
        proc = subprocess.Popen(  # noqa: S603
            [*cmd, "--nonblocking", "--format", "raw", "--output", str(out)]
        )
        time.sleep(1)
        return proc

    # -- per certificate --------------------------------------------------------------

    def per_cert(self, server: str, n: int, warmup: int = 0) -> dict[str, Any]:
        """N new hosts each clicked once, after `warmup` others; RSS growth per host."""
        if warmup:
            self._first_clicks(server, warmup, "w")
            time.sleep(self.args.settle)
        pids = bp.tree_pids(self.pids[server])
        time.sleep(1)
        before = sum(_statm_rss_kib(p) for p in pids)
        took = self._first_clicks(server, n, "c")
        time.sleep(self.args.settle)
        after = sum(_statm_rss_kib(p) for p in pids)
        return {
            "server": self.label(server),
            "n": n,
            "warmup": warmup,
            "before_kib": before,
            "after_kib": after,
            "kb_per_cert": (after - before) * 1.024 / n,  # kB (1000 bytes), as the issue
            "seconds": took,
        }

    def _first_clicks(self, server: str, n: int, prefix: str) -> float:
        """N new hosts, each clicked once (an order each); seconds they took."""
        import asyncio
        from concurrent.futures import ThreadPoolExecutor

        tag = re.sub(r"[^a-z0-9]+", "", self.label(server).lower())[:12] or "x"
        hosts = [f"links.{prefix}{i:04d}-{tag}.test" for i in range(n)]
        if server == "caddy":
            for host in hosts:
                self.dns.set_a(host, [bp.CADDY_IP])
        else:
            asyncio.run(self._register(hosts))
        ctx = be.client_context(str(self.pebble.root_path))
        ip, port = self.ips[server], self.ports[server]

        def click(host: str) -> int:
            for _ in range(3):  # Caddy sometimes aborts a handshake waiting for its order
                with contextlib.suppress(OSError, ValueError):
                    return int(be.one_click(ctx, ip, port, host, be.FIRST_CLICK_TIMEOUT)["status"])
                time.sleep(1)
            return 0

        t0 = time.perf_counter()
        with ThreadPoolExecutor(self.args.cert_concurrency) as pool:
            statuses = list(pool.map(click, hosts))
        took = time.perf_counter() - t0
        bad = [(h, s) for h, s in zip(hosts, statuses, strict=True) if s != 302]
        if bad:
            raise RuntimeError(
                f"{server}: {len(bad)} of {n} first clicks failed (host, status; 0: no "
                f"answer in 3 tries): {bad[:5]}"
            )
        return took


def _edge_counters(port: int) -> dict[str, float]:
    """linkedge's connection counters (cumulative over the run) from its /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    wanted = ("linkedge_tls_handshakes", "linkedge_listener_", "linkedge_backend_requests")
    return {
        name: float(value)
        for name, _, value in (line.rpartition(" ") for line in text.splitlines())
        if name.startswith(wanted) and float(value)
    }


def _mib(kib: float) -> str:
    return f"{kib / 1024:.0f}"


def print_report(results: dict[str, Any], args: argparse.Namespace) -> None:
    bursts: list[dict[str, Any]] = results["bursts"]
    print(
        f"\nburst: h2load --h1 -c {args.clients_burst} -n {args.clients_burst * args.requests}"
        f" (TLS 1.3, {args.requests} requests per connection), RSS of the process tree in MiB"
    )
    print(
        f"| round | server | before | peak (20 ms samples) | VmHWM | peak fds | right after "
        f"| +{args.settle:.0f} s | peak / nginx | 3xx |"
    )
    print("|---" * 10 + "|")
    for r in bursts:
        nginx = next(
            (x for x in bursts if x["server"] == "nginx" and x["round"] == r["round"]), None
        )
        ratio = f"{r['peak_kib'] / nginx['peak_kib']:.2f}" if nginx else "-"
        print(
            f"| {r['round']} | {r['server']} | {_mib(r['before_kib'])} | {_mib(r['peak_kib'])} "
            f"| {_mib(r['hwm_kib'])} | {r['peak_fds']} | {_mib(r['after_kib'])} "
            f"| {_mib(r['settled_kib'])} | {ratio} | {r['3xx']} |"
        )
    certs: list[dict[str, Any]] = results.get("certs", [])
    if certs:
        caddy = next((c for c in certs if c["server"] == "caddy"), None)
        print(f"\nRSS per cached certificate (N new hosts, one click each, +{args.settle:.0f} s)")
        print("| server | N | before MiB | after MiB | kB per cert | / Caddy | clicks took s |")
        print("|---" * 7 + "|")
        for c in certs:
            ratio = f"{c['kb_per_cert'] / caddy['kb_per_cert']:.2f}" if caddy else "-"
            print(
                f"| {c['server']} | {c['n']} | {_mib(c['before_kib'])} | {_mib(c['after_kib'])} "
                f"| {c['kb_per_cert']:.1f} | {ratio} | {c['seconds']:.0f} |"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-c", dest="clients_burst", type=int, default=2000, help="clients (2000)")
    p.add_argument("-r", dest="requests", type=int, default=3, help="requests per client (3)")
    p.add_argument("--rounds", type=int, default=2, help="bursts per server (2)")
    p.add_argument("--settle", type=float, default=12.0, help="seconds after, then RSS (12)")
    p.add_argument("--certs", type=int, default=150, help="hosts for RSS per certificate")
    p.add_argument(
        "--certs-warmup", type=int, default=0, help="new hosts clicked first, not counted"
    )
    p.add_argument("--cert-concurrency", type=int, default=8)
    p.add_argument("--peers", default="nginx,caddy")
    p.add_argument("--variants", default="", help="more linkedge processes, e.g. src=DIR")
    p.add_argument("--json", type=Path)
    p.add_argument("--profile", type=Path, metavar="DIR", help="py-spy linkedge's bursts")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    p.add_argument("--keep-going", action="store_true", help="report a burst with failures")
    args = p.parse_args(argv)
    # what PeerBench/Bench read
    args.hosts = 1
    args.clients = 0
    return args


def main(argv: list[str] | None = None) -> int:
    import signal

    args = parse_args(argv)
    if shutil.which("h2load") is None:
        print("h2load not installed (deploy/bootstrap.sh --bench)", file=sys.stderr)
        return 2
    _raise_nofile()  # inherited by the servers started from here
    signal.signal(signal.SIGTERM, be._raise_on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    results: dict[str, Any] = {"params": {k: str(v) for k, v in vars(args).items()}}
    try:
        with contextlib.ExitStack() as stack:
            workdir = stack.enter_context(be._workdir(args.keep))
            bench = BurstBench(args, workdir, stack)
            bench.results = results
            print("starting DNS, Pebble, backend, linkedge ...", flush=True)
            bench.setup_linkedge()  # default caps: only its certificate and store are used
            ips = iter(bp.VARIANT_IPS)
            bench.start_capped("", next(ips))
            for spec in (v for v in args.variants.split(",") if v):
                bench.start_capped(spec, next(ips))
            peers = [p for p in args.peers.split(",") if p]
            if "nginx" in peers:
                bench.start_nginx()
                bench.burst_servers.append("nginx")
            if "caddy" in peers:
                bench.start_caddy()
                bench.burst_servers.append("caddy")
            ctx = be.client_context(str(bench.pebble.root_path))
            for server in bench.burst_servers:  # warm: the first click's context is cached
                ip, port, host = bench.ips[server], bench.ports[server], bench.hosts[server]
                for _ in range(5):
                    be.one_click(ctx, ip, port, host, be.FIRST_CLICK_TIMEOUT)
            results["certs"] = []
            if args.certs:
                for server in bench.burst_servers:
                    if server == "nginx":
                        continue  # static certificate only
                    res = bench.per_cert(server, args.certs, args.certs_warmup)
                    print(f"  per cert {res}", flush=True)
                    results["certs"].append(res)
            results["bursts"] = []
            for r in range(args.rounds):
                n = len(bench.burst_servers)
                order = bench.burst_servers[r % n :] + bench.burst_servers[: r % n]
                for server in order:
                    res = bench.burst(server)
                    res["round"] = r
                    print(
                        f"  round {r} {res['server']:24s} peak {_mib(res['peak_kib'])} MiB "
                        f"hwm {_mib(res['hwm_kib'])} fds {res['peak_fds']} after "
                        f"{_mib(res['after_kib'])} settled {_mib(res['settled_kib'])} "
                        f"({res['wall_s']:.1f} s, CPU {res['cpu_s']:.1f} s, {res['3xx']} 3xx)",
                        flush=True,
                    )
                    results["bursts"].append(res)
    except KeyboardInterrupt:
        print("interrupted; stopped all processes", file=sys.stderr)
        return 130
    print_report(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
