"""Staying in good standing with the CA: order limiters and per-host failure backoff.

All state lives in the store, so it holds across worker processes and restarts:
- a global new-order limiter (Let's Encrypt: 300 new orders per account per 3 h);
- a per-registered-domain limiter (50 certificates per registered domain per week;
  "registered domain" from the Public Suffix List shipped inside `publicsuffixlist`,
  so every `links.customer.com` spends customer.com's budget). We count orders, not
  issued certificates: a little stricter than the CA, never looser;
- per host: at most `failed_authz_per_hour` failed authorizations in any hour, and after
  each failed order a pause of 1 min, 10 min, 100 min, then a day (first step ×10,
  capped), so a broken host never turns clicks into orders.

Renewals through ARI are exempt from the CA's limits, so they take no tokens here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from publicsuffixlist import PublicSuffixList

from certstore import Coordination, HostBackoff

from .errors import OrderLimitReached

HOUR = 3600.0


@dataclass(frozen=True, slots=True)
class LimitSettings:
    orders_per_window: int = 300
    orders_window_seconds: float = 3 * HOUR
    per_domain: int = 50
    per_domain_window_seconds: float = 7 * 86400.0
    failed_authz_per_hour: int = 5
    first_backoff_seconds: float = 60.0
    max_backoff_seconds: float = 86400.0


@dataclass(frozen=True, slots=True)
class HostVerdict:
    allowed: bool
    reason: str
    retry_at: float | None = None  # when a refused host may be tried again
    authz_budget: int = 0  # failed authorizations this attempt may still cost
    # whether a backoff record was there (expired): only then does a success clear it
    had_backoff: bool = True


@lru_cache(maxsize=1)
def _psl() -> PublicSuffixList:
    return PublicSuffixList()  # the list bundled with the package: no network


def registered_domain(hostname: str) -> str:
    """`links.shop.co.uk` -> `shop.co.uk`; a name that is itself a suffix stays as it is."""
    return _psl().privatesuffix(hostname) or hostname


def backoff_delay(failures: int, first: float, maximum: float) -> float:
    """Pause after the n-th consecutive failure: first, ×10, ×100, ... capped at maximum."""
    if failures <= 0:
        return 0.0
    return min(first * 10 ** min(failures - 1, 12), maximum)


class OrderLimits:
    def __init__(
        self, store: Coordination, settings: LimitSettings, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._settings = settings
        self._clock = clock

    @property
    def settings(self) -> LimitSettings:
        return self._settings

    async def check_host(self, hostname: str) -> HostVerdict:
        """May this host be ordered for now, and how many failed authorizations may it cost?"""
        now = self._clock()
        backoff = await self._store.get_backoff(hostname)
        if backoff is not None and backoff.next_attempt_at > now:
            return HostVerdict(
                False,
                f"backing off after {backoff.failures} failed order(s) until "
                f"{_iso(backoff.next_attempt_at)}: {backoff.last_error}",
                retry_at=backoff.next_attempt_at,
            )
        used, oldest = await self._store.rate_usage(_authz_bucket(hostname), HOUR)
        budget = self._settings.failed_authz_per_hour - used
        if budget <= 0:
            retry_at = (oldest or now) + HOUR
            return HostVerdict(
                False,
                f"{used} failed authorizations in the last hour; waiting until {_iso(retry_at)}",
                retry_at=retry_at,
            )
        return HostVerdict(True, "ok", authz_budget=budget, had_backoff=backoff is not None)

    async def before_new_order(self, hostname: str, *, exempt: bool = False) -> None:
        """Take one token from the registered-domain and the global bucket, or raise."""
        if exempt:
            return
        s = self._settings
        domain = registered_domain(hostname)
        domain_bucket = f"domain:{domain}"
        domain_token = await self._store.take_rate_token(
            domain_bucket, s.per_domain, s.per_domain_window_seconds
        )
        if domain_token is None:
            retry_at = await self._refill_at(domain_bucket, s.per_domain_window_seconds)
            raise OrderLimitReached(
                f"{domain} had {s.per_domain} orders within "
                f"{s.per_domain_window_seconds / 86400:g} days (limits.per_domain)",
                retry_at,
            )
        global_token = await self._store.take_rate_token(
            "orders", s.orders_per_window, s.orders_window_seconds
        )
        if global_token is None:
            await self._store.refund_rate_token(domain_token)
            retry_at = await self._refill_at("orders", s.orders_window_seconds)
            raise OrderLimitReached(
                f"{s.orders_per_window} new orders within "
                f"{s.orders_window_seconds / HOUR:g} h (limits.orders_per_window)",
                retry_at,
            )

    async def record_failed_authorizations(self, hostname: str, count: int) -> None:
        """Failed validations count against the hourly cap even when a later type worked."""
        for _ in range(count):
            await self._store.add_rate_event(_authz_bucket(hostname))

    async def record_failure(
        self, hostname: str, error: str, failed_authorizations: int
    ) -> HostBackoff:
        await self.record_failed_authorizations(hostname, failed_authorizations)
        previous = await self._store.get_backoff(hostname)
        failures = (previous.failures if previous else 0) + 1
        delay = backoff_delay(
            failures, self._settings.first_backoff_seconds, self._settings.max_backoff_seconds
        )
        backoff = HostBackoff(
            hostname=hostname,
            failures=failures,
            next_attempt_at=self._clock() + delay,
            last_error=error,
        )
        await self._store.put_backoff(backoff)
        return backoff

    async def record_success(self, hostname: str) -> None:
        await self._store.clear_backoff(hostname)

    async def prune(self) -> None:
        s = self._settings
        longest = max(s.orders_window_seconds, s.per_domain_window_seconds, HOUR)
        await self._store.prune_rate_log(self._clock() - longest)

    async def _refill_at(self, bucket: str, window: float) -> float | None:
        _, oldest = await self._store.rate_usage(bucket, window)
        return None if oldest is None else oldest + window


def _authz_bucket(hostname: str) -> str:
    return f"authz-failed:{hostname}"


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
