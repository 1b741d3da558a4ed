"""The DNS checks' UDP transport (dnscheck.LeanNameserver) keeps dnspython's rules.

Real sockets: the test DNS server for truncation and TCP, and a hand-driven UDP
nameserver for what a resolver must ignore (a datagram from elsewhere, garbage, an
answer to another query) and for silence. Each on asyncio's loop and on uvloop (the
edge's default, whose `sock_recvfrom` is not implemented).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Coroutine, Iterator
from typing import Any

import dns.message
import dns.nameserver
import dns.rrset
import pytest

from proxy.demo.dnsserver import DNSServer
from proxy.hosts.dnscheck import CnameChecker, CnameStatus, LeanNameserver, make_resolver

LOOPS = ["asyncio", "uvloop"]


def _run(loop: str, coro: Coroutine[Any, Any, None]) -> None:
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        uvloop.run(coro)
    else:
        asyncio.run(coro)


def test_configured_nameservers_use_the_lean_transport(dns_server: DNSServer) -> None:
    resolver = make_resolver([dns_server.nameserver], 2.0)
    assert all(type(ns) is LeanNameserver for ns in resolver.nameservers)


@pytest.mark.parametrize("loop", LOOPS)
def test_udp_queries_on_either_loop_skip_dnspythons_transport(
    dns_server: DNSServer, loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refused(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("dnspython's own UDP transport was used")

    monkeypatch.setattr(dns.nameserver.Do53Nameserver, "async_query", refused)
    host = "lean.lean-dns.test"
    dns_server.set_a(host, ["192.0.2.44"])

    async def lookups() -> None:
        resolver = make_resolver([dns_server.nameserver], 3.0)
        for _ in range(3):
            answer = await resolver.resolve(host, "A")
            assert [str(r) for r in answer] == ["192.0.2.44"]

    _run(loop, lookups())


@pytest.mark.parametrize("loop", LOOPS)
def test_a_truncated_answer_is_asked_again_over_tcp(dns_server: DNSServer, loop: str) -> None:
    host = "many.lean-dns.test"
    addresses = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(60)]  # > 512 bytes
    dns_server.set_a(host, addresses)
    dns_server.reset_counts()

    async def lookup() -> None:
        resolver = make_resolver([dns_server.nameserver], 3.0)
        answer = await resolver.resolve(host, "A")
        assert sorted(str(r) for r in answer) == sorted(addresses)

    _run(loop, lookup())
    assert dns_server.query_count(host, "A", "udp") == 1
    assert dns_server.query_count(host, "A", "tcp") == 1


@pytest.fixture
def unruly_nameserver() -> Iterator[tuple[str, int, list[str]]]:
    """Answers each query with, in order: a datagram from another socket, garbage, an
    answer with another id, then the real answer. Queries named `silent.*` get nothing."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    seen: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                data, client = sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            query = dns.message.from_wire(data)
            name = query.question[0].name.to_text()
            seen.append(name)
            if name.startswith("silent."):
                continue
            answer = dns.message.make_response(query)
            answer.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "192.0.2.7"))
            wrong = dns.message.make_response(query)
            wrong.id = (query.id + 1) % 65536
            wrong.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "198.51.100.66"))
            spoof = dns.message.make_response(query)
            spoof.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "203.0.113.66"))
            other.sendto(spoof.to_wire(), client)  # right id, wrong sender
            sock.sendto(b"\x00garbage", client)
            sock.sendto(wrong.to_wire(), client)
            sock.sendto(answer.to_wire(), client)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield "127.0.0.1", sock.getsockname()[1], seen
    stop.set()
    thread.join(timeout=5)
    sock.close()
    other.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_only_the_servers_answer_to_this_query_counts(
    unruly_nameserver: tuple[str, int, list[str]], loop: str
) -> None:
    host, port, seen = unruly_nameserver

    async def lookup() -> None:
        resolver = make_resolver([f"{host}:{port}"], 3.0)
        answer = await resolver.resolve("links.unruly.test", "A")
        assert [str(r) for r in answer] == ["192.0.2.7"]

    _run(loop, lookup())
    assert seen == ["links.unruly.test."]


@pytest.mark.parametrize("loop", LOOPS)
def test_silence_is_unknown_not_wrong(
    unruly_nameserver: tuple[str, int, list[str]], loop: str
) -> None:
    host, port, seen = unruly_nameserver

    async def check() -> None:
        checker = CnameChecker([f"{host}:{port}"], timeout=0.6)
        result = await checker.check("silent.unruly.test", "edge.linkedge.test")
        assert result.status is CnameStatus.UNKNOWN
        # the query left no task behind on the loop
        assert not asyncio.all_tasks() - {asyncio.current_task()}

    _run(loop, check())
    assert seen and all(name == "silent.unruly.test." for name in seen)
