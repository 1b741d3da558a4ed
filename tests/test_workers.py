"""Issue 2, scenario 6: `linkedge serve --workers 2` shares challenges and orders."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from conftest import free_port

from certstore import SQLiteStore, generate_key_text
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
                [sys.executable, "-m", "proxy.cli", "serve", "--workers", "2"],
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


@pytest.fixture
def two_workers(
    tmp_path: Path, pebble: PebbleServer, dns_server: DNSServer, backend
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
    }
    serve = ServeProcess(env, tmp_path / "serve.log")
    try:
        serve.wait_ready(2)
        yield serve, env, https_port
    finally:
        serve.stop()
    assert serve.proc.returncode == 0, serve.log()


async def open_store(env: dict[str, str]) -> SQLiteStore:
    return await SQLiteStore.open(
        env["LINKEDGE_STORE_PATH"], parse_key_text(env["LINKEDGE_STORE_KEY"], "test")
    )


def worker_pids(log: str) -> set[str]:
    return set(re.findall(r"\[(\d+)\] proxy\.edge: edge worker ready", log))


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
