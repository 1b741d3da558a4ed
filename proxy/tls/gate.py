"""The issuance gate: may this hostname get a certificate right now?

Security by default: only registered hosts whose CNAME reaches the edge (and whose
CAA records do not forbid our CA). Hosts already decided (verified, active, moved,
suspended) are answered from the store without DNS. A pending or failed host gets
at most one live DNS check per interval (shared across workers through the store's
last_check_at), so a flood of handshakes cannot become a flood of DNS queries; the
background verifier does the rest of the checking.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from certstore import Domain, DomainState, HostStore
from proxy.hosts.checks import HostChecker
from proxy.hosts.lifecycle import Lifecycle

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    registered: bool = True
    state: DomainState | None = None  # the host's state when refused
    verified_now: bool = False  # this decision's live check moved the host to verified


class IssuanceGate:
    def __init__(
        self,
        store: HostStore,
        checker: HostChecker,
        lifecycle: Lifecycle,
        recheck_interval: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._checker = checker
        self._lifecycle = lifecycle
        self._interval = recheck_interval
        self._clock = clock

    async def decide(self, hostname: str) -> Decision:
        domain = await self._store.get_domain(hostname)
        if domain is None:
            return Decision(False, "not registered", registered=False)
        if domain.state is DomainState.SUSPENDED:
            return Decision(False, "suspended by operator")
        if domain.state is DomainState.MOVED:
            return Decision(False, f"moved, not renewed: {domain.state_reason}")
        if domain.may_issue:
            return Decision(True, f"verified ({domain.state.value})")
        # pending or failed: one live check per interval
        now = self._clock()
        if domain.last_check_at is not None and now - domain.last_check_at < self._interval:
            return _refusal(domain, f"{domain.last_check_reason}")
        report = await self._checker.check_dns(hostname)
        domain = await self._lifecycle.apply(domain, report, has_valid_cert=False)
        log.info(
            "live check for %s: %s",
            hostname,
            report.summary,
            extra={"event": "check", "host": hostname, "reason": report.summary},
        )
        if domain.state is DomainState.VERIFIED:
            return Decision(True, report.summary, verified_now=True)
        return _refusal(domain, report.summary)


def _refusal(domain: Domain, reason: str) -> Decision:
    return Decision(False, f"{domain.state.value}: {reason}", state=domain.state)
