"""Tests for the demo stack: PKI, DNS server, Pebble runner and sample backend."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.resolver
import josepy as jose
import pytest
from acme import client as acme_client
from acme import crypto_util, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store

from proxy.demo.backend import RecordedRequest, start_backend
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer
from proxy.demo.pki import write_tls_identity

# -- pki ---------------------------------------------------------------------------


def test_tls_identity_verifies_for_names_and_ips(tmp_path: Path) -> None:
    ident = write_tls_identity(tmp_path / "id", ["localhost", "127.0.0.1"])
    assert {p.name for p in (tmp_path / "id").iterdir()} == {"ca.pem", "cert.pem", "key.pem"}
    assert stat.S_IMODE(ident.key_path.stat().st_mode) == 0o600

    ca = x509.load_pem_x509_certificate(ident.ca_path.read_bytes())
    leaf = x509.load_pem_x509_certificate(ident.cert_path.read_bytes())
    store = Store([ca])
    for name in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        PolicyBuilder().store(store).build_server_verifier(name).verify(leaf, [])

    key = serialization.load_pem_private_key(ident.key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == leaf.public_key()
    # Usable by a stdlib TLS server as-is.
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
        ident.cert_path, ident.key_path
    )


# -- DNS server --------------------------------------------------------------------


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    with DNSServer() as server:
        yield server


def _resolver(server: DNSServer) -> dns.resolver.Resolver:
    res = dns.resolver.Resolver(configure=False)
    res.nameservers = [server.address[0]]
    res.port = server.address[1]
    res.lifetime = 2.0
    return res


def _query(server: DNSServer, name: str, rdtype: str, tcp: bool = False) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(q, server.address[0], port=server.address[1], timeout=2.0)


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_dns_cname_chain_and_nodata(dns_server: DNSServer, tcp: bool) -> None:
    dns_server.set_cname("Click.Customer.example.", "edge.linkedge.test")
    dns_server.set_cname("edge.linkedge.test", "lb.linkedge.test")
    dns_server.set_a("lb.linkedge.test", ["127.0.0.1", "127.0.0.2"])

    answer = _resolver(dns_server).resolve("click.customer.example", "A", tcp=tcp)
    assert str(answer.canonical_name) == "lb.linkedge.test."
    assert sorted(r.to_text() for r in answer) == ["127.0.0.1", "127.0.0.2"]
    assert answer.rrset is not None and answer.rrset.ttl == 1

    # AAAA of a CNAME'd name with only A at the end: NOERROR with the chain (Pebble needs this).
    resp = _query(dns_server, "click.customer.example", "AAAA", tcp=tcp)
    assert resp.rcode() == dns.rcode.NOERROR
    assert [str(rrset.name) for rrset in resp.answer] == [
        "click.customer.example.",
        "edge.linkedge.test.",
    ]
    assert resp.flags & dns.flags.AA and resp.flags & dns.flags.RA
    assert [str(q.name) for q in resp.question] == ["click.customer.example."]

    # Direct CNAME query is not followed.
    resp = _query(dns_server, "click.customer.example", "CNAME", tcp=tcp)
    assert [rrset.to_text() for rrset in resp.answer] == [
        "click.customer.example. 1 IN CNAME edge.linkedge.test."
    ]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_dns_nxdomain_nodata_servfail(dns_server: DNSServer, tcp: bool) -> None:
    dns_server.set_a("a.b.zone.test", ["127.0.0.1"])
    dns_server.set_servfail("broken.zone.test")
    res = _resolver(dns_server)

    with pytest.raises(dns.resolver.NXDOMAIN):
        res.resolve("missing.zone.test", "A", tcp=tcp)
    with pytest.raises(dns.resolver.NoAnswer):  # name exists, no AAAA
        res.resolve("a.b.zone.test", "AAAA", tcp=tcp)
    with pytest.raises(dns.resolver.NoAnswer):  # empty non-terminal
        res.resolve("b.zone.test", "A", tcp=tcp)
    assert _query(dns_server, "broken.zone.test", "A", tcp=tcp).rcode() == dns.rcode.SERVFAIL

    dns_server.set_servfail("broken.zone.test", on=False)
    with pytest.raises(dns.resolver.NXDOMAIN):
        res.resolve("broken.zone.test", "A", tcp=tcp)


def test_dns_chain_into_missing_name_and_loops(dns_server: DNSServer) -> None:
    dns_server.set_cname("dangling.test", "gone.test")
    resp = _query(dns_server, "dangling.test", "A")
    assert resp.rcode() == dns.rcode.NXDOMAIN
    assert len(resp.answer) == 1  # the CNAME is still reported

    dns_server.set_cname("loop1.test", "loop2.test")
    dns_server.set_cname("loop2.test", "loop1.test")
    assert _query(dns_server, "loop1.test", "A").rcode() == dns.rcode.SERVFAIL

    dns_server.set_servfail("gone.test")
    assert _query(dns_server, "dangling.test", "A").rcode() == dns.rcode.SERVFAIL


def test_dns_caa_txt_aaaa_and_updates(dns_server: DNSServer) -> None:
    res = _resolver(dns_server)
    dns_server.set_caa("customer.example", [(0, "issue", "pebble.letsencrypt.org"), (128, "x", "")])
    caa = sorted((r.flags, r.tag, r.value) for r in res.resolve("customer.example", "CAA"))
    assert caa == [(0, b"issue", b"pebble.letsencrypt.org"), (128, b"x", b"")]

    long_value = "v" * 300
    dns_server.set_txt("_acme.customer.example", [long_value, "short"])
    txt = {b"".join(r.strings).decode() for r in res.resolve("_acme.customer.example", "TXT")}
    assert txt == {long_value, "short"}

    dns_server.set_aaaa("v6.customer.example", ["::1"])
    assert [r.to_text() for r in res.resolve("v6.customer.example", "AAAA")] == ["::1"]

    # A CNAME and other data are exclusive; setting one replaces the other.
    dns_server.set_cname("switch.example", "v6.customer.example")
    dns_server.set_a("switch.example", ["127.0.0.9"])
    resp = _query(dns_server, "switch.example", "A")
    assert [rrset.to_text() for rrset in resp.answer] == ["switch.example. 1 IN A 127.0.0.9"]

    dns_server.remove("SWITCH.example.")
    with pytest.raises(dns.resolver.NXDOMAIN):
        res.resolve("switch.example", "A")


def test_dns_query_counting(dns_server: DNSServer) -> None:
    dns_server.set_a("count.test", ["127.0.0.1"])
    res = _resolver(dns_server)
    res.resolve("COUNT.test.", "A")
    res.resolve("count.test", "A", tcp=True)
    with pytest.raises(dns.resolver.NoAnswer):
        res.resolve("count.test", "AAAA")
    with pytest.raises(dns.resolver.NXDOMAIN):
        res.resolve("other.test", "A")

    assert dns_server.query_count() == 4
    assert dns_server.query_count("count.test") == 3
    assert dns_server.query_count("count.test", "A") == 2
    assert dns_server.query_count("count.test", "aaaa") == 1
    assert dns_server.query_count(rdtype="A", transport="tcp") == 1
    dns_server.reset_counts()
    assert dns_server.query_count() == 0


def test_dns_survives_malformed_packets(dns_server: DNSServer) -> None:
    dns_server.set_a("ok.test", ["127.0.0.1"])
    host, port = dns_server.address
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.sendto(b"\x01\x02garbage", (host, port))
        udp.sendto(b"", (host, port))
    with socket.create_connection((host, port), timeout=2) as tcp:
        tcp.sendall(struct.pack("!H", 7) + b"garbage")
        assert tcp.recv(10) == b""  # server closed the connection
    with socket.create_connection((host, port), timeout=2) as tcp:
        tcp.sendall(b"\x00")  # truncated length prefix, then hang up

    for tcp_flag in (False, True):
        answer = _resolver(dns_server).resolve("ok.test", "A", tcp=tcp_flag)
        assert [r.to_text() for r in answer] == ["127.0.0.1"]
    assert dns_server.query_count() == 2


def test_dns_stop_is_prompt_and_leaves_no_threads() -> None:
    before = set(threading.enumerate())
    server = DNSServer()
    server.start()
    host, port = server.address
    assert server.nameserver == f"127.0.0.1:{port}"
    idle = socket.create_connection((host, port))  # an idle TCP client must not block stop()
    time.sleep(0.05)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 1.0
    idle.close()
    assert set(threading.enumerate()) <= before
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=1).close()


# -- Pebble ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pebble_stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[DNSServer, PebbleServer]]:
    with DNSServer() as dns_srv:
        pebble = PebbleServer(
            tmp_path_factory.mktemp("pebble"), dns_srv.nameserver, validity_seconds=3600
        )
        with pebble:
            yield dns_srv, pebble


def _get(url: str, cafile: Path) -> bytes:
    ctx = ssl.create_default_context(cafile=str(cafile))
    with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:
        return bytes(resp.read())


def _place_order(pebble: PebbleServer, name: str) -> messages.OrderResource:
    account_key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    net = acme_client.ClientNetwork(
        account_key,
        alg=jose.ES256,
        verify_ssl=str(pebble.ca_bundle),  # type: ignore[arg-type]
    )
    directory = acme_client.ClientV2.get_directory(pebble.directory_url, net)
    acme = acme_client.ClientV2(directory, net)
    acme.new_account(messages.NewRegistration.from_data(terms_of_service_agreed=True))
    cert_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return acme.new_order(crypto_util.make_csr(cert_key, [name]))


def _pebble_root(pebble: PebbleServer) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pebble.root_path.read_bytes())


def test_pebble_serves_directory_and_root(pebble_stack: tuple[DNSServer, PebbleServer]) -> None:
    _, pebble = pebble_stack
    assert pebble.directory_url.startswith("https://127.0.0.1:")
    assert b"newOrder" in _get(pebble.directory_url, pebble.ca_bundle)
    root = _pebble_root(pebble)
    assert root.subject == root.issuer  # self-signed: the issuing root, not an intermediate
    assert "Pebble Root CA" in root.subject.rfc4514_string()
    assert "certificate validity period of 3600 seconds" in pebble.log_text()
    assert "reject 0% of good nonces" in pebble.log_text()
    assert pebble.order_count() == 0


def test_pebble_counts_orders_and_restarts(pebble_stack: tuple[DNSServer, PebbleServer]) -> None:
    dns_srv, pebble = pebble_stack
    dns_srv.set_cname("click.customer.example", "edge.linkedge.test")
    dns_srv.set_a("edge.linkedge.test", ["127.0.0.1"])

    order = _place_order(pebble, "click.customer.example")
    assert order.body.identifiers[0].value == "click.customer.example"
    assert pebble.order_count() == 1

    url, old_root = pebble.directory_url, _pebble_root(pebble)
    old_mgmt = pebble.management_url
    pebble.restart()
    assert (pebble.directory_url, pebble.management_url) == (url, old_mgmt)
    assert b"newOrder" in _get(url, pebble.ca_bundle)  # same listener CA after restart
    assert _pebble_root(pebble) != old_root  # Pebble regenerated, we re-downloaded
    assert pebble.order_count() == 1  # counted across restarts


@pytest.mark.parametrize("binary", ["false", "/nonexistent/pebble"])
def test_pebble_start_failure_is_reported(tmp_path: Path, binary: str) -> None:
    pebble = PebbleServer(tmp_path, "127.0.0.1:1", binary=binary)
    with pytest.raises(RuntimeError, match="Pebble"):
        pebble.start(timeout=5)
    pebble.stop()  # idempotent after a failed start


# -- backend -----------------------------------------------------------------------


async def test_backend_routes_and_recording() -> None:
    recorded: list[RecordedRequest] = []
    runner, base = await start_backend(recorded=recorded)
    try:
        assert base.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/c/abc123", allow_redirects=False) as resp:
                assert resp.status == 302
                assert resp.headers["Location"] == "https://shop.example/landing/abc123?utm=mail"
                assert resp.headers["Set-Cookie"] == "clk=abc123; Path=/; HttpOnly"
                assert resp.headers["Cache-Control"] == "no-store"
                assert await resp.read()
            async with session.head(f"{base}/c/abc123", allow_redirects=False) as resp:
                assert resp.status == 302
                assert await resp.read() == b""

            async with session.post(f"{base}/unsubscribe", data=b"email=a%40b.c") as resp:
                assert resp.status == 200
                assert (await resp.json())["length"] == 13

            headers = [("X-Second", "2"), ("X-First", "1"), ("X-Second", "again")]
            async with session.put(f"{base}/echo?q=1", data=b"hello", headers=headers) as resp:
                echo = await resp.json()
            assert echo["method"] == "PUT"
            assert echo["path_qs"] == "/echo?q=1"
            assert echo["body"] == "hello"
            sent = [tuple(h) for h in echo["headers"] if h[0].startswith("X-")]
            assert sent == headers

            async with session.get(f"{base}/big?bytes=200000") as resp:
                assert resp.status == 200
                assert len(await resp.read()) == 200000
            async with session.get(f"{base}/slow?seconds=0.05") as resp:
                assert resp.status == 200
            async with session.get(f"{base}/slow?seconds=nope") as resp:
                assert resp.status == 400
            async with session.get(f"{base}/nothing-here") as resp:
                assert resp.status == 404
            with pytest.raises(TimeoutError):
                timeout = aiohttp.ClientTimeout(total=0.2)
                async with session.get(f"{base}/slow?seconds=30", timeout=timeout):
                    pass
    finally:
        started = time.monotonic()
        await runner.cleanup()
        assert time.monotonic() - started < 3

    assert [r.path_qs for r in recorded][:3] == ["/c/abc123", "/c/abc123", "/unsubscribe"]
    assert recorded[1].method == "HEAD"
    assert recorded[2].body == b"email=a%40b.c"
    put = recorded[3]
    assert [h for h in put.headers if h[0].startswith("X-")] == headers
    assert put.peer is not None and put.peer[0] == "127.0.0.1"
    assert recorded[-1].path_qs == "/slow?seconds=30"
