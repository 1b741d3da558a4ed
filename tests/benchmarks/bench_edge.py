"""Benchmark linkedge: first-click latency and cached-host TLS cost vs plain aiohttp.

Run:  /work/venv/bin/python tests/benchmarks/bench_edge.py [--quick] [--json out.json]

Everything runs on loopback, in one run, so that numbers are compared as ratios
(the machine is small and noisy; absolute timings are not goals):

* the real stack: DNSServer, Pebble, the sample backend (own process) and the
  edge (own process, `proxy.app.wiring.run_worker`), so the edge's CPU time can be
  read from /proc/<pid>/stat;
* first click: N new hosts, registered and CNAME'd, one HTTPS GET each,
  sequentially; time from TCP connect to the 302 (ACME order included);
* cached host, new connections: K client processes each doing full TLS
  handshakes (no session resumption, checked) + one GET /c/<id> + close;
  server CPU per connection;
* cached host, keep-alive: one connection per client, many GETs; server CPU
  per request;
* baselines with the same clients, the same Pebble-issued ECDSA P-256
  certificate and the same TLS settings (proxy.tls.contexts.build_server_context):
  - `aiohttp-fwd`: a plain aiohttp TLS site (web.TCPSite with ssl_context) serving
    linkedge's own HTTP app and Forwarder, proxying to the same backend. The only
    difference from linkedge is the TLS listener (ClientHello peek, context
    selection, connect_accepted_socket) vs asyncio's create_server(ssl=...).
  - `aiohttp-302`: a plain aiohttp TLS site answering the 302 itself (the sample
    backend app served over TLS, no proxying): a lower bound.

Rounds alternate the servers; the summary takes the median over rounds.
`--profile DIR` samples the edge (and the aiohttp-fwd baseline) with py-spy under
the new-connection load and prints where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

MP = multiprocessing.get_context("spawn")
CLK_TCK = os.sysconf("SC_CLK_TCK")
EDGE_IP = "127.0.0.201"
BASELINE_IPS = {"aiohttp-fwd": "127.0.0.202", "aiohttp-302": "127.0.0.203"}
SERVERS = ["linkedge", "aiohttp-fwd", "aiohttp-302"]
PROFILE_TARGETS = [("linkedge", "conns"), ("aiohttp-fwd", "conns"), ("linkedge", "keepalive")]
CLICK_PATH = "/c/bench42?src=mail"
START_TIMEOUT = 60.0
IO_TIMEOUT = 10.0  # per socket operation in the load clients
FIRST_CLICK_TIMEOUT = 60.0
MAX_COUNT = 200_000  # per client per phase: the loops are bounded by count as well as time
REFERENCE_FIGURES = {
    "source": "REFERENCE.md section 7 (same machine kind, not measured in this run)",
    "caddy_first_click_s": 0.52,
    "caddy_cpu_us_per_conn": 699,
    "nginx_cpu_us_per_conn": 472,
    "caddy_keepalive_cpu_us_per_req": 89,
    "nginx_keepalive_cpu_us_per_req": 24,
}


# ----------------------------------------------------------------------------------
# small helpers


@contextlib.contextmanager
def allocator_env(allocator: str | None) -> Iterator[None]:
    """PYTHONMALLOC for the processes spawned inside (a spawned child reads the inherited
    environment at its start); None leaves it as it is."""
    saved = os.environ.get("PYTHONMALLOC")
    if allocator is not None:
        os.environ["PYTHONMALLOC"] = allocator
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PYTHONMALLOC", None)
        else:
            os.environ["PYTHONMALLOC"] = saved


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class CpuSample:
    utime: float
    stime: float

    @property
    def total(self) -> float:
        return self.utime + self.stime


def cpu_of(pid: int) -> CpuSample:
    """utime and stime (seconds, all threads) of a live process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        text = fh.read()
    fields = text[text.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
    return CpuSample(int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def find_py_spy() -> str | None:
    """py-spy from this venv (bootstrap --bench installs it there), else from PATH."""
    return shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "min": min(values),
        "median": statistics.median(values),
        "p95": percentile(values, 95),
        "max": max(values),
    }


def _watch_parent(lifeline: multiprocessing.connection.Connection) -> None:
    """In a child: SIGTERM ourselves when the parent goes away (its pipe end closes)."""

    def wait() -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                lifeline.recv()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, name="lifeline", daemon=True).start()


async def _serve_until_sigterm(cleanup: Callable[[], Any]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)  # SIGINT stays ignored: parent decides
    try:
        await stop.wait()
    finally:
        await cleanup()


# ----------------------------------------------------------------------------------
# child processes: backend, edge, baselines


