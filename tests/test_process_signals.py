"""Issue 13: a `linkedge serve` process stops gracefully on SIGTERM and reloads on SIGHUP.

Real processes (`python -m proxy.app.cli serve`), a real config file on disk that the
test rewrites, real backends (aiohttp servers in the test's loop) and raw HTTP/1.1
keep-alive connections, so "the connection was not dropped" means the same socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NoReturn

import aiohttp
import pytest
from aiohttp import web
from support.clicks import edge_store, new_host
from support.edge import EdgeHandle, client_context, register, tls_handshake
from support.net import free_port

from certstore import generate_key_text, open_store
from certstore.crypto import parse_key_text
from proxy.demo.client import edge_session
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer
from proxy.hosts.leases import lease_name

IP = "127.0.0.78"
TARGET = "edge-signals.linkedge.test"
TOKEN_1 = "first-admin-token-0123456789"
TOKEN_2 = "second-admin-token-9876543210"


class Backend:
    """A tracking backend that names itself in every answer; /slow takes its time."""

    def __init__(self, name: str, slow_seconds: float = 1.5) -> None:
        self.name = name
        self.slow_seconds = slow_seconds
        self.slow_started = asyncio.Event()
        self.paths: list[str] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        async def handle(request: web.Request) -> web.Response:
            self.paths.append(request.path)
            if request.path == "/slow":
                self.slow_started.set()
                await asyncio.sleep(self.slow_seconds)
            return web.Response(text=f"{self.name} {request.path}")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)  # a /slow still running
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class Serve:
    """`linkedge -c FILE serve` with the config file and admin token file in tmp_path."""

    def __init__(
        self, tmp_path: Path, pebble: PebbleServer, workers: int = 1, http_port: int = 0
    ) -> None:
        self.tmp = tmp_path
        self.pebble = pebble
        self.workers = workers
        self.config_path = tmp_path / "linkedge.toml"
        self.token_path = tmp_path / "admin.token"
        self.log_path = tmp_path / "serve.log"
        self.http_port = http_port or free_port(IP)
        self.store_key = generate_key_text()
        self.https_port = free_port(IP)
        self.admin_port = free_port(IP)
        self.proc: subprocess.Popen[bytes] | None = None
        self.dns = "127.0.0.1:53"  # set by tests that need the edge to resolve names

    def write_config(self, backend_url: str, *, token: str = TOKEN_1, extra: str = "") -> None:
        self.token_path.write_text(token + "\n")
        self.config_path.write_text(
            f"""
shutdown_timeout = 10.0
{extra}
[listen]
https = "{IP}:{self.https_port}"
http = "{IP}:{self.http_port}"
[backend]
url = "{backend_url}"
timeout = 20.0
health_interval = 0.5
[edge]
cname_target = "{TARGET}"
[acme]
directory = "{self.pebble.directory_url}"
ca_bundle = "{self.pebble.ca_bundle}"
[dns]
nameservers = ["{self.dns}"]
[store]
path = "{self.tmp / "store.db"}"
key_env = "SIGNALS_TEST_STORE_KEY"
[admin]
listen = "{IP}:{self.admin_port}"
token_file = "{self.token_path}"
token_env = ""
[verify]
poll_seconds = 0
[renewal]
interval_seconds = 0
"""
        )

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LINKEDGE_")}
        env["SIGNALS_TEST_STORE_KEY"] = self.store_key
        args = [sys.executable, "-m", "proxy.app.cli", "-c", str(self.config_path), "serve"]
        if self.workers > 1:
            args += ["--workers", str(self.workers)]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_log(self, text: str, count: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(text) >= count:
                return
            assert self.proc is not None and self.proc.poll() is None, self.log()
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {text!r} ({count}x) in the log:\n{self.log()}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float, since: float | None = None) -> int | None:
        """The exit code once the process ends, waiting up to `timeout` seconds from
        `since` (a monotonic time; now by default); None if it is still running."""
        assert self.proc is not None
        deadline = (time.monotonic() if since is None else since) + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
async def backends() -> AsyncIterator[tuple[Backend, Backend]]:
    a, b = Backend("backend-A"), Backend("backend-B")
    await a.start()
    await b.start()
    yield a, b
    await a.stop()
    await b.stop()


@pytest.fixture
def serve(tmp_path: Path, pebble: PebbleServer) -> AsyncIterator[Serve]:
    process = Serve(tmp_path, pebble)
    yield process  # type: ignore[misc]
    process.stop()


class KeepAlive:
    """One HTTP/1.1 connection, several requests: proof that it stayed open."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> KeepAlive:
        reader, writer = await asyncio.open_connection(IP, port)
        return cls(reader, writer)

    async def get(self, path: str) -> tuple[int, str]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: links.shop.test\r\n\r\n".encode())
        await self.writer.drain()
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 30)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
        assert headers.get("connection", "").lower() != "close", headers
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
        else:
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, body.decode()

    def close(self) -> None:
        self.writer.close()


