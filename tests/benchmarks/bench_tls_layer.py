"""CPU of the edge's TLS layer per connection, paired in one process (issue 12).

Side-by-side runs spread by ±10-15 % on this shared machine, too coarse for a 2 % change;
callgrind counts instructions, which understate interpreted code. This drives the server
side of whole connections through `_CompactSSLProtocol` (`proxy/tls/listener.py`) in
memory: a client `SSLObject` (TLS 1.3, no tickets) and the protocol over a fake transport,
a full handshake, one request answered by a trivial app protocol, the client's
close_notify, `connection_lost`; with `--keepalive K`, K more requests answered on the
connection before the close, timed per click (the TLS layer's share of a keep-alive click).
Only the server side's calls are timed, per phase. The
variants run alternately in one process with the garbage collector off, so a slow spell
of the machine hits all of them alike; `bare` does the same TLS work with plain
`SSLObject`s, the floor for any protocol around OpenSSL.

    PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_tls_layer.py
    ... --src before=/tmp/base        # another tree's listener.py (git archive <commit>)

Prints µs per connection by phase for each variant.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import ssl
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxy.demo.pki import write_tls_identity

HOST = "links.tls-layer.test"
REQUEST = f"GET /c/1 HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
ANSWER = b"HTTP/1.1 302 Found\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n"
Timings = dict[str, float]
KEEPALIVE = "keep-alive clicks"


def contexts(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    identity = write_tls_identity(directory, [HOST])  # the demo's throwaway CA and leaf
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(identity.cert_path, identity.key_path)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(identity.ca_path)
    client.options |= ssl.OP_NO_TICKET
    return server, client


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.closing = False

    def write(self, data: Any) -> None:
        self.sent.append(bytes(data))

    def take(self) -> bytes:
        data, self.sent = b"".join(self.sent), []
        return data

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class _App(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(ANSWER)


class _Client:
    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=HOST)

    def step(self, received: bytes = b"") -> bytes:
        self.incoming.write(received)
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return self.outgoing.read()

    def request(self, received: bytes) -> bytes:
        self.incoming.write(received)
        self.tls.do_handshake()
        self.tls.write(REQUEST)
        return self.outgoing.read()

    def again(self, received: bytes) -> bytes:
        """The answer received, and the next request on the connection."""
        self.incoming.write(received)
        assert self.tls.read(65536).startswith(b"HTTP/1.1 302")
        self.tls.write(REQUEST)
        return self.outgoing.read()

    def close(self, received: bytes) -> bytes:
        self.incoming.write(received)
        assert self.tls.read(65536).startswith(b"HTTP/1.1 302")
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        return self.outgoing.read()


def through_protocol(
    cls: type,
    loop: asyncio.AbstractEventLoop,
    server: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    keepalive: int,
) -> Callable[[Timings], None]:
    def feed(protocol: Any, data: bytes) -> None:
        buffer = protocol.get_buffer(len(data))
        buffer[: len(data)] = data
        protocol.buffer_updated(len(data))

    def once(t: Timings) -> None:
        client = _Client(client_ctx)
        clock = time.perf_counter
        start = clock()
        transport = _Transport()
        protocol = cls(
            loop,
            _App(),
            server,
            loop.create_future(),
            server_side=True,
            ssl_handshake_timeout=10.0,
            ssl_shutdown_timeout=10.0,
        )
        protocol.connection_made(transport)
        t["set-up"] += clock() - start
        hello = client.step()
        start = clock()
        feed(protocol, hello)
        t["ClientHello"] += clock() - start
        finished = client.request(transport.take())
        start = clock()
        feed(protocol, finished)
        t["Finished + request"] += clock() - start
        answer = transport.take()
        for _ in range(keepalive):
            request = client.again(answer)
            start = clock()
            feed(protocol, request)
            t[KEEPALIVE] += clock() - start
            answer = transport.take()
        close_notify = client.close(answer)
        start = clock()
        feed(protocol, close_notify)
        protocol.connection_lost(None)
        t["close"] += clock() - start
        transport.take()

    return once


def bare(
    server: ssl.SSLContext, client_ctx: ssl.SSLContext, keepalive: int
) -> Callable[[Timings], None]:
    def once(t: Timings) -> None:
        client = _Client(client_ctx)
        clock = time.perf_counter
        start = clock()
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = server.wrap_bio(incoming, outgoing, server_side=True)
        t["set-up"] += clock() - start
        hello = client.step()
        start = clock()
        incoming.write(hello)
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        flight = outgoing.read()
        t["ClientHello"] += clock() - start
        finished = client.request(flight)
        start = clock()
        incoming.write(finished)
        tls.do_handshake()
        assert tls.read(65536) == REQUEST
        tls.write(ANSWER)
        answer = outgoing.read()
        t["Finished + request"] += clock() - start
        for _ in range(keepalive):
            request = client.again(answer)
            start = clock()
            incoming.write(request)
            assert tls.read(65536) == REQUEST
            tls.write(ANSWER)
            answer = outgoing.read()
            t[KEEPALIVE] += clock() - start
        close_notify = client.close(answer)
        start = clock()
        incoming.write(close_notify)
        assert tls.read(65536) == b""
        tls.unwrap()
        outgoing.read()
        t["close"] += clock() - start

    return once


def listener_class(name: str, tree: Path) -> type:
    path = tree / "proxy" / "tls" / "listener.py"
    spec = importlib.util.spec_from_file_location(f"_listener_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    cls: type = module._CompactSSLProtocol
    return cls


async def run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory() as directory:
        server, client_ctx = contexts(Path(directory))
        keepalive = args.keepalive
        variants: dict[str, Callable[[Timings], None]] = {
            "bare": bare(server, client_ctx, keepalive)
        }
        trees = [("this tree", Path(__file__).resolve().parents[2])]
        trees += [(spec.split("=", 1)[0], Path(spec.split("=", 1)[1])) for spec in args.src]
        for name, tree in trees:
            cls = listener_class(name, tree)
            variants[name] = through_protocol(cls, loop, server, client_ctx, keepalive)
        timings: dict[str, Timings] = {name: defaultdict(float) for name in variants}
        order = list(variants.items())
        for _ in range(args.warmup):
            for _name, once in order:
                once(defaultdict(float))
        gc.collect()
        gc.disable()
        try:
            for i in range(args.connections):
                shift = i % len(order)
                for name, once in order[shift:] + order[:shift]:
                    once(timings[name])
        finally:
            gc.enable()
    n = args.connections
    phases = [phase for phase in timings["bare"] if phase != KEEPALIVE]
    print(f"server-side µs per connection, {n} connections each, paired in one process")
    width = max(len(name) for name in timings) + 2
    print(f"  {'variant':{width}s}" + "".join(f"{p:>20s}" for p in phases) + f"{'total':>10s}")
    for name, t in timings.items():
        cells = "".join(f"{t[p] / n * 1e6:20.1f}" for p in phases)
        print(f"  {name:{width}s}{cells}{sum(t[p] for p in phases) / n * 1e6:10.1f}")
    if args.keepalive:
        print(f"server-side µs per keep-alive click ({args.keepalive} per connection)")
        for name, t in timings.items():
            print(f"  {name:{width}s}{t[KEEPALIVE] / n / args.keepalive * 1e6:20.2f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=4000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--keepalive", type=int, default=0, help="requests after the first, per conn")
    p.add_argument(
        "--src", action="append", default=[], metavar="NAME=DIR", help="another tree's listener"
    )
    p.add_argument("--asyncio", action="store_true", help="asyncio's loop instead of uvloop")
    args = p.parse_args(argv)
    if args.asyncio:
        asyncio.run(run(args))
    else:
        import uvloop

        uvloop.run(run(args))


if __name__ == "__main__":
    main()
