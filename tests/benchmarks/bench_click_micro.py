"""CPU per keep-alive click of the lean click protocol, in one process (issue 12).

`bench_peers.py` measures whole processes side by side; its rounds spread by 10-20 % on
this shared machine, too coarse to tell a 5 µs change. This drives the lean click
protocol (`proxy/http/click_protocol.py`) and the forwarder with its lean client
directly: a fake client transport feeds `GET /c/<n>` to the protocol and collects the
answer, and a real backend on loopback (an asyncio protocol answering a fixed 302, in
the same process and loop) answers over the lean client's pooled connection. What is
measured per click is the edge's Python work, the event loop's turns and the backend
connection's `send`/`recv` — everything of a keep-alive plain-HTTP click except the
client socket's two syscalls — plus a small constant for the fake client and the
backend protocol.

    PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_click_micro.py --clicks 20000 --rounds 7
    PYTHONPATH=/tmp/base .venv/bin/python tests/benchmarks/bench_click_micro.py ...   # a before
    ... --profile out.prof   # cProfile of one round (slower; for the ranking only)

Prints the median and [min..max] µs of process CPU per click over the rounds.

`--conns N` measures new connections instead: the real HTTPS listener
(`proxy/tls/listener.TLSListener`: accept, ClientHello peek and parse, a context from a
test certificate, the compact TLS protocol) in front of the same click protocol, and a
client process (not traced by callgrind) making N connections one after another, each a
full TLS 1.3 handshake without tickets, one `GET /c/<n>`, the 302, close. Under callgrind,
(instructions at N=300 − at N=100) / 200 is the edge's per connection, OpenSSL included.
`--per-conn K` makes K clicks on each of those connections: (instructions at `--conns 10
--per-conn 300` − at `--per-conn 100`) / 2,000 is a keep-alive HTTPS click through the real
listener, the compact TLS protocol and real sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.http.backends import BackendPool
from proxy.http.click_protocol import ClickPaths
from proxy.http.forward import Forwarder
from proxy.tls.contexts import build_server_context
from proxy.tls.listener import ListenerSettings, TLSListener

ANSWER = (
    b"HTTP/1.1 302 Found\r\nLocation: https://shop.example/landing?a=1\r\n"
    b"Content-Length: 0\r\nDate: Mon, 30 Nov 2026 17:00:00 GMT\r\n\r\n"
)


class _Backend(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(ANSWER)  # type: ignore[attr-defined]


class _ClientTransport(asyncio.Transport):
    """The client's side of a kept-alive connection: what the protocol writes ends a click."""

    def __init__(self) -> None:
        super().__init__()
        self.done: asyncio.Future[bytes] | None = None
        self._closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("192.0.2.7", 40000), "sockname": ("127.0.0.1", 80)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(bytes(data))

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    def abort(self) -> None:
        self._closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        raise AssertionError("handed off to aiohttp: not a lean click")


async def _never_called(_request: web.BaseRequest) -> web.StreamResponse:
    raise AssertionError("every request here is a lean click")


class _Book:
    def opened(self, conn: Any) -> None:
        pass

    def touched(self, conn: Any) -> None:
        pass

    def closed(self, conn: Any) -> None:
        pass


async def _round(protocol: asyncio.Protocol, transport: _ClientTransport, clicks: int) -> float:
    loop = asyncio.get_running_loop()
    start = time.process_time()
    for i in range(clicks):
        transport.done = loop.create_future()
        protocol.data_received(b"GET /c/%d HTTP/1.1\r\nHost: links.shop.test\r\n\r\n" % i)
        answer = await transport.done
        if not answer.startswith(b"HTTP/1.1 302"):
            raise SystemExit(f"unexpected answer: {answer[:80]!r}")
    return (time.process_time() - start) / clicks * 1e6