async def click(port: int, path: str) -> tuple[int, str]:
    conn = await KeepAlive.open(port)
    try:
        return await conn.get(path)
    finally:
        conn.close()


async def admin_status(serve: Serve, token: str) -> int:
    url = f"http://{IP}:{serve.admin_port}/v1/hosts"
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
            return resp.status


async def test_sigterm_finishes_the_click_in_flight_refuses_new_ones_and_exits_0(
    serve: Serve, backends: tuple[Backend, Backend]
) -> None:
    backend, _ = backends
    serve.write_config(backend.url)
    serve.start()
    await serve.wait_log("edge worker ready")
    assert await click(serve.http_port, "/c/before") == (200, "backend-A /c/before")
    idle = await KeepAlive.open(serve.http_port)  # an idle keep-alive connection
    assert (await idle.get("/c/idle"))[0] == 200

    in_flight = asyncio.create_task(click(serve.http_port, "/slow"))
    await asyncio.wait_for(backend.slow_started.wait(), 10)
    sent_at = time.monotonic()
    serve.signal(signal.SIGTERM)
    await serve.wait_log("stopping: no new connections")
    with pytest.raises(ConnectionRefusedError):  # the listener is gone...
        await asyncio.open_connection(IP, serve.http_port)
    assert not in_flight.done()  # ...while the click is still on its way
    assert await in_flight == (200, "backend-A /slow")  # and it arrives whole
    assert await asyncio.wait_for(idle.reader.read(), 5) == b""  # idle ones are closed
    idle.close()
    assert await serve.wait_exit(10, since=sent_at) == 0, serve.log()  # shutdown_timeout
    assert time.monotonic() - sent_at < 10
    assert "Traceback" not in serve.log()


async def test_sigterm_lets_an_https_click_in_flight_finish(
    tmp_path: Path,
    pebble: PebbleServer,
    dns_server: DNSServer,
    backends: tuple[Backend, Backend],
) -> None:
    """The same over HTTPS, with a certificate the process ordered from Pebble itself."""
    backend, _ = backends
    serve = Serve(tmp_path, pebble, http_port=pebble.http_port)  # Pebble validates there
    serve.dns = dns_server.nameserver
    dns_server.set_a(TARGET, [IP])
    host = "links.signals-https.test"
    dns_server.set_cname(host, TARGET)
    try:
        serve.write_config(backend.url)
        serve.start()
        await serve.wait_log("edge worker ready")
        store = await open_store(
            str(tmp_path / "store.db"), parse_key_text(serve.store_key, "test")
        )
        try:
            await store.add_domain(host, "shop")
        finally:
            await store.close()
        url = f"https://{host}:{serve.https_port}"
        async with edge_session(IP, str(pebble.root_path)) as session:
            async with session.get(f"{url}/c/first") as resp:  # the order happens here
                assert (resp.status, await resp.text()) == (200, "backend-A /c/first")

            async def slow() -> tuple[int, str]:
                async with session.get(f"{url}/slow") as resp:
                    return resp.status, await resp.text()

            in_flight = asyncio.create_task(slow())
            await asyncio.wait_for(backend.slow_started.wait(), 10)
            serve.signal(signal.SIGTERM)
            await serve.wait_log("stopping: no new connections")
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(IP, serve.https_port)
            assert await in_flight == (200, "backend-A /slow")
        assert await serve.wait_exit(10) == 0, serve.log()
    finally:
        serve.stop()


