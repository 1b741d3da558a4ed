"""Short-lived memory of refused names (the negative cache).

Random-SNI floods and retries of a failing host must not turn into store lookups,
DNS queries or ACME orders on every handshake. Bounded so a flood of distinct
names cannot grow memory without limit.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

UNRECOGNIZED_NAME = 112  # TLS alert (RFC 6066 §3)


class Refused(Exception):
    """No certificate will be served for this name now; `alert` is the TLS alert to send."""

    def __init__(self, reason: str, alert: int = UNRECOGNIZED_NAME) -> None:
        super().__init__(reason)
        self.reason = reason
        self.alert = alert


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str
    until: float
    alert: int


class RefusalCache:
    def __init__(self, capacity: int = 100_000) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[str, Refusal] = OrderedDict()

    def get(self, hostname: str, now: float) -> Refusal | None:
        entry = self._entries.get(hostname)
        if entry is None:
            return None
        if now >= entry.until:
            del self._entries[hostname]
            return None
        return entry

    def put(self, hostname: str, refusal: Refusal) -> None:
        self._entries[hostname] = refusal
        self._entries.move_to_end(hostname)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def discard(self, hostname: str) -> None:
        self._entries.pop(hostname, None)
