"""CPU cost of the PROXY protocol header per connection (micro-benchmark).

    PYTHONPATH=. /work/venv/bin/python tests/benchmarks/proxy_header.py

1. `parse_proxy_header` alone, per header kind.
2. What a PROXY listener adds per connection: the trusted-network check at accept,
   peek + parse + recv of exactly the header on a real loopback TCP socket with the
   header (and a ClientHello after it) already queued, the ConnectionInfo and the
   ContextVar. Connections are made up front; only the header step is timed.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: support

from support.proxy_protocol import v1_header, v2_header  # noqa: E402

from proxy.tls.accept import Listener, ProxyProtocolSettings  # noqa: E402
from proxy.wire.peers import TrustedNetworks  # noqa: E402
from proxy.wire.proxy_protocol import parse_proxy_header  # noqa: E402

HELLO = b"\x16\x03\x01\x02\x00" + bytes(512)
DST = ("192.0.2.1", 443)
CASES = {
    "v1 TCP4": v1_header(("203.0.113.7", 56324), DST),
    "v1 TCP6": v1_header(("2001:db8::7", 56324), ("2001:db8::1", 443)),
    "v2 INET": v2_header(("203.0.113.7", 56324), DST),
    "v2 INET6 + 3 TLVs": v2_header(
        ("2001:db8::7", 56324),
        ("2001:db8::1", 443),
        tlvs=[(0x01, b"h2"), (0x02, b"links.shop.test"), (0xEA, b"\x01vpce-0123456789")],
    ),
}


def parse_only() -> None:
    print("parse_proxy_header(header + ClientHello), best of 5 x 100k calls:")
    for name, header in CASES.items():
        data = header + HELLO
        best = min(timeit.repeat(lambda d=data: parse_proxy_header(d), number=100_000, repeat=5))
        print(f"  {name:20s} {best / 100_000 * 1e6:6.2f} us")


async def per_connection(header: bytes, batch: int = 400, rounds: int = 5) -> list[float]:
    listener = Listener(
        socket.socket(),
        max_pending=1,
        proxy_protocol=ProxyProtocolSettings(TrustedNetworks(["127.0.0.0/8"])),
    )
    server = socket.create_server(("127.0.0.1", 0), backlog=batch)
    results = []
    for _ in range(rounds):
        clients, conns = [], []
        for _ in range(batch):
            c = socket.create_connection(server.getsockname())
            c.sendall(header + HELLO)
            conn, peer = server.accept()
            conn.setblocking(False)
            clients.append(c)
            conns.append((conn, peer))
        await asyncio.sleep(0.05)  # everything queued
        t0 = time.process_time()
        for conn, peer in conns:
            assert peer[0] in listener._proxy.trusted  # type: ignore[union-attr]
            info = await listener._receive_proxy_header(conn, peer)
            assert info is not None
        results.append((time.process_time() - t0) / batch * 1e6)
        for conn, _ in conns:
            assert conn.recv(5, socket.MSG_PEEK) == HELLO[:5]  # the hello is untouched
            conn.close()
        for c in clients:
            c.close()
    server.close()
    return results


def main() -> None:
    parse_only()
    print("\nper connection on a PROXY listener (trust check, peek, parse, recv, ContextVar):")
    for name in ("v1 TCP4", "v2 INET"):
        us = asyncio.run(per_connection(CASES[name]))
        print(f"  {name:20s} median {statistics.median(us):6.2f} us CPU  (rounds: "
              + ", ".join(f"{u:.2f}" for u in us) + ")")  # fmt: skip


if __name__ == "__main__":
    main()
