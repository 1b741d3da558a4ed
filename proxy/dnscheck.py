"""Does a customer's hostname reach the edge through its CNAME chain?

One A query is enough: the resolver returns the whole CNAME chain in the answer
section, and dnspython hands it back as `chaining_result.cnames`. Resolution
failures (SERVFAIL, timeouts) are "unknown", never "wrong": a flaky resolver must
not make a working customer look broken.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from .config import parse_nameserver


class CnameStatus(enum.StrEnum):
    OK = "ok"  # the chain reaches the edge target
    ELSEWHERE = "elsewhere"  # resolves, but not through the edge target
    NXDOMAIN = "nxdomain"  # the name does not exist
    UNKNOWN = "unknown"  # SERVFAIL / timeout: try again later


@dataclass(frozen=True, slots=True)
class CnameResult:
    status: CnameStatus
    chain: tuple[str, ...]  # CNAME targets in order, without trailing dots
    reason: str

    @property
    def first_target(self) -> str | None:
        return self.chain[0] if self.chain else None


class CnameChecker:
    def __init__(self, nameservers: list[str], timeout: float = 3.0) -> None:
        if nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port)
                for host, port in map(parse_nameserver, nameservers)
            ]
        else:
            self._resolver = dns.asyncresolver.Resolver()
        self._resolver.lifetime = timeout
        self._resolver.timeout = min(timeout, 1.5)
        self._resolver.cache = None  # the callers decide how long an answer counts

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
                    f"CNAME points to {chain[-1]} (which does not exist), not {target}",
                )
            return CnameResult(CnameStatus.NXDOMAIN, chain, f"{hostname} does not exist in DNS")
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
            return CnameResult(CnameStatus.UNKNOWN, (), f"DNS lookup failed, will retry: {exc}")
        except dns.exception.DNSException as exc:
            return CnameResult(CnameStatus.UNKNOWN, (), f"DNS error, will retry: {exc}")
        chain = tuple(
            str(rrset[0].target).rstrip(".").lower() for rrset in answer.chaining_result.cnames
        )
        if target in chain:
            return CnameResult(CnameStatus.OK, chain, f"CNAME reaches {target}")
        if chain:
            return CnameResult(
                CnameStatus.ELSEWHERE,
                chain,
                f"CNAME points to {chain[0]}, not {target}",
            )
        addresses = sorted(str(r) for r in answer.rrset) if answer.rrset else []
        if addresses:
            return CnameResult(
                CnameStatus.ELSEWHERE,
                (),
                f"no CNAME: {hostname} has address records ({', '.join(addresses)});"
                f" point a CNAME at {target}",
            )
        return CnameResult(CnameStatus.ELSEWHERE, (), f"no CNAME record for {hostname}")


def _chain_from_nxdomain(exc: dns.resolver.NXDOMAIN, hostname: str) -> tuple[str, ...]:
    # NXDOMAIN at the end of a chain still carries the CNAMEs seen on the way.
    try:
        canonical = str(exc.canonical_name).rstrip(".").lower()
    except Exception:  # no responses recorded
        return ()
    return () if canonical == hostname else (canonical,)
