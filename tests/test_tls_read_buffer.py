"""Issue 12: all TLS connections of a worker share one read buffer, and no bytes mix.

The edge's TLS protocol reads every connection's socket into the same 32 KiB buffer
(`proxy/tls/listener.py`, `_shared_read_buffer`). Many connections upload distinct,
large bodies at once, interleaved on the loop; each must reach the backend intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import socket
import ssl
from asyncio import sslproto

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


def test_server_connections_start_with_asyncios_state() -> None:
    """The compact protocol's server __init__ sets only a connection's own state and
    takes asyncio's immutable first values from class attributes: every attribute
    asyncio's __init__ sets must read the same (a newer asyncio that adds or changes
    one fails here, not in production)."""

    async def pair() -> tuple[dict[str, object], tls_listener._CompactSSLProtocol]:
        loop = asyncio.get_running_loop()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        kwargs = {"server_side": True, "ssl_handshake_timeout": 7.0, "ssl_shutdown_timeout": 9.0}
        stock = sslproto.SSLProtocol(loop, asyncio.Protocol(), ctx, None, **kwargs)
        compact = tls_listener._CompactSSLProtocol(loop, asyncio.Protocol(), ctx, None, **kwargs)
        return vars(stock), compact

    stock, compact = asyncio.run(pair())
    own = vars(compact)
    assert "_conn_lost" not in own and "_state" not in own  # the lean __init__ ran
    per_connection = {
        "_ssl_buffer", "_ssl_buffer_view", "_extra", "_write_backlog", "_waiter", "_loop",
        "_app_protocol", "_incoming", "_outgoing", "_sslobj", "_app_transport", "_sslcontext",
    }  # fmt: skip
    for name, value in stock.items():
        assert hasattr(compact, name), name
        if name in per_connection:
            assert name in own, name
        else:
            assert getattr(compact, name) == value, name
    assert own["_extra"] == stock["_extra"]
    assert compact._app_transport._ssl_protocol is compact  # type: ignore[attr-defined]


class _RecordClient:
    """A TLS client that decides its records and TCP writes itself (an `SSLObject` over
    a plain stream), to feed the edge's read loop what browsers and stacks may send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.plain = b""

    @classmethod
    async def open(cls, edge: EdgeHandle, pebble: PebbleServer, host: str) -> _RecordClient:
        client = cls(*await asyncio.open_connection(edge.ip, edge.https_port))
        ctx = client_context(pebble)
        client.tls = ctx.wrap_bio(client.incoming, client.outgoing, server_hostname=host)
        while True:
            try:
                client.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await client.send(client.outgoing.read())
                await client.receive()
        await client.send(client.outgoing.read())
        return client

    def records(self, *parts: bytes) -> bytes:
        """Each part as a TLS record of its own, all in one buffer."""
        for part in parts:
            self.tls.write(part)
        return self.outgoing.read()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def receive(self) -> bool:
        data = await asyncio.wait_for(self.reader.read(65536), 10)
        if not data:
            return False
        self.incoming.write(data)
        return True

    async def answers(self, count: int) -> list[bytes]:
        """The next `count` answers' heads (their bodies read past)."""
        heads: list[bytes] = []
        while len(heads) < count:
            head, sep, rest = self.plain.partition(b"\r\n\r\n")
            if sep:
                length = re.search(rb"\r\ncontent-length: *(\d+)", head.lower())
                size = int(length.group(1)) if length else 0
                if len(rest) >= size:
                    heads.append(head)
                    self.plain = rest[size:]
                    continue
            try:
                self.plain += self.tls.read(65536)
            except ssl.SSLWantReadError:
                assert await self.receive(), f"closed after {len(heads)} of {count} answers"
        return heads

    async def closed(self) -> bool:
        """The edge ends the connection (its close_notify, then EOF)."""
        while await self.receive():
            pass
        return True

    def close(self) -> None:
        self.writer.close()


