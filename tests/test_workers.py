"""Issue 2, scenario 6: `linkedge serve --workers 2` shares challenges and orders."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from support.net import free_port

from certstore import DomainState, Store, generate_key_text
from certstore import open_store as open_store_url
from certstore.crypto import parse_key_text
from proxy.demo.client import edge_session
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer

IP = "127.0.0.77"
TARGET = "edge-workers.linkedge.test"


class ServeProcess:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy.app.cli", "serve", "--workers", "2"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, workers: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count("edge worker ready") >= workers:
                return
            assert self.proc.poll() is None, self.log()
            time.sleep(0.1)
        raise AssertionError(f"workers not ready:\n{self.log()}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class HookReceiver:
    """Records webhook deliveries (a thread, so it runs beside sync fixtures)."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.bodies: list[bytes] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                owner.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooks() -> Iterator[HookReceiver]:
    receiver = HookReceiver()
    yield receiver
    receiver.close()


ADMIN_TOKEN = "workers-admin-token-0123456789"


@pytest.fixture
def two_workers(
    tmp_path: Path, pebble: PebbleServer, dns_server: DNSServer, backend, hooks
) -> Iterator[tuple[ServeProcess, dict[str, str], int]]:
    dns_server.set_a(TARGET, [IP])
    key_text = generate_key_text()
    https_port = free_port(IP)
    env = {
        "LINKEDGE_LISTEN_HTTPS": f"{IP}:{https_port}",
        "LINKEDGE_LISTEN_HTTP": f"{IP}:{pebble.http_port}",
        "LINKEDGE_BACKEND_URL": backend[0],
        "LINKEDGE_EDGE_CNAME_TARGET": TARGET,
        "LINKEDGE_ACME_DIRECTORY": pebble.directory_url,
        "LINKEDGE_ACME_CA_BUNDLE": str(pebble.ca_bundle),
        "LINKEDGE_STORE_PATH": str(tmp_path / "store.db"),
        "LINKEDGE_STORE_KEY": key_text,
        "LINKEDGE_DNS_NAMESERVERS": dns_server.nameserver,
        "LINKEDGE_ADMIN_LISTEN": f"{IP}:{free_port(IP)}",
        "LINKEDGE_ADMIN_TOKEN": ADMIN_TOKEN,
        "LINKEDGE_VERIFY_POLL_SECONDS": "0.2",
        "LINKEDGE_LIFECYCLE_SYNC_SECONDS": "0.2",
        "LINKEDGE_CHECKS_HTTPS_PORT": str(https_port),
        "LINKEDGE_CHECKS_HTTPS_ADDRESSES": IP,
        "LINKEDGE_CHECKS_CA_BUNDLE": str(pebble.root_path),
        "LINKEDGE_WEBHOOKS_URL": hooks.url,
        "LINKEDGE_WEBHOOK_SECRET": "webhook-secret-0123456789",
    }
    serve = ServeProcess(env, tmp_path / "serve.log")
    try:
        serve.wait_ready(2)
        yield serve, env, https_port
    finally:
        serve.stop()
    assert serve.proc.returncode == 0, serve.log()


async def open_store(env: dict[str, str]) -> Store:
    return await open_store_url(
        env["LINKEDGE_STORE_PATH"], parse_key_text(env["LINKEDGE_STORE_KEY"], "test")
    )


def worker_pids(log: str) -> set[str]:
    return set(re.findall(r"\[(\d+)\] proxy\.app\.wiring: edge worker ready", log))


async def test_challenge_token_answered_by_every_worker(two_workers, pebble: PebbleServer) -> None:
    serve, env, _ = two_workers
    store = await open_store(env)  # a third process writes the token
    await store.put_challenge("tok-" + "a" * 40, "tok-keyauth.thumbprint", "links.w.test")
    url = f"http://{IP}:{pebble.http_port}/.well-known/acme-challenge/tok-{'a' * 40}"
    for _ in range(30):  # new connection each time: SO_REUSEPORT spreads them
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            async with s.get(url) as resp:
                assert resp.status == 200
                assert await resp.text() == "tok-keyauth.thumbprint"
    await store.close()
    served_by = set(re.findall(r"served ACME challenge token tok-a+ \(worker (\d+)\)", serve.log()))
    assert served_by == worker_pids(serve.log()) and len(served_by) == 2


async def test_one_order_per_name_across_workers(
    two_workers, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    serve, env, https_port = two_workers
    host = "links.workers.test"
    store = await open_store(env)
    await store.add_domain(host, "acct")
    dns_server.set_cname(host, TARGET)
    before = pebble.order_count()

    async def first_click(i: int) -> int:
        async with edge_session(IP, str(pebble.root_path)) as session:
            url = f"https://{host}:{https_port}/c/w{i}"
            async with session.get(url, allow_redirects=False) as resp:
                return resp.status

    statuses = await asyncio.gather(*(first_click(i) for i in range(20)))
    assert statuses == [302] * 20
    assert pebble.order_count() - before == 1
    events = await store.list_events(host)
    assert [e.kind for e in events].count("order_started") == 1
    await store.close()


async def test_admin_checks_and_webhooks_once_across_workers(
    two_workers, pebble: PebbleServer, dns_server: DNSServer, hooks
) -> None:
    """Two processes: one admin listener; each host checked once (leases), verified
    hosts issued without a click, and every transition announced exactly once."""
    serve, env, _ = two_workers
    log = serve.log()
    assert log.count("admin API and status page on") == 1  # only the primary worker
    assert ADMIN_TOKEN not in log and "webhook-secret" not in log  # secrets are never logged
    hosts = [f"links.bg{i}.test" for i in range(6)]
    dns_server.reset_counts()
    before = pebble.order_count()
    base = f"http://{env['LINKEDGE_ADMIN_LISTEN']}"
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(base_url=base, headers=headers) as api:
        for host in hosts:
            dns_server.set_cname(host, TARGET)
            async with api.post("/v1/hosts", json={"hostname": host, "account": "acct"}) as r:
                assert r.status == 201
    store = await open_store(env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the background verifiers of both workers
        states = [(await store.get_domain(h)).state for h in hosts]  # type: ignore[union-attr]
        if all(s is DomainState.ACTIVE for s in states) and len(hooks.bodies) >= 2 * len(hosts):
            break
        await asyncio.sleep(0.2)
    assert states == [DomainState.ACTIVE] * len(hosts), serve.log()
    assert pebble.order_count() - before == len(hosts)
    for host in hosts:
        assert dns_server.query_count(host, "CAA") == 1, host  # one check, not one per worker
    await asyncio.sleep(1.0)  # let a duplicate delivery show up if there were one
    import json

    deliveries = [json.loads(b) for b in hooks.bodies]
    assert sorted((d["host"], d["to"]) for d in deliveries) == sorted(
        (h, to) for h in hosts for to in ("verified", "active")
    )
    await store.close()


async def test_store_files_are_private_in_every_process(two_workers) -> None:
    """Issue 9: a fresh store, its -wal and -shm are 0600 while `serve` runs, and every
    linkedge process (supervisor and workers) runs with umask 077, whatever the umask
    it was started with (pytest's, usually 022)."""
    serve, env, _ = two_workers
    store_path = Path(env["LINKEDGE_STORE_PATH"])
    for path in (store_path, Path(f"{store_path}-wal"), Path(f"{store_path}-shm")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    pids = {str(serve.proc.pid), *worker_pids(serve.log())}
    assert len(pids) == 3
    for pid in pids:
        status = Path(f"/proc/{pid}/status").read_text()
        assert re.search(r"^Umask:\s+0077$", status, re.M), (pid, status[:300])
