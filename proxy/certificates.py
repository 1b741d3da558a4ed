"""Which TLS context serves a hostname, obtaining a certificate when needed.

Order of work for one handshake (the first steps are the hot path):
  1. in-memory context cache;
  2. negative cache (refused or failing names answer at once);
  3. the store (a certificate issued earlier, or by another worker);
  4. the issuance gate (registered + CNAME verified);
  5. issuance, single-flight: one task per name in this process, one lease per
     name across processes. Callers that give up do not cancel the order, so the
     next click finds the certificate.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from acme_client import AcmeError, AcmeIssuer
from certstore import CertStore, DomainState, StoredCertificate

from .clienthello import INTERNAL_ERROR, UNRECOGNIZED_NAME
from .gate import IssuanceGate
from .lifecycle import Lifecycle
from .refusals import Refusal, RefusalCache, Refused
from .tlscontexts import ContextCache, build_server_context_async

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ManagerSettings:
    refusal_seconds: float = 30.0
    failure_backoff_seconds: float = 60.0
    lease_seconds: float = 150.0  # > ACME order timeout: a crashed holder frees the name
    lease_poll_seconds: float = 0.1
    cache_size: int = 10_000


class RenewalBusy(Exception):
    """Another order for this host is in progress (in this or another worker)."""


class CertificateManager:
    def __init__(
        self,
        store: CertStore,
        issuer: AcmeIssuer,
        gate: IssuanceGate,
        settings: ManagerSettings,
        clock: Callable[[], float] = time.time,
        lifecycle: Lifecycle | None = None,
    ) -> None:
        self._store = store
        self._lifecycle = lifecycle
        self._issuer = issuer
        self._gate = gate
        self._settings = settings
        self._clock = clock
        self._contexts = ContextCache(settings.cache_size)
        self._refusals = RefusalCache()
        self._inflight: dict[str, asyncio.Task[ssl.SSLContext]] = {}
        self._holder = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.orders_started = 0  # in this process, for logs and tests

    @property
    def cached_contexts(self) -> int:
        return len(self._contexts)

    async def context_for(self, hostname: str) -> ssl.SSLContext:
        now = self._clock()
        ctx = self._contexts.get(hostname, now)
        if ctx is not None:
            return ctx
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

    def forget(self, hostname: str) -> None:
        """Drop cached state for a host (after removal, suspension, renewal)."""
        self._contexts.discard(hostname)
        self._refusals.discard(hostname)

    async def _resolve(self, hostname: str) -> ssl.SSLContext:
        stored = await self._store.get_certificate(hostname)
        if stored is not None and stored.is_valid_at(self._clock()):
            domain = await self._store.get_domain(hostname)
            if domain is not None and domain.state is not DomainState.SUSPENDED:
                return await self._remember(stored)
        decision = await self._gate.decide(hostname)
        if not decision.allowed:
            self._refuse(hostname, decision.reason, self._settings.refusal_seconds)
            if decision.registered:
                await self._store.record_event(hostname, "refused", decision.reason)
            else:
                log.debug("refused unregistered name %s", hostname)
            raise Refused(decision.reason)
        return await self._obtain(hostname)

    async def _obtain(self, hostname: str) -> ssl.SSLContext:
        lease = f"issue:{hostname}"
        while True:
            if await self._store.try_acquire_lease(
                lease, self._holder, self._settings.lease_seconds
            ):
                try:
                    return await self._order_with_lease(hostname)
                finally:
                    await self._store.release_lease(lease, self._holder)
            # Another worker is ordering this name: its certificate lands in the store.
            await asyncio.sleep(self._settings.lease_poll_seconds)
            stored = await self._store.get_certificate(hostname)
            if stored is not None and stored.is_valid_at(self._clock()):
                return await self._remember(stored)
            failed = await self._recent_failure(hostname)
            if failed is not None:
                self._refuse(
                    hostname, failed, self._settings.failure_backoff_seconds, INTERNAL_ERROR
                )
                raise Refused(failed, INTERNAL_ERROR)

    async def renew_now(self, hostname: str) -> StoredCertificate:
        """Order a new certificate now, replacing the stored one (operator's forced renewal).

        Takes the host's issuance lease like any order, so it never races a first-click
        order in another worker. A failure leaves the current certificate and state as
        they are (an `renewal_failed` event) and raises AcmeError.
        """
        lease = f"issue:{hostname}"
        if not await self._store.try_acquire_lease(
            lease, self._holder, self._settings.lease_seconds
        ):
            raise RenewalBusy(f"an order for {hostname} is already in progress")
        try:
            try:
                stored = await self._order(hostname, "forced renewal")
            except AcmeError as exc:
                await self._store.record_event(hostname, "renewal_failed", str(exc))
                raise
        finally:
            await self._store.release_lease(lease, self._holder)
        self.forget(hostname)
        await self._remember(stored)
        return stored

    async def _order_with_lease(self, hostname: str) -> ssl.SSLContext:
        # The previous holder may have finished between our miss and our lease.
        stored = await self._store.get_certificate(hostname)
        if stored is not None and stored.is_valid_at(self._clock()):
            return await self._remember(stored)
        try:
            stored = await self._order(hostname, "first certificate")
        except AcmeError as exc:
            reason = f"issuance failed: {exc}"
            log.warning("%s: %s", hostname, reason)
            await self._store.record_event(hostname, "issuance_failed", str(exc))
            if self._lifecycle is not None:
                await self._lifecycle.issuance_failed(hostname, reason)
            else:
                await self._store.set_domain_state(hostname, DomainState.FAILED, reason)
            self._refuse(hostname, reason, self._settings.failure_backoff_seconds, INTERNAL_ERROR)
            raise Refused(reason, INTERNAL_ERROR) from exc
        return await self._remember(stored)

    async def _order(self, hostname: str, why: str) -> StoredCertificate:
        """One ACME order (the caller holds the lease); stores the certificate."""
        started = time.monotonic()
        self.orders_started += 1
        await self._store.record_event(hostname, "order_started", f"{why}, by {self._holder}")
        issued = await self._issuer.issue(hostname, self._store)
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
        )
        await self._store.put_certificate(stored)
        detail = (
            f"by {issued.issuer}, valid until {_iso(issued.not_after)}, "
            f"took {elapsed * 1000:.0f} ms"
        )
        await self._store.record_event(hostname, "issued", detail)
        if self._lifecycle is not None:
            await self._lifecycle.issued(hostname, f"certificate issued {detail}")
        else:
            await self._store.set_domain_state(hostname, DomainState.ACTIVE, "certificate issued")
        log.info("issued certificate for %s in %.0f ms", hostname, elapsed * 1000)
        return stored

    async def _recent_failure(self, hostname: str) -> str | None:
        window = self._settings.failure_backoff_seconds
        for event in await self._store.list_events(hostname, limit=5):
            if self._clock() - event.at > window:
                break
            if event.kind == "issued":
                return None
            if event.kind == "issuance_failed":
                return f"issuance failed: {event.detail}"
        return None

    async def _remember(self, stored: StoredCertificate) -> ssl.SSLContext:
        ctx = await build_server_context_async(stored.chain_pem, stored.key_pem)
        self._contexts.put(stored.hostname, ctx, stored.not_after)
        return ctx

    def _refuse(
        self, hostname: str, reason: str, seconds: float, alert: int = UNRECOGNIZED_NAME
    ) -> None:
        self._refusals.put(hostname, Refusal(reason, self._clock() + seconds, alert))


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


__all__ = ["CertificateManager", "ManagerSettings", "Refused", "RenewalBusy"]