async def test_records_in_any_grouping_reach_the_click_whole(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    # the read loop stops when the BIO and OpenSSL are both empty (no trailing read
    # that only raises SSLWantReadError): every grouping of records must still arrive
    host = await certify(edge, pebble, dns_server)
    get = f"GET /c/r HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    client = await _RecordClient.open(edge, pebble, host)
    try:
        # one request in three records, one TCP write
        await client.send(client.records(get[:5], get[5:20], get[20:]))
        assert (await client.answers(1))[0].startswith(b"HTTP/1.1 302 ")
        # two requests, a record each, one TCP write
        await client.send(client.records(get, get))
        assert [h[:13] for h in await client.answers(2)] == [b"HTTP/1.1 302 "] * 2
        # one record cut across two TCP writes
        data = client.records(get)
        await client.send(data[:7])
        await asyncio.sleep(0.05)
        await client.send(data[7:])
        assert (await client.answers(1))[0].startswith(b"HTTP/1.1 302 ")
        # a record and a half, then the rest
        data = client.records(get, get)
        cut = len(data) - 10
        await client.send(data[:cut])
        await asyncio.sleep(0.05)
        await client.send(data[cut:])
        assert [h[:13] for h in await client.answers(2)] == [b"HTTP/1.1 302 "] * 2
        # close_notify right behind a request: the edge ends the connection
        with contextlib.suppress(ssl.SSLWantReadError):
            client.tls.write(get)
            client.tls.unwrap()
        await client.send(client.outgoing.read())
        assert await asyncio.wait_for(client.closed(), 10)
    finally:
        client.close()


async def test_the_edge_answers_close_notify_with_its_own(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    # a client's close_notify, alone on an idle connection or right behind a request
    # (asyncio's TLS layer then ends the connection, answered or not: see the test
    # above), gets the edge's own close_notify, then EOF: a clean shutdown
    host = await certify(edge, pebble, dns_server)
    get = f"GET /c/n HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    for behind_a_request in (False, True):
        client = await _RecordClient.open(edge, pebble, host)
        try:
            if behind_a_request:
                client.tls.write(get)
            else:
                await client.send(client.records(get))
                assert (await client.answers(1))[0].startswith(b"HTTP/1.1 302 ")
            with contextlib.suppress(ssl.SSLWantReadError):
                client.tls.unwrap()
            await client.send(client.outgoing.read())
            while await client.receive():
                pass
            client.tls.unwrap()  # SSLWantReadError if the edge's close_notify is missing
        finally:
            client.close()


async def test_a_large_answer_to_a_slow_reader_arrives_whole(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    # the TLS write's one-frame path covers a buffer written at once; a reader too slow
    # for the answer pauses the socket's writing and asyncio's queue takes over: every
    # byte still arrives, in order, and the connection serves the next click
    host = await certify(edge, pebble, dns_server)
    size = 12_000_000  # beyond the kernel's send buffer (at most 4 MiB here)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((edge.ip, edge.https_port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(
        sock=sock, ssl=client_context(pebble), server_hostname=host, limit=4096
    )
    try:
        for path in (f"/big?bytes={size}", "/c/after"):
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(re.search(rb"\r\ncontent-length: *(\d+)", head.lower()).group(1))
            await asyncio.sleep(0.5)  # not reading: the edge's socket buffer fills
            parts = []
            received = 0
            while received < length:
                part = await asyncio.wait_for(reader.read(65536), 10)
                assert part, f"closed after {received} of {length} bytes"
                parts.append(part)
                received += len(part)
            body = b"".join(parts)
            if path.startswith("/big"):
                assert head.startswith(b"HTTP/1.1 200 ") and length == size
                assert body == b"x" * size
            else:
                assert head.startswith(b"HTTP/1.1 302 "), head
    finally:
        writer.close()


async def test_requests_arriving_while_reading_is_paused_are_all_answered(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    # a click in progress and 100 KiB of pipelined requests behind it: the click
    # protocol pauses reading past 64 KiB, so records arrive while the TLS layer's
    # reading is paused (asyncio's path, not the one-frame read); every request is
    # answered, in order, once reading resumes
    host = await certify(edge, pebble, dns_server)
    client = await _RecordClient.open(edge, pebble, host)
    count = 2000
    try:
        await client.send(
            client.records(f"GET /slow?seconds=0.5 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        )
        await asyncio.sleep(0.1)  # the slow click is in progress
        flood = b"".join(
            f"GET /c/p{i} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode() for i in range(count)
        )
        assert len(flood) > 100_000
        await client.send(
            client.records(*(flood[i : i + 16_000] for i in range(0, len(flood), 16_000)))
        )
        heads = await client.answers(1 + count)
        assert heads[0].startswith(b"HTTP/1.1 200 ")
        assert all(h.startswith(b"HTTP/1.1 302 ") for h in heads[1:])
    finally:
        client.close()
    paths = [r.path_qs for r in backend[1] if r.path_qs.startswith("/c/p")]
    assert paths == [f"/c/p{i}" for i in range(count)]
