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

import enum
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from proxy.wire.addresses import nameserver_address


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


def make_resolver(nameservers: list[str], timeout: float) -> dns.asyncresolver.Resolver:
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(host, port)
            for host, port in map(nameserver_address, nameservers)
        ]
    else:
        resolver = dns.asyncresolver.Resolver()
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
