"""Does a customer's hostname reach the edge through its CNAME chain?

One A query is enough: the resolver returns the whole CNAME chain in the answer
section, and dnspython hands it back as `chaining_result.cnames`. The rule:

- the chain reaches the edge target: ok;
- the chain goes to any other name: elsewhere (a failure), whatever that name's
  addresses are. Shared load-balancer and anycast addresses make "the other name
  happens to resolve to our addresses" common, and it proves nothing about who
  controls the name;
- no CNAME at all: the host's own A and AAAA records are compared with the edge
  target's. All of them the edge's: via_address (works, with a warning; whether it
  may be issued is `checks.issue_via_address`). Others: most often a CNAME flattened
  by a CDN proxy (Cloudflare's "proxied" records), and the customer is told so.

Resolution failures (SERVFAIL, timeouts) are "unknown", never "wrong": a flaky
resolver must not make a working customer look broken.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.inet
import dns.message
import dns.nameserver
import dns.resolver

from proxy.wire.addresses import nameserver_address

T = TypeVar("T")


class CnameStatus(enum.StrEnum):
    OK = "ok"  # the chain reaches the edge target
    VIA_ADDRESS = "via_address"  # no CNAME to the target, but the edge's own addresses
    ELSEWHERE = "elsewhere"  # CNAME to another name, or no address at all
    PROXIED = "proxied"  # answers with address records that are not the edge's
    NXDOMAIN = "nxdomain"  # the name does not exist
    UNKNOWN = "unknown"  # SERVFAIL / timeout: try again later

    @property
    def reaches_edge(self) -> bool:
        return self in (CnameStatus.OK, CnameStatus.VIA_ADDRESS)


@dataclass(frozen=True, slots=True)
class CnameResult:
    status: CnameStatus
    chain: tuple[str, ...]  # CNAME targets in order, without trailing dots
    reason: str
    addresses: tuple[str, ...] = ()  # what the name finally resolves to (A records)

    @property
    def first_target(self) -> str | None:
        return self.chain[0] if self.chain else None


class LeanNameserver(dns.nameserver.Do53Nameserver):
    """A Do53 nameserver whose UDP queries skip asyncio's datagram transport.

    dnspython's asyncio backend makes a socket, a transport and a protocol per query
    (`create_datagram_endpoint`), about a third of a lookup's CPU here. A query is one
    datagram out and one in: a plain non-blocking socket, sent at once and read when the
    loop says it is readable (`add_reader`, which asyncio's loops and uvloop both have;
    uvloop's `sock_recvfrom` raises NotImplementedError), does the same with less. The
    rest is dnspython's as before: the message is built and parsed by it, and answers
    are accepted by its rules (`ignore_unexpected`, `ignore_errors`: from the server's
    address, a response to this query, well formed; a truncated answer raises Truncated
    so the resolver retries over TCP, which goes through dnspython unchanged, as do
    queries from a source address).
    """

    async def async_query(
        self,
        request: dns.message.QueryMessage,
        timeout: float,  # noqa: ASYNC109 (dnspython's signature)
        source: str | None,
        source_port: int,
        max_size: bool,
        backend: dns.asyncbackend.Backend,
        one_rr_per_rrset: bool = False,
        ignore_trailing: bool = False,
    ) -> dns.message.Message:
        loop = asyncio.get_running_loop()
        if max_size or source or source_port:
            return await super().async_query(
                request,
                timeout,
                source,
                source_port,
                max_size,
                backend,
                one_rr_per_rrset,
                ignore_trailing,
            )
        wire = request.to_wire()
        begin = time.time()
        deadline = loop.time() + timeout
        destination = (self.address, self.port)
        with socket.socket(dns.inet.af_for_address(self.address), socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            try:
                await _datagram_io(
                    loop, sock, deadline, lambda: sock.sendto(wire, destination), sending=True
                )
            except TimeoutError:
                raise dns.exception.Timeout(timeout=timeout) from None
            while True:
                try:
                    data, sender = await _datagram_io(
                        loop, sock, deadline, lambda: sock.recvfrom(65535)
                    )
                except TimeoutError:
                    raise dns.exception.Timeout(timeout=timeout) from None
                if sender[:2] != destination:
                    continue  # not from the server asked (ignore_unexpected)
                try:
                    response = dns.message.from_wire(
                        data,
                        keyring=request.keyring,
                        request_mac=request.mac,
                        one_rr_per_rrset=one_rr_per_rrset,
                        ignore_trailing=ignore_trailing,
                        raise_on_truncation=True,
                    )
                except dns.message.Truncated as exc:
                    if not request.is_response(exc.message()):
                        continue
                    raise
                except Exception:  # noqa: S112 a malformed datagram (ignore_errors): wait on
                    continue
                if not request.is_response(response):
                    continue
                response.time = time.time() - begin
                return response


async def _datagram_io(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    deadline: float,
    attempt: Callable[[], T],
    *,
    sending: bool = False,
) -> T:
    """`attempt` (a receive on the non-blocking `sock`, or a send) once it does not
    block; TimeoutError at `deadline` (the loop's clock). Waits with `add_reader` (or
    `add_writer`) and one timer: no task, no transport."""
    while True:
        try:
            return attempt()
        except (BlockingIOError, InterruptedError):
            pass
        left = deadline - loop.time()
        if left <= 0:
            raise TimeoutError
        ready: asyncio.Future[None] = loop.create_future()
        fd = sock.fileno()
        if sending:
            loop.add_writer(fd, _set_done, ready)
        else:
            loop.add_reader(fd, _set_done, ready)
        timer = loop.call_later(left, _set_done, ready)
        try:
            await ready
        finally:
            timer.cancel()
            if sending:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _lean(nameserver: str | dns.nameserver.Nameserver, port: int) -> dns.nameserver.Nameserver:
    if isinstance(nameserver, str) and dns.inet.is_address(nameserver):
        return LeanNameserver(nameserver, port)
    if type(nameserver) is dns.nameserver.Do53Nameserver:
        return LeanNameserver(nameserver.address, nameserver.port)
    if isinstance(nameserver, str):
        raise ValueError(f"nameserver {nameserver} is not an IP address")
    return nameserver


def make_resolver(nameservers: list[str], timeout: float) -> dns.asyncresolver.Resolver:
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [
            LeanNameserver(host, port) for host, port in map(nameserver_address, nameservers)
        ]
    else:
        resolver = dns.asyncresolver.Resolver()
        resolver.nameservers = [
            _lean(ns, resolver.nameserver_ports.get(str(ns), resolver.port))
            for ns in resolver.nameservers
        ]
    resolver.lifetime = timeout
    resolver.timeout = min(timeout, 1.5)
    resolver.cache = None  # the callers decide how long an answer counts
    return resolver


class CnameChecker:
    def __init__(
        self,
        nameservers: list[str],
        timeout: float = 3.0,
        resolver: dns.asyncresolver.Resolver | None = None,
    ) -> None:
        self._resolver = resolver or make_resolver(nameservers, timeout)

    @property
    def resolver(self) -> dns.asyncresolver.Resolver:
        return self._resolver

    async def check(self, hostname: str, target: str) -> CnameResult:
        target = target.rstrip(".").lower()
        try:
            answer = await self._resolver.resolve(hostname, "A", raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            chain = _chain_from_nxdomain(exc, hostname)
            if target in chain:
                return CnameResult(CnameStatus.OK, chain, f"CNAME reaches {target}")
            if chain:
                return CnameResult(
                    CnameStatus.ELSEWHERE,
                    chain,
                    f"{hostname} points at {chain[-1]} (which does not exist), not {target}",
                )
            return CnameResult(
                CnameStatus.NXDOMAIN,
                chain,
                f"{hostname} does not exist in DNS; add a CNAME record pointing to {target}",
            )
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
            return CnameResult(CnameStatus.UNKNOWN, (), f"DNS lookup failed, will retry: {exc}")
        except dns.exception.DNSException as exc:
            return CnameResult(CnameStatus.UNKNOWN, (), f"DNS error, will retry: {exc}")
        chain = _chain(answer)
        addresses = tuple(sorted(str(r) for r in answer.rrset)) if answer.rrset else ()
        if target in chain:
            return CnameResult(CnameStatus.OK, chain, f"CNAME reaches {target}", addresses)
        if chain:  # another name: its addresses do not matter (shared LB / anycast)
            return CnameResult(
                CnameStatus.ELSEWHERE,
                chain,
                f"{hostname} points at {chain[0]}, not {target}; change the CNAME to {target}",
                addresses,
            )
        # No CNAME: the host's own A and AAAA records must all be the edge's.
        v6 = await self._aaaa(hostname)
        if isinstance(v6, CnameResult):
            return v6
        v6_chain, v6_addresses = v6
        if v6_chain:  # the AAAA answer has a CNAME the A answer did not: not ours either
            return CnameResult(
                CnameStatus.ELSEWHERE,
                v6_chain,
                f"{hostname} points at {v6_chain[0]} (for IPv6), not {target};"
                f" use one CNAME to {target}",
                addresses,
            )
        addresses = tuple(sorted((*addresses, *v6_addresses)))
        if not addresses:
            return CnameResult(
                CnameStatus.ELSEWHERE,
                chain,
                f"no CNAME record for {hostname}; add one pointing to {target}",
            )
        edge = await self._edge_addresses(target)
        if edge is None:
            return CnameResult(
                CnameStatus.UNKNOWN,
                chain,
                f"cannot resolve the edge target {target} to compare addresses, will retry",
                addresses,
            )
        if set(addresses) <= edge:
            return CnameResult(
                CnameStatus.VIA_ADDRESS,
                chain,
                f"resolves to the edge's addresses ({', '.join(addresses)}) without a CNAME"
                f" to {target}; it works, but point a CNAME at {target} so it keeps working"
                " when the edge's addresses change",
                addresses,
            )
        return CnameResult(
            CnameStatus.PROXIED,
            chain,
            f"{hostname} answers with addresses {', '.join(addresses)}, not the edge's and no"
            f" CNAME: if the CNAME to {target} sits behind a CDN proxy (e.g. Cloudflare's orange"
            " cloud), switch it to DNS only; otherwise replace the A records with that CNAME",
            addresses,
        )

    async def _aaaa(self, hostname: str) -> tuple[tuple[str, ...], tuple[str, ...]] | CnameResult:
        """The host's CNAME chain and IPv6 addresses as the AAAA answer has them."""
        try:
            answer = await self._resolver.resolve(hostname, "AAAA", raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return (), ()  # the A query just said it exists: an inconsistent server
        except dns.exception.DNSException as exc:
            return CnameResult(CnameStatus.UNKNOWN, (), f"DNS lookup failed, will retry: {exc}")
        addresses = tuple(str(r) for r in answer.rrset) if answer.rrset else ()
        return _chain(answer), addresses

    async def _edge_addresses(self, target: str) -> set[str] | None:
        found: set[str] = set()
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(target, rdtype, raise_on_no_answer=False)
            except dns.resolver.NXDOMAIN:
                return found
            except dns.exception.DNSException:
                return None
            if answer.rrset:
                found.update(str(r) for r in answer.rrset)
        return found


def _chain(answer: dns.resolver.Answer) -> tuple[str, ...]:
    return tuple(
        str(rrset[0].target).rstrip(".").lower() for rrset in answer.chaining_result.cnames
    )


def _chain_from_nxdomain(exc: dns.resolver.NXDOMAIN, hostname: str) -> tuple[str, ...]:
    # NXDOMAIN at the end of a chain still carries the CNAMEs seen on the way.
    try:
        canonical = str(exc.canonical_name).rstrip(".").lower()
    except Exception:  # no responses recorded
        return ()
    return () if canonical == hostname else (canonical,)