HOST = "links.shop.test"
CLIENT = """
import socket, ssl, sys
port, count, ca = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
per_conn = int(sys.argv[5])
ctx = ssl.create_default_context(cafile=ca)
ctx.options |= ssl.OP_NO_TICKET
for i in range(count):
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(raw, server_hostname=sys.argv[4]) as tls:
            assert not tls.session_reused
            for k in range(per_conn):
                request = b"GET /c/%d HTTP/1.1\\r\\nHost: %s\\r\\n\\r\\n"
                tls.sendall(request % (k, sys.argv[4].encode()))
                answer = b""
                while b"\\r\\n\\r\\n" not in answer:
                    chunk = tls.recv(4096)
                    assert chunk, answer
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 302"), answer
"""


async def _conns(paths: ClickPaths, count: int, per_conn: int = 1) -> float:
    """`count` new TLS connections + `per_conn` clicks each from a client process; µs CPU
    per connection."""
    import trustme  # a test dependency: a CA and a certificate for HOST

    ca = trustme.CA()
    cert = ca.issue_cert(HOST)
    chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    ctx = build_server_context(chain, cert.private_key_pem.bytes())

    async def select(_hello: object) -> ssl.SSLContext:
        return ctx

    sock = socket.create_server(("127.0.0.1", 0))
    listener = TLSListener(sock, select, paths.protocol_factory(), ListenerSettings())
    listener.start()
    with tempfile.TemporaryDirectory() as tmp:
        ca_file = Path(tmp) / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        command = [sys.executable, "-c", CLIENT, str(sock.getsockname()[1])]
        start = time.process_time()
        client = await asyncio.create_subprocess_exec(
            *command, str(count), str(ca_file), HOST, str(per_conn)
        )
        if await client.wait() != 0:
            raise SystemExit("the client failed")
        spent = time.process_time() - start
    await listener.close()
    return spent / count * 1e6


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    backend = await loop.create_server(_Backend, "127.0.0.1", 0)
    port = backend.sockets[0].getsockname()[1]
    forwarder = Forwarder(BackendPool([f"http://127.0.0.1:{port}"]), lean_clicks=True)
    await forwarder.start()
    server = web.Server(_never_called)
    paths = ClickPaths(
        forwarding=forwarder,
        is_suspended=lambda _name: False,
        policy=None,
        fallback=lambda: (_ for _ in ()).throw(AssertionError("no fallback")),
        limits=_Book(),
        server=server,
        idle_timeout=60.0,
    )
    if args.conns:
        profiler = cProfile.Profile() if args.profile else None
        if profiler is not None:
            profiler.enable()
        figure = await _conns(paths, args.conns, args.per_conn)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        print(
            f"new TLS connection + {args.per_conn} click(s), µs CPU per connection: "
            f"{figure:.0f} ({args.conns})"
        )
        await forwarder.close()
        backend.close()
        return
    protocol = paths.protocol_factory()()
    transport = _ClientTransport()
    protocol.connection_made(transport)
    await _round(protocol, transport, 500)  # warm: the backend connection, caches
    figures = []
    for _ in range(args.rounds):
        figures.append(await _round(protocol, transport, args.clicks))
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        await _round(protocol, transport, args.clicks)
        profiler.disable()
        profiler.dump_stats(args.profile)
    print(
        f"lean keep-alive click, µs CPU per click: median {statistics.median(figures):.1f} "
        f"[{min(figures):.1f}..{max(figures):.1f}] over {args.rounds} rounds of {args.clicks}"
        f" (lean clicks {paths.stats.lean})"
    )
    await forwarder.close()
    backend.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--clicks", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--conns", type=int, default=0, help="new connections instead")
    parser.add_argument(
        "--per-conn", type=int, default=1, help="--conns: clicks per connection (keep-alive TLS)"
    )
    parser.add_argument("--profile", help="cProfile one more round into this file")
    arguments = parser.parse_args()
    if arguments.uvloop:
        import uvloop

        uvloop.run(main(arguments))
    else:
        asyncio.run(main(arguments))
