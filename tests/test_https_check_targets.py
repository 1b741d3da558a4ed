"""Issue 8, part 2: the https check dials only the edge's own addresses (no SSRF).

Real DNS server, real TLS servers on loopback. The customer's host is only the SNI:
a rebinding answer, or a host pointed at an internal address, never makes the check
connect anywhere but the edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import pytest
from test_checks import _write_pki, checker_for

from proxy.app.config import ConfigError, load_config
from proxy.app.settings import checks as check_settings
from proxy.demo.dnsserver import DNSServer
from proxy.hosts.checks import CheckState
from proxy.hosts.checks.https import is_public


class RecordingTLSServer:
    """A TLS server that records every TCP connection it accepts, before any TLS."""

    def __init__(self) -> None:
        self.peers: list[tuple[str, int]] = []
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, ip: str, port: int, chain: Path, key: Path) -> int:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(chain, key)
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((ip, port))
        except OSError:
            sock.close()
            raise
        sock.listen(16)
        sock.setblocking(False)
        self._sock = sock
        self._spawn(self._accept(sock, ctx))
        return int(sock.getsockname()[1])

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, peer = await loop.sock_accept(sock)
            self.peers.append(peer[:2])
            self._spawn(self._handshake(conn, ctx))

    async def _handshake(self, conn: socket.socket, ctx: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await asyncio.wait_for(
                loop.connect_accepted_socket(asyncio.Protocol, conn, ssl=ctx), 5
            )
            transport.close()
        except (OSError, ssl.SSLError, TimeoutError):
            conn.close()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
            self._sock = None


@contextlib.asynccontextmanager
async def tls_servers(count: int) -> AsyncIterator[list[RecordingTLSServer]]:
    servers = [RecordingTLSServer() for _ in range(count)]
    try:
        yield servers
    finally:
        for server in servers:
            await server.close()


async def test_a_rebinding_answer_never_redirects_the_check(
    tmp_path: Path, dns_server: DNSServer
) -> None:
    """The host answers the edge's address to the cname check, then an internal one."""
    edge_ip, internal_ip = "127.0.0.211", "127.0.0.212"
    target, host = "edge-rebind.linkedge.test", "links.rebind-shop.test"
    dns_server.set_a(target, [edge_ip])
    dns_server.set_a(host, [edge_ip])  # no CNAME, the edge's address: passes with a warning
    dns_server.rebind_a(host, [internal_ip], after=1)  # every later A answer: internal
    ca, chain, key = _write_pki(tmp_path / "edge", host, days_before=1, days_after=60)
    _ca2, chain2, key2 = _write_pki(tmp_path / "internal", host, days_before=1, days_after=60)
    async with tls_servers(2) as (edge, internal):
        port = await edge.start(edge_ip, 0, chain, key)
        await internal.start(internal_ip, port, chain2, key2)  # same port: a real target
        checker = checker_for(
            dns_server, target, https_port=port, ca_bundle=str(ca), https_addresses=(edge_ip,)
        )
        report = await checker.check_all(host)
        # the rebinding did happen: the name now answers the internal address
        again = await checker.cname_checker.check(host, target)
    cname, https = report.get("cname"), report.get("https")
    assert cname is not None and (cname.state, cname.code) == (CheckState.WARN, "via_address")
    assert https is not None and (https.state, https.code) == (CheckState.PASS, "valid"), https
    assert https.details["address"] == f"{edge_ip}:{port}"
    assert again.addresses == (internal_ip,)
    assert internal.peers == []  # not one connection to the internal address
    assert len(edge.peers) == 1


