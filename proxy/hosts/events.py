"""Every kind of event in the store's event log, and which per-worker caches each one
invalidates.

The events table is the change feed every worker follows (`proxy/hosts/state_sync.py`),
the audit trail the admin API and status page show, and what webhooks deliver. Emitters
in proxy/ write `EventKind` members; the store's own triggers and methods
(`certstore/`) and the ACME account registration (`acme_client/`) write the same strings,
which a `StrEnum` keeps compatible (`tests/test_state_sync.py` reads every kind emitted
in code and schema and checks each is a member).

A consumer asks the enum, never a hand-kept set: `invalidating(Cache.HANDSHAKE)` is what
makes every worker drop a host's TLS context and refusal, `invalidating(Cache.HOST_VIEW)`
what makes the HTTP side read the host again; `FAILURES` is what the status page marks.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Cache(enum.Enum):
    """Per-worker copies of store state that an event can make stale."""

    HANDSHAKE = "handshake"  # TLS contexts, refusals, the suspended set (state_sync)
    HOST_VIEW = "host_view"  # hosts' options, files, state for HTTP answers (host_views)


@dataclass(frozen=True, slots=True)
class _Meta:
    invalidates: frozenset[Cache]
    failure: bool  # shown as a problem on the status page
    why: str  # who emits it / why it invalidates what it does


_H = frozenset({Cache.HANDSHAKE, Cache.HOST_VIEW})  # the HTTP side shows certificates too
_V = frozenset({Cache.HOST_VIEW})
_N: frozenset[Cache] = frozenset()


class EventKind(enum.StrEnum):
    REGISTERED = "registered"
    REMOVED = "removed"
    STATE = "state"
    ISSUED = "issued"
    RENEWED = "renewed"
    REVOKED = "revoked"
    PURGED = "purged"
    OPTIONS_CHANGED = "options_changed"
    FILE_UPDATED = "file_updated"
    FILE_DELETED = "file_deleted"
    ACME_ACCOUNT_REGISTERED = "acme_account_registered"
    ORDER_STARTED = "order_started"
    RENEWAL_STARTED = "renewal_started"
    ORDER_DEFERRED = "order_deferred"
    ISSUANCE_FAILED = "issuance_failed"
    RENEWAL_FAILED = "renewal_failed"
    RENEWAL_SKIPPED = "renewal_skipped"
    REFUSED = "refused"
    CHECKS_STOPPED = "checks_stopped"
    REMOVED_UNREVOKED = "removed_unrevoked"
    WEBHOOK_FAILED = "webhook_failed"

    @property
    def invalidates(self) -> frozenset[Cache]:
        return _META[self].invalidates

    @property
    def failure(self) -> bool:
        return _META[self].failure


K = EventKind
_META: dict[EventKind, _Meta] = {
    K.REGISTERED: _Meta(_H, False, "certstore add_domain: a remembered 'not registered' must go"),
    K.REMOVED: _Meta(_H, False, "certstore remove_domain (ops.remove)"),
    K.STATE: _Meta(_H, False, "the domains trigger: suspended, resumed, verified, moved, retired"),
    K.ISSUED: _Meta(_H, False, "tls/certificates: a new certificate"),
    K.RENEWED: _Meta(_H, False, "tls/certificates: a newer certificate"),
    K.REVOKED: _Meta(_H, False, "hosts/revocation: certs revoke, domains remove"),
    K.PURGED: _Meta(_H, False, "hosts/revocation: an expired certificate deleted"),
    K.OPTIONS_CHANGED: _Meta(_V, False, "store trigger: HTTP answers only"),
    K.FILE_UPDATED: _Meta(_V, False, "store trigger: HTTP answers only"),
    K.FILE_DELETED: _Meta(_V, False, "store trigger: HTTP answers only"),
    K.ACME_ACCOUNT_REGISTERED: _Meta(_N, False, "acme_client: no host"),
    K.ORDER_STARTED: _Meta(_N, False, "the certificate arrives with `issued`"),
    K.RENEWAL_STARTED: _Meta(_N, False, "the certificate arrives with `renewed`"),
    K.ORDER_DEFERRED: _Meta(_N, True, "nothing changed; this worker's refusal cache only"),
    K.ISSUANCE_FAILED: _Meta(_N, True, "the state change to failed is a `state` event"),
    K.RENEWAL_FAILED: _Meta(_N, True, "the current certificate stays in service"),
    K.RENEWAL_SKIPPED: _Meta(_N, True, "the current certificate stays in service"),
    K.REFUSED: _Meta(_N, True, "a decision, not a change"),
    K.CHECKS_STOPPED: _Meta(_N, False, "background checks only"),
    K.REMOVED_UNREVOKED: _Meta(_N, True, "followed by `removed`"),
    K.WEBHOOK_FAILED: _Meta(_N, True, "delivery bookkeeping"),
}
assert set(_META) == set(EventKind), set(EventKind) - set(_META)


def invalidating(cache: Cache) -> frozenset[EventKind]:
    """The kinds after which `cache` must forget the event's host."""
    return frozenset(k for k in EventKind if cache in k.invalidates)


def why(kind: EventKind) -> str:
    return _META[kind].why


HANDSHAKE_EVENTS = invalidating(Cache.HANDSHAKE)
HOST_VIEW_EVENTS = invalidating(Cache.HOST_VIEW)
FAILURES = frozenset(k for k in EventKind if k.failure)
