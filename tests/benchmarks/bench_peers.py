"""Side by side: linkedge vs Caddy (on-demand TLS) vs nginx, proxy CPU per unit of work.

Run:  PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_peers.py [--quick] [--json out.json]

Needs Debian `caddy` and `nginx-light` (`deploy/bootstrap.sh --bench`); a server whose
binary is missing is left out of the table. Everything runs on loopback:

* one sample backend (aiohttp, answers `GET /c/<id>` with a 302), shared by every proxy;
* Pebble + the bench DNS server; linkedge (own process, `proxy.app.wiring.run_worker`, one
  worker) gets its certificate on demand through Pebble, exactly as in bench_edge.py;
* Caddy 2.6 with `on_demand_tls` + an `ask` endpoint served by this script, through the
  same Pebble (its own host name, A record to its own loopback address, its HTTP port
  on Pebble's HTTP-01 port), `reverse_proxy` to the backend, HTTPS and plain HTTP;
* nginx 1.22 (`worker_processes 1`), linkedge's Pebble certificate as a static
  certificate, `proxy_pass` with an upstream keep-alive pool, HTTPS and plain HTTP;
* optional (`--peers ...,floor`): `floor_server.py`, the least a Python TLS forwarder does
  (uvloop's TLS transport, a static certificate, a pooled backend connection), the same
  certificate as nginx: how far linkedge is from Python's own floor;
* optional extra linkedge variants (`--variants`): `uvloop` (uvloop's loop), `malloc`
  (`PYTHONMALLOC=malloc`: glibc's allocator for Python's small objects), and any
  `key=value` edits of the Config (e.g. `tls.num_tickets=0`, `listen.lean_clicks=false`:
  every click through aiohttp's server), each its own process.

Units (CPU time of the server's whole process tree from /proc, utime + stime, divided by
the successful operations; the load client is pinned to the other CPU with the backend):

* `conns`: new TCP + full TLS 1.3 handshake + one `GET /c/<id>` + read the 302 + close;
* `keepalive`: `--clients` TLS connections, sequential GETs on each;
* `plain`: `--clients` plain-HTTP connections, sequential GETs on each.

The load client (`--load`): `h2load` (Debian `nghttp2-client`; the default when installed)
is C and cheap per connection, so the servers, not the client, set the pace: `conns`
opens `--conn-rate` connections per second (in tenths of a second), one click each; it
never offers a session, which the run checks first against a TLS server of its own that
would resume one (`check_h2load_full_handshakes`). Its load comes from one address that
stands for many recipients, so the measured linkedge has its per-source caps raised
above it (`PeerBench.adjust_config`). `python`: two Python processes (`bench_edge.py`'s
clients; OP_NO_TICKET, `session_reused` checked on every connection), which cap every
server at ~250-300 new connections per second on this machine.

Rounds rotate the server order; per kind the table shows the median over rounds, its
[min..max], and the per-round ratio to each peer (median [min..max]).
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_edge as be  # noqa: E402

CADDY_IP = "127.0.0.204"
NGINX_IP = "127.0.0.205"
FLOOR_IP = "127.0.0.206"
VARIANT_IPS = [f"127.0.0.{n}" for n in range(210, 220)]
CADDY_HOST = "links.caddy-bench.test"
KINDS = ("conns", "keepalive", "plain")


def edge_variant_main(
    variant: str, config_pickle: bytes, log_path: str, ready: Any, lifeline: Any
) -> None:
    """bench_edge.edge_main, optionally on uvloop and/or with another source tree.

    `src=DIR` in the variant puts DIR first on sys.path before `proxy` is imported
    (the config travels pickled so that unpickling it imports DIR's `proxy`): e.g. a
    `git archive` of the commit before a change, run side by side with the change.
    """
    import pickle

    parts = variant.split("+")
    for part in parts:
        if part.startswith("src="):
            sys.path.insert(0, part[4:])
    if "malloc" in parts and os.environ.get("PYTHONMALLOC") != "malloc":
        raise SystemExit("variant malloc: PYTHONMALLOC did not reach the edge process")
    if "uvloop" in parts:
        import uvloop

        uvloop.install()
    config = pickle.loads(config_pickle)  # noqa: S301 (our own parent's bytes)
    if "secondary" in parts:  # a further worker of `workers=N`: as `serve --workers N` starts it
        import asyncio
        import logging
        import signal

        from proxy.app.wiring import run_worker

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        be._watch_parent(lifeline)
        logging.basicConfig(filename=log_path, level=logging.INFO)
        asyncio.run(run_worker(config, ready=lambda: ready.send("ready"), primary=False))
        return
    be.edge_main(config, log_path, ready, lifeline)


# ----------------------------------------------------------------------------------
# process CPU of a whole tree (nginx: master + worker)


def tree_pids(pid: int) -> list[int]:
    out = [pid]
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                for child in fh.read().split():
                    out.extend(tree_pids(int(child)))
    return out


def tree_cpu(pid: int) -> be.CpuSample:
    u = s = 0.0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            c = be.cpu_of(p)
            u += c.utime
            s += c.stime
    return be.CpuSample(u, s)


def tree_rss_kib(pid: int) -> int:
    return sum(be.rss_kib(p) for p in tree_pids(pid))


H2LOAD = shutil.which("h2load") or "h2load"


def _per_unit(
    server: str,
    kind: str,
    ok: int,
    errors: dict[str, int],
    seconds: float,
    server_cpu: tuple[be.CpuSample, be.CpuSample],
    backend_cpu: tuple[be.CpuSample, be.CpuSample],
    wall: float,
    tls_version: str,
) -> dict[str, Any]:
    """One load phase's result: CPU per successful operation (µs), before/after samples."""
    (c0, c1), (b0, b1) = server_cpu, backend_cpu
    per = 1e6 / ok if ok else math.nan
    return {
        "server": server,
        "kind": kind,
        "ok": ok,
        "errors": errors,
        "rate_per_s": ok / seconds if seconds else math.nan,
        "cpu_us": (c1.total - c0.total) * per,
        "user_us": (c1.utime - c0.utime) * per,
        "sys_us": (c1.stime - c0.stime) * per,
        "backend_us": (b1.total - b0.total) * per,
        "wall_s": wall,
        "tls_version": tls_version,
    }


def h2load_counts(out: str) -> dict[str, int]:
    """h2load's request and status counts from its report."""
    counts: dict[str, int] = {}
    m = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        out,
    )
    if m:
        for key, value in zip(
            ("total", "started", "done", "succeeded", "failed", "errored", "timeout"),
            m.groups(),
            strict=True,
        ):
            counts[key] = int(value)
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if m:
        for key, value in zip(("2xx", "3xx", "4xx", "5xx"), m.groups(), strict=True):
            counts[key] = int(value)
    return counts


