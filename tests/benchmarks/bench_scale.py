"""Issue 11 "Scale": a million hosts in the store (not a pytest test).

    .venv/bin/python tests/benchmarks/bench_scale.py                    # fill + serve + lookups
    .venv/bin/python tests/benchmarks/bench_scale.py --hosts 100000     # smaller, same shape
    .venv/bin/python tests/benchmarks/bench_scale.py --simulate         # + the renewal year
    .venv/bin/python tests/benchmarks/bench_scale.py --only-simulate --scheduler uniform
    .venv/bin/python tests/benchmarks/bench_scale.py --store postgresql

What it measures (goals from the issue, compared by eye: the machine is small and shared):

1. **Fill**: `--hosts` registered hosts (default 1,000,000), `--cert-share` of them
   active with a certificate and a renewal plan, a few suspended, the rest pending or
   verified. The fill **bypasses the ports for speed**: rows go straight into the
   backend's own tables through its driver (sqlite3 ``executemany``; asyncpg
   ``copy_records_to_table``), in the shape the store itself writes them: every key is
   sealed with the store key bound to its row (``Sealer``), the triggers that emit the
   ``registered`` events run (so the events table holds a million rows too). One ECDSA
   leaf (SAN ``*.scale.test``, from a CA made for the run) serves every host.
2. **Store queries** that a worker runs at start or on a timer (maintenance, gauges,
   the suspended set): time of each, in a fresh process.
3. **Start to first click**: `linkedge serve` (one worker) is exec'd against the
   filled store, Pebble and a DNS server on loopback; the time from exec to the first
   successful HTTPS GET on one host (TLS verified against the run's CA, answer from
   the backend), and the worker's CPU seconds until then. The code is byte-compiled
   first, as on a deployed node. `--starts N` times only this, N times, interleaved
   with other checkouts' code (`--start-root`, e.g. main's): same store, same machine.
   Goal: < 2 s.
4. **Cold lookups**: `--lookups` random certified hosts, one new TLS connection each
   (the worker has no context for them: its handshake reads the store), then the same
   hosts again (cached). Reported: handshake p50 / p95 / max, cold and warm, the
   worker's CPU per handshake, and the store reads alone (get_certificate and
   get_domain at once, as the click path does them; and one after the other) in this
   process. Goal: the cold lookup < 5 ms. Then the worker's RSS. `--edge-root` serves
   with another checkout's code.
5. **Renewal year** (`--simulate`, `--scenario growth|steady`): see :func:`simulate`.
   Goal: the peak of renewal orders per 3 h within 1.2x of the mean: of the 30 days
   around it for the growing fleet (whose year's mean is below its late months by
   construction), of the whole year for the steady one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import random
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from acme_client.renewal import ratio_window  # noqa: E402
from acme_client.renewal_slots import SLOT_SECONDS  # noqa: E402
from certstore import DomainState, generate_key_text, open_store  # noqa: E402
from certstore.crypto import Sealer, parse_key_text  # noqa: E402

DAY = 86400.0
YEAR = 365 * DAY
LIFETIME = 90 * DAY
ZONE = "scale.test"
EDGE_IP = "127.0.0.211"
TARGET = "edge-scale.linkedge.test"
CHUNK = 50_000


def hostname(i: int) -> str:
    return f"h{i:07d}.{ZONE}"


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(pct / 100 * len(ordered)) - 1))]


def stats_ms(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(values) * 1000, 3),
        "p95_ms": round(percentile(values, 95) * 1000, 3),
        "max_ms": round(max(values) * 1000, 3),
    }


# -- the run's PKI -----------------------------------------------------------------


@dataclass
class Pki:
    ca_pem: bytes
    chain_pem: bytes  # the leaf alone (~0.7 kB; a Let's Encrypt chain is ~3.5 kB)
    key_pem: bytes
    serial: str
    issuer: str


def make_pki() -> Pki:
    """A CA and one leaf for *.scale.test, valid around now (the store's not_before /
    not_after per host are what the edge schedules on; the leaf only has to verify)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench-scale CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"*.{ZONE}")]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"*.{ZONE}")]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return Pki(
        ca_pem=ca.public_bytes(pem),
        chain_pem=leaf.public_bytes(pem),
        key_pem=leaf_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        serial=format(leaf.serial_number, "x"),
        issuer="bench-scale CA",
    )


# -- the fill (bypasses the ports: the backend's tables through its driver) ------------


@dataclass
class Shape:
    hosts: int
    cert_share: float
    suspended_share: float = 0.001


def host_rows(shape: Shape, now: float, seed: int = 11) -> Iterator[tuple[Any, ...]]:
    """(index, state, created_at, next_check_at, not_before) per host, deterministic."""
    rnd = random.Random(seed)
    certified = int(shape.hosts * shape.cert_share)
    suspended = int(shape.hosts * shape.suspended_share)
    for i in range(shape.hosts):
        if i < certified:
            state = DomainState.SUSPENDED if i % 1000 == 999 and suspended else DomainState.ACTIVE
            # issued steadily over the last 50 days: no plan is due at the start (the
            # ratio window of a 90-day certificate opens 52.5 days after issuance)
            not_before = now - rnd.random() * 50 * DAY
            created = not_before - rnd.random() * DAY
            next_check = now + rnd.random() * 6 * 3600  # the verifier's active re-check
        else:
            state = DomainState.PENDING if i % 2 else DomainState.VERIFIED
            not_before = None
            created = now - rnd.random() * 30 * DAY
            next_check = now + 3600 + rnd.random() * DAY
        yield i, state, created, next_check, not_before


