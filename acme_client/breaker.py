"""A circuit breaker per CA: an unreachable CA is the CA's failure, not each host's.

Network errors, timeouts, 5xx and `serverInternal`/`rateLimited` answers are CA-level
(`errors.is_ca_failure`): they open the breaker instead of escalating a host's backoff.
While it is open, orders fail at once (`CaUnavailable`) and a probe goes to the CA every
`probe_seconds` (jittered); the first answer closes it again.

    closed --failures >= threshold--> open --probe due, claimed--> half_open
    half_open --CA answers--> closed          half_open --CA-level failure--> open

`transition_*` and `decide` are pure (sans-IO, unit-tested); `CaBreaker` keeps the
state in the store, so every worker process sees the same breaker and exactly one of
them claims each probe.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from certstore import BreakerStore, CaBreakerState

from .errors import CaUnavailable

log = logging.getLogger(__name__)

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
PROBE_WAIT = 1.0  # an order arriving during a probe waits this long for its outcome
# A closed, failure-free breaker this process read or wrote this recently (monotonic
# seconds) is not read again for an order's checks: an issuance looked at it three times
# (~0.7 ms of CPU each, 5 % of an issuance). Another worker's opening is seen this much
# later at most; an order placed meanwhile fails at the CA and opens it here too.
CLOSED_REUSE_SECONDS = 0.5
# The background prober trusts a closed state this process saw this long (instead of a
# store read per tick per worker: most of an idle fleet's statements). Whoever opens the
# breaker reads it open here (this process's failure, or its next order's check); another
# process's prober claims the probes meanwhile.
PROBER_CLOSED_REUSE_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    failure_threshold: int = 1  # consecutive CA-level failures (each already retried) to open
    probe_seconds: float = 2.0  # between probes while open, jittered ±25 %
    probe_timeout: float = 5.0  # a probe that takes longer counts as a failure
    rate_limited_seconds: float = 60.0  # after a `rateLimited` answer: no probe before this


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    probe: bool = False  # allowed as the probe of an open breaker
    reason: str = ""
    retry_at: float | None = None


def next_probe(now: float, settings: BreakerSettings, uniform: Callable[[], float]) -> float:
    return now + settings.probe_seconds * (0.75 + 0.5 * uniform())


def transition_failure(
    state: CaBreakerState,
    now: float,
    error: str,
    settings: BreakerSettings,
    uniform: Callable[[], float] = random.random,
    hold_until: float | None = None,
) -> CaBreakerState:
    """`hold_until`: no probe before then (a CA that said "rate limited" is not asked again
    every few seconds just because its directory answers)."""
    failures = state.failures + 1
    if state.state == CLOSED and failures < max(settings.failure_threshold, 1):
        return replace(state, failures=failures, last_error=error)
    return replace(
        state,
        state=OPEN,
        failures=failures,
        opened_at=state.opened_at if state.state != CLOSED else now,
        next_probe_at=max(next_probe(now, settings, uniform), hold_until or 0.0),
        last_error=error,
    )


def transition_success(state: CaBreakerState) -> CaBreakerState:
    return CaBreakerState(directory_url=state.directory_url)


def decide(state: CaBreakerState, now: float) -> Decision:
    """May an order go to this CA now? (Claiming a due probe is the caller's job.)"""
    if state.state == CLOSED:
        return Decision(True)
    retry_at = state.next_probe_at
    if retry_at is not None and now >= retry_at:
        return Decision(True, probe=True)
    since = now - state.opened_at if state.opened_at is not None else 0.0
    return Decision(
        False,
        reason=(
            f"ACME CA {state.directory_url} unavailable for {since:.0f} s "
            f"({state.failures} failure(s) in a row; last: {state.last_error})"
        ),
        retry_at=retry_at,
    )


class CaBreaker:
    """The store-backed breaker of one CA directory."""

    def __init__(
        self,
        store: BreakerStore,
        directory_url: str,
        settings: BreakerSettings,
        clock: Callable[[], float] = time.time,
        uniform: Callable[[], float] = random.random,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self._store = store
        self._on_change = on_change  # told "closed" or "open" as this process sees it change
        self.directory_url = directory_url
        self.settings = settings
        self._clock = clock
        self._uniform = uniform
        self._seen_state = CLOSED  # what this process last logged
        self._closed: tuple[CaBreakerState, float] | None = None  # see CLOSED_REUSE_SECONDS

    async def state(self) -> CaBreakerState:
        """The shared state, read from the store."""
        stored = await self._store.get_ca_breaker(self.directory_url)
        state = stored or CaBreakerState(directory_url=self.directory_url)
        self._remember(state)
        return state

    def _remember(self, state: CaBreakerState) -> None:
        healthy = state.state == CLOSED and state.failures == 0
        self._closed = (state, time.monotonic()) if healthy else None

    async def _recent_state(self) -> CaBreakerState:
        """For an order's checks: a closed state seen a moment ago, else the store's."""
        if self._closed is not None:
            state, seen = self._closed
            if time.monotonic() - seen < CLOSED_REUSE_SECONDS:
                return state
        return await self.state()

    async def check(self, *, claim: bool = True) -> None:
        """Raise CaUnavailable at once while the breaker is open and no probe is due.

        With `claim`, a due probe is claimed (this caller's order is the probe);
        without, this only looks (a pre-check before the real attempt).
        """
        state = await self._recent_state()
        decision = decide(state, self._clock())
        if state.state == HALF_OPEN and not decision.allowed:
            # a probe is on its way: its outcome decides (briefly waited for)
            state = await self._probe_outcome()
            decision = decide(state, self._clock())
        if not decision.allowed:
            self._log_change(state)
            raise CaUnavailable(decision.reason, retry_at=decision.retry_at)
        if claim and decision.probe and not await self._claim_probe():
            # another caller (worker) claimed this probe just now: wait for its outcome
            state = await self._probe_outcome()
            decision = decide(state, self._clock())
            if not decision.allowed or decision.probe:
                raise CaUnavailable(
                    decision.reason or f"ACME CA {self.directory_url} unavailable",
                    retry_at=decision.retry_at,
                )

    async def _probe_outcome(self, wait: float = PROBE_WAIT) -> CaBreakerState:
        deadline = time.monotonic() + wait
        while True:
            state = await self.state()
            if state.state != HALF_OPEN or time.monotonic() >= deadline:
                return state
            await asyncio.sleep(0.02)

    async def record_failure(self, error: str, *, hold_until: float | None = None) -> None:
        state = transition_failure(
            await self.state(), self._clock(), error, self.settings, self._uniform, hold_until
        )
        await self._store.put_ca_breaker(state)
        self._remember(state)
        self._log_change(state)

    async def record_success(self) -> None:
        state = await self._recent_state()
        if state.state == CLOSED and state.failures == 0:
            return  # the usual case: no write
        closed = transition_success(state)
        await self._store.put_ca_breaker(closed)
        self._remember(closed)
        self._log_change(closed, previous=state)

    async def probe_if_due(self, probe: Callable[[], Awaitable[object]]) -> bool | None:
        """Background probe: when the breaker is open and a probe is due, claim it and run
        `probe` (e.g. a directory fetch). Returns None when there was nothing to do."""
        if self._closed is not None:
            if time.monotonic() - self._closed[1] < PROBER_CLOSED_REUSE_SECONDS:
                return None
        state = await self.state()
        if state.state == CLOSED:
            if self._seen_state != CLOSED:
                self._log_change(state)
            return None
        if not decide(state, self._clock()).probe or not await self._claim_probe():
            self._log_change(state)
            return None
        try:
            await probe()
        except Exception as exc:  # noqa: BLE001 - any failure keeps the breaker open
            await self.record_failure(f"probe: {exc}")
            return False
        await self.record_success()
        return True

    async def _claim_probe(self) -> bool:
        now = self._clock()
        return await self._store.claim_ca_probe(
            self.directory_url, now, next_probe(now, self.settings, self._uniform)
        )

    def _log_change(self, state: CaBreakerState, previous: CaBreakerState | None = None) -> None:
        shown = CLOSED if state.state == CLOSED else OPEN
        if shown == self._seen_state:
            return
        self._seen_state = shown
        if self._on_change is not None:
            self._on_change(shown)
        if shown == OPEN:
            log.warning(
                "ACME CA %s unavailable (%s); circuit breaker open: orders fail fast, "
                "probing every %.0f s",
                self.directory_url,
                state.last_error,
                self.settings.probe_seconds,
            )
        else:
            down = ""
            if previous is not None and previous.opened_at is not None:
                down = f" after {self._clock() - previous.opened_at:.0f} s"
            log.warning(
                "ACME CA %s answers again%s; circuit breaker closed", self.directory_url, down
            )
