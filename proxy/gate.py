"""The issuance gate: may this hostname get a certificate right now?

Security by default: only registered hosts whose CNAME reaches the edge. A pending
host gets at most one live DNS check per interval (shared across workers through
the store's last_check_at), so a flood of handshakes cannot become a flood of DNS
queries. Hosts already verified are decided without DNS on the handshake path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from certstore import CertStore, DomainState

from .dnscheck import CnameChecker, CnameStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    registered: bool = True


class IssuanceGate:
    def __init__(
        self,
        store: CertStore,
        checker: CnameChecker,
        edge_target: str,
        recheck_interval: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._checker = checker
        self._target = edge_target.rstrip(".").lower()
        self._interval = recheck_interval
        self._clock = clock

    async def decide(self, hostname: str) -> Decision:
        domain = await self._store.get_domain(hostname)
        if domain is None:
            return Decision(False, "not registered", registered=False)
        if domain.state is DomainState.SUSPENDED:
            return Decision(False, "suspended by operator")
        if domain.may_issue:
            return Decision(True, f"verified ({domain.state.value})")
        # pending: one live check per interval
        now = self._clock()
        if domain.last_check_at is not None and now - domain.last_check_at < self._interval:
            return Decision(False, f"pending: {domain.last_check_reason}")
        result = await self._checker.check(hostname, self._target)
        verified = result.status is CnameStatus.OK
        await self._store.record_check(
            hostname,
            state=DomainState.VERIFIED if verified else DomainState.PENDING,
            cname_target_seen=result.first_target,
            reason=result.reason,
            verified=verified,
        )
        await self._store.record_event(
            hostname, "verified" if verified else "check_failed", result.reason
        )
        log.info("live CNAME check for %s: %s", hostname, result.reason)
        if verified:
            return Decision(True, result.reason)
        return Decision(False, f"pending: {result.reason}")