@pytest.mark.parametrize(
    "addresses",
    [
        ["127.0.0.213"],  # loopback (a TLS server listens there: it must see nothing)
        ["10.1.2.3", "172.16.0.1", "192.168.1.1"],  # RFC 1918
        ["100.64.0.1", "169.254.169.254"],  # CGNAT, link-local (cloud metadata)
        ["224.0.0.1", "240.0.0.1", "0.0.0.0"],  # multicast, reserved, unspecified
    ],
)
async def test_resolved_edge_addresses_that_are_not_public_are_never_dialled(
    tmp_path: Path, dns_server: DNSServer, addresses: list[str]
) -> None:
    target = f"edge-private-{addresses[0].replace('.', '-')}.linkedge.test"
    host = f"links.private-{addresses[0].replace('.', '-')}.test"
    dns_server.set_a(target, addresses)
    dns_server.set_cname(host, target)
    ca, chain, key = _write_pki(tmp_path, host, days_before=1, days_after=60)
    async with tls_servers(1) as (listener,):
        port = await listener.start("127.0.0.213", 0, chain, key)
        # no checks.https_addresses: only what the edge target resolves to, if public
        checker = checker_for(dns_server, target, https_port=port, ca_bundle=str(ca))
        report = await checker.check_all(host)
    https = report.get("https")
    assert https is not None
    assert (https.state, https.code) == (CheckState.UNKNOWN, "no_edge_address"), https
    assert "checks.https_addresses" in https.reason
    assert sorted(https.details["edge_addresses"]) == sorted(addresses)
    assert listener.peers == []


def test_public_address_filter() -> None:
    private = [
        "127.0.0.1", "::1", "10.0.0.1", "172.31.255.255", "192.168.0.1", "100.64.0.1",
        "100.127.255.254", "169.254.169.254", "fe80::1", "fc00::1", "fd12:3456::1",
        "224.0.0.251", "ff02::1", "240.0.0.1", "255.255.255.255", "0.0.0.0", "::",
        "::ffff:127.0.0.1", "::ffff:10.0.0.1", "64:ff9b::a00:1", "192.0.2.1", "2001:db8::1",
        "not an address",
    ]  # fmt: skip
    public = ["93.184.215.14", "1.1.1.1", "2606:4700:4700::1111"]
    assert [a for a in private if is_public(a)] == []
    assert [a for a in public if not is_public(a)] == []


async def test_every_edge_address_is_checked_ipv4_and_ipv6(
    tmp_path: Path, dns_server: DNSServer
) -> None:
    v4, v6 = "127.0.0.214", "::1"
    target, host = "edge-dual.linkedge.test", "links.dual-shop.test"
    dns_server.set_a(target, [v4])
    dns_server.set_aaaa(target, [v6])
    dns_server.set_cname(host, target)
    ca, chain, key = _write_pki(tmp_path / "good", host, days_before=1, days_after=60)
    old = tmp_path / "old"
    old.mkdir()
    # the same CA, an expired leaf: write a second PKI and reuse its files under the first CA
    _ca, old_chain, old_key = _write_pki(old, host, days_before=50, days_after=-1)
    async with tls_servers(2) as (four, six):
        port = await four.start(v4, 0, chain, key)
        try:
            await six.start(v6, port, chain, key)
        except OSError as exc:  # the same port number taken on ::1 by someone else
            pytest.skip(f"cannot listen on [::1]:{port}: {exc}")
        checker = checker_for(
            dns_server, target, https_port=port, ca_bundle=str(ca), https_addresses=(v4, v6)
        )
        both = (await checker.check_all(host)).get("https")
        assert both is not None and (both.state, both.code) == (CheckState.PASS, "valid"), both
        assert both.details["addresses"] == [f"{v4}:{port}", f"[{v6}]:{port}"]
        assert both.details["unreachable"] == []
        assert (len(four.peers), len(six.peers)) == (1, 1)

        # one node serves a bad certificate: that is what its recipients get
        await six.close()
        six_bad = RecordingTLSServer()
        await six_bad.start(v6, port, old_chain, old_key)
        try:
            bad = (await checker.check_all(host)).get("https")
        finally:
            await six_bad.close()
        assert bad is not None and bad.state is CheckState.FAIL, bad
        assert bad.details["address"] == f"[{v6}]:{port}"

        # a node that cannot be reached from here does not hide the others' answer
        partial = (await checker.check_all(host)).get("https")
        assert partial is not None and partial.code == "valid", partial
        assert partial.details["unreachable"] == [f"[{v6}]:{port}"]


def test_listed_addresses_must_be_ip_literals() -> None:
    config = load_config(None, environ={"LINKEDGE_CHECKS_HTTPS_ADDRESSES": "[::1], 127.0.0.9"})
    assert check_settings(config).https_addresses == ("::1", "127.0.0.9")
    bad = load_config(None, environ={"LINKEDGE_CHECKS_HTTPS_ADDRESSES": "127.0.0.9,edge.test"})
    with pytest.raises(ConfigError, match=r"checks.https_addresses: 'edge.test' is not an IP"):
        check_settings(bad)
