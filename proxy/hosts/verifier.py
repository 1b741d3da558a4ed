"""Checks hosts: on demand (API, CLI) and in the background on the Schedule.

Every worker process runs the background loop; a lease per host (`check:<host>`) in
the store makes each due check run once, and the re-read after the lease skips a host
another worker has just done. A host that verifies gets its certificate at once
(proactive issuance), not at its first click. DNS and TLS work happens here, never on
the handshake path of a host already decided.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from certstore import CertStore, Domain, DomainState
from certstore.errors import StoreUnavailable
from proxy.counters import Counters
from proxy.hosts.checks import CheckReport, HostChecker
from proxy.hosts.lifecycle import Lifecycle

log = logging.getLogger(__name__)
IssueNow = Callable[[str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class VerifierSettings:
    poll_seconds: float = 5.0
    concurrency: int = 4
    lease_seconds: float = 180.0  # > a check plus an ACME order: a killed holder frees the host
    batch: int = 100


@dataclass(frozen=True, slots=True)
class Outcome:
    domain: Domain
    report: CheckReport


@dataclass
class CheckStats(Counters):
    runs: int = 0  # hosts checked by this process
    results: dict[str, int] = field(default_factory=dict)  # "cname.pass" -> count

    def count(self, report: CheckReport) -> None:
        for result in report.results:
            key = f"{result.name}.{result.state.value}"
            self.results[key] = self.results.get(key, 0) + 1


class Verifier:
    def __init__(
        self,
        store: CertStore,
        checker: HostChecker,
        lifecycle: Lifecycle,
        settings: VerifierSettings,
        *,
        issue_now: IssueNow | None = None,
        account_uri: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._checker = checker
        self._lifecycle = lifecycle
        self._settings = settings
        self._issue_now = issue_now
        self.account_uri = account_uri
        self._clock = clock
        self._holder = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._slots = asyncio.Semaphore(max(1, settings.concurrency))
        self.stats = CheckStats()  # results of the checks this worker ran

    async def verify(
        self, hostname: str, *, https: bool = True, issue: bool = True
    ) -> Outcome | None:
        """Run the checks now and apply what they say (API "check now", CLI verify)."""
        domain = await self._store.get_domain(hostname)
        if domain is None:
            return None
        return await self._verify(domain, https=https, issue=issue)

    async def _verify(self, domain: Domain, *, https: bool = True, issue: bool = True) -> Outcome:
        hostname = domain.hostname
        self.stats.runs += 1
        report = await self._checker.check_dns(hostname, self.account_uri)
        cert = await self._store.get_certificate(hostname)
        has_valid_cert = cert is not None and cert.is_valid_at(self._clock())
        domain = await self._lifecycle.apply(domain, report, has_valid_cert)
        if issue and domain.state is DomainState.VERIFIED and self._issue_now is not None:
            await self._issue_now(hostname)
            domain = await self._store.get_domain(hostname) or domain
        if https:
            report = await self._checker.check_https(report)
            await self._store.update_checks(
                hostname, report=report.to_json(), reason=report.summary
            )
            domain = await self._store.get_domain(hostname) or domain
        self.stats.count(report)
        return Outcome(domain, report)

    # -- background --------------------------------------------------------------

    async def run_forever(self) -> None:
        while True:
            try:
                await self.run_once()
            except StoreUnavailable as exc:  # logged once by the store
                log.debug("background verification pass: %s", exc)
            except Exception:  # a bad row or a store hiccup must not stop the schedule
                log.exception("background verification pass failed")
            await asyncio.sleep(self._settings.poll_seconds)

    async def run_once(self) -> int:
        """Check every host that is due; returns how many this process checked."""
        due = await self._store.due_for_check(self._clock(), self._settings.batch)
        done = await asyncio.gather(*(self._bounded(h) for h in due))
        return sum(done)

    async def _bounded(self, hostname: str) -> bool:
        async with self._slots:
            try:
                return await self.check_due(hostname)
            except StoreUnavailable as exc:
                log.debug("checking %s: %s", hostname, exc)
                return False
            except Exception:
                log.exception("checking %s failed", hostname)
                return False

    async def check_due(self, hostname: str) -> bool:
        lease = f"check:{hostname}"
        if not await self._store.try_acquire_lease(
            lease, self._holder, self._settings.lease_seconds
        ):
            return False  # another worker is on it
        try:
            domain = await self._store.get_domain(hostname)
            now = self._clock()
            if domain is None or domain.next_check_at is None or domain.next_check_at > now:
                return False  # removed, unscheduled, or just done by another worker
            domain = (await self._verify(domain)).domain
            await self._retire_if_due(domain)
            return True
        finally:
            await self._store.release_lease(lease, self._holder)

    async def _retire_if_due(self, domain: Domain) -> None:
        schedule = self._lifecycle.schedule
        now = self._clock()
        since = domain.state_changed_at or domain.created_at
        if schedule.gave_up(domain.state, now, since):
            days = schedule.give_up / 86400
            await self._lifecycle.retire(
                domain,
                f"gave up after {days:g} days without passing checks: {domain.last_check_reason}",
            )
        elif schedule.grace_over(domain.state, now, since):
            days = schedule.moved_grace / 86400
            await self._lifecycle.retire(
                domain,
                f"retired: the CNAME has not reached the edge for {days:g} days;"
                " certificate deleted",
            )
