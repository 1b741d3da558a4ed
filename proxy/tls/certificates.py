"""Which TLS context serves a hostname, obtaining a certificate when needed.

Order of work for one handshake (the first steps are the hot path):
  1. in-memory context cache (re-validated against the store in the background at
     most every `revalidate_seconds`, so renewals and removals by other workers reach
     this one without a store read on the handshake path);
  2. negative cache (refused or failing names answer at once);
  3. the store (a certificate issued earlier, or by another worker);
  4. the issuance gate (registered + CNAME verified) and the host's backoff;
  5. issuance, single-flight: one task per name in this process, one lease per
     name across processes. Callers that give up do not cancel the order, so the
     next click finds the certificate.

`issue_and_store` is also what the maintenance loop renews with (under the same lease).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from acme_client import (
    ACME_TLS_ALPN,
    AcmeError,
    CaUnavailable,
    HostVerdict,
    IssuedCertificate,
    LimitSettings,
    OrderBudget,
    OrderLimitReached,
    OrderLimits,
    PublishedAnswers,
    RateLimited,
    is_ca_failure,
    tls_alpn01_certificate,
)
from acme_client.solvers import ChallengeSink
from certstore import CertStore, Domain, DomainState, Event, StoredCertificate
from certstore.errors import StoreUnavailable
from proxy.counters import Counters, LogBudget
from proxy.hosts.events import EventKind
from proxy.hosts.leases import lease_name
from proxy.hosts.lifecycle import Lifecycle
from proxy.tls.contexts import CachedContext, ContextCache, build_server_context
from proxy.tls.gate import Decision, IssuanceGate
from proxy.tls.refusals import Refusal, RefusalCache, Refused
from proxy.wire.clienthello import INTERNAL_ERROR, UNRECOGNIZED_NAME

log = logging.getLogger(__name__)


class Issuer(Protocol):
    """What the manager needs from ACME (an AcmeIssuer or a FailoverIssuer)."""

    async def issue(
        self,
        hostname: str,
        sink: ChallengeSink,
        *,
        budget: OrderBudget | None = None,
        replaces: str | None = None,
        exempt: bool = False,
        authz_budget: int | None = None,
    ) -> IssuedCertificate: ...

    async def check_available(self) -> None:
        """Raise CaUnavailable at once when no CA can take an order now (breaker open)."""


@dataclass(frozen=True, slots=True)
class ManagerSettings:
    refusal_seconds: float = 30.0
    failure_backoff_seconds: float = 60.0  # first backoff step; see acme_client.limits
    # kept alive by the holder (refreshed every third of it): a dead holder's lease
    # expires within this many seconds
    lease_seconds: float = 10.0
    lease_poll_seconds: float = 0.1
    # an operator's forced renewal waits this long for another holder's lease (a first
    # click's order, or a proactive one that just found the certificate stored) before
    # answering "order in progress"
    renew_wait_seconds: float = 10.0
    cache_size: int = 10_000
    revalidate_seconds: float = 30.0  # cached contexts are compared with the store this often
    ca_refusal_seconds: float = 1.0  # a click refused for a CA outage is remembered this long
    # a name refused because the store is unreachable (and not in the local copy) is
    # remembered this long: short, so a new host is served soon after the store returns
    store_refusal_seconds: float = 1.0


class RenewalBusy(Exception):
    """Another order for this host is in progress (in this or another worker)."""


class LeaseLost(RenewalBusy, Refused):
    """The name's lease was taken over while this worker held it (its refreshes failed
    until it expired and another worker took it): the work under it was stopped, the new
    holder finishes the order (the pending order is in the store)."""

    def __init__(self, name: str) -> None:
        Refused.__init__(
            self, f"lease {name} was taken over; another worker finishes the order", INTERNAL_ERROR
        )


@contextlib.asynccontextmanager
async def kept_lease(store: CertStore, name: str, holder: str, ttl: float) -> AsyncIterator[bool]:
    """Try to take a lease; while the body runs, refresh it every third of `ttl`.

    Yields whether the lease is held. A holder that dies stops refreshing, so its lease
    expires within `ttl` (and a restarted process on the same node frees it at once:
    `CertStore.release_dead_leases`). When another holder has taken it over, the body is
    cancelled and LeaseLost raised: two workers never go on ordering the same name.
    """
    if not await store.try_acquire_lease(name, holder, ttl):
        yield False
        return
    body = asyncio.current_task()
    state = {"lost": False, "done": False}

    def stop(refresher: asyncio.Future[None]) -> None:
        # the refresher ends by itself only when the lease was taken over
        if state["done"] or refresher.cancelled() or refresher.exception() is not None:
            return
        state["lost"] = True
        if body is not None:
            body.cancel()

    refresher = asyncio.ensure_future(_refresh_lease(store, name, holder, ttl))
    refresher.add_done_callback(stop)
    try:
        yield True
    except asyncio.CancelledError:
        if state["lost"] and body is not None and body.uncancel() == 0:
            raise LeaseLost(name) from None
        raise
    finally:
        state["done"] = True
        refresher.cancel()
        await asyncio.gather(refresher, return_exceptions=True)
        if not state["lost"]:
            await store.release_lease(name, holder)


OWN_EVENTS_MAX = 10_000  # own events expected but not yet followed (normally a handful)


def _own_key(hostname: str, kind: str, to_state: str | None) -> tuple[str, str]:
    return (hostname, f"{kind}:{to_state}" if kind == EventKind.STATE else kind)


LEASE_RETRY_SECONDS = 0.5  # after a failed refresh: again this soon, doubling


async def _refresh_lease(store: CertStore, name: str, holder: str, ttl: float) -> None:
    """Refresh every third of `ttl`; after a failure, again after 0.5 s, 1 s, 2 s ...
    (never later than halfway to the expiry): waiting another third would lose the
    lease after two failures in a row."""
    held_until = time.monotonic() + ttl  # from the acquire just before
    delay, retry = ttl / 3, LEASE_RETRY_SECONDS
    while True:
        await asyncio.sleep(delay)
        asked = time.monotonic()
        try:
            if not await store.try_acquire_lease(name, holder, ttl):
                log.warning("lease %s was taken over while %s still held it", name, holder)
                return
        except Exception as exc:  # a store hiccup: retried soon, the lease may outlast it
            if isinstance(exc, StoreUnavailable):  # logged by the store once
                log.debug("refreshing lease %s: %s", name, exc)
            else:
                log.exception("refreshing lease %s failed", name)
            left = held_until - time.monotonic()
            delay, retry = min(retry, max(left / 2, 0.05)), min(retry * 2, ttl / 3)
            continue
        held_until = asked + ttl
        delay, retry = ttl / 3, LEASE_RETRY_SECONDS


@dataclass
class IssuanceStats(Counters):
    orders_started: int = 0  # ACME orders placed by this process (first clicks, renewals)
    alpn_challenges_answered: int = 0  # TLS-ALPN-01 validation handshakes served


class CertificateManager:
    def __init__(
        self,
        store: CertStore,
        issuer: Issuer,
        gate: IssuanceGate,
        settings: ManagerSettings,
        clock: Callable[[], float] = time.time,
        limits: OrderLimits | None = None,
        *,
        lifecycle: Lifecycle,
    ) -> None:
        self._store = store
        self._lifecycle = lifecycle
        self._issuer = issuer
        self._gate = gate
        self._settings = settings
        self._clock = clock
        self._limits = limits or OrderLimits(
            store, LimitSettings(first_backoff_seconds=settings.failure_backoff_seconds), clock
        )
        self._contexts = ContextCache(settings.cache_size)
        # where this process's orders publish challenge answers, and where the listeners
        # read them: the store, plus an in-memory copy of what this process published
        self.challenges = PublishedAnswers(store)
        self._refusals = RefusalCache()
        # events this process's own issuance is about to write (host, kind[:to_state]),
        # whose effect it applies itself: see `caused_here`
        self._own_events: Counter[tuple[str, str]] = Counter()
        self._inflight: dict[str, asyncio.Task[ssl.SSLContext]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._ca_refusal_logged: dict[str, float] = {}  # host -> when its refusal was logged
        # while the store is unreachable: one refusal line per second at most (a random-SNI
        # flood looks like new hosts), and one line per interval about kept contexts
        self._store_refusals = LogBudget(1.0)
        self._kept_contexts = LogBudget(settings.revalidate_seconds)
        self.on_stored: Callable[[str], None] | None = None  # e.g. wake the maintenance loop
        # Plans a first-click certificate's renewal while its order still holds the name's
        # lease (Maintainer.plan_new): one store write instead of a maintenance visit later
        # (its own lease, certificate and plan reads, and the passes around it).
        self.plan_new: Callable[[StoredCertificate], Awaitable[None]] | None = None
        self.holder = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stats = IssuanceStats()

    @property
    def cached_contexts(self) -> int:
        return len(self._contexts)

    @property
    def limits(self) -> OrderLimits:
        return self._limits

    def cached_context(self, hostname: str) -> ssl.SSLContext | None:
        """The hot path: a cached context for an exact (already normalised) name."""
        now = self._clock()
        entry = self._contexts.entry(hostname, now)
        if entry is None:
            return None
        if now - entry.checked_at >= self._settings.revalidate_seconds:
            self._revalidate_soon(hostname, entry, now)
        return entry.context

    async def context_for(self, hostname: str) -> ssl.SSLContext:
        cached = self.cached_context(hostname)
        if cached is not None:
            return cached
        now = self._clock()
        refusal = self._refusals.get(hostname, now)
        if refusal is not None:
            raise Refused(refusal.reason, refusal.alert)
        task = self._inflight.get(hostname)
        if task is None:
            task = asyncio.ensure_future(self._resolve(hostname))
            self._inflight[hostname] = task
            task.add_done_callback(lambda _t: self._inflight.pop(hostname, None))
        # shield: a client that hangs up must not cancel the work others wait for
        return await asyncio.shield(task)

    async def challenge_context_for(self, hostname: str) -> ssl.SSLContext:
        """TLS-ALPN-01 (RFC 8737): the CA's validation handshake offers only `acme-tls/1`."""
        try:
            key_authorization = await self.challenges.get_alpn_challenge(hostname)
        except StoreUnavailable as exc:
            raise Refused(f"TLS-ALPN-01 challenge unknown: {exc}", INTERNAL_ERROR) from None
        if key_authorization is None:
            raise Refused("no TLS-ALPN-01 challenge pending for this name")
        self.stats.alpn_challenges_answered += 1
        return await asyncio.to_thread(_challenge_context, hostname, key_authorization)

    async def check_ca(self) -> None:
        """Raise CaUnavailable at once while no CA can take an order (breaker open)."""
        await self._issuer.check_available()

    def forget(self, hostname: str) -> None:
        """Drop cached state for a host (after removal, suspension, renewal)."""
        self._contexts.discard(hostname)
        self._refusals.discard(hostname)

    def caused_here(self, event: Event) -> bool:
        """Whether `event` is one this process's own issuance wrote (its certificate's
        `issued`/`renewed`, the host's move to active), which the event follower then
        need not apply: this process cached that very certificate's context, and
        dropping it cost a store read and a context build at the host's next handshake.

        Counted, not matched: an own write is expected before it is made, so whichever
        of the host's events of that kind comes first is taken as the own one. If another
        process's older certificate comes first, keeping the cache is still right (ours
        is newer) and the own event then drops it (harmless); a newer one comes after ours
        and is applied."""
        if event.hostname is None:
            return False
        key = _own_key(event.hostname, event.kind, event.to_state)
        if not self._own_events.get(key):
            return False
        self._expect_done(key)
        return True

    def _expect(self, hostname: str, kind: str, to_state: str | None = None) -> tuple[str, str]:
        if len(self._own_events) > OWN_EVENTS_MAX:  # only ever costs a store read
            self._own_events.clear()
        key = _own_key(hostname, kind, to_state)
        self._own_events[key] += 1
        return key

    def _expect_done(self, key: tuple[str, str]) -> None:
        self._own_events[key] -= 1
        if self._own_events[key] <= 0:
            del self._own_events[key]

    async def close(self) -> None:
        # Orders still running are cancelled too: their `finally` releases the name's
        # lease while the store is open, so another process can order at once.
        tasks = [*self._background, *self._inflight.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def issue_and_store(
        self,
        hostname: str,
        *,
        authz_budget: int | None,
        replaces: str | None = None,
        exempt: bool = False,
        renewal: bool = False,
        clear_backoff: bool = True,
    ) -> StoredCertificate:
        """Order a certificate (the caller holds the name's lease), store it, cache it.

        Failures update the host's backoff (except our own limiter saying "not now")
        and the event log, then propagate as AcmeError. `clear_backoff=False`: the caller
        read no backoff record under this lease, and only the lease holder writes one, so
        a success has nothing to clear (one store round trip less).
        """
        started = time.monotonic()
        what = "renewal" if renewal else "order"
        try:
            await self._issuer.check_available()  # an open breaker: no order, no event
        except CaUnavailable as exc:
            await self._ca_unavailable(hostname, what, exc)
            raise
        self.stats.orders_started += 1
        await self._store.record_event(
            hostname,
            EventKind.RENEWAL_STARTED if renewal else EventKind.ORDER_STARTED,
            f"by {self.holder}",
        )
        try:
            issued = await self._issuer.issue(
                hostname,
                self.challenges,
                budget=self._limits,
                replaces=replaces,
                exempt=exempt,
                authz_budget=authz_budget,
            )
        except OrderLimitReached as exc:
            await self._store.record_event(hostname, EventKind.ORDER_DEFERRED, str(exc))
            raise
        except AcmeError as exc:
            if is_ca_failure(exc):  # the CA's failure: the breaker counts it, not the host
                await self._ca_unavailable(hostname, what, exc)
                raise
            backoff = await self._limits.record_failure(
                hostname, str(exc), exc.failed_authorizations
            )
            log.warning(
                "%s: %s failed (%d in a row): %s",
                hostname,
                what,
                backoff.failures,
                exc,
                extra={
                    "event": EventKind.RENEWAL_FAILED if renewal else EventKind.ISSUANCE_FAILED,
                    "host": hostname,
                    "reason": str(exc),
                    "duration": time.monotonic() - started,
                },
            )
            if not renewal:  # a failed renewal leaves the current certificate in service
                await self._lifecycle.issuance_failed(hostname, f"issuance failed: {exc}")
            await self._store.record_event(
                hostname,
                EventKind.RENEWAL_FAILED if renewal else EventKind.ISSUANCE_FAILED,
                f"{exc} (next attempt after {_iso(backoff.next_attempt_at)})",
            )
            raise
        elapsed = time.monotonic() - started
        stored = StoredCertificate(
            hostname=hostname,
            chain_pem=issued.chain_pem,
            key_pem=issued.key_pem,
            names=issued.names,
            not_before=issued.not_before,
            not_after=issued.not_after,
            issuer=issued.issuer,
            created_at=self._clock(),
            serial=issued.serial,
            directory_url=issued.directory_url,
        )
        done = EventKind.RENEWED if renewal else EventKind.ISSUED
        # expected before it is written: the follower may read the event before this
        # coroutine resumes (see `caused_here`)
        stored_event = self._expect(hostname, done)
        try:
            # the event in the certificate's own transaction: a process killed between the
            # two would leave a served certificate that no event (follower, webhook) tells of
            await self._store.put_certificate(
                stored,
                event=(
                    EventKind.RENEWED if renewal else EventKind.ISSUED,
                    f"by {issued.issuer} ({issued.directory_url}), serial {issued.serial}, "
                    f"valid until {_iso(issued.not_after)}, took {elapsed * 1000:.0f} ms",
                ),
            )
        except BaseException:
            self._expect_done(stored_event)
            raise
        if clear_backoff:
            await self._limits.record_success(hostname)
        await self._limits.record_failed_authorizations(hostname, issued.failed_authorizations)
        activated = self._expect(hostname, EventKind.STATE, DomainState.ACTIVE.value)
        moved = False
        try:
            moved = await self._lifecycle.issued(
                hostname, f"certificate issued, serial {issued.serial}"
            )
        finally:
            if not moved:  # already active (a renewal), or it failed: no event of ours
                self._expect_done(activated)
        log.info(
            "%s certificate for %s in %.0f ms",
            done,
            hostname,
            elapsed * 1000,
            extra={"event": done, "host": hostname, "duration": elapsed},
        )
        self._refusals.discard(hostname)
        self._ca_refusal_logged.pop(hostname, None)
        if self.plan_new is not None and not renewal:  # renewals are planned by their visit
            await self._plan_new(stored)
        await self._remember(stored)
        if self.on_stored is not None:
            self.on_stored(hostname)
        return stored

    async def _plan_new(self, stored: StoredCertificate) -> None:
        assert self.plan_new is not None
        try:
            await self.plan_new(stored)
        except StoreUnavailable as exc:  # logged by the store; the maintenance visit plans it
            log.debug("%s: renewal not planned at issuance: %s", stored.hostname, exc)
        except Exception:  # the certificate is stored: serve it, the visit plans it
            log.exception("%s: planning the renewal at issuance failed", stored.hostname)

    async def _ca_unavailable(self, hostname: str, what: str, exc: AcmeError) -> None:
        """Log (and record) a CA-level refusal once per host per `refusal_seconds`."""
        now = self._clock()
        last = self._ca_refusal_logged.get(hostname)
        if last is not None and now - last < self._settings.refusal_seconds:
            return
        if len(self._ca_refusal_logged) > 10_000:
            self._ca_refusal_logged.clear()
        self._ca_refusal_logged[hostname] = now
        log.warning("%s: %s not placed, the CA is unavailable: %s", hostname, what, exc)
        await self._store.record_event(hostname, EventKind.ORDER_DEFERRED, f"CA unavailable: {exc}")

    # -- the miss path -----------------------------------------------------------

    async def _stored_context(self, hostname: str) -> ssl.SSLContext | None:
        """A context for a still-valid certificate already in the store, if any."""
        stored = await self._store.get_certificate(hostname)
        if stored is not None and stored.is_valid_at(self._clock()):
            return await self._remember(stored)
        return None

    async def _resolve(self, hostname: str) -> ssl.SSLContext:
        try:
            return await self._resolve_from_store(hostname)
        except StoreUnavailable as exc:
            # The store (and the local copy) cannot say: refuse now, cheaply, and soon ask
            # again. An unreachable store is our problem, not the name's: internal_error.
            reason = f"store unavailable: {exc}"
            self._refuse(hostname, reason, self._settings.store_refusal_seconds, INTERNAL_ERROR)
            if self._store_refusals.due():
                log.warning(
                    "refused %s: %s (%d more refused since the last line)",
                    hostname,
                    reason,
                    self._store_refusals.take_suppressed(),
                    extra={"event": "refused", "host": hostname, "reason": reason},
                )
            raise Refused(reason, INTERNAL_ERROR) from None

    async def _resolve_from_store(self, hostname: str) -> ssl.SSLContext:
        # Both reads at once: on a database over the network (PostgreSQL) a cold lookup
        # then waits for one round trip instead of two in a row.
        stored, domain = await asyncio.gather(
            self._store.get_certificate(hostname), self._store.get_domain(hostname)
        )
        if stored is not None and stored.is_valid_at(self._clock()):
            if domain is not None and domain.state is not DomainState.SUSPENDED:
                return await self._remember(stored)
        decision = await self._verified_here(hostname, domain)
        if not decision.allowed:
            if decision.registered:
                await self._store.record_event(hostname, EventKind.REFUSED, decision.reason)
                # once per refusal: the refusal cache answers the next handshakes
                log.info(
                    "refused a certificate for %s: %s",
                    hostname,
                    decision.reason,
                    extra={"event": "refused", "host": hostname, "reason": decision.reason},
                )
            else:
                log.debug("refused unregistered name %s", hostname)
            if decision.state is DomainState.FAILED:
                # A failed host still backing off is our problem (internal_error); a
                # retired or given-up one is a name we no longer serve (unrecognized_name).
                await self._refuse_if_backing_off(hostname)
            self._refuse(hostname, decision.reason, self._settings.refusal_seconds)
            raise Refused(decision.reason)
        return await self._obtain(hostname)

    async def _verified_here(self, hostname: str, domain: Domain | None) -> Decision:
        """The gate's decision. When its live check verifies the host (pending or failed
        until now), that `state` event is ours too (see `caused_here`): following it while
        the order runs, or after, would only drop the context the order is about to cache
        (nothing is cached for the host before: it had no valid certificate here)."""
        if domain is None or domain.state not in (DomainState.PENDING, DomainState.FAILED):
            return await self._gate.decide(hostname)
        verified = self._expect(hostname, EventKind.STATE, DomainState.VERIFIED.value)
        decision = None
        try:
            decision = await self._gate.decide(hostname)
            return decision
        finally:
            if decision is None or not decision.verified_now:
                self._expect_done(verified)

    async def _obtain(self, hostname: str) -> ssl.SSLContext:
        # The backoff is read once, under the lease (`_order_with_lease`): read before it
        # as well, it cost two more store round trips on every first click, and a host
        # that backs off is refused (and remembered) after taking and releasing the lease.
        lease = lease_name(hostname)
        while True:
            async with kept_lease(
                self._store, lease, self.holder, self._settings.lease_seconds
            ) as held:
                if held:
                    return await self._order_with_lease(hostname)
            # Another worker is ordering this name: its certificate lands in the store.
            await asyncio.sleep(self._settings.lease_poll_seconds)
            ctx = await self._stored_context(hostname)
            if ctx is not None:
                return ctx
            await self._refuse_if_backing_off(hostname)

    async def renew_now(self, hostname: str) -> StoredCertificate:
        """Order a new certificate now, replacing the stored one (operator's forced renewal).

        Takes the host's issuance lease like any order, so it never races a first-click
        order in another worker. A failure leaves the current certificate and state as
        they are (an `renewal_failed` event) and raises AcmeError.
        """
        lease = lease_name(hostname)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._settings.renew_wait_seconds
        while True:
            async with kept_lease(
                self._store, lease, self.holder, self._settings.lease_seconds
            ) as held:
                if held:
                    return await self._renew_with_lease(hostname)
            # Held by another order. Often it ends at once: the proactive issuance of a
            # host that has just verified holds the lease while it finds the certificate
            # stored; an operator's renewal right after it must not be refused for that.
            if loop.time() >= give_up:
                raise RenewalBusy(f"an order for {hostname} is already in progress")
            await asyncio.sleep(self._settings.lease_poll_seconds)

    async def _renew_with_lease(self, hostname: str) -> StoredCertificate:
        # The CA's limits bind operators too: no forced order while the host backs off.
        verdict = await self._limits.check_host(hostname)
        if not verdict.allowed:
            raise AcmeError(verdict.reason)
        return await self.issue_and_store(
            hostname,
            authz_budget=verdict.authz_budget,
            renewal=True,
            clear_backoff=verdict.had_backoff,
        )

    async def _order_with_lease(self, hostname: str) -> ssl.SSLContext:
        # The previous holder may have finished (or failed) between our miss and our lease.
        ctx = await self._stored_context(hostname)
        if ctx is not None:
            return ctx
        verdict = await self._refuse_if_backing_off(hostname)
        try:
            stored = await self.issue_and_store(
                hostname, authz_budget=verdict.authz_budget, clear_backoff=verdict.had_backoff
            )
        except AcmeError as exc:
            if is_ca_failure(exc):
                # Remembered only briefly: the host must be served soon after the CA returns.
                reason = f"CA unavailable: {exc}"
                self._refuse(hostname, reason, self._settings.ca_refusal_seconds, INTERNAL_ERROR)
                raise Refused(reason, INTERNAL_ERROR) from exc
            if isinstance(exc, RateLimited):
                reason = f"issuance deferred: {exc}"
                self._refuse_until(hostname, reason, exc.retry_at)
                raise Refused(reason, INTERNAL_ERROR) from exc
            reason = f"issuance failed: {exc}"
            backoff = await self._store.get_backoff(hostname)
            self._refuse_until(hostname, reason, backoff.next_attempt_at if backoff else None)
            raise Refused(reason, INTERNAL_ERROR) from exc
        return await self._remember(stored)

    async def _refuse_if_backing_off(self, hostname: str) -> HostVerdict:
        verdict = await self._limits.check_host(hostname)
        if not verdict.allowed:
            self._refuse_until(hostname, verdict.reason, verdict.retry_at)
            raise Refused(verdict.reason, INTERNAL_ERROR)
        return verdict

    # -- cache -------------------------------------------------------------------

    async def _remember(self, stored: StoredCertificate) -> ssl.SSLContext:
        entry = self._contexts.entry(stored.hostname, self._clock())
        if entry is not None and entry.serial == stored.serial and stored.serial:
            return entry.context  # built already (e.g. by a concurrent revalidation)
        ctx = await asyncio.to_thread(build_server_context, stored.chain_pem, stored.key_pem)
        self._contexts.put(
            stored.hostname, ctx, stored.not_after, stored.serial, checked_at=self._clock()
        )
        return ctx

    def _revalidate_soon(self, hostname: str, entry: CachedContext, now: float) -> None:
        entry.checked_at = now  # one check per interval, however many handshakes arrive
        task = asyncio.ensure_future(self._revalidate(hostname, entry.serial))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _revalidate(self, hostname: str, cached_serial: str) -> None:
        """Off the hot path: pick up a renewed certificate, drop a removed or suspended host."""
        try:
            serial = await self._store.certificate_serial(hostname)
            domain = await self._store.get_domain(hostname)
            if serial is None or domain is None or domain.state is DomainState.SUSPENDED:
                self._contexts.discard(hostname)
                return
            if serial == cached_serial:
                return
            stored = await self._store.get_certificate(hostname)
            if stored is not None and stored.is_valid_at(self._clock()):
                await self._remember(stored)
                log.info("%s: cached context replaced by serial %s", hostname, stored.serial)
        except StoreUnavailable as exc:
            # The context stays: it is what keeps this host served through the outage. The
            # event feed catches up on what changed once the store is back.
            if self._kept_contexts.due():
                log.info(
                    "cached contexts kept unchecked while the store is unreachable "
                    "(%s; %d more since the last line): %s",
                    hostname,
                    self._kept_contexts.take_suppressed(),
                    exc,
                )
        except Exception:  # a store hiccup must not break serving; next interval retries
            log.exception("revalidating the cached context of %s failed", hostname)

    def _refuse(
        self, hostname: str, reason: str, seconds: float, alert: int = UNRECOGNIZED_NAME
    ) -> None:
        self._refusals.put(hostname, Refusal(reason, self._clock() + seconds, alert))

    def _refuse_until(self, hostname: str, reason: str, retry_at: float | None) -> None:
        # Remembered in memory at most `refusal_seconds`: the store has the real backoff,
        # and an operator clearing it should not wait for a day-long memory to expire.
        now = self._clock()
        seconds = self._settings.refusal_seconds
        if retry_at is not None:
            seconds = max(min(retry_at - now, seconds), 1.0)
        self._refuse(hostname, reason, seconds, INTERNAL_ERROR)


def _challenge_context(hostname: str, key_authorization: str) -> ssl.SSLContext:
    cert_pem, key_pem = tls_alpn01_certificate(hostname, key_authorization)
    return build_server_context(cert_pem, key_pem, alpn=[ACME_TLS_ALPN])


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


__all__ = ["CertificateManager", "ManagerSettings", "Refused", "RenewalBusy", "lease_name"]
