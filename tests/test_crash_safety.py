"""Issue 8, part 6: a crash mid-issuance costs seconds and loses nothing.

A `linkedge serve` process is SIGKILLed 0-80 ms into a first click on a new host, 12
times, each time restarted. Every host must be served within 15 s of the restart, the
CA must have issued at most one certificate per host (the process that takes over
resumes the order in flight instead of placing a second one), and SQLite's integrity
check must pass after every round.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.edge import client_context, tls_handshake
from support.net import free_port
from support.pebble import running_pebble

from certstore import generate_key_text, open_store
from certstore.crypto import parse_key_text
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer

IP = "127.0.0.78"
TARGET = "edge-crash.linkedge.test"
ROUNDS = 12
SERVED_WITHIN = 15.0


@pytest.fixture
def own_pebble(
    dns_server: DNSServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PebbleServer]:
    with running_pebble(tmp_path_factory.mktemp("pebble-crash"), dns_server) as server:
        yield server


class Serve:
    """`linkedge serve` (one worker, in the serving process itself) logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0

    def start(self, timeout: float = 30) -> None:
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy.app.cli", "serve", "--workers", "1"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
            )
        deadline = time.monotonic() + timeout
        while "edge worker ready" not in self.log()[self._offset :]:
            assert self.proc.poll() is None, self.log()[self._offset :]
            assert time.monotonic() < deadline, self.log()[self._offset :]
            time.sleep(0.02)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def integrity(db: str) -> str:
    with sqlite3.connect(db) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


async def click(host: str, port: int, pebble: PebbleServer, timeout: float = 5) -> bool:
    try:
        await tls_handshake(IP, port, host, client_context(pebble), timeout=timeout)
    except (ssl.SSLError, OSError, TimeoutError):
        return False
    return True


async def test_sigkill_during_first_clicks_loses_nothing(
    tmp_path: Path, own_pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    dns_server.set_a(TARGET, [IP])
    key_text = generate_key_text()
    https_port = free_port(IP)
    db = str(tmp_path / "store.db")
    env = {
        "LINKEDGE_LISTEN_HTTPS": f"{IP}:{https_port}",
        "LINKEDGE_LISTEN_HTTP": f"{IP}:{own_pebble.http_port}",
        "LINKEDGE_BACKEND_URL": backend[0],
        "LINKEDGE_EDGE_CNAME_TARGET": TARGET,
        "LINKEDGE_ACME_DIRECTORY": own_pebble.directory_url,
        "LINKEDGE_ACME_CA_BUNDLE": str(own_pebble.ca_bundle),
        "LINKEDGE_ACME_ORDER_TIMEOUT": "30",
        "LINKEDGE_STORE_PATH": db,
        "LINKEDGE_STORE_KEY": key_text,
        "LINKEDGE_DNS_NAMESERVERS": dns_server.nameserver,
        "LINKEDGE_ADMIN_LISTEN": "",
        "LINKEDGE_VERIFY_POLL_SECONDS": "0",  # only clicks order (no proactive issuance)
        "LINKEDGE_TLS_ISSUANCE_WAIT": "30",
    }
    serve = Serve(env, tmp_path / "serve.log")
    store = await open_store(db, parse_key_text(key_text, "test"))
    # Pebble's line for a finalization it accepted: a killed process's finalize POST can
    # reach Pebble cut short (logged as a request, refused), and issues nothing
    finalizing = "is fully authorized. Processing finalization"
    finalized_before = own_pebble.log_text().count(finalizing)
    hosts = [f"links.crash{i}-{os.getpid()}.test" for i in range(ROUNDS)]
    waits: list[float] = []
    in_flight = 0  # rounds killed with an order recorded in the store
    try:
        serve.start()
        for i, host in enumerate(hosts):
            await store.add_domain(host, "acct")
            dns_server.set_cname(host, TARGET)
            kill_after = 0.080 * i / (ROUNDS - 1)  # spread over 0-80 ms into the click
            attempt = asyncio.ensure_future(click(host, https_port, own_pebble, timeout=3))
            await asyncio.sleep(kill_after)
            serve.kill()
            await attempt
            assert integrity(db) == "ok", f"round {i}"
            if await store.get_pending_order(host) is not None:
                in_flight += 1

            restarted = time.monotonic()
            serve.start()
            while not await click(host, https_port, own_pebble):
                assert time.monotonic() - restarted < SERVED_WITHIN, serve.log()[-4000:]
                await asyncio.sleep(0.1)
            waits.append(time.monotonic() - restarted)
            assert waits[-1] < SERVED_WITHIN, (i, waits)
        serve.stop()
        assert integrity(db) == "ok"
        for host in hosts:
            cert = await store.get_certificate(host)
            assert cert is not None, host
            issued = [e for e in await store.list_events(host) if e.kind == "issued"]
            assert len(issued) == 1, (host, issued)
            assert await store.get_pending_order(host) is None
        finalized = own_pebble.log_text().count(finalizing) - finalized_before
        assert finalized == ROUNDS  # one certificate per host at the CA: none lost, none twice
        log = serve.log()
        assert "Traceback" not in log, log[-4000:]
        print(
            f"served after restart: max {max(waits):.2f} s, mean {sum(waits) / len(waits):.2f} s;"
            f" killed with an order in flight: {in_flight}, resumed: {log.count('resuming order')},"
            f" leases released at start: {log.count('lease(s) of earlier processes')}"
        )
    finally:
        serve.stop()
        await store.close()