def check_h2load_full_handshakes(n: int = 40) -> dict[str, int]:
    """h2load's new connections are full handshakes: it is pointed at a TLS server of
    this process whose session cache and tickets would let a client resume; every
    connection must be a full handshake (no cache hit) with the SNI asked for."""
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("links.h2load-check.test")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    names: set[str] = set()
    ctx.sni_callback = lambda _s, name, _c: names.add(name or "")
    listener = socket.create_server(("127.0.0.1", 0), backlog=n)
    port = listener.getsockname()[1]
    served = 0

    def serve() -> None:
        nonlocal served
        listener.settimeout(10)
        for _ in range(n):
            raw, _addr = listener.accept()
            with ctx.wrap_socket(raw, server_side=True) as tls:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += tls.recv(4096) or b"\r\n\r\n"
                tls.sendall(b"HTTP/1.1 302 Found\r\nLocation: /\r\nContent-Length: 0\r\n\r\n")
                served += 1

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    out = subprocess.run(  # noqa: S603 (our own arguments)
        [H2LOAD, "--h1", "-c", str(n), "-n", str(n), "-r", str(n // 4), "--rate-period", "100ms"]
        + ["--connect-to", f"127.0.0.1:{port}", "https://links.h2load-check.test/c/1"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    thread.join(15)
    listener.close()
    stats = ctx.session_stats()
    counts = h2load_counts(out)
    if counts.get("3xx") != n or served != n or stats["hits"] or stats["accept_good"] != n:
        raise RuntimeError(f"h2load check: {counts} served {served} session stats {stats}")
    if names != {"links.h2load-check.test"}:
        raise RuntimeError(f"h2load check: SNI {names}")
    return {"connections": n, "full_handshakes": stats["accept_good"] - stats["hits"]}


class _Ask(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


# ----------------------------------------------------------------------------------


class PeerBench(be.Bench):
    def __init__(self, args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack):
        super().__init__(args, workdir, stack)
        self.servers: list[str] = []
        self.hosts: dict[str, str] = {}
        self.plain_ports: dict[str, int] = {}
        self.popen: dict[str, subprocess.Popen[bytes]] = {}
        self.cpu_fn = be.cpu_of
        self.extra_pids: dict[str, list[int]] = {}  # further workers of a `workers=N` variant

    def server_cpu(self, name: str) -> be.CpuSample:
        u = s = 0.0
        for pid in [self.pids[name], *self.extra_pids.get(name, [])]:
            c = tree_cpu(pid)
            u += c.utime
            s += c.stime
        return be.CpuSample(u, s)

    # processes started with Popen (caddy, nginx) are stopped here
    def _popen(self, name: str, cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.out", "wb")  # noqa: SIM115
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **kw)

        def stop() -> None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            log.close()

        self.stack.callback(stop)
        self.popen[name] = proc
        return proc

    def adjust_config(self, config: Any) -> None:
        if getattr(self.args, "load", None) == "h2load":  # not other benchmarks' PeerBench
            # h2load is one client address standing for many recipients: linkedge's caps
            # per source (there to stop one hostile client) raised above its load
            cap = max(1024, 4 * self.args.conn_rate)
            config.listen.max_connections_per_source = cap
            config.tls.max_pending_per_source = cap
            config.backend.max_per_source = cap

    def setup_linkedge(self) -> None:
        self.start_stack()
        host = self.first_click()[0]
        self.servers.append("linkedge")
        self.hosts["linkedge"] = host
        self.plain_ports["linkedge"] = int(self.config.listen.http.rsplit(":", 1)[1])

    def start_variant(self, spec: str, ip: str) -> None:
        import copy

        config = copy.deepcopy(self.config)
        config.listen.https = f"{ip}:{be.free_port(ip)}"
        config.listen.http = f"{ip}:{be.free_port(ip)}"
        parts = [p for p in spec.split("+") if p]
        for part in parts:
            if "=" in part and not part.startswith(("src=", "workers=")):
                path, value = part.split("=", 1)
                obj = config
                *head, last = path.split(".")
                for attr in head:
                    obj = getattr(obj, attr)
                old = getattr(obj, last)
                setattr(
                    obj,
                    last,
                    type(old)(value) if not isinstance(old, bool) else value in ("1", "true"),
                )
        name = f"linkedge[{spec}]"
        log = self.workdir / f"edge-{len(self.servers)}.log"
        import pickle

        workers = next((int(p[8:]) for p in parts if p.startswith("workers=")), 1)
        # `malloc`: CPython's small objects from glibc's malloc instead of pymalloc (issue 9:
        # memory after a burst); a spawned child reads PYTHONMALLOC from the inherited env
        with be.allocator_env("malloc" if "malloc" in parts else None):
            proc, _ = self.children.start_server(
                name, edge_variant_main, spec, pickle.dumps(config), str(log)
            )
        for i in range(1, workers):  # SO_REUSEPORT on the same addresses, like --workers
            more, _ = self.children.start_server(
                f"{name}-{i}",
                edge_variant_main,
                spec + "+secondary",
                pickle.dumps(config),
                str(log) + f".{i}",
            )
            self.extra_pids.setdefault(name, []).append(int(more.pid or 0))
        self.pids[name] = int(proc.pid or 0)
        self.procs[name] = proc
        self.ports[name] = int(config.listen.https.rsplit(":", 1)[1])
        self.plain_ports[name] = int(config.listen.http.rsplit(":", 1)[1])
        self.ips[name] = ip
        self.hosts[name] = self.hosts["linkedge"]
        self.servers.append(name)

    def static_certificate(self) -> tuple[Path, Path]:
        """linkedge's Pebble certificate for its host as PEM files (chain, key), for the
        peers that serve one static certificate (nginx, the floor server)."""
        d = self.workdir / "static-cert"
        if not d.exists():
            import asyncio

            from certstore.crypto import parse_key_text

            host = self.hosts["linkedge"]
            key = parse_key_text(self.key_text, "bench")
            cert = asyncio.run(self._get_certificate(host, key))
            d.mkdir()
            (d / "chain.pem").write_bytes(cert.chain_pem)
            (d / "key.pem").write_bytes(cert.key_pem)
        return d / "chain.pem", d / "key.pem"

    def start_floor(self) -> None:
        """floor_server.py: the least a Python TLS forwarder does (issue 12's floor)."""
        chain, key = self.static_certificate()
        sp, hp = be.free_port(FLOOR_IP), be.free_port(FLOOR_IP)
        backend = self.backend_url.split("://", 1)[1].rstrip("/")
        cmd = [sys.executable, str(Path(__file__).with_name("floor_server.py"))]
        cmd += ["--https", f"{FLOOR_IP}:{sp}", "--http", f"{FLOOR_IP}:{hp}"]
        cmd += ["--cert", str(chain), "--key", str(key), "--backend", backend]
        proc = self._popen("floor", cmd)
        self._wait_port(FLOOR_IP, sp, proc, "floor")
        self.pids["floor"] = proc.pid
        self.ports["floor"] = sp
        self.plain_ports["floor"] = hp
        self.ips["floor"] = FLOOR_IP
        self.hosts["floor"] = self.hosts["linkedge"]
        self.servers.append("floor")

    def start_nginx(self) -> None:
        nginx = shutil.which("nginx") or (
            "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
        )
        if nginx is None:
            print("nginx not installed: left out", file=sys.stderr)
            return
        host = self.hosts["linkedge"]
        chain, key = self.static_certificate()
        d = self.workdir / "nginx"
        (d / "logs").mkdir(parents=True)
        sp, hp = be.free_port(NGINX_IP), be.free_port(NGINX_IP)
        backend = self.backend_url.split("://", 1)[1].rstrip("/")
        conf = f"""
user root;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  upstream backend {{ server {backend}; keepalive 64; }}
  server {{
    listen {NGINX_IP}:{sp} ssl;
    listen {NGINX_IP}:{hp};
    ssl_certificate {chain};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ecdh_curve X25519:prime256v1:secp384r1;
    keepalive_requests 1000000;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
    }}
  }}
}}
"""
        (d / "nginx.conf").write_text(conf)
        proc = self._popen("nginx", [nginx, "-p", str(d), "-c", str(d / "nginx.conf")])
        self._wait_port(NGINX_IP, sp, proc, "nginx")
        self.pids["nginx"] = proc.pid
        self.ports["nginx"] = sp
        self.plain_ports["nginx"] = hp
        self.ips["nginx"] = NGINX_IP
        self.hosts["nginx"] = host
        self.servers.append("nginx")

    def start_caddy(self) -> None:
        caddy = shutil.which("caddy")
        if caddy is None:
            print("caddy not installed: left out", file=sys.stderr)
            return
        ask = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ask)
        threading.Thread(target=ask.serve_forever, daemon=True).start()
        self.stack.callback(ask.shutdown)
        d = self.workdir / "caddy"
        d.mkdir()
        sp = be.free_port(CADDY_IP)
        self.dns.set_a(CADDY_HOST, [CADDY_IP])
        backend = self.backend_url.split("://", 1)[1].rstrip("/")
        conf = f"""{{
  admin off
  http_port {self.pebble.http_port}
  https_port {sp}
  default_bind {CADDY_IP}
  acme_ca {self.pebble.directory_url}
  acme_ca_root {self.pebble.ca_bundle}
  email bench@example.com
  storage file_system {d}/data
  skip_install_trust
  on_demand_tls {{
    ask http://127.0.0.1:{ask.server_address[1]}/ask
  }}
  log {{
    output discard
  }}
}}
https:// {{
  tls {{
    on_demand
    key_type p256
  }}
  reverse_proxy {backend}
}}
http:// {{
  reverse_proxy {backend}
}}
"""
        (d / "Caddyfile").write_text(conf)
        env = {**os.environ, "HOME": str(d), "XDG_DATA_HOME": str(d), "XDG_CONFIG_HOME": str(d)}
        env["GOMAXPROCS"] = "1"  # like nginx's one worker and linkedge's one process
        proc = self._popen(
            "caddy",
            [caddy, "run", "--config", str(d / "Caddyfile"), "--adapter", "caddyfile"],
            env=env,
        )
        self._wait_port(CADDY_IP, sp, proc, "caddy")
        self.pids["caddy"] = proc.pid
        self.ports["caddy"] = sp
        self.plain_ports["caddy"] = self.pebble.http_port
        self.ips["caddy"] = CADDY_IP
        self.hosts["caddy"] = CADDY_HOST
        # first click: Caddy orders its certificate on demand
        ctx = be.client_context(str(self.pebble.root_path))
        cpu0 = be.cpu_of(proc.pid)
        t0 = time.perf_counter()
        res = be.one_click(ctx, CADDY_IP, sp, CADDY_HOST, be.FIRST_CLICK_TIMEOUT)
        took = time.perf_counter() - t0
        cpu1 = be.cpu_of(proc.pid)
        if res["status"] != 302:
            raise RuntimeError(f"caddy first click: HTTP {res['status']}")
        self.results["caddy_first_click"] = {
            "total_s": took,
            "cpu_ms": (cpu1.total - cpu0.total) * 1000,
        }
        self.servers.append("caddy")

    def _wait_port(self, ip: str, port: int, proc: subprocess.Popen[bytes], name: str) -> None:
        deadline = time.monotonic() + be.START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                out = (self.workdir / f"{name}.out").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited ({proc.returncode}): {out}")
            with contextlib.suppress(OSError), socket.create_connection((ip, port), 0.5):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not listen on {ip}:{port}")

    def pin_all(self) -> dict[str, list[int]]:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return {}
        server_cpus, other = {cpus[0]}, set(cpus[1:])
        for name in self.servers:
            pids = [self.pids[name], *self.extra_pids.get(name, [])]
            for pid in [p for top in pids for p in tree_pids(top)]:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(pid, server_cpus)
                    with contextlib.suppress(OSError):
                        for task in os.listdir(f"/proc/{pid}/task"):
                            os.sched_setaffinity(int(task), server_cpus)
        for pid in [self.pids["backend"], *self.client_pids]:
            os.sched_setaffinity(pid, other)
        return {"servers": sorted(server_cpus), "backend_and_clients": sorted(other)}

    # -- load --------------------------------------------------------------------

    def load(self, server: str, kind: str, duration: float) -> dict[str, Any]:
        if self.args.load == "h2load":
            return self.load_h2load(server, kind, duration)
        ip = self.ips[server]
        port = self.plain_ports[server] if kind == "plain" else self.ports[server]
        kwargs = {
            "ip": ip,
            "port": port,
            "host": self.hosts[server],
            "duration": duration,
            "max_count": be.MAX_COUNT,
        }
        b0 = be.cpu_of(self.pids["backend"])
        c0 = self.server_cpu(server)
        t0 = time.perf_counter()
        for conn in self.clients:
            conn.send((kind, kwargs))
        results = []
        for conn in self.clients:
            if not conn.poll(duration + 2 * be.IO_TIMEOUT + 5):
                raise RuntimeError(f"load client did not finish ({server}, {kind})")
            results.append(conn.recv())
        wall = time.perf_counter() - t0
        c1 = self.server_cpu(server)
        b1 = be.cpu_of(self.pids["backend"])
        fatal = [r["fatal"] for r in results if "fatal" in r]
        if fatal:
            raise RuntimeError(f"load client failed: {fatal[0]}")
        ok = sum(r["ok"] for r in results)
        errors: Counter[str] = Counter()
        for r in results:
            errors.update(r["errors"])
        if kind == "conns":
            reused = sum(r["reused"] for r in results)
            if reused:
                raise RuntimeError(f"{server}: {reused} TLS sessions were resumed")
        elapsed = max(r["elapsed_s"] for r in results)
        tls = next((r.get("tls_version") for r in results if r.get("tls_version")), "")
        return _per_unit(server, kind, ok, dict(errors), elapsed, (c0, c1), (b0, b1), wall, tls)

    def load_h2load(self, server: str, kind: str, duration: float) -> dict[str, Any]:
        """`load` with h2load as the client: C, one thread on the clients' CPU.

        `conns`: `--conn-rate` new connections per second (opened in tenths of a second),
        one click each, then h2load closes it; it never offers a TLS session
        (`check_h2load_full_handshakes`). Keep-alive kinds: `--clients` connections,
        sequential requests for `duration` seconds."""
        a = self.args
        ip = self.ips[server]
        plain = kind == "plain"
        port = self.plain_ports[server] if plain else self.ports[server]
        url = f"{'http' if plain else 'https'}://{self.hosts[server]}:{port}{be.CLICK_PATH}"
        cmd = [H2LOAD, "--h1", "-t", "1", "--connect-to", f"{ip}:{port}"]
        if kind == "conns":
            per_tenth = max(1, round(a.conn_rate / 10))
            total = max(per_tenth, round(a.conn_rate * duration))
            cmd += ["-c", str(total), "-n", str(total), "-r", str(per_tenth)]
            cmd += ["--rate-period", "100ms"]
        else:
            cmd += ["-c", str(a.clients), "-D", f"{round(duration * 1000)}ms"]
        b0 = be.cpu_of(self.pids["backend"])
        c0 = self.server_cpu(server)
        t0 = time.perf_counter()
        proc = subprocess.run(  # noqa: S603 (our own arguments)
            [*cmd, url],
            capture_output=True,
            text=True,
            timeout=duration * 4 + 60,
            preexec_fn=self._on_client_cpus,
        )
        wall = time.perf_counter() - t0
        c1 = self.server_cpu(server)
        b1 = be.cpu_of(self.pids["backend"])
        counts = h2load_counts(proc.stdout)
        if proc.returncode != 0 or "3xx" not in counts:
            raise RuntimeError(
                f"h2load failed ({server}, {kind}): {proc.stdout[-2000:]}{proc.stderr[-1000:]}"
            )
        ok = counts["3xx"]
        elapsed = re.search(r"finished in ([0-9.]+)s", proc.stdout)
        seconds = float(elapsed.group(1)) if elapsed else wall
        tls = re.search(r"TLS Protocol: (\S+)", proc.stdout)
        errors = {
            k: counts[k] for k in ("2xx", "4xx", "5xx", "failed", "errored", "timeout") if counts[k]
        }
        version = tls.group(1) if tls else ""
        return _per_unit(server, kind, ok, errors, seconds, (c0, c1), (b0, b1), wall, version)

    def _on_client_cpus(self) -> None:
        cpus = sorted(os.sched_getaffinity(0))
        if self.args.pin and len(cpus) > 1:
            os.sched_setaffinity(0, set(cpus[1:]))

    def rounds(self) -> dict[str, list[dict[str, Any]]]:
        a = self.args
        out: dict[str, list[dict[str, Any]]] = {k: [] for k in a.kinds}
        durations = {
            "conns": a.duration,
            "keepalive": a.keepalive_duration,
            "plain": a.keepalive_duration,
        }
        for server in self.servers:
            for kind in a.kinds:
                self.load(server, kind, a.warmup)
        for r in range(a.rounds):
            n = len(self.servers)
            order = self.servers[r % n :] + self.servers[: r % n]
            for kind in a.kinds:
                for server in order:
                    res = self.load(server, kind, durations[kind])
                    res["round"] = r
                    out[kind].append(res)
                    print(
                        f"  round {r} {kind:9s} {server:28s} {res['rate_per_s']:7.0f}/s "
                        f"CPU {res['cpu_us']:6.0f} µs  errors {sum(res['errors'].values())}",
                        flush=True,
                    )
        return out

    def profile_edges(self, outdir: Path) -> dict[str, Any]:
        """py-spy (--nonblocking, 250 Hz) each linkedge process under each kind of load."""
        spy = be.find_py_spy()
        if spy is None:
            print("py-spy not found; no profile", file=sys.stderr)
            return {}
        outdir.mkdir(parents=True, exist_ok=True)
        secs = self.args.profile_seconds
        found: dict[str, Any] = {}
        for server in [s for s in self.servers if s.startswith("linkedge")]:
            for kind in self.args.kinds:
                name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{server}-{kind}")
                folded = outdir / f"{name}.folded"
                cmd = [
                    spy,
                    "record",
                    "--pid",
                    str(self.pids[server]),
                    "--duration",
                    str(secs),
                    "--rate",
                    "250",
                    "--nonblocking",
                    "--format",
                    "raw",
                    "--output",
                    str(folded),
                ]
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                try:
                    time.sleep(0.5)
                    load = self.load(server, kind, secs + 1)
                    proc.communicate(timeout=secs + 30)
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
                if not folded.exists():
                    continue
                found[name] = be.analyze_profile(folded, float(load["cpu_us"]))
                found[name]["cpu_us"] = load["cpu_us"]
                found[name]["file"] = str(folded)
                p = found[name]
                if not p.get("samples"):
                    continue
                cats = ", ".join(f"{k} {v:.0f}%" for k, v in p["self_pct_by_category"].items())
                print(
                    f"\nProfile {name} ({p['samples']} samples, {load['cpu_us']:.0f} µs/op): {cats}"
                )
                print("  by innermost linkedge frame (callees included):")
                for row in p["linkedge_innermost_top"][:10]:
                    print(f"    {row['pct']:5.1f}% {row['us']:6.0f} µs  {row['frame']}")
                print("  top self frames:")
                for row in p["self_top"][:12]:
                    print(f"    {row['pct']:5.1f}% {row['us']:6.0f} µs  {row['frame']}")
        return found


def summarize(servers: list[str], rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    peers = [p for p in ("nginx", "caddy", "floor") if p in servers]
    for kind, results in rounds.items():
        block: dict[str, Any] = {}
        for server in servers:
            mine = [x for x in results if x["server"] == server]
            if not mine:
                continue
            cpu = [x["cpu_us"] for x in mine]
            row: dict[str, Any] = {
                "cpu_us": statistics.median(cpu),
                "cpu_us_min": min(cpu),
                "cpu_us_max": max(cpu),
                "user_us": statistics.median(x["user_us"] for x in mine),
                "sys_us": statistics.median(x["sys_us"] for x in mine),
                "rate_per_s": statistics.median(x["rate_per_s"] for x in mine),
                "backend_us": statistics.median(x["backend_us"] for x in mine),
                "errors": sum(sum(x["errors"].values()) for x in mine),
                "ratios": {},
            }
            for peer in [
                *peers,
                *(["linkedge"] if server != "linkedge" and server.startswith("linkedge") else []),
            ]:
                if peer == server:
                    continue
                per_round = []
                for r in {x["round"] for x in results}:
                    a = [x for x in results if x["round"] == r and x["server"] == server]
                    b = [x for x in results if x["round"] == r and x["server"] == peer]
                    if a and b and b[0]["cpu_us"] > 0:
                        per_round.append(a[0]["cpu_us"] / b[0]["cpu_us"])
                if per_round:
                    row["ratios"][peer] = {
                        "median": statistics.median(per_round),
                        "min": min(per_round),
                        "max": max(per_round),
                    }
            block[server] = row
        summary[kind] = block
    return summary


TITLES = {
    "conns": "new TLS connection + click (full handshake, no resumption)",
    "keepalive": "keep-alive HTTPS click",
    "plain": "keep-alive plain-HTTP click",
}


def print_table(summary: dict[str, Any], rounds: int) -> None:
    for kind, block in summary.items():
        print()
        print(f"{TITLES[kind]}: proxy CPU µs per unit, median of {rounds} rounds [min..max]")
        print(
            f"  {'server':28s} {'CPU µs':>7s} {'[min..max]':>13s} {'user':>5s} {'sys':>5s}"
            f" {'ops/s':>7s} {'errs':>4s}  ratios per round: median [min..max]"
        )
        for server, row in block.items():
            ratios = "  ".join(
                f"/{p} {v['median']:.2f} [{v['min']:.2f}..{v['max']:.2f}]"
                for p, v in row["ratios"].items()
            )
            span = f"[{row['cpu_us_min']:.0f}..{row['cpu_us_max']:.0f}]"
            print(
                f"  {server:28s} {row['cpu_us']:7.0f} {span:>13s} {row['user_us']:5.0f} "
                f"{row['sys_us']:5.0f} {row['rate_per_s']:7.0f} {row['errors']:4d}  {ratios}"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--rounds", type=int)
    p.add_argument("--duration", type=float, help="seconds per new-connection phase (4; quick 2)")
    p.add_argument(
        "--keepalive-duration", type=float, help="seconds per keep-alive phase (3; quick 1)"
    )
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument(
        "--load",
        choices=("h2load", "python"),
        default="h2load" if shutil.which("h2load") else "python",
        help="load client: h2load (C, default when installed) or the Python clients",
    )
    p.add_argument(
        "--conn-rate", type=int, default=600, help="h2load: new connections per second (600)"
    )
    p.add_argument("--kinds", default="conns,keepalive,plain")
    p.add_argument(
        "--peers", default="nginx,caddy", help="comma list of nginx,caddy,floor ('' for none)"
    )
    p.add_argument(
        "--variants",
        default="",
        help="comma list of extra linkedge processes: 'uvloop', 'tls.num_tickets=0', "
        "'uvloop+backend.x=y' ...",
    )
    p.add_argument("--keep", action="store_true")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="no CPU pinning")
    p.add_argument("--idle-seconds", type=float, default=10.0, help="idle CPU sample (10)")
    p.add_argument(
        "--profile", type=Path, metavar="DIR", help="py-spy each linkedge process per kind"
    )
    p.add_argument("--profile-seconds", type=int, default=5)
    args = p.parse_args(argv)
    args.hosts = 1
    args.kinds = [k for k in args.kinds.split(",") if k]
    if any(k not in KINDS for k in args.kinds):
        p.error(f"--kinds from {KINDS}")
    for key, full, quick in (
        ("rounds", 5, 1),
        ("duration", 4.0, 2.0),
        ("keepalive_duration", 3.0, 1.0),
    ):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if not 1 <= args.rounds <= 30 or not 1 <= args.clients <= 8:
        p.error("--rounds 1..30, --clients 1..8")
    return args


def main(argv: list[str] | None = None) -> int:
    import signal

    args = parse_args(argv)
    signal.signal(signal.SIGTERM, be._raise_on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    results: dict[str, Any] = {"params": {k: str(v) for k, v in vars(args).items()}}
    try:
        with contextlib.ExitStack() as stack:
            workdir = stack.enter_context(be._workdir(args.keep))
            bench = PeerBench(args, workdir, stack)
            bench.results = results
            if args.load == "h2load":  # before anything else: its handshakes are full ones
                results["h2load_check"] = check_h2load_full_handshakes()
            print("starting DNS, Pebble, backend, linkedge, clients ...", flush=True)
            bench.setup_linkedge()
            for i, spec in enumerate(v for v in args.variants.split(",") if v):
                bench.start_variant(spec, VARIANT_IPS[i])
            peers = [p for p in args.peers.split(",") if p]
            if "nginx" in peers:
                bench.start_nginx()
            if "caddy" in peers:
                bench.start_caddy()
            if "floor" in peers:
                bench.start_floor()
            results["pinning"] = bench.pin_all() if args.pin else {}
            results["servers"] = bench.servers
            results["rss_kib_before"] = {s: tree_rss_kib(bench.pids[s]) for s in bench.servers}
            print(f"servers: {', '.join(bench.servers)}", flush=True)
            idle0 = {s: bench.server_cpu(s).total for s in bench.servers}
            time.sleep(args.idle_seconds)
            results["idle_cpu_ms_per_s"] = {
                s: (bench.server_cpu(s).total - idle0[s]) * 1000 / args.idle_seconds
                for s in bench.servers
            }
            rounds = bench.rounds()
            results["rss_kib_after"] = {s: tree_rss_kib(bench.pids[s]) for s in bench.servers}
            results["rounds"] = rounds
            results["summary"] = summarize(bench.servers, rounds)
            if args.profile is not None:
                results["profile"] = bench.profile_edges(args.profile)
    except KeyboardInterrupt:
        print("interrupted; stopped all processes", file=sys.stderr)
        return 130
    print_table(results["summary"], args.rounds)
    print(f"\nidle CPU, ms per second over {args.idle_seconds:.0f} s without load:")
    for server, ms in results["idle_cpu_ms_per_s"].items():
        print(f"  {server:40s} {ms:6.2f}")
    print("RSS KiB before / after the rounds:")
    for server in results["servers"]:
        print(
            f"  {server:40s} {results['rss_kib_before'][server]:8d} "
            f"{results['rss_kib_after'][server]:8d}"
        )
    if "caddy_first_click" in results:
        c = results["caddy_first_click"]
        # Both first clicks are each process's first order (account registration, first
        # use of everything): not the CPU per certificate, which bench_issuance.py measures.
        print(
            f"\ncaddy first click (on-demand via Pebble, its first order): {c['total_s']:.3f} s, "
            f"CPU {c['cpu_ms']:.1f} ms"
        )
    fc = results.get("first_click", {})
    if fc:
        print(
            f"linkedge first click (its first order): median {fc['total_s']['median']:.3f} s, "
            f"CPU {fc['edge_cpu_ms_per_first_click']:.1f} ms (per certificate: bench_issuance.py)"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