def fill_records(
    shape: Shape, pki: Pki, sealer: Sealer, now: float
) -> Iterator[tuple[tuple[Any, ...], tuple[Any, ...] | None, tuple[Any, ...] | None]]:
    """Per host, the rows both fills write, in their tables' column order: the domain
    (DOMAIN_COLUMNS), its certificate and its renewal plan (CERT_COLUMNS, PLAN_COLUMNS;
    None for a host without a certificate)."""
    rnd = random.Random(7)
    for i, state, created, next_check, not_before in host_rows(shape, now):
        name = hostname(i)
        verified = None if state is DomainState.PENDING else created + 60
        domain = (
            name,
            f"acct-{i % 1000}",
            state.value,
            TARGET if verified else None,
            verified,
            verified,
            "ok" if verified else None,
            created,
            state.value,
            created,
            None if state is DomainState.SUSPENDED else next_check,
            0,
        )
        if not_before is None:
            yield domain, None, None
            continue
        not_after = not_before + LIFETIME
        cert = (
            name,
            pki.chain_pem,
            sealer.seal(pki.key_pem, Sealer.row("cert", name)),
            name,
            not_before,
            not_after,
            pki.issuer,
            not_before,
            pki.serial,
            "https://ca.invalid/dir",
        )
        due = ratio_window(not_before, not_after).pick(rnd.random)
        yield domain, cert, (name, due, due, "ratio", None, not_before)


DOMAIN_COLUMNS = [
    "hostname",
    "account",
    "state",
    "cname_target_seen",
    "verified_at",
    "last_check_at",
    "last_check_reason",
    "created_at",
    "state_reason",
    "state_changed_at",
    "next_check_at",
    "failed_checks",
]
CERT_COLUMNS = [
    "hostname",
    "chain_pem",
    "key_sealed",
    "names",
    "not_before",
    "not_after",
    "issuer",
    "created_at",
    "serial",
    "directory_url",
]
PLAN_COLUMNS = ["hostname", "due_at", "next_check_at", "source", "last_error", "updated_at"]
FILL_TABLES = {"domains": DOMAIN_COLUMNS, "certificates": CERT_COLUMNS, "renewals": PLAN_COLUMNS}


