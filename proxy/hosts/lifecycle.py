"""The life of a tracking host: which states follow which, and why.

    pending --checks pass--> verified --certificate--> active
       |                       |                         |
       +--given up--> failed <-+--issuance failed        +--CNAME gone--> moved
                                                                           |
    moved --CNAME back--> active;  moved --grace over--> failed (retired, certificate deleted)
    any --operator--> suspended --resume--> active (valid certificate) or pending

Every transition is a compare-and-set in the store, which logs it as a `state` event
with the reason (a trigger, so no code path can forget). Check reports decide
transitions through :func:`decide`, a pure function.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from certstore import CertStore, Domain, DomainState
from proxy.hosts.checks import CheckReport, CheckState
from proxy.hosts.events import EventKind
from proxy.hosts.schedule import Schedule

log = logging.getLogger(__name__)

S = DomainState
ALLOWED: dict[DomainState, frozenset[DomainState]] = {
    S.PENDING: frozenset({S.VERIFIED, S.FAILED, S.SUSPENDED}),
    S.VERIFIED: frozenset({S.ACTIVE, S.PENDING, S.FAILED, S.SUSPENDED}),
    S.ACTIVE: frozenset({S.MOVED, S.FAILED, S.SUSPENDED}),
    S.FAILED: frozenset({S.VERIFIED, S.ACTIVE, S.SUSPENDED}),
    S.MOVED: frozenset({S.ACTIVE, S.VERIFIED, S.FAILED, S.SUSPENDED}),
    S.SUSPENDED: frozenset({S.ACTIVE, S.PENDING}),
}


class InvalidTransition(Exception):
    """The host is not in a state that allows this change; the message says why."""


@dataclass(frozen=True, slots=True)
class Transition:
    to: DomainState
    reason: str


def decide(current: DomainState, report: CheckReport, has_valid_cert: bool) -> Transition | None:
    """The transition a check report calls for, if any. Unknown results change nothing."""
    cname = report.get("cname")
    if current is S.SUSPENDED or cname is None:
        return None
    if cname.state in (CheckState.UNKNOWN, CheckState.SKIPPED):
        return None
    caa = report.get("caa")
    if current in (S.PENDING, S.FAILED) and report.may_issue:
        return Transition(S.VERIFIED, f"checks pass: {cname.reason}")
    if current is S.VERIFIED and not report.may_issue:
        blocker = cname if not cname.passed else caa
        assert blocker is not None
        return Transition(S.PENDING, f"{blocker.name}: {blocker.reason}")
    if current is S.ACTIVE and not cname.passed:
        return Transition(S.MOVED, f"CNAME no longer reaches the edge: {cname.reason}")
    if current is S.MOVED and cname.passed:
        if has_valid_cert:
            return Transition(S.ACTIVE, f"CNAME is back: {cname.reason}")
        return Transition(S.VERIFIED, f"CNAME is back: {cname.reason}")
    return None


class Lifecycle:
    def __init__(
        self, store: CertStore, schedule: Schedule, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self.schedule = schedule
        self._clock = clock

    async def transition(
        self, domain: Domain, to: DomainState, reason: str, *, next_check_at: float | None = None
    ) -> bool:
        """Move `domain` (as last read) to `to`; False if it changed meanwhile."""
        if to not in ALLOWED[domain.state]:
            allowed = ", ".join(sorted(s.value for s in ALLOWED[domain.state]))
            raise InvalidTransition(
                f"{domain.hostname} is {domain.state.value} and cannot become {to.value}"
                f" (it can become: {allowed})"
            )
        now = self._clock()
        if next_check_at is None:
            next_check_at = self.schedule.next_check(to, 0, now, now)
        changed = await self._store.transition_domain(
            domain.hostname, [domain.state], to, reason, next_check_at=next_check_at
        )
        if changed:
            _log_transition(domain, to, reason)
        return changed

    async def issued(self, hostname: str, reason: str) -> bool:
        """The host has its certificate: active. False if it was not verified, failed or
        moved (already active: a renewal), so no transition was written."""
        now = self._clock()
        return await self._store.transition_domain(
            hostname,
            [S.VERIFIED, S.FAILED, S.MOVED],
            S.ACTIVE,
            reason,
            next_check_at=self.schedule.next_check(S.ACTIVE, 0, now, now),
        )

    async def issuance_failed(self, hostname: str, reason: str) -> None:
        """Failed, retried by the verifier after 1 min, 10 min, 100 min, then daily
        (Let's Encrypt's advice; 5 failed validations per host and hour are the limit)."""
        now = self._clock()
        recent = [
            e
            for e in await self._store.list_events(hostname, limit=20)
            if e.kind == EventKind.ISSUANCE_FAILED and now - e.at < self.schedule.give_up
        ]
        delay = min(self.schedule.pending_first * 10 ** max(len(recent) - 1, 0), 86400.0)
        await self._store.transition_domain(
            hostname, [S.VERIFIED, S.ACTIVE], S.FAILED, reason, next_check_at=now + delay
        )

    async def retire(self, domain: Domain, reason: str) -> bool:
        """Given up on a host: no more background checks (and no certificate for a moved one)."""
        if domain.state is S.MOVED:
            await self._store.delete_certificate(domain.hostname)
        if domain.state is S.FAILED:
            await self._store.update_checks(domain.hostname, next_check_at=None)
            await self._store.record_event(domain.hostname, EventKind.CHECKS_STOPPED, reason)
            return True
        return await self._store.transition_domain(
            domain.hostname, [domain.state], S.FAILED, reason, next_check_at=None
        )

    async def apply(self, domain: Domain, report: CheckReport, has_valid_cert: bool) -> Domain:
        """Store the report, reschedule, and make the transition it calls for."""
        now = self._clock()
        step = decide(domain.state, report, has_valid_cert)
        state = step.to if step else domain.state
        failed = 0 if (step or report.may_issue) else domain.failed_checks + 1
        since = now if step else (domain.state_changed_at or domain.created_at)
        next_at = self.schedule.next_check(state, failed, now, since)
        if step is None and domain.next_check_at is None and state is S.FAILED:
            next_at = None  # given up: a manual check that still fails does not restart it
        # Transition first, then the report: another worker reading in between must
        # see the new state, not "pending, checked just now" (it would refuse a host
        # that has just verified).
        moved = False
        if step is not None:
            if step.to not in ALLOWED[domain.state]:  # decide() only proposes allowed steps
                raise InvalidTransition(f"{domain.state} -> {step.to}")
            moved = await self._store.transition_domain(
                domain.hostname, [domain.state], step.to, step.reason, next_check_at=next_at
            )
            if moved:  # another worker may have made the same step first: it logged it
                _log_transition(domain, step.to, step.reason)
        problem = report.first_problem
        await self._store.update_checks(
            domain.hostname,
            report=report.to_json(),
            cname_target_seen=_points_to(report),
            reason=report.summary if problem else "all checks pass",
            passed=report.may_issue,
            next_check_at=next_at,
            reset_failures=moved,  # a transition starts the count afresh
        )
        updated = await self._store.get_domain(domain.hostname)
        return updated or domain


def _log_transition(domain: Domain, to: DomainState, reason: str) -> None:
    log.info(
        "%s: %s -> %s (%s)",
        domain.hostname,
        domain.state,
        to,
        reason,
        extra={"event": "transition", "host": domain.hostname, "reason": reason},
    )


def _points_to(report: CheckReport) -> str | None:
    cname = report.get("cname")
    if cname is None:
        return None
    value = cname.details.get("points_to")
    return str(value) if value else None


def load_report(domain: Domain) -> CheckReport | None:
    if not domain.last_report:
        return None
    try:
        return CheckReport.from_json(json.loads(domain.last_report))
    except (ValueError, KeyError, TypeError):
        return None
