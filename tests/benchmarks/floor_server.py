"""The Python floor of issue 12: a minimal TLS server + forwarder on uvloop.

bench_peers.py runs it as the peer `floor`. It does the least a TLS-terminating forwarder
can do in Python: uvloop's own TLS transport with a static certificate (no ClientHello
peek, no certificate selection, no timeouts, no caps, no metrics or logs), the request
head split with bytes methods, one pooled keep-alive backend connection per request in
flight, and the backend's answer relayed as it came (Content-Length answers only: the
sample backend's 302). Bodiless requests only. It shows what CPU per click Python and
OpenSSL cost before any of linkedge's own work, so linkedge's ratios to nginx can be read
against this server's.

Run:  python floor_server.py --https IP:PORT --http IP:PORT --cert chain.pem --key key.pem
          --backend IP:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
from collections import deque
from typing import cast

import uvloop


def header_fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """A message head's fields after its first line: (lower-case name, value)."""
    fields = []
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        fields.append((name.lower(), value.strip()))
    return fields


class Upstream(asyncio.Protocol):
    """One keep-alive backend connection; one exchange at a time."""

    def __init__(self, pool: deque[Upstream]) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.client: Click | None = None
        self.buf = b""
        self.ready = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        self.ready.set_result(None)

    def send(self, head: bytes, client: Click) -> None:
        assert self.transport is not None
        self.client = client
        self.transport.write(head)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self.buf = buf
            return
        length = 0
        for name, value in header_fields(buf[:end]):
            if name == b"content-length":
                length = int(value)
        total = end + 4 + length
        if len(buf) < total:
            self.buf = buf
            return
        self.buf = buf[total:]
        client, self.client = self.client, None
        self.pool.append(self)
        if client is not None:
            client.answer(buf[:total])

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None:
            self.client.answer(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")


class Click(asyncio.Protocol):
    """One client connection: read a request head, forward it, relay the answer."""

    def __init__(self, forwarder: Forwarder, scheme: bytes) -> None:
        self.forwarder = forwarder
        self.scheme = scheme
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0].encode() if peer else b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self.buf = buf
            return
        self.buf = buf[end + 4 :]
        method, target, _ = buf[: buf.find(b"\r\n")].split(b" ", 2)
        host = b""
        for name, value in header_fields(buf[:end]):
            if name == b"host":
                host = value
            elif name == b"connection" and value.lower() == b"close":
                self.close_after = True
        head = b"".join(
            (
                method,
                b" ",
                target,
                b" HTTP/1.1\r\nHost: ",
                host,
                b"\r\nX-Forwarded-For: ",
                self.client_ip,
                b"\r\nX-Forwarded-Proto: ",
                self.scheme,
                b"\r\n\r\n",
            )
        )
        self.forwarder.forward(head, self)

    def answer(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(data)
        if self.close_after:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class Forwarder:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.pool: deque[Upstream] = deque()

    def forward(self, head: bytes, client: Click) -> None:
        if self.pool:
            self.pool.pop().send(head, client)
        else:
            asyncio.ensure_future(self._connect_and_send(head, client))

    async def _connect_and_send(self, head: bytes, client: Click) -> None:
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(
            lambda: Upstream(self.pool), self.host, self.port
        )
        upstream.send(head, client)


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    # OpenSSL's defaults otherwise (two TLS 1.3 tickets, as linkedge and nginx send)
    bhost, bport = args.backend.rsplit(":", 1)
    forwarder = Forwarder(bhost, int(bport))
    hip, hport = args.https.rsplit(":", 1)
    pip, pport = args.http.rsplit(":", 1)
    await loop.create_server(
        lambda: Click(forwarder, b"https"), hip, int(hport), ssl=ctx, backlog=4096
    )
    await loop.create_server(lambda: Click(forwarder, b"http"), pip, int(pport), backlog=4096)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--https", "--http", "--cert", "--key", "--backend"):
        p.add_argument(name, required=True)
    uvloop.run(serve(p.parse_args()))


if __name__ == "__main__":
    main()
