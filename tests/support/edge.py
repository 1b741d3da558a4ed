"""An edge worker a test starts, and what a test needs to talk to it."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from certstore import Store, generate_key_text, open_store
from certstore.crypto import parse_key_text
from proxy.app.config import Config
from proxy.app.wiring import EdgeWorker
from proxy.demo.backend import HEALTH_PATH
from proxy.demo.client import edge_session, verifying_context
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer
from support.net import free_port, next_edge_address


@dataclass
class EdgeHandle:
    """A running edge worker plus what a test needs to talk to it."""

    ip: str
    target: str
    config: Config
    key_text: str
    worker: EdgeWorker | None = None
    hosts: list[str] = field(default_factory=list)
    clock: Callable[[], float] = time.time  # the worker's and the store's

    @property
    def https_port(self) -> int:
        return int(self.config.listen.https.rsplit(":", 1)[1])

    @property
    def http_port(self) -> int:
        return int(self.config.listen.http.rsplit(":", 1)[1])

    async def start(self, clock: Callable[[], float] | None = None) -> None:
        if clock is not None:
            self.clock = clock
        self.worker = EdgeWorker(self.config, self.clock)
        await self.worker.start()

    async def stop(self) -> None:
        if self.worker is not None:
            await self.worker.close()
            self.worker = None

    async def restart(self) -> None:
        """A new worker on the same config, store and clock."""
        await self.stop()
        await self.start()

    async def open_store(self) -> Store:
        return await open_store(
            self.config.store.path, parse_key_text(self.key_text, "test"), clock=self.clock
        )

    async def followed(self, event_id: int) -> None:
        """Wait until the in-process worker has applied the store's events up to event_id."""
        assert self.worker is not None and self.worker.state_sync is not None
        for _ in range(200):
            if self.worker.state_sync.cursor >= event_id:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"the worker did not follow event {event_id} within 10 s")

    async def run_maintenance(self) -> int:
        """One pass of the renewal loop (tests that set renewal.interval_seconds = 0)."""
        assert self.worker is not None and self.worker.maintainer is not None
        return await self.worker.maintainer.run_once()


class FakeClock:
    """Wall-clock time plus an offset the test moves forward (schedules, grace periods,
    renewal windows)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def advance_to(self, moment: float) -> None:
        self.offset += max(moment - self(), 0.0)


ADMIN_TOKEN = "test-admin-token-0123456789abcdef"


def enable_admin(handle: EdgeHandle, tmp_path: Path) -> str:
    """Turn the admin listener on (token in a file); returns its base URL."""
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    port = free_port(handle.ip)
    handle.config.admin.listen = f"{handle.ip}:{port}"
    handle.config.admin.token_file = str(token_file)
    handle.config.admin.token_env = ""
    # wrong tokens are slowed down per source (tests/test_admin_hardening.py): keep the
    # steps short for the tests that send many on purpose
    handle.config.admin.auth_delay_seconds = 0.001
    handle.config.admin.auth_max_delay_seconds = 0.05
    return f"http://{handle.ip}:{port}"


def make_config(
    tmp_path: Path, ip: str, target: str, pebble: PebbleServer, dns: DNSServer, backend_url: str
) -> Config:
    config = Config()
    config.listen.https = f"{ip}:{free_port(ip, avoid={pebble.http_port})}"
    config.listen.http = f"{ip}:{pebble.http_port}"
    config.backend.url = backend_url
    config.backend.timeout = 5
    config.backend.health_path = HEALTH_PATH
    config.edge.cname_target = target
    config.acme.directory = pebble.directory_url
    config.acme.ca_bundle = str(pebble.ca_bundle)
    config.acme.order_timeout = 30
    config.store.path = str(tmp_path / "store.db")
    config.store.key_file = str(tmp_path / "store.key")
    config.store.key_env = ""
    config.dns.nameservers = [dns.nameserver]
    config.dns.timeout = 2
    config.tls.issuance_wait = 30
    config.tls.hello_timeout = 2
    config.admin.listen = ""  # tests that need the admin API turn it on
    config.verify.poll_seconds = 0  # tests drive the verifier themselves (no timing)
    config.checks.https_port = int(config.listen.https.rsplit(":", 1)[1])
    config.checks.https_addresses = [ip]  # loopback: dialled only because it is listed
    config.checks.ca_bundle = str(pebble.root_path)
    config.checks.https_timeout = 10
    return config


def new_edge(tmp_path: Path, pebble: PebbleServer, dns: DNSServer, backend_url: str) -> EdgeHandle:
    """A configured (not started) edge on a fresh 127.0.0.N whose target name resolves."""
    ip, target = next_edge_address()
    dns.set_a(target, [ip])
    key_text = generate_key_text()
    (tmp_path / "store.key").write_text(key_text)
    config = make_config(tmp_path, ip, target, pebble, dns, backend_url)
    return EdgeHandle(ip=ip, target=target, config=config, key_text=key_text)


def client_context(pebble: PebbleServer) -> ssl.SSLContext:
    """A strict TLS client context trusting only Pebble's issuing root."""
    return verifying_context(str(pebble.root_path))


def https_session(
    edge: EdgeHandle, pebble: PebbleServer, **kwargs: object
) -> aiohttp.ClientSession:
    return edge_session(edge.ip, str(pebble.root_path), **kwargs)


async def register(store: Store, dns: DNSServer, host: str, target: str) -> None:
    await store.add_domain(host, "acct-test")
    dns.set_cname(host, target)


async def tls_handshake(
    ip: str, port: int, server_name: str | None, ctx: ssl.SSLContext, timeout: float = 30
) -> ssl.SSLObject | None:
    """One raw TLS handshake; returns the peer certificate's SSL object info."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(ip, port, ssl=ctx, server_hostname=server_name), timeout
    )
    obj = writer.get_extra_info("ssl_object")
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, ssl.SSLError):
        pass
    return obj
