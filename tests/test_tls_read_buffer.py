"""Issue 12: all TLS connections of a worker share one read buffer, and no bytes mix.

The edge's TLS protocol reads every connection's socket into the same 32 KiB buffer
(`proxy/tls/listener.py`, `_shared_read_buffer`). Many connections upload distinct,
large bodies at once, interleaved on the loop; each must reach the backend intact.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl

from support.clicks import certify
from support.edge import EdgeHandle, client_context

from proxy.demo.backend import RecordedRequest
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer
from proxy.tls import listener as tls_listener

CONNECTIONS = 12
BODY = 300_000  # ~19 TLS records each, read in pieces of up to 32 KiB


def body_of(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (BODY // 32) + bytes([i]) * i


async def upload(edge: EdgeHandle, pebble: PebbleServer, host: str, i: int) -> int:
    reader, writer = await asyncio.open_connection(
        edge.ip, edge.https_port, ssl=client_context(pebble), server_hostname=host
    )
    try:
        body = body_of(i)
        writer.write(
            f"POST /echo?conn={i} HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        for start in range(0, len(body), 7_000):  # odd slices: records and reads interleave
            writer.write(body[start : start + 7_000])
            await writer.drain()
            await asyncio.sleep(0)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        return int(head.split(b" ", 2)[1])
    finally:
        writer.close()


async def test_concurrent_uploads_share_one_read_buffer_and_arrive_intact(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    host = await certify(edge, pebble, dns_server)
    recorded: list[RecordedRequest] = backend[1]
    statuses = await asyncio.wait_for(
        asyncio.gather(*(upload(edge, pebble, host, i) for i in range(CONNECTIONS))), 60
    )
    assert statuses == [200] * CONNECTIONS
    seen = {r.path_qs: r.body for r in recorded if r.path_qs.startswith("/echo?conn=")}
    assert sorted(seen) == sorted(f"/echo?conn={i}" for i in range(CONNECTIONS))
    for i in range(CONNECTIONS):
        assert seen[f"/echo?conn={i}"] == body_of(i), f"connection {i}: body mixed or cut"


def test_tls_protocols_have_no_read_buffer_of_their_own() -> None:
    async def views() -> list[memoryview]:
        loop = asyncio.get_running_loop()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        protocols = [
            tls_listener._CompactSSLProtocol(loop, asyncio.Protocol(), ctx, None, server_side=True)
            for _ in range(3)
        ]
        return [p._ssl_buffer_view for p in protocols]

    first, *others = asyncio.run(views())
    assert all(view is first for view in others)
    assert first is tls_listener._shared_read_buffer()
    assert len(first) == tls_listener.TLS_READ_BUFFER