def _insert(table: str, columns: list[str]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({','.join('?' * len(columns))})"


def fill_sqlite(path: Path, key: bytes, shape: Shape, pki: Pki, now: float) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    # no journal while filling (a failed fill is thrown away); the store puts WAL back
    db.execute("PRAGMA journal_mode = OFF")
    db.execute("PRAGMA synchronous = OFF")
    db.execute("PRAGMA cache_size = -262144")
    chunk: dict[str, list[tuple[Any, ...]]] = {table: [] for table in FILL_TABLES}

    def flush() -> None:
        db.execute("BEGIN")
        for table, columns in FILL_TABLES.items():
            db.executemany(_insert(table, columns), chunk[table])
            chunk[table].clear()
        db.execute("COMMIT")

    for domain, cert, plan in fill_records(shape, pki, Sealer(key), now):
        chunk["domains"].append(domain)
        if cert is not None and plan is not None:
            chunk["certificates"].append(cert)
            chunk["renewals"].append(plan)
        if len(chunk["domains"]) >= CHUNK:
            flush()
    if chunk["domains"]:
        flush()
    db.execute("ANALYZE")
    db.execute("PRAGMA journal_mode = WAL")
    db.close()


async def fill_postgresql(url: str, key: bytes, shape: Shape, pki: Pki, now: float) -> None:
    import asyncpg  # type: ignore[import-untyped]

    chunk: dict[str, list[tuple[Any, ...]]] = {table: [] for table in FILL_TABLES}
    conn = await asyncpg.connect(url)
    try:

        async def flush() -> None:
            # COPY fires the row triggers: the `registered` events, the maintenance queue
            async with conn.transaction():
                for table, columns in FILL_TABLES.items():
                    await conn.copy_records_to_table(table, records=chunk[table], columns=columns)
                    chunk[table].clear()

        for domain, cert, plan in fill_records(shape, pki, Sealer(key), now):
            chunk["domains"].append(domain)
            if cert is not None and plan is not None:
                chunk["certificates"].append(cert)
                chunk["renewals"].append(plan)
            if len(chunk["domains"]) >= CHUNK:
                await flush()
        if chunk["domains"]:
            await flush()
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


# -- store queries a worker runs at start or on a timer --------------------------------


async def time_queries(url: str, key: bytes, now: float) -> dict[str, float]:
    store = await open_store(url, key)
    out: dict[str, float] = {}
    try:
        calls: list[tuple[str, Any]] = [
            ("last_event_id", lambda: store.last_event_id()),
            (
                "suspended page (state index)",
                lambda: store.list_domains_page(limit=1000, state=DomainState.SUSPENDED),
            ),
            ("hosts_needing_maintenance(200)", lambda: store.hosts_needing_maintenance(now, 200)),
            ("next_maintenance_at", lambda: store.next_maintenance_at()),
            ("due_for_check(100)", lambda: store.due_for_check(now, 100)),
            ("count_domains_by_state (gauge)", lambda: store.count_domains_by_state()),
            ("certificate_summary (gauge)", lambda: store.certificate_summary(now, 14 * DAY)),
            ("renewal_summary (gauge)", lambda: store.renewal_summary(now, DAY)),
            ("soonest_expiries(10)", lambda: store.soonest_expiries(10)),
        ]
        if hasattr(store, "renewal_load"):
            start = math.floor((now + 15 * DAY) / SLOT_SECONDS) * SLOT_SECONDS
            calls.append(
                (
                    "renewal_load(45 d in 3 h slots)",
                    lambda: store.renewal_load(start, start + 45 * DAY, SLOT_SECONDS),
                )
            )
        for label, call in calls:
            started = time.perf_counter()
            await call()
            out[label] = time.perf_counter() - started
    finally:
        await store.close()
    return out


async def store_lookups(
    url: str, key: bytes, hosts: list[str], *, concurrent: bool = True
) -> list[float]:
    """The store reads of a cold handshake (proxy/tls/certificates.py `_resolve`): the
    certificate and the domain, at once (`concurrent`, as the click path reads them) or
    one after the other (as it did before)."""
    store = await open_store(url, key)
    samples = []
    try:
        for host in hosts:
            started = time.perf_counter()
            if concurrent:
                cert, domain = await asyncio.gather(
                    store.get_certificate(host), store.get_domain(host)
                )
            else:
                cert = await store.get_certificate(host)
                domain = await store.get_domain(host)
            samples.append(time.perf_counter() - started)
            assert cert is not None and domain is not None, host
    finally:
        await store.close()
    return samples


# -- the edge --------------------------------------------------------------------------


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


async def run_backend(ip: str) -> tuple[Any, str]:
    from aiohttp import web

    async def answer(_request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "https://example.com/"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port(ip)
    await web.TCPSite(runner, ip, port).start()
    return runner, f"http://{ip}:{port}"


async def click(ctx: Any, port: int, host: str, timeout: float = 5.0) -> int:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(EDGE_IP, port, ssl=ctx, server_hostname=host), timeout
    )
    try:
        writer.write(f"GET /c/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), timeout)
        return int(line.split()[1])
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def handshake_time(ctx: Any, port: int, host: str) -> float:
    sock = socket.create_connection((EDGE_IP, port), timeout=5)
    sock.setblocking(False)
    started = time.perf_counter()
    _reader, writer = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=host)
    took = time.perf_counter() - started
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return took


def cpu_seconds(pid: int, *, precise: bool = False) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total if precise else round(total, 2)


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


async def serve_and_click(
    args: argparse.Namespace, url: str, key_text: str, pki: Pki, workdir: Path, hosts: list[str]
) -> dict[str, Any]:
    import ssl

    from proxy.demo.dnsserver import DNSServer
    from proxy.demo.pebble import PebbleServer

    result: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        dns = DNSServer()
        dns.start()
        stack.callback(dns.stop)
        dns.set_a(TARGET, [EDGE_IP])
        pebble = PebbleServer(
            workdir / "pebble",
            dns.nameserver,
            http_port=free_port("127.0.0.1"),
            tls_port=free_port("127.0.0.1"),
        )
        pebble.start()
        stack.callback(pebble.stop)
        runner, backend_url = await run_backend("127.0.0.1")
        https_port = free_port(EDGE_IP)
        metrics_port = free_port(EDGE_IP)
        env = {
            **os.environ,
            "LINKEDGE_LISTEN_HTTPS": f"{EDGE_IP}:{https_port}",
            "LINKEDGE_LISTEN_HTTP": f"{EDGE_IP}:{free_port(EDGE_IP)}",
            "LINKEDGE_BACKEND_URL": backend_url,
            "LINKEDGE_EDGE_CNAME_TARGET": TARGET,
            "LINKEDGE_ACME_DIRECTORY": pebble.directory_url,
            "LINKEDGE_ACME_CA_BUNDLE": str(pebble.ca_bundle),
            "LINKEDGE_STORE_URL": url,
            "LINKEDGE_STORE_KEY": key_text,
            "LINKEDGE_DNS_NAMESERVERS": dns.nameserver,
            "LINKEDGE_METRICS_LISTEN": f"{EDGE_IP}:{metrics_port}",
            "LINKEDGE_LOG_LEVEL": "warning",
            "LINKEDGE_ADMIN_LISTEN": "",
            # the node's local copy of a PostgreSQL store: the run's own, not the default path
            "LINKEDGE_STORE_LOCAL_COPY": str(workdir / "local-copy.db"),
            # no background re-checks: the run's DNS server knows none of the million names,
            # so the verifier would move every host it re-checks (and change the kept store)
            "LINKEDGE_VERIFY_POLL_SECONDS": "0",
        }
        ctx = ssl.create_default_context(cadata=pki.ca_pem.decode())
        first = hosts[0]
        if args.starts:  # the start alone, N times per code root, interleaved
            result["starts"] = await repeated_starts(args, env, ctx, https_port, first, workdir)
            await runner.cleanup()
            return result
        root = args.edge_root or ROOT
        compile_bytecode(root)
        proc, took, status = await start_edge(env, ctx, https_port, first, workdir, root)
        stack.callback(_stop, proc)
        result["start_to_first_click_s"] = round(took, 3)
        # CPU seconds the serve process spent until then (user + system): what the start
        # costs, less sensitive than wall time to a busy machine
        result["serve_cpu_to_first_click_s"] = cpu_seconds(proc.pid)
        result["first_click_status"] = status
        result["rss_after_first_click_kib"] = proc_status(proc.pid)
        cpu0 = cpu_seconds(proc.pid, precise=True)
        cold = [await handshake_time(ctx, https_port, h) for h in hosts[1:]]
        cpu1 = cpu_seconds(proc.pid, precise=True)
        # the edge's own measure of a cold lookup: ClientHello to the host's context
        # chosen (store reads and the context built), apart from the handshake around it
        result["certificate_wait"] = await certificate_waits(metrics_port)
        warm = [await handshake_time(ctx, https_port, h) for h in hosts[1:]]
        cpu2 = cpu_seconds(proc.pid, precise=True)
        # the worker's CPU per handshake (ms): a cold one reads the store and builds the
        # host's context; the difference is the lookup's own cost, whatever the load
        n = len(hosts) - 1
        result["serve_cpu_per_cold_handshake_ms"] = round((cpu1 - cpu0) / n * 1000, 3)
        result["serve_cpu_per_warm_handshake_ms"] = round((cpu2 - cpu1) / n * 1000, 3)
        result["cold_handshake"] = stats_ms(cold)
        result["warm_handshake"] = stats_ms(warm)
        result["cold_minus_warm_p50_ms"] = round(
            (statistics.median(cold) - statistics.median(warm)) * 1000, 3
        )
        result["rss_after_lookups_kib"] = proc_status(proc.pid)
        await asyncio.sleep(args.idle)  # the background loops' first passes at scale
        result[f"rss_after_{args.idle:.0f}s_kib"] = proc_status(proc.pid)
        result["serve_log_tail"] = (
            (workdir / "serve.log").read_text(errors="replace").splitlines()[-5:]
        )
        await runner.cleanup()
    return result


async def certificate_waits(metrics_port: int) -> dict[str, Any]:
    """`linkedge_tls_certificate_wait_seconds` from the worker's /metrics: every handshake
    whose context was not in memory, by bucket (cumulative counts) and the share within
    5 ms."""
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{EDGE_IP}:{metrics_port}/metrics") as resp,
    ):
        text = await resp.text()
    name = "linkedge_tls_certificate_wait_seconds"
    buckets = {
        m.group(1): float(m.group(2))
        for m in re.finditer(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', text, re.M)
    }
    count = buckets.get("+Inf", 0.0)
    return {
        "handshakes": int(count),
        "within_5ms_share": round(buckets.get("0.005", 0.0) / count, 3) if count else None,
        "share_by_bucket": {
            le: round(n / count, 3) for le, n in buckets.items() if count and float(le) <= 0.1
        },
    }


def compile_bytecode(root: Path) -> None:
    """Byte-compile a checkout's packages, as `pip install` does on a deployed node: this
    machine sets PYTHONDONTWRITEBYTECODE, so a worktree never gets its .pyc files and
    every start would compile the whole edge from source first (~0.3 s of CPU)."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j0", "proxy", "certstore", "acme_client"],
        cwd=root,
        check=True,
    )


async def start_edge(
    env: dict[str, str], ctx: Any, port: int, host: str, workdir: Path, root: Path
) -> tuple[subprocess.Popen[bytes], float, int]:
    """Exec `linkedge serve --workers 1` from `root`'s code; poll until `host` answers
    over HTTPS. Returns the process (running), the seconds from exec to that answer,
    and its status. The console script's module where the checkout has it: its
    re-exec with the allocator set is part of every start."""
    import ssl

    log_path = workdir / "serve.log"
    launch = "proxy.app.launch" if (root / "proxy/app/launch.py").exists() else "proxy.app.cli"
    with log_path.open("wb") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", launch, "serve", "--workers", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**env, "PYTHONPATH": str(root)},
            cwd=root,
        )
    deadline = started + 120
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve exited {proc.returncode}:\n{log_path.read_text()}")
        try:
            status = await click(ctx, port, host)
            return proc, time.perf_counter() - started, status
        except (OSError, TimeoutError, ssl.SSLError):
            await asyncio.sleep(0.01)
    _stop(proc)
    raise SystemExit(f"no answer from the edge within 120 s:\n{log_path.read_text()}")


async def repeated_starts(
    args: argparse.Namespace, env: dict[str, str], ctx: Any, port: int, host: str, workdir: Path
) -> dict[str, Any]:
    """`--starts N`: start to first click N times for each code root (this checkout and
    every `--start-root`), interleaved so that each sees the same machine; the worker's
    CPU seconds beside the wall time."""
    roots = [ROOT, *args.start_root]
    for root in roots:
        compile_bytecode(root)
    runs: dict[str, dict[str, list[float]]] = {str(r): {"wall_s": [], "cpu_s": []} for r in roots}
    for _ in range(args.starts):
        for root in roots:
            proc, took, status = await start_edge(env, ctx, port, host, workdir, root)
            cpu = cpu_seconds(proc.pid, precise=True)
            _stop(proc)
            if status != 302:
                raise SystemExit(f"first click answered {status}")
            runs[str(root)]["wall_s"].append(round(took, 3))
            runs[str(root)]["cpu_s"].append(round(cpu, 2))
    return {
        root: {
            **samples,
            "wall_median_s": round(statistics.median(samples["wall_s"]), 3),
            "cpu_median_s": round(statistics.median(samples["cpu_s"]), 2),
        }
        for root, samples in runs.items()
    }


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the renewal year ---------------------------------------------------------------------


MEAN_CYCLE = 56.25 * DAY  # the uniform ratio rule's mean: the middle of days 52.5-60


def steady_history(start: float, rnd: random.Random) -> tuple[float, float]:
    """(not_before, due_at) at `start` of a host renewed by the uniform ratio rule for
    several cycles: first issued at a uniformly random phase of one mean cycle three
    cycles back, then renewed at each plan's moment until the plan lies ahead. A fleet
    of these renews at a steady rate from the first day (no ramp, no gap)."""
    nb = start - (3 + rnd.random()) * MEAN_CYCLE
    due = ratio_window(nb, nb + LIFETIME).pick(rnd.random)
    while due < start:
        nb = due
        due = ratio_window(nb, nb + LIFETIME).pick(rnd.random)
    return nb, due


@dataclass
class Scenario:
    """What the renewal year replays: issuance events (moment, host index; a host seen
    again is re-issued: a new certificate, its plan dropped, as ``put_certificate``
    does), how many hosts exist before the loop with plans the uniform rule made, and
    when the loop starts (before `start`: a warm-up whose orders are not counted)."""

    events: list[tuple[float, int]]
    initial_hosts: int
    loop_start: float
    description: str


def growth_scenario(hosts: int, start: float, seed: int = 5) -> Scenario:
    """The growing fleet:

    - 40 % of the hosts exist at the start, in the steady state of the uniform ratio
      rule (``steady_history``: renewals at a steady rate from day 0), each with a plan
      as that rule made it (the store the leveling scheduler is deployed onto);
    - 20 % arrive in one day at day 30 (a platform migrating to the edge);
    - 10 % arrive in one day at day 200 (a second, smaller migration);
    - 30 % arrive steadily over the year (organic growth).
    """
    rnd = random.Random(seed)
    base = int(hosts * 0.4)
    burst1 = int(hosts * 0.2)
    burst2 = int(hosts * 0.1)
    growth = hosts - base - burst1 - burst2
    times = [start + 30 * DAY + rnd.random() * DAY for _ in range(burst1)]
    times += [start + 200 * DAY + rnd.random() * DAY for _ in range(burst2)]
    times += [start + rnd.random() * YEAR for _ in range(growth)]
    times.sort()
    return Scenario(
        [(t, base + i) for i, t in enumerate(times)],
        base,
        start,
        "growth: 40 % steady at the start (uniform plans), +20 % in one day at day 30,"
        " +10 % in one day at day 200, +30 % steadily over the year",
    )


STEADY_WARMUP = 120 * DAY


def steady_scenario(hosts: int, start: float, seed: int = 5) -> Scenario:
    """No growth, certificates issued in bursts, every plan the scheduler's:

    - the loop starts 120 days before the year (a warm-up, not counted): 40 % of the
      hosts get their first certificate steadily over its first 60 days, 30 % in one
      day 50 days before the year, 30 % in one day 20 days before it;
    - during the year nobody arrives, but 30 % of the certificates (a random third of
      the fleet) are re-issued in one day at day 100 (a CA's mass revocation, a key
      rotation): their plans are dropped and made again.
    """
    rnd = random.Random(seed)
    loop_start = start - STEADY_WARMUP
    steady = int(hosts * 0.4)
    burst1 = int(hosts * 0.3)
    events = [(loop_start + rnd.random() * 60 * DAY, i) for i in range(steady)]
    events += [(start - 50 * DAY + rnd.random() * DAY, steady + i) for i in range(burst1)]
    events += [(start - 20 * DAY + rnd.random() * DAY, i) for i in range(steady + burst1, hosts)]
    reissued = rnd.sample(range(hosts), int(hosts * 0.3))
    events += [(start + 100 * DAY + rnd.random() * DAY, i) for i in reissued]
    events.sort()
    return Scenario(
        events,
        0,
        loop_start,
        "steady: no growth; 40 % steadily, 30 % in one day (day -50), 30 % in one day"
        " (day -20), planned by the scheduler from a 120-day warm-up; 30 % re-issued in"
        " one day at day 100",
    )


async def simulate(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """A year of renewals on the real schema, with a simulated clock.

    The fleet is a :class:`Scenario` (``--scenario``: :func:`growth_scenario`,
    :func:`steady_scenario`). The store is the real backend (its tables, indexes and
    queries). From the scenario's loop start (the year's start, or a warm-up before it
    whose orders are not counted), every `--step` seconds of simulated time:
      1. hosts whose certificate is issued by then get it (certificate row, as
         ``put_certificate`` writes it: no plan yet; a re-issued one loses its plan,
         and the planner is told to read the load again);
      2. the scheduler's own query, ``hosts_needing_maintenance(now, batch)``, is asked
         until it returns nothing; for each host it returns:
         - no plan yet: plan it (the planner under test: ``--scheduler``),
         - a plan due: "renew" it (one order, counted in the 3-hour bucket of its plan's
           moment, as the real loop wakes then):
           a new certificate from now, 90 days, and a new plan the same way;
      3. writes go back in bulk through the driver (what ``put_certificate`` and
         ``put_renewal`` write, without sealing a key per renewal: for speed).

    ``uniform``: the shipped ratio rule before leveling (a uniform moment in the last
    quarter of the remaining third). ``level``: proxy.tls.maintenance's planner
    (``RenewalPlanner``), which reads ``renewal_load`` from the store.
    """
    if args.store != "sqlite":
        raise SystemExit("--simulate runs on SQLite only (for now)")
    key = os.urandom(32)
    path = workdir / "sim.db"
    url = f"sqlite:///{path}"
    start = math.floor(time.time() / DAY) * DAY
    sim_now = [start]
    store = await open_store(url, key, clock=lambda: sim_now[0])
    from proxy.tls.maintenance import RenewalPlanner

    # One writer: its own placements keep its snapshot of the load exact, so it re-reads
    # the store once a simulated day (a worker among several: every minute).
    planner = RenewalPlanner(
        store, clock=lambda: sim_now[0], level=args.scheduler == "level", cache_seconds=DAY
    )
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous = OFF")
    db.execute("PRAGMA cache_size = -262144")  # the million rows' indexes stay in memory
    make = steady_scenario if args.scenario == "steady" else growth_scenario
    scenario = make(args.sim_hosts, start)
    events = scenario.events
    pki_chain = b"-----BEGIN CERTIFICATE-----\nsim\n-----END CERTIFICATE-----\n"
    sealed = Sealer(key).seal(b"sim", "cert:sim")  # never opened: the simulation reads no key
    orders: Counter[int] = Counter()
    first_issues: Counter[int] = Counter()
    arrivals: Counter[int] = Counter()  # hosts new to the fleet (not re-issues), per slot
    nb: dict[str, float] = {}
    next_arrival = 0
    steps = 0
    wall = time.perf_counter()
    query_time = 0.0
    late = 0

    def write(rows: list[tuple[str, float, float, float | None]]) -> None:
        """(host, not_before, due_at, renewed) -> certificate (if renewed) + plan."""
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO certificates (hostname, chain_pem, key_sealed, names, not_before,"
            " not_after, issuer, created_at, serial, directory_url) VALUES"
            " (?, ?, ?, ?, ?, ?, 'sim', ?, '', '') ON CONFLICT (hostname) DO UPDATE SET"
            " not_before = excluded.not_before, not_after = excluded.not_after",
            [(h, pki_chain, sealed, h, b, b + LIFETIME, b) for h, b, _d, r in rows if r],
        )
        db.executemany(
            "INSERT INTO renewals (hostname, due_at, next_check_at, source, last_error,"
            " updated_at) VALUES (?, ?, ?, 'ratio', NULL, ?) ON CONFLICT (hostname) DO UPDATE"
            " SET due_at = excluded.due_at, next_check_at = excluded.next_check_at,"
            " updated_at = excluded.updated_at",
            [(h, d, d, b) for h, b, d, _r in rows],
        )
        db.execute("COMMIT")

    # The hosts that exist at the start: certificates and plans as the uniform rule
    # made them, in its steady state (the store the leveling scheduler is deployed onto).
    rnd = random.Random(3)
    initial: list[tuple[str, float, float, float | None]] = []
    for i in range(scenario.initial_hosts):
        h = hostname(i)
        b, due = steady_history(start, rnd)
        nb[h] = b
        initial.append((h, b, due, b))
    for i in range(0, len(initial), CHUNK):
        write(initial[i : i + CHUNK])
    db.execute("ANALYZE")
    end = start + YEAR
    now = scenario.loop_start
    while now < end:
        now += args.step
        sim_now[0] = now
        steps += 1
        new: list[tuple[str, float, float, float | None]] = []
        again: list[str] = []
        while next_arrival < len(events) and events[next_arrival][0] <= now:
            moment, index = events[next_arrival]
            h = hostname(index)
            if h in nb:
                again.append(h)
            else:
                arrivals[math.floor(now / SLOT_SECONDS)] += 1
            nb[h] = moment
            new.append((h, moment, 0.0, moment))
            first_issues[math.floor(now / SLOT_SECONDS)] += 1
            next_arrival += 1
        if new:  # certificate rows without a plan, as put_certificate leaves them
            db.execute("BEGIN")
            db.executemany(
                "INSERT INTO certificates (hostname, chain_pem, key_sealed, names, not_before,"
                " not_after, issuer, created_at, serial, directory_url) VALUES"
                " (?, ?, ?, ?, ?, ?, 'sim', ?, '', '') ON CONFLICT (hostname) DO UPDATE SET"
                " not_before = excluded.not_before, not_after = excluded.not_after",
                [(h, pki_chain, sealed, h, b, b + LIFETIME, b) for h, b, _d, _r in new],
            )
            # a re-issued certificate's plan goes, as put_certificate drops it
            db.executemany("DELETE FROM renewals WHERE hostname = ?", [(h,) for h in again])
            db.execute("COMMIT")
            if again:  # the planner's day-long snapshot still counts the dropped plans
                planner.invalidate()
        while True:
            t0 = time.perf_counter()
            batch = await store.hosts_needing_maintenance(now, args.batch)
            query_time += time.perf_counter() - t0
            if not batch:
                break
            # the plans of the batch in one read (get_renewal per host, in bulk)
            rows = db.execute(
                f"SELECT hostname, due_at FROM renewals WHERE hostname IN"
                f" ({','.join('?' * len(batch))})",
                batch,
            ).fetchall()
            due_of = {r[0]: r[1] for r in rows}
            out: list[tuple[str, float, float, float | None]] = []
            for h in batch:
                due = due_of.get(h)
                if due is None:  # a new certificate: plan it
                    b = nb[h]
                    out.append((h, b, await planner.due_at(b, b + LIFETIME), None))
                    continue
                if due > now:
                    raise AssertionError(f"{h} picked before its plan was due")
                # the real loop wakes at the plan's moment (next_maintenance_at): the
                # order and the new certificate happen at `due`, not at the step's end
                orders[math.floor(due / SLOT_SECONDS)] += 1
                if due > ratio_window(nb[h], nb[h] + LIFETIME).end:
                    late += 1
                nb[h] = due
                out.append((h, due, await planner.due_at(due, due + LIFETIME), due))
            write(out)
        if steps % 240 == 0:
            print(
                f"  day {int((now - start) / DAY):3d}: {sum(orders.values())} renewals,"
                f" {time.perf_counter() - wall:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    await store.close()
    db.close()
    first_bucket = math.floor(start / SLOT_SECONDS)
    buckets = [orders.get(first_bucket + k, 0) for k in range(int(YEAR / SLOT_SECONDS))]
    both = [
        orders.get(first_bucket + k, 0) + first_issues.get(first_bucket + k, 0)
        for k in range(int(YEAR / SLOT_SECONDS))
    ]
    mean = statistics.fmean(buckets)
    # The rate the fleet of each slot needs if every certificate renewed once per cycle
    # at the ratio rule's bound (60 days for 90-day certificates: the longest a plan may
    # wait): fleet size / slots per cycle. A growing fleet's renewals must rise with it;
    # this says how far above that need a slot's orders went.
    cycle_slots = (ratio_window(0.0, LIFETIME).end) / SLOT_SECONDS
    fleet = scenario.initial_hosts + sum(n for k, n in arrivals.items() if k < first_bucket)
    need: list[float] = []
    for k in range(len(buckets)):
        fleet += arrivals.get(first_bucket + k, 0)
        need.append(fleet / cycle_slots)
    over_need = [b / n for b, n in zip(buckets, need, strict=True)]
    if args.json:  # the year bucket by bucket, beside the summary
        args.json.with_suffix(".buckets.json").write_text(json.dumps(buckets))
    local = local_peak(buckets, 120)
    return {
        "scheduler": args.scheduler,
        "scenario": scenario.description,
        "hosts": args.sim_hosts,
        "step_s": args.step,
        "renewal_orders": sum(buckets),
        "renewals_per_3h_mean": round(mean, 1),
        "renewals_per_3h_peak": max(buckets),
        # the goal of a fleet that does not grow: the peak over the whole year's mean
        "peak_over_mean": round(max(buckets) / mean, 3) if mean else None,
        "all_orders_peak_over_mean (first issuance incl.)": round(
            max(both) / statistics.fmean(both), 3
        ),
        # the goal of a growing fleet (30 % organic growth, two migrations): its year's
        # mean is below what the fleet of any late month implies however well spread,
        # so each bucket is compared with the mean of the 30 days around it, over the
        # WHOLE year (its first days included: the window is clipped at the year's ends)
        "peak_over_local_30d_mean": round(local, 3),
        "local_peak_day": round(local_peak_at(buckets, 120) * SLOT_SECONDS / DAY, 1),
        "from_day_60": {
            "peak_over_mean": round(max(buckets[480:]) / statistics.fmean(buckets[480:]), 3),
            "peak_over_local_30d_mean": round(local_peak(buckets, 120, first=480), 3),
        },
        # orders per 3 h over the fleet's own need in that slot (see above)
        "peak_over_fleet_need": round(max(over_need), 3),
        "peak_over_fleet_need_day": round(over_need.index(max(over_need)) * SLOT_SECONDS / DAY, 1),
        "renewed_after_ratio_bound": late,
        "peak_day": round((buckets.index(max(buckets)) * SLOT_SECONDS) / DAY, 1),
        "peak_over_mean_per_30_days": [
            round(max(buckets[m * 240 : (m + 1) * 240]) / mean, 2) for m in range(13)
        ],
        "planner_load_reads": planner.reads,
        "scheduler_query_s": round(query_time, 1),
        "wall_s": round(time.perf_counter() - wall, 1),
    }


def local_ratios(buckets: list[int], half: int) -> list[float]:
    """Each bucket over the mean of the buckets within `half` of it (centered, clipped
    at the year's ends)."""
    prefix = [0]
    for b in buckets:
        prefix.append(prefix[-1] + b)
    out = []
    for k, b in enumerate(buckets):
        lo, hi = max(0, k - half), min(len(buckets), k + half + 1)
        mean = (prefix[hi] - prefix[lo]) / (hi - lo)
        out.append(b / mean if mean else 0.0)
    return out


def local_peak(buckets: list[int], half: int, first: int = 0) -> float:
    """The largest bucket (from `first` on) over the mean of the 2 * `half` + 1 around it."""
    return max(local_ratios(buckets, half)[first:], default=0.0)


def local_peak_at(buckets: list[int], half: int) -> int:
    """The bucket where :func:`local_peak` is found (whole year)."""
    ratios = local_ratios(buckets, half)
    return ratios.index(max(ratios))


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    p.add_argument("--hosts", type=int, default=1_000_000)
    p.add_argument("--cert-share", type=float, default=0.8)
    p.add_argument("--lookups", type=int, default=300)
    p.add_argument("--idle", type=float, default=10.0, help="seconds to watch the worker after")
    p.add_argument("--simulate", action="store_true", help="also run the renewal year")
    p.add_argument("--only-simulate", action="store_true")
    p.add_argument("--scheduler", choices=("uniform", "level"), default="level")
    p.add_argument("--sim-hosts", type=int, default=1_000_000)
    p.add_argument(
        "--scenario",
        choices=("growth", "steady"),
        default="growth",
        help="the renewal year's fleet: growing (bursts of new hosts), or steady (no"
        " growth, certificates issued in bursts)",
    )
    p.add_argument("--step", type=float, default=SLOT_SECONDS, help="simulated s per step")
    p.add_argument("--batch", type=int, default=5000, help="hosts_needing_maintenance limit")
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--store-file",
        type=Path,
        help="SQLite: fill this file once (with its .key and .pki.json beside it), reuse it after;"
        " with --store-url: where that database's .key and .pki.json are kept",
    )
    p.add_argument(
        "--store-url",
        help="PostgreSQL: an existing database (filled on the first run, when --store-file's"
        " .key does not exist yet; reused after) instead of a throwaway server",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--starts",
        type=int,
        default=0,
        help="only time start to first click, N times (no store queries, no lookups)",
    )
    p.add_argument(
        "--edge-root",
        type=Path,
        help="serve (start, lookups) with this checkout's code instead of this one's",
    )
    p.add_argument(
        "--start-root",
        type=Path,
        action="append",
        default=[],
        help="with --starts: also start this checkout's code (e.g. main), interleaved",
    )
    return p.parse_args(argv)


