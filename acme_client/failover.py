"""A primary ACME CA with an optional fallback CA (typically one requiring EAB).

An order goes to the primary first. When the primary fails for a reason of its own
(unreachable, timing out, rate limiting, server errors, a CAA record that only names
the other CA), the same attempt continues at the fallback; when the host itself is the
problem (validation failed), the fallback would fail the same way and is not asked.
Each CA has its own account (accounts are stored per directory URL). Certificates
remember which CA issued them, so ARI and revocation go to the right one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from .errors import AcmeError, CaUnavailable, falls_back
from .issuer import (
    CESSATION_OF_OPERATION,
    AcmeIssuer,
    AriAnswer,
    IssuedCertificate,
    OrderBudget,
)
from .solvers import ChallengeSink

log = logging.getLogger(__name__)


class FailoverIssuer:
    def __init__(self, primary: AcmeIssuer, fallback: AcmeIssuer | None = None) -> None:
        self.primary = primary
        self.fallback = fallback

    @property
    def directory_url(self) -> str:
        return self.primary.directory_url

    async def start(self) -> None:
        """At least one CA must be reachable; the other is started when first needed.

        Without a fallback an unreachable primary is a start-up error (a wrong URL or CA
        bundle is better reported at once than at the first click).
        """
        try:
            await self.primary.start()
        except AcmeError as exc:
            if self.fallback is None:
                raise
            log.warning("primary ACME CA not ready (will retry when needed): %s", exc)
            await self.fallback.start()
            return
        if self.fallback is not None:
            try:
                await self.fallback.start()
            except AcmeError as exc:
                log.warning("fallback ACME CA not ready (will retry when needed): %s", exc)

    async def connect(self) -> bool:
        """Start both CAs lazily (never raises): True when at least one is ready."""
        ready = await self.primary.connect()
        if self.fallback is not None:
            ready = await self.fallback.connect() or ready
        return ready

    async def check_available(self) -> None:
        """Raise CaUnavailable at once when no configured CA can take an order now."""
        try:
            await self.primary.check_available()
        except CaUnavailable:
            if self.fallback is None:
                raise
            await self.fallback.check_available()

    async def run_prober(self) -> None:
        """Probe each CA whose breaker is open, every few seconds (see breaker.py)."""
        probers = [self.primary.run_prober()]
        if self.fallback is not None:
            probers.append(self.fallback.run_prober())
        await asyncio.gather(*probers)

    async def close(self) -> None:
        await self.primary.close()
        if self.fallback is not None:
            await self.fallback.close()

    def for_directory(self, directory_url: str) -> AcmeIssuer:
        if self.fallback is not None and directory_url == self.fallback.directory_url:
            return self.fallback
        return self.primary

    async def issue(
        self,
        hostname: str,
        sink: ChallengeSink,
        *,
        budget: OrderBudget | None = None,
        replaces: str | None = None,
        exempt: bool = False,
        authz_budget: int | None = None,
    ) -> IssuedCertificate:
        try:
            return await self.primary.issue(
                hostname,
                sink,
                budget=budget,
                replaces=replaces,
                exempt=exempt,
                authz_budget=authz_budget,
            )
        except AcmeError as exc:
            if self.fallback is None or not falls_back(exc):
                raise
            spent = exc.failed_authorizations
            left = None if authz_budget is None else authz_budget - spent
            if left is not None and left <= 0:
                raise
            if isinstance(exc, CaUnavailable):
                log.info(
                    "%s: primary CA unavailable (breaker open); ordering at the fallback", hostname
                )
            else:
                log.warning("%s: primary CA failed (%s); trying the fallback CA", hostname, exc)
            try:
                # `replaces` names a certificate of the primary: meaningless to the fallback
                issued = await self.fallback.issue(
                    hostname, sink, budget=budget, exempt=False, authz_budget=left
                )
                return dataclasses.replace(
                    issued, failed_authorizations=issued.failed_authorizations + spent
                )
            except AcmeError as fallback_exc:
                combined = AcmeError(
                    f"{exc}; fallback CA {self.fallback.directory_url}: {fallback_exc}"
                )
                combined.failed_authorizations = spent + fallback_exc.failed_authorizations
                raise combined from fallback_exc

    async def renewal_info(self, chain_pem: bytes, directory_url: str) -> AriAnswer | None:
        return await self.for_directory(directory_url).renewal_info(chain_pem)

    def may_offer_ari(self, directory_url: str) -> bool:
        """False only when the CA that issued at `directory_url` is known to offer no ARI
        (its directory was read and has no renewalInfo): then asking it is pointless."""
        issuer = self.for_directory(directory_url)
        return not issuer.started or issuer.offers_ari

    async def revoke(
        self,
        chain_pem: bytes,
        key_pem: bytes,
        directory_url: str,
        reason: int = CESSATION_OF_OPERATION,
    ) -> None:
        await self.for_directory(directory_url).revoke(chain_pem, key_pem, reason)