async def test_sigterm_cuts_what_outlives_the_deadline(
    serve: Serve, backends: tuple[Backend, Backend]
) -> None:
    backend, _ = backends
    backend.slow_seconds = 60
    serve.write_config(backend.url, extra="log_level = 'info'")
    serve.config_path.write_text(
        serve.config_path.read_text().replace("shutdown_timeout = 10.0", "shutdown_timeout = 1.0")
    )
    serve.start()
    await serve.wait_log("edge worker ready")
    in_flight = asyncio.create_task(click(serve.http_port, "/slow"))
    await asyncio.wait_for(backend.slow_started.wait(), 10)
    sent_at = time.monotonic()
    serve.signal(signal.SIGTERM)
    assert await serve.wait_exit(15, since=sent_at) == 0, serve.log()
    assert time.monotonic() - sent_at < 5  # 1 s deadline, then the rest of the close
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await in_flight


async def test_sighup_switches_backend_and_admin_token_keeping_keepalive_connections(
    serve: Serve, backends: tuple[Backend, Backend]
) -> None:
    a, b = backends
    serve.write_config(a.url)
    serve.start()
    await serve.wait_log("edge worker ready")
    conn = await KeepAlive.open(serve.http_port)
    assert await conn.get("/c/1") == (200, "backend-A /c/1")
    assert await admin_status(serve, TOKEN_1) == 200

    access_log = serve.tmp / "access.log"
    logs = f'log_format = "json"\naccess_log = "{access_log}"\naccess_log_format = "common"'
    serve.write_config(b.url, token=TOKEN_2, extra=logs)
    serve.signal(signal.SIGHUP)
    await serve.wait_log("reloaded configuration")
    # the same connection, the next click: the new backend
    assert await conn.get("/c/2") == (200, "backend-B /c/2")
    assert await click(serve.http_port, "/c/3") == (200, "backend-B /c/3")
    assert "/c/2" not in a.paths and "/c/3" not in a.paths
    assert await admin_status(serve, TOKEN_2) == 200
    assert await admin_status(serve, TOKEN_1) == 401
    conn.close()
    log = serve.log()
    assert "backend.url" in log and "access_log" in log and "log_format" in log
    assert TOKEN_1 not in log and TOKEN_2 not in log
    # the log format and the access log changed with the reload too
    lines = access_log.read_text().splitlines()
    assert any(line.endswith('"GET /c/3 HTTP/1.1" 200 14') for line in lines), lines
    assert all(line.startswith("127.0.0.1 - - [") for line in lines), lines
    serve.stop()
    assert serve.proc is not None and serve.proc.returncode == 0
    tail = serve.log().split("reloaded configuration", 1)[1].splitlines()[1:]
    events = [json.loads(line) for line in tail if line.startswith("{")]
    assert [e["event"] for e in events if "event" in e] == ["draining"]
    assert all(set(e) >= {"ts", "level", "logger", "message"} for e in events)


