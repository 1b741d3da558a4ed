"""Runs the three checks of a tracking host and hands back one report."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.hosts.checks.caa import check_caa
from proxy.hosts.checks.cname import check_cname
from proxy.hosts.checks.https import HttpsProber
from proxy.hosts.checks.model import CheckReport, CheckResult, CheckState
from proxy.hosts.dnscheck import CnameChecker, make_resolver


@dataclass(frozen=True, slots=True)
class CheckSettings:
    edge_target: str
    nameservers: tuple[str, ...] = ()
    dns_timeout: float = 3.0
    caa_issuer: str = "letsencrypt.org"
    https_port: int = 443
    ca_bundle: str | None = None
    https_timeout: float = 10.0
    https_addresses: tuple[str, ...] = ()  # the edge's, dialled by the https check
    issue_via_address: bool = True  # no CNAME, the edge's A/AAAA records: warn (else fail)


class HostChecker:
    def __init__(self, settings: CheckSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._clock = clock
        resolver = make_resolver(list(settings.nameservers), settings.dns_timeout)
        self._resolver = resolver
        self._dns_inflight: dict[tuple[str, str | None], asyncio.Future[CheckReport]] = {}
        self.cname_checker = CnameChecker([], resolver=resolver)
        self._https = HttpsProber(
            resolver,
            settings.https_port,
            settings.ca_bundle,
            settings.https_timeout,
            clock,
            edge_target=settings.edge_target,
            addresses=settings.https_addresses,
        )

    async def check_dns(self, hostname: str, account_uri: str | None = None) -> CheckReport:
        """cname and caa, concurrently: what decides whether we may issue.

        Single-flight per host: a first click's live check and the verifier's pass that
        catch the same pending host at the same moment share one set of lookups instead
        of resolving everything twice. Nothing is kept once the lookups are done, so a
        later check always sees DNS as it is then.
        """
        key = (hostname, account_uri)
        running = self._dns_inflight.get(key)
        if running is None:
            running = asyncio.ensure_future(self._check_dns(hostname, account_uri))
            self._dns_inflight[key] = running
            running.add_done_callback(lambda _f: self._dns_inflight.pop(key, None))
        # shield: one caller giving up must not cancel the lookups the other waits for
        return await asyncio.shield(running)

    async def _check_dns(self, hostname: str, account_uri: str | None) -> CheckReport:
        cname, caa = await asyncio.gather(
            check_cname(
                self.cname_checker,
                hostname,
                self.settings.edge_target,
                self.settings.issue_via_address,
            ),
            check_caa(self._resolver, hostname, self.settings.caa_issuer, account_uri),
        )
        return CheckReport(hostname, self._clock(), (cname, caa))

    async def check_https(self, report: CheckReport) -> CheckReport:
        """Adds the https check; skipped while the CNAME does not reach us. It dials the
        edge's addresses with the host as SNI and never resolves the host again, so a
        DNS answer that changes after the cname check (rebinding) cannot redirect it."""
        if not report.reaches_edge:
            result = CheckResult(
                "https",
                CheckState.SKIPPED,
                "skipped",
                "not checked until the CNAME reaches the edge",
            )
        else:
            result = await self._https.check(report.hostname)
        return report.with_result(result)

    async def check_all(self, hostname: str, account_uri: str | None = None) -> CheckReport:
        return await self.check_https(await self.check_dns(hostname, account_uri))