async def amain(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"store": args.store}
    if not args.only_simulate:
        results.update(await scale(args, workdir))
    if args.simulate or args.only_simulate:
        print(f"renewal year, {args.scheduler}, {args.sim_hosts} hosts ...", file=sys.stderr)
        results["renewal_year"] = await simulate(args, workdir)
    return results


async def scale(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"hosts": args.hosts, "cert_share": args.cert_share}
    key_text = generate_key_text()
    key = parse_key_text(key_text, "bench")
    pki = make_pki()
    now = time.time()
    shape = Shape(args.hosts, args.cert_share)
    with contextlib.ExitStack() as stack:
        reuse = False
        sidecar: Path | None = None  # where the key and the PKI of a kept store live
        if args.store == "sqlite":
            path = args.store_file or workdir / "store.db"
            url = f"sqlite:///{path}"
            reuse = path.exists()
            sidecar = path if args.store_file is not None else None
        elif args.store_url:  # a PostgreSQL database kept between runs (filled by the first)
            url = args.store_url
            sidecar = args.store_file
            if sidecar is None:
                raise SystemExit("--store-url needs --store-file (where its key is kept)")
            reuse = sidecar.with_suffix(".key").exists()
        else:
            from support.postgres import PostgresServer

            pg = PostgresServer()
            pg.start()
            stack.callback(pg.destroy)
            url = pg.url(pg.create_database("scale"))
        if sidecar is not None:  # the same key and PKI each time: kept beside it
            key_file = sidecar.with_suffix(".key")
            if not key_file.exists():
                key_file.write_text(key_text)
            key_text = key_file.read_text()
            key = parse_key_text(key_text, "bench")
            pki_file = sidecar.with_suffix(".pki.json")
            if pki_file.exists():
                fields = json.loads(pki_file.read_text())
                pki = Pki(**{k: v.encode() if k.endswith("_pem") else v for k, v in fields.items()})
            else:
                fields = {
                    k: v.decode() if isinstance(v, bytes) else v for k, v in vars(pki).items()
                }
                pki_file.write_text(json.dumps(fields))
        started = time.perf_counter()
        await (await open_store(url, key)).close()  # the schema, as the backend makes it
        if reuse:  # a store kept by --store-file (migrated now if this code is newer)
            out["reused_store_open_s"] = round(time.perf_counter() - started, 1)
        elif args.store == "sqlite":
            fill_sqlite(path, key, shape, pki, now)
        else:
            await fill_postgresql(url, key, shape, pki, now)
        if args.store == "sqlite":
            out["store_bytes"] = path.stat().st_size
        if not reuse:
            out["fill_s"] = round(time.perf_counter() - started, 1)
            print(f"filled {args.hosts} hosts in {out['fill_s']} s", file=sys.stderr, flush=True)
        if not args.starts:
            queries = await time_queries(url, key, now)
            out["store_queries_ms"] = {k: round(v * 1000, 2) for k, v in queries.items()}
        certified = [
            i for i in range(int(args.hosts * args.cert_share)) if i % 1000 != 999
        ]  # active ones (every 1000th is suspended)
        picks = random.Random(1).sample(certified, args.lookups * 2 + 1)
        if not args.starts:
            reads = [hostname(i) for i in picks[args.lookups + 1 :]]
            half = len(reads) // 2  # other hosts for each way: both cold
            out["store_reads_of_a_cold_lookup"] = stats_ms(
                await store_lookups(url, key, reads[:half])
            )
            out["store_reads_of_a_cold_lookup_one_after_the_other"] = stats_ms(
                await store_lookups(url, key, reads[half:], concurrent=False)
            )
        out.update(
            await serve_and_click(
                args, url, key_text, pki, workdir, [hostname(i) for i in picks[: args.lookups + 1]]
            )
        )
    return out


@contextlib.contextmanager
def _workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="linkedge-bench-scale-"))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with _workdir(args.keep) as workdir:
        results = asyncio.run(amain(args, workdir))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
