"""Getting a certificate and clicking: helpers of the edge integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import uuid
from collections.abc import AsyncIterator

from certstore import Store
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer
from support.edge import EdgeHandle, https_session, register


@contextlib.asynccontextmanager
async def edge_store(edge: EdgeHandle) -> AsyncIterator[Store]:
    """The edge's store, always closed (an open aiosqlite thread keeps pytest from exiting)."""
    store = await edge.open_store()
    try:
        yield store
    finally:
        await store.close()


def new_host(edge: EdgeHandle, label: str = "links") -> str:
    """A fresh customer host name, unique across the session-scoped DNS server."""
    return f"{label}.c{uuid.uuid4().hex[:10]}-{edge.ip.split('.')[-1]}.test"


def url(edge: EdgeHandle, host: str, path: str = "/c/warm") -> str:
    return f"https://{host}:{edge.https_port}{path}"


async def get_status(edge: EdgeHandle, pebble: PebbleServer, host: str, path: str = "/c/x") -> int:
    """One HTTPS GET on a new connection (strict verification); the status code."""
    async with (
        https_session(edge, pebble) as session,
        session.get(url(edge, host, path), allow_redirects=False) as resp,
    ):
        await resp.read()
        return resp.status


async def certify(
    edge: EdgeHandle, pebble: PebbleServer, dns: DNSServer, host: str | None = None
) -> str:
    """Register a host, CNAME it to the edge and make the first click (a real order)."""
    host = host or new_host(edge)
    async with edge_store(edge) as store:
        await register(store, dns, host, edge.target)
    assert await get_status(edge, pebble, host) == 302
    return host


async def read_to_close(reader: asyncio.StreamReader, timeout: float) -> tuple[bytes, str, float]:
    """Read until the server ends the connection: (bytes, "eof" | "reset", seconds)."""
    started = time.monotonic()
    data = b""
    how = "eof"
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await reader.read(4096)
            except ConnectionResetError:
                how = "reset"
                break
            if not chunk:
                break
            data += chunk
    return data, how, time.monotonic() - started


def python_hello(server_hostname: str | None) -> bytes:
    """The first flight of Python's TLS client for this SNI, captured with MemoryBIO."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    data = outgoing.read()
    assert data[:1] == b"\x16"
    return data


def ssl_error_text(exc: BaseException) -> str:
    return f"{getattr(exc, 'reason', '')} {exc}".lower()
