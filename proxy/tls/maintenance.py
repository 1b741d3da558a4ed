"""Background maintenance: renew every certificate in time, whether or not it is clicked.

Every worker runs this loop; each visit to a host happens under the host's issuance
lease (the same lease as a first-click order), so with N workers each ARI poll and
each renewal happens once. A visit:
  1. plans the renewal if there is no plan yet (a new certificate): a moment in the
     least loaded 3-hour slot of the lifetime window (RenewalPlanner,
     acme_client.renewal_slots), or a random one in the CA's ARI window when the CA
     offers renewalInfo (polled again when its Retry-After says);
  2. when the plan is due: re-checks the CNAME (a host that no longer reaches the edge
     is not renewed: event `renewal_skipped`, the current certificate keeps being
     served), respects the host's backoff and the order limiters, and renews (ARI
     renewals carry `replaces` and are exempt from the limiters);
  3. records the outcome in the plan (`last_error`, next visit) and the event log.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from cryptography import x509

from acme_client import AcmeError, AriAnswer, CaUnavailable, RateLimited, is_ca_failure
from acme_client.renewal import RenewalWindow, ari_certificate_id, next_ari_poll, ratio_window
from acme_client.renewal_slots import (
    SLOT_SECONDS,
    SlotLoad,
    leveling_window,
    levels,
    span_slots,
)
from certstore import CertStore, DomainState, RenewalPlan, StoredCertificate
from certstore.errors import StoreUnavailable
from proxy.hosts.dnscheck import CnameChecker, CnameStatus
from proxy.hosts.events import EventKind
from proxy.hosts.leases import lease_name
from proxy.tls.certificates import CertificateManager, LeaseLost, kept_lease

log = logging.getLogger(__name__)
ARI_ERROR_RETRY = 3600.0  # a CA whose renewalInfo fails is asked again in an hour
PRUNE_EVERY = 3600.0
MIN_SLEEP = 0.25  # between passes when something is due (a lease held elsewhere: 1 s)
CA_RETRY_SPREAD = 10.0  # renewals refused by a CA outage come back spread over this many s
LOAD_CACHE_SECONDS = 60.0  # a worker re-reads the store's renewal load at most this often
LOAD_HORIZON = 70 * 86400.0  # the load read covers at least this far ahead (90-day certs)
PLANNED_MEMO_SECONDS = 60.0  # wakes about a certificate this worker planned itself: ignored


class RenewalLoadSource(Protocol):
    async def renewal_load(self, start: float, end: float, slot: float) -> list[int]: ...


class RenewalPlanner:
    """When a certificate without an ARI window renews: leveled over the store's plans.

    A moment in the least loaded 3-hour slot of the certificate's leveling window
    (acme_client.renewal_slots), so bursts of issuance do not come back as bursts of
    renewals. The store's load per slot is read once per `cache_seconds` (one index
    range over the horizon) and this worker's own placements are added to it, so a
    pass that plans a whole burst spreads it without a query per certificate; other
    workers' placements show up at the next read. `level=False` is the plain ratio
    rule (a uniform moment in its window), kept for comparison (tests/benchmarks).
    """

    def __init__(
        self,
        store: RenewalLoadSource,
        clock: Callable[[], float] = time.time,
        uniform: Callable[[], float] = random.random,
        *,
        level: bool = True,
        cache_seconds: float = LOAD_CACHE_SECONDS,
    ) -> None:
        self._store = store
        self._clock = clock
        self._uniform = uniform
        self._level = level
        self._cache_seconds = cache_seconds
        self._load: SlotLoad | None = None
        self._loaded_at = 0.0
        self._lock = asyncio.Lock()
        self.reads = 0  # store reads of the load (tests, benchmarks)

    async def due_at(self, not_before: float, not_after: float) -> float:
        window = leveling_window(not_before, not_after, self._clock())
        if not self._level or not levels(window):
            return ratio_window(not_before, not_after).pick(self._uniform)
        async with self._lock:  # concurrent visits share one read
            load = await self._current(window)
            return load.place(window, self._uniform)

    def invalidate(self) -> None:
        """Plans left the store that this planner did not place (certificates re-issued
        out of turn drop theirs): read the load again at the next placement instead of
        leveling on counts that include them (which piles a burst onto the slots past
        the dropped plans)."""
        self._load = None

    async def _current(self, window: RenewalWindow) -> SlotLoad:
        now = self._clock()
        load = self._load
        if load is None or now - self._loaded_at >= self._cache_seconds or not load.covers(window):
            first, count = span_slots(min(now, window.start), max(window.end, now + LOAD_HORIZON))
            start = first * SLOT_SECONDS
            counts = await self._store.renewal_load(
                start, start + count * SLOT_SECONDS, SLOT_SECONDS
            )
            self.reads += 1
            load = self._load = SlotLoad(first, counts)
            self._loaded_at = now
        return load


class RenewalInfoSource(Protocol):
    async def renewal_info(self, chain_pem: bytes, directory_url: str) -> AriAnswer | None: ...


@dataclass(frozen=True, slots=True)
class MaintenanceSettings:
    interval_seconds: float = 60.0  # safety net: longest sleep between passes (jittered)
    batch_size: int = 200  # hosts visited per pass at most
    concurrency: int = 4  # visits in flight at once
    skip_recheck_seconds: float = 3600.0  # a skipped renewal is looked at again after this
    lease_seconds: float = 10.0  # kept alive while a visit runs (see certificates.kept_lease)
    level_renewals: bool = True  # RenewalPlanner: spread bursts (False: plain ratio pick)
    # checks.issue_via_address: a host whose A/AAAA records are the edge's own (no CNAME)
    # was issued on that ground, so it is renewed on the same ground
    issue_via_address: bool = True


class Maintainer:
    def __init__(
        self,
        store: CertStore,
        manager: CertificateManager,
        ari: RenewalInfoSource,
        checker: CnameChecker,
        edge_target: str,
        settings: MaintenanceSettings,
        clock: Callable[[], float] = time.time,
        uniform: Callable[[], float] = random.random,
    ) -> None:
        self._store = store
        self._manager = manager
        self._ari = ari
        self._checker = checker
        self._target = edge_target.rstrip(".").lower()
        self._settings = settings
        self._clock = clock
        self._uniform = uniform
        self._task: asyncio.Task[None] | None = None
        self._last_prune = 0.0
        self._wake = asyncio.Event()
        self.passes = 0  # for tests and logs
        # its own lease holder: a first-click order in this very process must exclude it too
        self._holder = f"{manager.holder}:maintenance"
        self.planner = RenewalPlanner(store, clock, uniform, level=settings.level_renewals)
        # when the loop next reads the store (inf during a pass), and the first-click
        # certificates planned by this worker: host -> (due, memo expiry on the monotonic
        # clock); entries live PLANNED_MEMO_SECONDS, so at most a minute's first clicks
        self._next_pass_at = float("inf")
        self._planned: dict[str, tuple[float, float]] = {}
        manager.plan_new = self.plan_new

    def start(self) -> None:
        self._task = asyncio.ensure_future(self.run_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def wake(self, hostname: str | None = None) -> None:
        """Something changed the schedule (a new certificate here or in another worker):
        look again now instead of at the planned moment. Not for a certificate this worker
        planned at issuance (`plan_new`) whose renewal is not due before the next pass
        anyway: its own store notice and event-log echo would cost two passes for nothing."""
        planned = self._planned.get(hostname) if hostname else None
        if planned is not None and time.monotonic() < planned[1]:
            if planned[0] >= self._next_pass_at:
                return
        self._wake.set()

    async def plan_new(self, cert: StoredCertificate) -> None:
        """Plan a first-click certificate's renewal, called by its order under the name's
        lease (CertificateManager.plan_new): what this worker's visit would write, without
        the visit. Left to the visit when the CA may offer ARI (asked there, off the click
        path) or when the certificate is due at once."""
        now = self._clock()
        may_offer_ari = getattr(self._ari, "may_offer_ari", None)
        if now >= cert.not_after or may_offer_ari is None or may_offer_ari(cert.directory_url):
            return
        due = await self.planner.due_at(cert.not_before, cert.not_after)
        if due <= now:
            return
        await self._store.put_renewal(
            RenewalPlan(cert.hostname, due_at=due, next_check_at=due, source="ratio")
        )
        if len(self._planned) >= 1000:  # a burst of first clicks: drop the expired ones
            mono = time.monotonic()
            self._planned = {h: p for h, p in self._planned.items() if p[1] > mono}
        self._planned[cert.hostname] = (due, time.monotonic() + PLANNED_MEMO_SECONDS)

    async def run_forever(self) -> None:
        """Sleep until the earliest moment the store says a host needs a visit (a renewal
        due, an ARI poll, a backoff ending), woken early by `wake`; the interval is only
        the longest sleep, a safety net."""
        interval = self._settings.interval_seconds
        await asyncio.sleep(min(interval, 1.0) * self._uniform())  # workers out of step
        while True:
            self._wake.clear()  # a wake during the pass below means: pass again at once
            self._next_pass_at = float("inf")  # a plan made meanwhile may be missed: wake
            try:
                visited = await self.run_once()
                delay = await self._sleep_for(visited)
            except StoreUnavailable as exc:  # logged once by the store
                log.debug("maintenance pass: %s", exc)
                delay = min(interval, 5.0)
            except Exception:  # the loop must outlive a store or DNS hiccup
                log.exception("maintenance pass failed")
                delay = interval * (0.5 + self._uniform())
            if self._wake.is_set():
                continue
            self._next_pass_at = self._clock() + delay
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    async def _sleep_for(self, visited: int) -> float:
        safety = self._settings.interval_seconds * (0.5 + self._uniform())
        earliest = await self._store.next_maintenance_at()
        if earliest is None:
            return safety
        # a little jitter so N workers do not all reach for the same lease at once
        wait = earliest - self._clock() + 0.05 * self._uniform()
        floor = MIN_SLEEP if visited else 1.0  # due but not ours (another worker's lease)
        return min(max(wait, floor), safety)

    async def run_once(self) -> int:
        """One pass over the hosts whose plan wants a visit now; returns how many."""
        now = self._clock()
        self.passes += 1
        hosts = await self._store.hosts_needing_maintenance(now, self._settings.batch_size)
        slots = asyncio.Semaphore(max(self._settings.concurrency, 1))

        async def visit(hostname: str) -> None:
            async with slots:
                try:
                    await self.visit(hostname)
                except (StoreUnavailable, LeaseLost) as exc:  # LeaseLost: logged when lost
                    log.debug("maintenance of %s: %s", hostname, exc)
                except Exception:
                    log.exception("maintenance of %s failed", hostname)

        await asyncio.gather(*(visit(h) for h in hosts))
        if now - self._last_prune >= PRUNE_EVERY:
            self._last_prune = now
            await self._manager.limits.prune()
        return len(hosts)

    async def visit(self, hostname: str) -> None:
        lease = lease_name(hostname)
        ttl = self._settings.lease_seconds
        async with kept_lease(self._store, lease, self._holder, ttl) as held:
            if not held:
                return  # another worker is ordering or maintaining this name
            cert = await self._store.get_certificate(hostname)
            if cert is None:
                return
            plan = await self._plan(cert)
            if plan.due_at <= self._clock():
                plan = await self._renew(cert, plan)
            await self._store.put_renewal(plan)

    # -- planning --------------------------------------------------------------

    async def _plan(self, cert: StoredCertificate) -> RenewalPlan:
        now = self._clock()
        plan = await self._store.get_renewal(cert.hostname)
        if plan is None:
            due = await self.planner.due_at(cert.not_before, cert.not_after)
            plan = RenewalPlan(cert.hostname, due_at=due, next_check_at=due, source="ratio")
        if plan.due_at <= now or now >= cert.not_after:
            return plan  # due (or expired: RFC 9773 forbids asking ARI about it)
        try:
            answer = await self._ari.renewal_info(cert.chain_pem, cert.directory_url)
        except AcmeError as exc:
            log.warning("%s: renewal info unavailable: %s", cert.hostname, exc)
            return replace(plan, next_check_at=min(plan.due_at, now + ARI_ERROR_RETRY))
        if answer is None or answer.window is None:
            return replace(plan, next_check_at=plan.due_at)
        due = plan.due_at
        if plan.source != "ari" or not _within(due, answer.window):
            due = answer.window.pick(self._uniform)  # a new or moved window: pick again
        poll = next_ari_poll(now, answer.retry_after)
        return replace(plan, due_at=due, next_check_at=min(due, poll), source="ari")

    # -- renewing --------------------------------------------------------------

    async def _renew(self, cert: StoredCertificate, plan: RenewalPlan) -> RenewalPlan:
        hostname = cert.hostname
        now = self._clock()
        domain = await self._store.get_domain(hostname)
        # Only hosts in service are renewed: suspended, moved (grace period) and
        # failed hosts keep what they have until the lifecycle decides otherwise.
        if domain is None or domain.state is not DomainState.ACTIVE:
            why = "not registered" if domain is None else f"host is {domain.state.value}"
            return await self._skip(plan, why)
        result = await self._checker.check(hostname, self._target)
        via_address = result.status is CnameStatus.VIA_ADDRESS and self._settings.issue_via_address
        if result.status is not CnameStatus.OK and not via_address:
            return await self._skip(plan, f"CNAME check: {result.reason}")
        try:
            await self._manager.check_ca()  # an open breaker: not even the CNAME check
        except CaUnavailable as exc:
            return self._after_ca_outage(plan, exc)
        verdict = await self._manager.limits.check_host(hostname)
        if not verdict.allowed:
            return replace(
                plan, next_check_at=verdict.retry_at or now + 60.0, last_error=verdict.reason
            )
        ari = plan.source == "ari"
        try:
            await self._manager.issue_and_store(
                hostname,
                authz_budget=verdict.authz_budget,
                replaces=_ari_id(cert) if ari else None,
                exempt=ari,
                renewal=True,
            )
        except AcmeError as exc:
            if is_ca_failure(exc):
                return self._after_ca_outage(plan, exc)
            if isinstance(exc, RateLimited):
                retry = exc.retry_at if exc.retry_at is not None else now + 600.0
                return replace(plan, next_check_at=retry, last_error=str(exc))
            backoff = await self._store.get_backoff(hostname)
            retry = backoff.next_attempt_at if backoff is not None else now + 600.0
            return replace(plan, next_check_at=retry, last_error=str(exc))
        # the new certificate replaced the plan; the next pass plans it afresh
        renewed = await self._store.get_certificate(hostname)
        assert renewed is not None
        due = await self.planner.due_at(renewed.not_before, renewed.not_after)
        return RenewalPlan(hostname, due_at=due, next_check_at=self._clock(), source="ratio")

    def _after_ca_outage(self, plan: RenewalPlan, exc: AcmeError) -> RenewalPlan:
        """A CA outage is not the host's failure: no backoff step. Retry soon after the
        breaker's next probe, spread, so due renewals go first when the CA is back."""
        now = self._clock()
        base = getattr(exc, "retry_at", None) or now + 5.0
        retry = max(base, now + 1.0) + CA_RETRY_SPREAD * self._uniform()
        return replace(plan, next_check_at=retry, last_error=f"CA unavailable: {exc}")

    async def _skip(self, plan: RenewalPlan, reason: str) -> RenewalPlan:
        await self._store.record_event(plan.hostname, EventKind.RENEWAL_SKIPPED, reason)
        log.warning(
            "%s: renewal skipped: %s",
            plan.hostname,
            reason,
            extra={"event": EventKind.RENEWAL_SKIPPED, "host": plan.hostname, "reason": reason},
        )
        return replace(
            plan,
            next_check_at=self._clock() + self._settings.skip_recheck_seconds,
            last_error=f"skipped: {reason}",
        )


def _within(moment: float, window: RenewalWindow) -> bool:
    return window.start <= moment <= window.end


def _ari_id(cert: StoredCertificate) -> str | None:
    try:
        return ari_certificate_id(x509.load_pem_x509_certificates(cert.chain_pem)[0])
    except (ValueError, x509.ExtensionNotFound):
        return None
