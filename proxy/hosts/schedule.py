"""When a host is checked next, Cloudflare-like: often at first, then less often.

Pure arithmetic on a host's state, so it is unit-tested without clocks or DNS.
"""

from __future__ import annotations

from dataclasses import dataclass

from certstore import DomainState

_DAY = 86400.0  # (proxy/app/config.py derives a Schedule from the config)


@dataclass(frozen=True, slots=True)
class Schedule:
    pending_first: float = 60.0
    pending_max: float = 3600.0
    give_up: float = 7 * _DAY
    active_interval: float = 6 * 3600.0
    moved_grace: float = 7 * _DAY

    def next_check(
        self, state: DomainState, failed_checks: int, now: float, state_since: float
    ) -> float | None:
        """The next background check, or None for "no background checks"."""
        if state is DomainState.SUSPENDED:
            return None
        if state in (DomainState.ACTIVE, DomainState.VERIFIED):
            return now + self.active_interval
        if state is DomainState.MOVED:
            # at the latest when the grace period ends, so the host retires on time
            return min(now + self.pending_max, max(now, state_since + self.moved_grace))
        # pending, failed: back off from pending_first to pending_max; failed_checks counts
        # the consecutive failing checks including the one just made
        backoff = self.pending_first * 2 ** min(max(failed_checks - 1, 0), 32)
        return now + min(backoff, self.pending_max)

    def gave_up(self, state: DomainState, now: float, state_since: float) -> bool:
        return state in (DomainState.PENDING, DomainState.FAILED) and (
            now - state_since >= self.give_up
        )

    def grace_over(self, state: DomainState, now: float, state_since: float) -> bool:
        return state is DomainState.MOVED and now - state_since >= self.moved_grace