def backend_main(
    ready: multiprocessing.connection.Connection, lifeline: multiprocessing.connection.Connection
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us with SIGTERM
    _watch_parent(lifeline)
    from proxy.demo.backend import start_backend

    async def main() -> None:
        runner, url = await start_backend("127.0.0.1", 0)
        ready.send(url)
        await _serve_until_sigterm(runner.cleanup)

    asyncio.run(main())


def edge_main(
    config: Any,
    log_path: str,
    ready: multiprocessing.connection.Connection,
    lifeline: multiprocessing.connection.Connection,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch_parent(lifeline)
    import logging

    from proxy.app.supervisor import run_on_loop
    from proxy.app.wiring import run_worker

    logging.basicConfig(
        filename=log_path,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    run_on_loop(config, run_worker(config, ready=lambda: ready.send("ready")))


class _NoStore:
    """make_http_app needs a store only for ACME challenges, which the bench never asks."""

    async def get_challenge(self, token: str) -> None:
        return None


def baseline_main(
    mode: str,
    ip: str,
    chain_pem: bytes,
    key_pem: bytes,
    backend_url: str,
    ready: multiprocessing.connection.Connection,
    lifeline: multiprocessing.connection.Connection,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch_parent(lifeline)
    from aiohttp import web

    from proxy.demo.backend import make_backend_app
    from proxy.http.app import make_http_app
    from proxy.http.backends import BackendPool
    from proxy.http.forward import Forwarder
    from proxy.tls.contexts import build_server_context

    async def main() -> None:
        ctx = build_server_context(chain_pem, key_pem)  # same TLS settings as linkedge
        closers: list[Callable[[], Any]] = []
        if mode == "aiohttp-fwd":
            # same parameters as the edge's Forwarder in this benchmark
            # (with health checks, as the edge has them)
            backends = BackendPool([backend_url])
            await backends.start()
            closers.append(backends.close)
            forwarder = Forwarder(backends, connect_timeout=5.0, timeout=5.0, pool_size=256)
            await forwarder.start()
            closers.append(forwarder.close)
            app = make_http_app(_NoStore(), forwarder)  # type: ignore[arg-type]
        else:
            app = make_backend_app(recorded=None)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        closers.append(runner.cleanup)
        site = web.TCPSite(runner, ip, 0, ssl_context=ctx, backlog=1024)
        await site.start()
        ready.send(int(runner.addresses[0][1]))

        async def cleanup() -> None:
            for closer in reversed(closers):
                await closer()

        await _serve_until_sigterm(cleanup)

    asyncio.run(main())


# ----------------------------------------------------------------------------------
# HTTP/1.1 over TLS, minimal and cheap on the client side


def client_context(cafile: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)  # verifies chain and host name
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def request_bytes(host: str, port: int) -> bytes:
    return (
        f"GET {CLICK_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "User-Agent: linkedge-bench/1\r\nAccept: */*\r\n\r\n"
    ).encode()


def read_response(sock: socket.socket) -> int:
    """Read one response (Content-Length or chunked body); return its status."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the response headers")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    match = re.search(rb"\r\ncontent-length:\s*(\d+)", lower)
    if match:
        length = int(match.group(1))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed inside the body")
            body += chunk
    elif b"\r\ntransfer-encoding: chunked" in lower:
        while not body.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed inside a chunked body")
            body += chunk
    return status


def connect(ip: str, port: int, timeout: float) -> socket.socket:
    """A client TCP connection with Nagle off, as browsers and curl have it. With Nagle on,
    a request written right after the handshake waits for the server to acknowledge the
    client's Finished: a server that sends nothing then (no session tickets: Caddy to this
    client, linkedge with `tls.session_tickets=0`) delays that ACK ~40 ms, and the run
    measured the delay."""
    raw = socket.create_connection((ip, port), timeout=timeout)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return raw


def one_click(
    ctx: ssl.SSLContext, ip: str, port: int, host: str, timeout: float
) -> dict[str, float | int]:
    """One new connection + GET; seconds from TCP connect to handshake and to response."""
    t0 = time.perf_counter()
    with connect(ip, port, timeout) as raw:
        t_connect = time.perf_counter()
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            t_handshake = time.perf_counter()
            tls.sendall(request_bytes(host, port))
            status = read_response(tls)
            t_done = time.perf_counter()
    return {
        "status": status,
        "connect_s": t_connect - t0,
        "handshake_s": t_handshake - t0,
        "total_s": t_done - t0,
    }


def run_new_connections(
    ctx: ssl.SSLContext, ip: str, port: int, host: str, duration: float, max_count: int
) -> dict[str, Any]:
    """Full handshake + one GET + close, repeatedly, until duration or max_count."""
    req = request_bytes(host, port)
    ok = reused = 0
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    tls_version = ""
    cpu0 = time.process_time()
    start = time.perf_counter()
    deadline = start + duration
    while ok + sum(errors.values()) < max_count:
        t0 = time.perf_counter()
        if t0 >= deadline:
            break
        try:
            with connect(ip, port, IO_TIMEOUT) as raw:
                with ctx.wrap_socket(raw, server_hostname=host) as tls:
                    if tls.session_reused:
                        reused += 1
                    tls_version = tls.version() or ""
                    tls.sendall(req)
                    status = read_response(tls)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            errors[type(exc).__name__] += 1
            continue
        if status != 302:
            errors[f"HTTP {status}"] += 1
            continue
        ok += 1
        latencies.append(time.perf_counter() - t0)
    return {
        "ok": ok,
        "errors": dict(errors),
        "reused": reused,
        "elapsed_s": time.perf_counter() - start,
        "client_cpu_s": time.process_time() - cpu0,
        "latencies": latencies,
        "tls_version": tls_version,
    }


def run_keepalive(
    ctx: ssl.SSLContext | None, ip: str, port: int, host: str, duration: float, max_count: int
) -> dict[str, Any]:
    """One connection, sequential GETs until duration or max_count (reconnect if closed);
    plain HTTP when `ctx` is None."""
    req = request_bytes(host, port)
    ok = connections = 0
    errors: Counter[str] = Counter()
    cpu0 = time.process_time()
    start = time.perf_counter()
    deadline = start + duration
    tls: socket.socket | None = None
    try:
        while ok + sum(errors.values()) < max_count and time.perf_counter() < deadline:
            try:
                if tls is None:
                    raw = connect(ip, port, IO_TIMEOUT)
                    tls = raw if ctx is None else ctx.wrap_socket(raw, server_hostname=host)
                    connections += 1
                tls.sendall(req)
                status = read_response(tls)
            except (OSError, ValueError) as exc:
                errors[type(exc).__name__] += 1
                if tls is not None:
                    tls.close()
                tls = None
                continue
            if status == 302:
                ok += 1
            else:
                errors[f"HTTP {status}"] += 1
    finally:
        if tls is not None:
            tls.close()
    return {
        "ok": ok,
        "errors": dict(errors),
        "connections": connections,
        "elapsed_s": time.perf_counter() - start,
        "client_cpu_s": time.process_time() - cpu0,
    }


def client_main(cafile: str, conn: multiprocessing.connection.Connection) -> None:
    """A load client: runs commands from the parent until None or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctx = client_context(cafile)
    runners = {
        "conns": run_new_connections,
        "keepalive": run_keepalive,
        "plain": lambda _ctx, **kw: run_keepalive(None, **kw),  # keep-alive over plain HTTP
    }
    conn.send("ready")
    while True:
        try:
            cmd = conn.recv()
        except EOFError:
            return
        if cmd is None:
            return
        kind, kwargs = cmd
        try:
            result = runners[kind](ctx, **kwargs)
        except Exception as exc:  # report, do not die silently
            result = {"fatal": repr(exc)}
        try:
            conn.send(result)
        except OSError:
            return


# ----------------------------------------------------------------------------------
# the orchestrator


class Children:
    """Child processes, always stopped (SIGTERM, then SIGKILL) when the bench ends."""

    def __init__(self) -> None:
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._lifelines: list[multiprocessing.connection.Connection] = []

    def start_server(
        self, name: str, target: Callable[..., None], *args: Any
    ) -> tuple[multiprocessing.process.BaseProcess, Any]:
        ready_r, ready_w = MP.Pipe(duplex=False)
        life_r, life_w = MP.Pipe(duplex=False)
        proc = MP.Process(target=target, args=(*args, ready_w, life_r), name=name, daemon=True)
        proc.start()
        ready_w.close()
        life_r.close()
        self._procs.append(proc)
        self._lifelines.append(life_w)
        deadline = time.monotonic() + START_TIMEOUT
        while not ready_r.poll(0.1):
            if not proc.is_alive():
                raise RuntimeError(f"{name} exited with code {proc.exitcode} before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready within {START_TIMEOUT:.0f}s")
        value = ready_r.recv()
        ready_r.close()
        return proc, value

    def start_client(
        self, index: int, cafile: str
    ) -> tuple[multiprocessing.process.BaseProcess, multiprocessing.connection.Connection]:
        parent, child = MP.Pipe()
        proc = MP.Process(
            target=client_main, args=(cafile, child), name=f"bench-client-{index}", daemon=True
        )
        proc.start()
        child.close()
        self._procs.append(proc)
        if not parent.poll(START_TIMEOUT) or parent.recv() != "ready":
            raise RuntimeError(f"load client {index} did not start")
        return proc, parent

    def stop(self, proc: multiprocessing.process.BaseProcess) -> None:
        if proc.is_alive():
            proc.terminate()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)

    def stop_all(self) -> None:
        for proc in reversed(self._procs):
            with contextlib.suppress(Exception):
                self.stop(proc)
        for life in self._lifelines:
            life.close()
        self._procs.clear()
        self._lifelines.clear()


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack):
        self.args = args
        self.workdir = workdir
        self.stack = stack
        self.children = Children()
        stack.callback(self.children.stop_all)
        self.clients: list[multiprocessing.connection.Connection] = []
        self.client_pids: list[int] = []
        self.procs: dict[str, multiprocessing.process.BaseProcess] = {}
        self.pids: dict[str, int] = {}
        self.ports: dict[str, int] = {}
        self.ips: dict[str, str] = {"linkedge": EDGE_IP, **BASELINE_IPS}
        self.results: dict[str, Any] = {}

    # -- setup -------------------------------------------------------------------

    def adjust_config(self, config: Any) -> None:
        """A subclass's edits of the measured edge's Config (variants copy it)."""

    def start_stack(self) -> None:
        from certstore import generate_key_text
        from proxy.app.config import Config
        from proxy.demo.dnsserver import DNSServer
        from proxy.demo.pebble import PebbleServer

        self.dns = DNSServer()
        self.dns.start()
        self.stack.callback(self.dns.stop)
        self.pebble = PebbleServer(
            self.workdir / "pebble",
            self.dns.nameserver,
            http_port=free_port(),
            tls_port=free_port(),
        )
        self.pebble.start()
        self.stack.callback(self.pebble.stop)

        backend_proc, self.backend_url = self.children.start_server("bench-backend", backend_main)
        self.pids["backend"] = int(backend_proc.pid or 0)
        self.procs["backend"] = backend_proc

        self.key_text = generate_key_text()
        key_file = self.workdir / "store.key"
        key_file.write_text(self.key_text)
        key_file.chmod(0o600)
        self.target = "edge-bench.linkedge.test"
        self.dns.set_a(self.target, [EDGE_IP])
        config = Config()
        config.listen.https = f"{EDGE_IP}:{free_port(EDGE_IP)}"
        config.listen.http = f"{EDGE_IP}:{self.pebble.http_port}"
        config.backend.url = self.backend_url
        config.backend.timeout = 5
        config.edge.cname_target = self.target
        config.acme.directory = self.pebble.directory_url
        config.acme.ca_bundle = str(self.pebble.ca_bundle)
        config.acme.order_timeout = 30
        config.store.path = str(self.workdir / "store.db")
        config.store.key_file = str(key_file)
        config.store.key_env = ""
        config.dns.nameservers = [self.dns.nameserver]
        config.dns.timeout = 2
        config.tls.issuance_wait = 30
        config.tls.hello_timeout = 2
        config.admin.listen = ""  # no admin API in the benchmark
        self.adjust_config(config)
        self.config = config
        self.edge_log = self.workdir / "edge.log"
        try:
            edge_proc, _ = self.children.start_server(
                "bench-edge", edge_main, config, str(self.edge_log)
            )
        except RuntimeError:
            print(self.edge_log_tail(), file=sys.stderr)
            raise
        self.pids["linkedge"] = int(edge_proc.pid or 0)
        self.procs["linkedge"] = edge_proc
        self.ports["linkedge"] = int(config.listen.https.rsplit(":", 1)[1])

        for i in range(self.args.clients):
            proc, conn = self.children.start_client(i, str(self.pebble.root_path))
            self.clients.append(conn)
            self.client_pids.append(int(proc.pid or 0))

    def pin(self) -> dict[str, list[int]]:
        """Servers on CPU 0, backend and load clients on the others.

        On a small box the load clients would otherwise preempt the server under
        test; pinning keeps its CPU accounting and its profile clean (a sampling
        profiler counts runnable-but-waiting time as busy).
        """
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return {}
        server_cpus, other_cpus = {cpus[0]}, set(cpus[1:])
        for name in SERVERS:
            os.sched_setaffinity(self.pids[name], server_cpus)
        for pid in [self.pids["backend"], *self.client_pids]:
            os.sched_setaffinity(pid, other_cpus)
        return {"servers": sorted(server_cpus), "backend_and_clients": sorted(other_cpus)}

    def start_baselines(self, host: str) -> None:
        from certstore.crypto import parse_key_text

        stored = asyncio.run(self._get_certificate(host, parse_key_text(self.key_text, "bench")))
        for name, ip in BASELINE_IPS.items():
            proc, port = self.children.start_server(
                f"bench-{name}",
                baseline_main,
                name,
                ip,
                stored.chain_pem,
                stored.key_pem,
                self.backend_url,
            )
            self.pids[name] = int(proc.pid or 0)
            self.procs[name] = proc
            self.ports[name] = int(port)

    async def _get_certificate(self, host: str, key: bytes) -> Any:
        from certstore import open_store

        store = await open_store(self.config.store.path, key)
        try:
            cert = await store.get_certificate(host)
        finally:
            await store.close()
        if cert is None:
            raise RuntimeError(f"no certificate for {host} in the store")
        return cert

    def edge_log_tail(self, lines: int = 30) -> str:
        try:
            text = self.edge_log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no edge log)"
        return f"--- {self.edge_log} (tail) ---\n" + "\n".join(text.splitlines()[-lines:])

    # -- first click -------------------------------------------------------------

    async def _register(self, hosts: list[str]) -> None:
        from certstore import open_store
        from certstore.crypto import parse_key_text

        store = await open_store(self.config.store.path, parse_key_text(self.key_text, "bench"))
        try:
            for host in hosts:
                await store.add_domain(host, "acct-bench")
                self.dns.set_cname(host, self.target)
        finally:
            await store.close()

    async def _issuance_times(self, hosts: list[str]) -> dict[str, Any]:
        from certstore import open_store
        from certstore.crypto import parse_key_text

        store = await open_store(self.config.store.path, parse_key_text(self.key_text, "bench"))
        took: list[float] = []
        orders = 0
        try:
            for host in hosts:
                for event in await store.list_events(host):
                    if event.kind == "order_started":
                        orders += 1
                    match = re.search(r"took (\d+) ms", event.detail or "")
                    if event.kind == "issued" and match:
                        took.append(int(match.group(1)) / 1000)
        finally:
            await store.close()
        return {"orders_started": orders, "acme_issue_s": latency_stats(took)}

    def first_click(self) -> list[str]:
        n = self.args.hosts
        hosts = [f"links.shop{i:03d}-bench.test" for i in range(n)]
        asyncio.run(self._register(hosts))
        ctx = client_context(str(self.pebble.root_path))
        port, pid = self.ports["linkedge"], self.pids["linkedge"]
        rss0 = rss_kib(pid)
        cpu0 = cpu_of(pid)
        first: list[dict[str, Any]] = []
        for host in hosts:
            try:
                res = one_click(ctx, EDGE_IP, port, host, FIRST_CLICK_TIMEOUT)
            except (OSError, ValueError) as exc:
                print(self.edge_log_tail(), file=sys.stderr)
                raise RuntimeError(f"first click on {host} failed: {exc!r}") from exc
            if res["status"] != 302:
                raise RuntimeError(f"first click on {host}: HTTP {res['status']}, expected 302")
            first.append({"host": host, **res})
        cpu1 = cpu_of(pid)
        rss1 = rss_kib(pid)
        warm = [one_click(ctx, EDGE_IP, port, h, IO_TIMEOUT) for h in hosts]
        issuance = asyncio.run(self._issuance_times(hosts))
        self.results["first_click"] = {
            "hosts": n,
            "total_s": latency_stats([float(r["total_s"]) for r in first]),
            "handshake_s": latency_stats([float(r["handshake_s"]) for r in first]),
            "first_host_total_s": float(first[0]["total_s"]),
            "edge_cpu_ms_per_first_click": (cpu1.total - cpu0.total) * 1000 / n,
            "edge_rss_kib_growth_per_host": (rss1 - rss0) / n,
            "second_click_new_connection_s": latency_stats([float(r["total_s"]) for r in warm]),
            **issuance,
            "per_host": first,
        }
        return hosts

    # -- load phases -------------------------------------------------------------

    def _load(
        self, server: str, kind: str, host: str, duration: float, clients: int | None = None
    ) -> dict[str, Any]:
        """Run one load phase on `server`; server CPU is sampled around it."""
        pid, port, ip = self.pids[server], self.ports[server], self.ips[server]
        conns = self.clients[: clients or len(self.clients)]
        kwargs = {
            "ip": ip,
            "port": port,
            "host": host,
            "duration": duration,
            "max_count": MAX_COUNT,
        }
        backend0 = cpu_of(self.pids["backend"])
        cpu0 = cpu_of(pid)
        t0 = time.perf_counter()
        for conn in conns:
            conn.send((kind, kwargs))
        results = []
        for conn in conns:
            if not conn.poll(duration + 2 * IO_TIMEOUT + 5):
                raise RuntimeError(f"load client did not finish ({server}, {kind})")
            results.append(conn.recv())
        wall = time.perf_counter() - t0
        cpu1 = cpu_of(pid)
        backend1 = cpu_of(self.pids["backend"])
        for name in (server, "backend"):
            if not self.procs[name].is_alive():
                raise RuntimeError(f"{name} exited with code {self.procs[name].exitcode}")
        fatal = [r["fatal"] for r in results if "fatal" in r]
        if fatal:
            raise RuntimeError(f"load client failed: {fatal[0]}")
        ok = sum(r["ok"] for r in results)
        errors: Counter[str] = Counter()
        for r in results:
            errors.update(r["errors"])
        elapsed = max(r["elapsed_s"] for r in results)
        per = 1e6 / ok if ok else math.nan
        out: dict[str, Any] = {
            "server": server,
            "kind": kind,
            "clients": len(conns),
            "ok": ok,
            "errors": dict(errors),
            "wall_s": wall,
            "rate_per_s": ok / elapsed if elapsed else math.nan,
            "server_cpu_s": cpu1.total - cpu0.total,
            "server_utime_s": cpu1.utime - cpu0.utime,
            "server_stime_s": cpu1.stime - cpu0.stime,
            "server_cpu_us_per_op": (cpu1.total - cpu0.total) * per,
            "server_utime_us_per_op": (cpu1.utime - cpu0.utime) * per,
            "server_stime_us_per_op": (cpu1.stime - cpu0.stime) * per,
            "server_cpu_utilization": (cpu1.total - cpu0.total) / wall,
            "backend_cpu_us_per_op": (backend1.total - backend0.total) * per,
            "client_cpu_us_per_op": sum(r["client_cpu_s"] for r in results) * per,
        }
        if kind == "conns":
            lat = [x for r in results for x in r["latencies"]]
            out["session_reused"] = sum(r["reused"] for r in results)
            out["tls_version"] = next((r["tls_version"] for r in results if r["tls_version"]), "")
            out["latency_ms"] = {
                "median": statistics.median(lat) * 1000 if lat else math.nan,
                "p99": percentile(lat, 99) * 1000,
            }
            if out["session_reused"]:
                raise RuntimeError(f"{server}: {out['session_reused']} sessions were resumed")
        else:
            out["connections"] = sum(r["connections"] for r in results)
        return out

    def idle_cpu(self, seconds: float) -> dict[str, float]:
        names = [*SERVERS, "backend"]
        before = {n: cpu_of(self.pids[n]) for n in names}
        time.sleep(seconds)
        return {
            n: (cpu_of(self.pids[n]).total - before[n].total) / seconds * 1e6 for n in names
        }  # µs of CPU per second while idle

    def load_rounds(self, host: str) -> None:
        a = self.args
        rounds: dict[str, list[dict[str, Any]]] = {"conns": [], "keepalive": []}
        for server in SERVERS:  # warm-up: pools, caches, code paths
            self._load(server, "conns", host, a.warmup)
            self._load(server, "keepalive", host, a.warmup)
        for r in range(a.rounds):
            order = SERVERS[r % len(SERVERS) :] + SERVERS[: r % len(SERVERS)]
            for kind, duration in (("conns", a.duration), ("keepalive", a.keepalive_duration)):
                for server in order:
                    res = self._load(server, kind, host, duration)
                    res["round"] = r
                    rounds[kind].append(res)
                    _progress(res)
        self.results["new_connections"] = rounds["conns"]
        self.results["keepalive"] = rounds["keepalive"]
        self.results["summary"] = summarize(rounds)

    # -- profile -----------------------------------------------------------------

    def profile(self, host: str, outdir: Path) -> None:
        spy = find_py_spy()
        if spy is None:
            print("py-spy not found; skipping --profile", file=sys.stderr)
            return
        outdir.mkdir(parents=True, exist_ok=True)
        seconds = self.args.profile_seconds
        found: dict[str, Any] = {}
        for server, kind in PROFILE_TARGETS:
            name = f"{server}-{kind}"
            folded = outdir / f"{name}.folded"
            cmd = [
                spy,
                "record",
                "--pid",
                str(self.pids[server]),
                "--duration",
                str(seconds),  # whole seconds (py-spy wants an integer)
                "--rate",
                "250",
                "--nonblocking",  # never pause the server: its timing stays honest
                "--format",
                "raw",
                "--output",
                str(folded),
            ]
            spy_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            err = b""
            try:
                time.sleep(0.5)
                load = self._load(server, kind, host, seconds + 1)
                _out, err = spy_proc.communicate(timeout=seconds + 30)
            finally:
                if spy_proc.poll() is None:
                    spy_proc.kill()
                    spy_proc.wait()
            if spy_proc.returncode != 0 or not folded.exists():
                reason = err.decode(errors="replace")
                print(f"py-spy failed for {name}: {reason}", file=sys.stderr)
                continue
            per_op = float(load["server_cpu_us_per_op"])
            found[name] = analyze_profile(folded, per_op)
            found[name]["file"] = str(folded)
            found[name]["server_cpu_us_per_op"] = per_op
            found[name]["rate_per_s"] = load["rate_per_s"]
        mine, base = found.get("linkedge-conns"), found.get("aiohttp-fwd-conns")
        if mine and base and mine.get("samples") and base.get("samples"):
            found["diff_linkedge_vs_aiohttp_fwd_conns"] = profile_diff(
                Path(mine["file"]),
                mine["server_cpu_us_per_op"],
                Path(base["file"]),
                base["server_cpu_us_per_op"],
            )
        self.results["profile"] = found


def _progress(res: dict[str, Any]) -> None:
    unit = "conn" if res["kind"] == "conns" else "req"
    print(
        f"  round {res['round']} {res['kind']:9s} {res['server']:12s} "
        f"{res['rate_per_s']:8.0f} {unit}/s  "
        f"server CPU {res['server_cpu_us_per_op']:6.0f} µs/{unit}"
        f"  errors {sum(res['errors'].values())}",
        flush=True,
    )


def summarize(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for kind, results in rounds.items():
        per_server: dict[str, Any] = {}
        for server in SERVERS:
            mine = [r for r in results if r["server"] == server]
            if not mine:
                continue
            per_server[server] = {
                key: statistics.median(r[key] for r in mine)
                for key in (
                    "rate_per_s",
                    "server_cpu_us_per_op",
                    "server_utime_us_per_op",
                    "server_stime_us_per_op",
                    "backend_cpu_us_per_op",
                    "client_cpu_us_per_op",
                    "server_cpu_utilization",
                )
            }
            per_server[server]["server_cpu_us_per_op_min"] = min(
                r["server_cpu_us_per_op"] for r in mine
            )
            per_server[server]["errors"] = sum(sum(r["errors"].values()) for r in mine)
        edge = per_server.get("linkedge", {}).get("server_cpu_us_per_op", math.nan)
        ratios = {
            f"linkedge/{base}": edge / per_server[base]["server_cpu_us_per_op"]
            for base in ("aiohttp-fwd", "aiohttp-302")
            if base in per_server
        }
        # pairwise within each round (measured seconds apart): robust to slow drift
        by_round: dict[str, list[float]] = {}
        for base in ("aiohttp-fwd", "aiohttp-302"):
            for r in {x["round"] for x in results}:
                mine = [x for x in results if x["round"] == r and x["server"] == "linkedge"]
                other = [x for x in results if x["round"] == r and x["server"] == base]
                if mine and other and other[0]["server_cpu_us_per_op"] > 0:
                    by_round.setdefault(f"linkedge/{base}", []).append(
                        mine[0]["server_cpu_us_per_op"] / other[0]["server_cpu_us_per_op"]
                    )
        summary[kind] = {
            "servers": per_server,
            "cpu_ratio": ratios,
            "cpu_ratio_per_round": by_round,
            "cpu_ratio_per_round_median": {k: statistics.median(v) for k, v in by_round.items()},
        }
    return summary


# ----------------------------------------------------------------------------------
# py-spy output analysis

_LINKEDGE_PARTS = ("proxy/", "certstore/", "acme_client/")
# py-spy's idle detection misses epoll_wait here (VM, --nonblocking): those samples
# are the event loop waiting, not work, and are left out of every percentage.
_IDLE_LEAVES = {("EpollSelector.select", "selectors.py")}
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")


def _frame_key(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), ""
    return m.group("func"), m.group("file")


def _is_linkedge(file: str) -> bool:
    return any(part in file for part in _LINKEDGE_PARTS) and "site-packages" not in file


def _category(file: str) -> str:
    if _is_linkedge(file):
        return "linkedge"
    for name in ("aiohttp", "multidict", "yarl"):
        if name in file:
            return "aiohttp"
    if file.endswith(("ssl.py", "sslproto.py")):
        return "ssl"
    if "asyncio" in file or file.endswith(("selectors.py", "socket.py")):
        return "asyncio/socket"
    return "other"


def _stacks(path: Path) -> Iterator[tuple[list[tuple[str, str]], int]]:
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = [_frame_key(f) for f in stack.split(";")]
        frames = [f for f in frames if f[1]]  # drop thread/process label frames
        if frames and frames[-1] not in _IDLE_LEAVES:
            yield frames, int(count_text)


def _self_by_function(path: Path) -> tuple[int, Counter[tuple[str, str]]]:
    total = 0
    selftime: Counter[tuple[str, str]] = Counter()
    for frames, count in _stacks(path):
        total += count
        selftime[frames[-1]] += count
    return total, selftime


def profile_diff(
    mine: Path, mine_us: float, base: Path, base_us: float, n: int = 15
) -> list[dict[str, Any]]:
    """Self time per operation (µs) by function, where linkedge spends more than the base."""
    mt, ms = _self_by_function(mine)
    bt, bs = _self_by_function(base)
    rows = []
    for key in set(ms) | set(bs):
        a = ms[key] / mt * mine_us
        b = bs[key] / bt * base_us
        rows.append({"frame": f"{key[0]} ({key[1]})", "linkedge_us": a, "base_us": b})
    rows.sort(key=lambda r: r["base_us"] - r["linkedge_us"])
    return rows[:n]


def analyze_profile(path: Path, us_per_op: float) -> dict[str, Any]:
    """Collapsed stacks -> self time by category, and linkedge frames by time.

    Percentages are of sampled on-CPU time; `us` scales them to the server CPU per
    operation measured during the same load (an approximation: py-spy samples the
    main thread's wall time while it is not idle).
    """
    total = 0
    self_by_cat: Counter[str] = Counter()
    inclusive: Counter[tuple[str, str]] = Counter()
    selftime: Counter[tuple[str, str]] = Counter()
    innermost: Counter[tuple[str, str]] = Counter()
    for frames, count in _stacks(path):
        total += count
        leaf = frames[-1]
        self_by_cat[_category(leaf[1])] += count
        selftime[leaf] += count
        for key in set(frames):
            if _is_linkedge(key[1]):
                inclusive[key] += count
        inner = next((f for f in reversed(frames) if _is_linkedge(f[1])), None)
        if inner is not None:
            innermost[inner] += count

    def top(counter: Counter[tuple[str, str]], n: int) -> list[dict[str, Any]]:
        return [
            {"frame": f"{func} ({file})", "pct": 100 * c / total, "us": c / total * us_per_op}
            for (func, file), c in counter.most_common(n)
        ]

    if not total:
        return {"samples": 0}
    return {
        "samples": total,
        "self_pct_by_category": {k: 100 * v / total for k, v in self_by_cat.most_common()},
        "linkedge_self_pct": 100 * self_by_cat["linkedge"] / total,
        "linkedge_on_stack_pct": 100 * sum(innermost.values()) / total,
        "linkedge_inclusive_top": top(inclusive, 12),
        "linkedge_innermost_top": top(innermost, 12),
        "self_top": top(selftime, 15),
    }


# ----------------------------------------------------------------------------------
# report


def print_report(results: dict[str, Any]) -> None:
    fc = results["first_click"]
    t = fc["total_s"]
    print()
    print(f"First click on a new host (n={t['n']}, sequential, TCP connect -> HTTP 302):")
    print(
        f"  min {t['min']:.3f} s   median {t['median']:.3f} s   p95 {t['p95']:.3f} s   "
        f"max {t['max']:.3f} s   (first host {fc['first_host_total_s']:.3f} s)"
    )
    acme = fc["acme_issue_s"]
    if acme.get("n"):
        print(
            f"  of which ACME issuance (edge's 'took' events): median {acme['median']:.3f} s, "
            f"max {acme['max']:.3f} s; orders started {fc['orders_started']} "
            f"for {fc['hosts']} hosts"
        )
    print(
        f"  edge CPU per first click {fc['edge_cpu_ms_per_first_click']:.1f} ms; second click on "
        f"a new connection median {fc['second_click_new_connection_s']['median'] * 1000:.2f} ms"
    )
    print(f"  reference: Caddy {REFERENCE_FIGURES['caddy_first_click_s']} s flat (REFERENCE.md §7)")
    for kind, unit, title in (
        ("new_connections", "conn", "Cached host, new TLS connection + one GET (full handshakes)"),
        ("keepalive", "req", "Cached host, keep-alive GETs"),
    ):
        key = "conns" if kind == "new_connections" else "keepalive"
        block = results["summary"][key]
        print()
        print(f"{title}, median of {results['params']['rounds']} round(s):")
        print(
            f"  {'server':12s} {unit + '/s':>8s} {'CPU µs/' + unit:>12s} {'user':>6s} "
            f"{'sys':>6s} {'min':>6s} {'backend':>8s} {'client':>7s} {'errors':>6s}"
        )
        for server, s in block["servers"].items():
            print(
                f"  {server:12s} {s['rate_per_s']:8.0f} {s['server_cpu_us_per_op']:12.0f} "
                f"{s['server_utime_us_per_op']:6.0f} {s['server_stime_us_per_op']:6.0f} "
                f"{s['server_cpu_us_per_op_min']:6.0f} {s['backend_cpu_us_per_op']:8.0f} "
                f"{s['client_cpu_us_per_op']:7.0f} {s['errors']:6d}"
            )
        ratios = "   ".join(f"{k} = {v:.2f}" for k, v in block["cpu_ratio"].items())
        print(f"  CPU ratio of medians: {ratios}")
        spread = "   ".join(
            f"{k} = {statistics.median(v):.2f} [{min(v):.2f}..{max(v):.2f}]"
            for k, v in block["cpu_ratio_per_round"].items()
        )
        print(f"  CPU ratio per round, median [min..max]: {spread}")
    ref = REFERENCE_FIGURES
    print(
        f"  reference (REFERENCE.md §7, not this run): Caddy {ref['caddy_cpu_us_per_conn']} / "
        f"nginx {ref['nginx_cpu_us_per_conn']} µs per new conn; Caddy "
        f"{ref['caddy_keepalive_cpu_us_per_req']} / nginx {ref['nginx_keepalive_cpu_us_per_req']}"
        " µs per keep-alive req"
    )
    prof = results.get("profile")
    if prof:
        for name, p in prof.items():
            if name.startswith("diff_") or not p.get("samples"):
                continue
            unit = "req" if name.endswith("keepalive") else "conn"
            print()
            cats = ", ".join(f"{k} {v:.0f}%" for k, v in p["self_pct_by_category"].items())
            print(
                f"Profile {name} ({p['samples']} samples, "
                f"{p['server_cpu_us_per_op']:.0f} µs/{unit}); self time: {cats}"
            )
            if name.startswith("linkedge"):
                print(
                    f"  samples with linkedge code on the stack: {p['linkedge_on_stack_pct']:.0f}%;"
                    " by innermost linkedge frame (callees included):"
                )
                for row in p["linkedge_innermost_top"][:8]:
                    print(f"    {row['pct']:5.1f}% {row['us']:5.0f} µs  {row['frame']}")
            print("  top self frames:")
            for row in p["self_top"][:6]:
                print(f"    {row['pct']:5.1f}% {row['us']:5.0f} µs  {row['frame']}")
        diff = prof.get("diff_linkedge_vs_aiohttp_fwd_conns")
        if diff:
            print()
            print("Self time per new connection, linkedge minus aiohttp-fwd (largest first):")
            for row in diff[:10]:
                extra = row["linkedge_us"] - row["base_us"]
                print(
                    f"  {extra:+6.0f} µs  ({row['linkedge_us']:4.0f} vs {row['base_us']:4.0f})"
                    f"  {row['frame']}"
                )


# ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="5 hosts, 1 round, short phases")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--hosts", type=int, help="new hosts for first-click latency (20; quick 5)")
    p.add_argument("--clients", type=int, default=2, help="load client processes (2)")
    p.add_argument("--rounds", type=int, help="rounds over all servers (5; quick 1)")
    p.add_argument("--duration", type=float, help="seconds per new-connection phase (5; quick 2)")
    p.add_argument(
        "--keepalive-duration", type=float, help="seconds per keep-alive phase (4; quick 1)"
    )
    p.add_argument("--warmup", type=float, help="seconds of unmeasured load per server (1; 0.5)")
    p.add_argument("--profile", type=Path, metavar="DIR", help="py-spy the servers, output here")
    p.add_argument("--profile-seconds", type=int, default=5, help="py-spy duration (5)")
    p.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin servers to CPU 0 and backend/clients to the other CPUs",
    )
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, store)")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "hosts": 5 if quick else 20,
        "rounds": 1 if quick else 5,
        "duration": 2.0 if quick else 5.0,
        "keepalive_duration": 1.0 if quick else 4.0,
        "warmup": 0.5 if quick else 1.0,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 1 <= args.hosts <= 500 or not 1 <= args.clients <= 16 or not 1 <= args.rounds <= 20:
        p.error("--hosts 1..500, --clients 1..16, --rounds 1..20")
    for key in ("duration", "keepalive_duration", "warmup", "profile_seconds"):
        if not 0 < getattr(args, key) <= 120:
            p.error(f"--{key.replace('_', '-')} must be in (0, 120] seconds")
    return args


def _raise_on_sigterm(_sig: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="linkedge-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"work dir kept: {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    import aiohttp

    results: dict[str, Any] = {
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "openssl": ssl.OPENSSL_VERSION,
            "aiohttp": aiohttp.__version__,
            "loop": "asyncio (default)",
        },
        "baselines": {
            "aiohttp-fwd": "aiohttp web.TCPSite(ssl_context) + linkedge's HTTP app/Forwarder "
            "proxying to the same backend",
            "aiohttp-302": "aiohttp web.TCPSite(ssl_context) answering the 302 itself "
            "(sample backend app over TLS, no proxying)",
            "tls": "same Pebble-issued ECDSA P-256 certificate and build_server_context() "
            "settings for every server",
            "nginx": "not installed" if shutil.which("nginx") is None else "installed, not run",
        },
        "reference": REFERENCE_FIGURES,
    }
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            workdir = stack.enter_context(_workdir(args.keep))
            bench = Bench(args, workdir, stack)
            bench.results = results
            print("starting DNS, Pebble, backend, edge and load clients ...", flush=True)
            bench.start_stack()
            print(f"first click on {args.hosts} new hosts ...", flush=True)
            hosts = bench.first_click()
            bench.start_baselines(hosts[0])
            results["pinning"] = bench.pin() if args.pin else {}
            results["idle_cpu_us_per_s"] = bench.idle_cpu(1.0)
            results["edge_rss_kib"] = rss_kib(bench.pids["linkedge"])
            print(f"load phases on {hosts[0]} ({args.clients} client processes) ...", flush=True)
            bench.load_rounds(hosts[0])
            if args.profile is not None:
                print("profiling with py-spy ...", flush=True)
                bench.profile(hosts[0], args.profile)
    except KeyboardInterrupt:
        print("interrupted; stopped all processes", file=sys.stderr)
        return 130
    results["elapsed_s"] = time.monotonic() - started
    print_report(results)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
