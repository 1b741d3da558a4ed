"""The PROXY protocol on both listeners: real clients behind a balancer, bad headers.

The trusted balancer network is 127.0.0.5/32; connections from 127.0.0.6 play an
untrusted peer. Pebble validates straight from 127.0.0.1, so the host is
certified first on a plain edge, which then restarts with PROXY listeners on the
same store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from support.clicks import certify, read_to_close
from support.edge import EdgeHandle, client_context
from support.proxy_protocol import ProxyBalancer, v1_header, v2_header

from proxy.app.config import ConfigError, check_listen, load_config
from proxy.demo.backend import RecordedRequest
from proxy.demo.client import StaticResolver
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer
from proxy.tls.accept import ListenerStats
from proxy.wire.peers import TrustedNetworks

BALANCER = "127.0.0.5"
STRANGER = "127.0.0.6"
HEADER_TIMEOUT = 1.0


@dataclasses.dataclass
class LBEdge:
    edge: EdgeHandle
    pebble: PebbleServer
    host: str
    recorded: list[RecordedRequest]

    @property
    def https(self) -> ListenerStats:
        assert self.edge.worker is not None and self.edge.worker.tls_listener is not None
        return self.edge.worker.tls_listener.stats

    @property
    def http(self) -> ListenerStats:
        assert self.edge.worker is not None and self.edge.worker.http_listener is not None
        return self.edge.worker.http_listener.stats

    @property
    def https_target(self) -> tuple[str, int]:
        return self.edge.ip, self.edge.https_port

    @property
    def http_target(self) -> tuple[str, int]:
        return self.edge.ip, self.edge.http_port

    def forwarded_for(self, path: str) -> list[str]:
        seen = [r for r in self.recorded if r.raw_path == path]
        assert len(seen) == 1, (path, [r.raw_path for r in self.recorded])
        return [v for k, v in seen[0].headers if k.lower() == "x-forwarded-for"]

    def header(self, path: str, name: str) -> list[str]:
        seen = [r for r in self.recorded if r.raw_path == path]
        assert len(seen) == 1
        return [v for k, v in seen[0].headers if k.lower() == name.lower()]


@pytest.fixture
async def lb(
    edge_config: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, backend
) -> AsyncIterator[LBEdge]:
    await edge_config.start()
    try:
        host = await certify(edge_config, pebble, dns_server)
    finally:
        await edge_config.stop()
    backend[1].clear()  # the certifying click
    listen = edge_config.config.listen
    listen.https_proxy_protocol = listen.http_proxy_protocol = True
    listen.proxy_protocol_trusted = [f"{BALANCER}/32"]
    listen.proxy_protocol_timeout = HEADER_TIMEOUT
    edge_config.config.tls.max_pending_per_source = 3
    edge_config.config.listen.max_connections_per_source = 4
    await edge_config.start()
    try:
        yield LBEdge(edge_config, pebble, host, backend[1])
    finally:
        await edge_config.stop()


def connect_from(source: str, target: tuple[str, int]) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(target)
    sock.setblocking(False)
    return sock


def get_request(lb: LBEdge, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {lb.host}\r\nConnection: close\r\n\r\n".encode()


async def https_request(
    lb: LBEdge, header: bytes, path: str, *, source: str = BALANCER
) -> tuple[bytes, bytes]:
    """PROXY header, then TLS (strict verification) and one GET; (status line, body)."""
    sock = connect_from(source, lb.https_target)
    sock.sendall(header)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(sock=sock, ssl=client_context(lb.pebble), server_hostname=lb.host),
        10,
    )
    try:
        writer.write(get_request(lb, path))
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], body


async def http_request(lb: LBEdge, header: bytes, path: str, *, source: str = BALANCER) -> bytes:
    reader, writer = await asyncio.open_connection(sock=connect_from(source, lb.http_target))
    try:
        # one write: an edge that closes at accept (an untrusted balancer) would make
        # a second write fail with EPIPE before the test reads the close
        writer.write(header + get_request(lb, path))
        data, _, _ = await read_to_close(reader, 10)
    finally:
        writer.close()
    return data


async def closed_without_answer(source: str, target: tuple[str, int], payload: bytes) -> None:
    reader, writer = await asyncio.open_connection(sock=connect_from(source, target))
    try:
        if payload:
            writer.write(payload)
        data, how, _ = await read_to_close(reader, 10)
    finally:
        writer.close()
    assert data == b"" and how in ("eof", "reset")


async def wait_for(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.01)


def balancer_session(lb: LBEdge) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        resolver=StaticResolver("127.0.0.1"), ssl=client_context(lb.pebble)
    )
    return aiohttp.ClientSession(connector=connector)


# -- real clients behind a balancer ------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
async def test_aiohttp_client_behind_balancer_keeps_its_address(lb: LBEdge, version: int) -> None:
    """Two clients, two balancer connections, keep-alive: each request carries its own client."""
    claims = [("203.0.113.7", 40001), ("2001:db8::42", 40002)]
    async with (
        ProxyBalancer(lb.https_target, BALANCER, version, claim=claims[0]) as lb_a,
        ProxyBalancer(lb.https_target, BALANCER, version, claim=claims[1]) as lb_b,
        balancer_session(lb) as session,
    ):
        for i in range(3):  # interleaved on two keep-alive connections
            for name, balancer in (("a", lb_a), ("b", lb_b)):
                path = f"/c/v{version}-{name}{i}"
                url = f"https://{lb.host}:{balancer.port}{path}"
                async with session.get(url, allow_redirects=False) as resp:
                    assert resp.status == 302
                    await resp.read()
    for i in range(3):
        assert lb.forwarded_for(f"/c/v{version}-a{i}") == ["203.0.113.7"]
        assert lb.forwarded_for(f"/c/v{version}-b{i}") == ["2001:db8::42"]
    assert lb.header(f"/c/v{version}-b0", "Forwarded")[0].startswith('for="[2001:db8::42]";')
    assert lb.https.accepted == 2  # one connection per balancer: keep-alive held
    assert lb.https.proxy_missing == lb.https.proxy_malformed == lb.https.proxy_untrusted == 0


async def test_real_client_address_through_balancer(lb: LBEdge) -> None:
    """Without a claim the balancer reports the client it saw (127.0.0.1), not itself."""
    async with ProxyBalancer(lb.https_target, BALANCER, 2) as balancer, balancer_session(lb) as s:
        url = f"https://{lb.host}:{balancer.port}/c/real"
        async with s.get(url, allow_redirects=False) as resp:
            assert resp.status == 302
    assert lb.forwarded_for("/c/real") == ["127.0.0.1"]


async def curl(*args: str) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "10", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode is not None
    return proc.returncode, out, err


async def test_curl_sends_proxy_v1_itself(lb: LBEdge) -> None:
    """curl --haproxy-protocol from the trusted address: its own v1 header, over TLS."""
    common = [
        "--haproxy-protocol", "--cacert", str(lb.pebble.root_path),
        "--resolve", f"{lb.host}:{lb.edge.https_port}:{lb.edge.ip}",
        "-o", "/dev/null", "-w", "%{http_code}",
    ]  # fmt: skip
    code, out, err = await curl(
        *common, "--interface", BALANCER, f"https://{lb.host}:{lb.edge.https_port}/c/curl-v1"
    )
    assert (code, out) == (0, b"302"), err
    assert lb.forwarded_for("/c/curl-v1") == [BALANCER]
    # the same from an address that is not a trusted balancer: closed at accept
    code, out, err = await curl(
        *common, "--interface", STRANGER, f"https://{lb.host}:{lb.edge.https_port}/c/curl-x"
    )
    assert code != 0 and out == b"000"
    assert lb.https.proxy_untrusted == 1
    assert not [r for r in lb.recorded if r.raw_path == "/c/curl-x"]


async def test_curl_behind_balancer(lb: LBEdge) -> None:
    async with ProxyBalancer(lb.https_target, BALANCER, 1, claim=("198.51.100.23", 1)) as b:
        code, out, err = await curl(
            "--cacert", str(lb.pebble.root_path),
            "--resolve", f"{lb.host}:{b.port}:127.0.0.1",
            "-o", "/dev/null", "-w", "%{http_code}",
            f"https://{lb.host}:{b.port}/c/curl-lb",
        )  # fmt: skip
    assert (code, out) == (0, b"302"), err
    assert lb.forwarded_for("/c/curl-lb") == ["198.51.100.23"]


# -- header variants on the HTTPS listener -----------------------------------------------


async def test_https_header_variants(lb: LBEdge) -> None:
    dst = lb.https_target
    cases = {
        "/c/v2-tlv": (
            v2_header(("192.0.2.77", 1234), dst, tlvs=[(0x02, lb.host.encode()), (0xEA, b"x")]),
            "192.0.2.77",
        ),
        "/c/v2-local": (v2_header(("192.0.2.78", 1), dst, local=True), BALANCER),
        "/c/v2-unspec": (v2_header(None, None), BALANCER),
        "/c/v1-unknown": (b"PROXY UNKNOWN\r\n", BALANCER),
        "/c/v1-tcp6": (v1_header(("2001:db8::1:2", 9), ("2001:db8::1", 443)), "2001:db8::1:2"),
    }
    for path, (header, client) in cases.items():
        status, _ = await https_request(lb, header, path)
        assert status == b"HTTP/1.1 302 Found", path
        assert lb.forwarded_for(path) == [client], path
    assert lb.https.handshakes_started == len(cases)


async def test_https_bad_headers_close_and_count(lb: LBEdge) -> None:
    target = lb.https_target
    hello_like = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
    # missing: TLS straight away from the balancer's address
    await closed_without_answer(BALANCER, target, hello_like)
    assert lb.https.proxy_missing == 1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await https_request(lb, b"", "/c/none")
    assert lb.https.proxy_missing == 2
    # malformed
    await closed_without_answer(BALANCER, target, b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n")
    await closed_without_answer(BALANCER, target, v2_header(("1.2.3.4", 1), target)[:13] + b"\x12")
    assert lb.https.proxy_malformed == 2
    # part of a header, then FIN: noticed at once, not at the header timeout
    reader, writer = await asyncio.open_connection(sock=connect_from(BALANCER, target))
    writer.write(b"PROXY TCP4 1.2.3.4 ")
    writer.write_eof()
    data, how, _ = await read_to_close(reader, 10)
    writer.close()
    assert (data, how) == (b"", "eof")
    assert lb.https.proxy_malformed == 3
    assert lb.https.proxy_timeouts == 0
    # a silent balancer connection runs into the header timeout
    await closed_without_answer(BALANCER, target, b"")
    assert lb.https.proxy_timeouts == 1
    # untrusted source with a perfect header
    await closed_without_answer(STRANGER, target, v2_header(("192.0.2.1", 1), target))
    assert lb.https.proxy_untrusted == 1
    # connect and close without a byte (a TCP health check): closed, no error counted
    accepted = lb.https.accepted
    sock = connect_from(BALANCER, target)
    sock.close()
    await wait_for(lambda: lb.https.accepted == accepted + 1 and lb.https.pending == 0)
    assert lb.https.handshakes_started == 0
    assert (lb.https.proxy_missing, lb.https.proxy_malformed) == (2, 3)
    assert lb.https.pending == 0
    assert not lb.recorded


async def test_per_source_limit_counts_the_real_client_not_the_balancer(lb: LBEdge) -> None:
    """max_pending_per_source is 3 here: behind a balancer the client in the header counts."""
    target = lb.https_target
    socks = []
    for i in range(3):
        sock = connect_from(BALANCER, target)
        sock.sendall(v2_header(("198.51.100.1", 1000 + i), target))  # header, then silence
        socks.append(sock)
    try:
        await wait_for(lambda: lb.https.awaiting_hello == 3)
        fourth = connect_from(BALANCER, target)
        fourth.sendall(v2_header(("198.51.100.1", 2000), target))
        socks.append(fourth)
        # the client's oldest waiting connection is closed, well before the hello timeout
        reader, writer = await asyncio.open_connection(sock=socks[0])
        data, how, _ = await read_to_close(reader, 5)
        writer.close()
        assert data == b""
        assert lb.https.per_source_limited == 1
        assert lb.https.hello_timeouts == 0
        await wait_for(lambda: lb.https.awaiting_hello == 3)  # the newest one waits instead
        # other clients of the same balancer are served meanwhile
        status, _ = await https_request(lb, v2_header(("198.51.100.2", 1), target), "/c/other")
        assert status.startswith(b"HTTP/1.1 302")
    finally:
        for sock in socks:
            sock.close()


# -- the HTTP listener -------------------------------------------------------------------


async def test_connection_cap_counts_the_client_in_the_header(lb: LBEdge) -> None:
    """listen.max_connections_per_source is 4 here: every connection comes from the one
    balancer, but the cap applies to the client each PROXY header names."""
    assert lb.edge.worker is not None and lb.edge.worker.connections is not None
    limits = lb.edge.worker.connections
    dst = lb.http_target
    held = []
    try:
        for i in range(4):
            reader, writer = await asyncio.open_connection(sock=connect_from(BALANCER, dst))
            writer.write(v2_header(("198.51.100.7", 3000 + i), dst))  # then idle
            held.append((reader, writer))
            await wait_for(lambda n=i + 1: limits.source_count("198.51.100.7") == n)
        # another client of the same balancer: not affected by the first one's cap
        data = await http_request(lb, v2_header(("198.51.100.8", 1), dst), "/c/neighbour")
        assert data.startswith(b"HTTP/1.1 302")
        reader, writer = await asyncio.open_connection(sock=connect_from(BALANCER, dst))
        writer.write(v2_header(("198.51.100.7", 4000), dst))
        held.append((reader, writer))
        data, _, elapsed = await read_to_close(held[0][0], 5)  # the client's oldest idle one
        assert data == b"" and elapsed < 1.0
        assert limits.stats.evicted_source == 1
        assert limits.source_count("198.51.100.7") == 4
        assert limits.source_count(BALANCER) == 0
    finally:
        for _, writer in held:
            writer.close()


async def test_http_listener_with_proxy_headers(lb: LBEdge) -> None:
    dst = lb.http_target
    data = await http_request(lb, v1_header(("203.0.113.9", 5), dst), "/c/http-v1")
    assert data.startswith(b"HTTP/1.1 302")
    data = await http_request(lb, v2_header(("2001:db8::9", 5), dst), "/c/http-v2")
    assert data.startswith(b"HTTP/1.1 302")
    data = await http_request(lb, v2_header(None, None, local=True), "/c/http-local")
    assert data.startswith(b"HTTP/1.1 302")
    assert lb.forwarded_for("/c/http-v1") == ["203.0.113.9"]
    assert lb.forwarded_for("/c/http-v2") == ["2001:db8::9"]
    assert lb.forwarded_for("/c/http-local") == [BALANCER]
    assert lb.header("/c/http-v1", "X-Forwarded-Proto") == ["http"]
    assert lb.header("/c/http-v2", "Forwarded")[0].startswith('for="[2001:db8::9]";proto=http;')

    # without a header, malformed, untrusted: closed, nothing forwarded
    assert await http_request(lb, b"", "/c/http-none") == b""
    assert await http_request(lb, b"PROXY TCP4 x y 1 2\r\n", "/c/http-bad") == b""
    assert await http_request(lb, v1_header(("192.0.2.1", 1), dst), "/c/x", source=STRANGER) == b""
    assert (lb.http.proxy_missing, lb.http.proxy_malformed, lb.http.proxy_untrusted) == (1, 1, 1)
    assert lb.http.pending == 0
    assert {r.raw_path for r in lb.recorded} == {"/c/http-v1", "/c/http-v2", "/c/http-local"}


# -- configuration -----------------------------------------------------------------------


def test_proxy_protocol_config() -> None:
    config = load_config(
        None,
        environ={
            "LINKEDGE_LISTEN_HTTPS_PROXY_PROTOCOL": "true",
            "LINKEDGE_LISTEN_PROXY_PROTOCOL_TRUSTED": "10.0.0.0/8, 2001:db8::/32,192.0.2.7",
        },
    )
    assert config.listen.https_proxy_protocol and not config.listen.http_proxy_protocol
    check_listen(config)
    trusted = TrustedNetworks(config.listen.proxy_protocol_trusted)
    assert "10.1.2.3" in trusted and "::ffff:10.1.2.3" in trusted and "192.0.2.7" in trusted
    assert "2001:db8:1::5" in trusted
    assert "11.0.0.1" not in trusted and "192.0.2.8" not in trusted and "junk" not in trusted

    config.listen.proxy_protocol_trusted = []
    with pytest.raises(ConfigError, match="proxy_protocol_trusted must name"):
        check_listen(config)
    config.listen.proxy_protocol_trusted = ["10.0.0.1/8"]
    with pytest.raises(ConfigError, match="10.0.0.1/8.*host bits"):
        check_listen(config)
    config.listen.proxy_protocol_trusted = ["10.0.0.0/8"]
    config.listen.forwarded_trusted = ["cdn"]
    with pytest.raises(ConfigError, match="listen.forwarded_trusted: 'cdn' is not a CIDR"):
        check_listen(config)
    config.listen.forwarded_trusted = []
    config.tls.max_pending_per_source = 0
    with pytest.raises(ConfigError, match="max_pending_per_source"):
        check_listen(config)