async def test_sighup_with_a_broken_config_keeps_the_running_one(
    serve: Serve, backends: tuple[Backend, Backend]
) -> None:
    a, b = backends
    serve.write_config(a.url)
    serve.start()
    await serve.wait_log("edge worker ready")
    conn = await KeepAlive.open(serve.http_port)
    assert await conn.get("/c/1") == (200, "backend-A /c/1")

    serve.config_path.write_text(serve.config_path.read_text().replace(a.url, "ftp://nowhere"))
    serve.signal(signal.SIGHUP)
    await serve.wait_log("reload refused")
    assert "must be an http:// or https:// URL" in serve.log()
    assert await conn.get("/c/2") == (200, "backend-A /c/2")

    serve.config_path.write_text("[listen\nbroken = ")  # not even TOML
    serve.signal(signal.SIGHUP)
    await serve.wait_log("reload refused", count=2)
    assert "is not valid TOML" in serve.log()
    assert await conn.get("/c/3") == (200, "backend-A /c/3")
    assert await admin_status(serve, TOKEN_1) == 200

    # a listening address needs a restart: said so, the old one keeps serving
    old_port = serve.http_port
    serve.http_port = free_port(IP)
    serve.write_config(b.url)
    serve.signal(signal.SIGHUP)
    await serve.wait_log("reloaded configuration")
    assert "need a restart and keep their old values until then: listen.http" in serve.log()
    assert await conn.get("/c/4") == (200, "backend-B /c/4")
    assert await click(old_port, "/c/5") == (200, "backend-B /c/5")
    conn.close()
    assert serve.proc is not None and serve.proc.poll() is None


async def test_supervisor_forwards_sighup_and_drains_workers_on_sigterm(
    tmp_path: Path, pebble: PebbleServer, backends: tuple[Backend, Backend]
) -> None:
    a, b = backends
    serve = Serve(tmp_path, pebble, workers=2)
    try:
        serve.write_config(a.url)
        serve.start()
        await serve.wait_log("edge worker ready", count=2)
        assert await click(serve.http_port, "/c/1") == (200, "backend-A /c/1")

        serve.write_config(b.url, extra="no_such_key = 1")
        serve.signal(signal.SIGHUP)
        await serve.wait_log("reload refused")
        assert serve.log().count("reload refused") == 1  # validated once, by the supervisor

        serve.write_config(b.url, token=TOKEN_2)
        serve.signal(signal.SIGHUP)
        await serve.wait_log("reloaded configuration", count=2)  # each worker
        for i in range(10):  # new connections, spread over both workers
            assert await click(serve.http_port, f"/c/n{i}") == (200, f"backend-B /c/n{i}")
        assert await admin_status(serve, TOKEN_2) == 200

        in_flight = asyncio.create_task(click(serve.http_port, "/slow"))
        await asyncio.wait_for(b.slow_started.wait(), 10)
        serve.signal(signal.SIGTERM)
        assert await in_flight == (200, "backend-B /slow")
        assert await serve.wait_exit(15) == 0, serve.log()
    finally:
        serve.stop()


async def test_shutdown_releases_the_leases_of_orders_in_flight(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    """An order still running at the deadline is cancelled and its lease released, so
    another process may order the name at once instead of waiting for the lease to expire."""
    worker = edge.worker
    assert worker is not None and worker.manager is not None
    host = new_host(edge)
    async with edge_store(edge) as store:
        await register(store, dns_server, host, edge.target)
    ordering = asyncio.Event()

    async def slow_issue(*_args: object, **_kwargs: object) -> NoReturn:
        ordering.set()
        await asyncio.Event().wait()  # a CA that never finishes
        raise AssertionError("unreachable")

    worker.manager._issuer.issue = slow_issue  # type: ignore[method-assign]
    click = asyncio.create_task(
        tls_handshake(edge.ip, edge.https_port, host, client_context(pebble))
    )
    await asyncio.wait_for(ordering.wait(), 20)
    async with edge_store(edge) as store:
        assert not await store.try_acquire_lease(lease_name(host), "other-process", 60)
    await worker.drain(0.5)
    await edge.stop()
    with contextlib.suppress(ssl.SSLError, ConnectionError, OSError):
        await click
    async with edge_store(edge) as store:
        assert await store.try_acquire_lease(lease_name(host), "other-process", 60)
