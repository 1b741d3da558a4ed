"""Host operations: register, remove (revoking), suspend, resume, renew, verify, revoke.

The single implementation the CLI (`linkedge domains ...`, `linkedge certs revoke`) and
the admin API (`/v1/hosts...`) both call, so both accept and refuse the same things with
the same words. Every refusal is an `OpError` (its `status` and `code` are the API's)
and changes nothing. A change is written to the store, whose triggers log the event
every worker follows (`proxy/hosts/state_sync.py`); when the caller runs inside a worker
it passes that worker's caches (`WorkerCaches`) so this worker applies it at once.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from acme_client import AcmeError
from certstore import CertStore, Domain, DomainExists, DomainState, StoredCertificate
from proxy.hosts.lifecycle import InvalidTransition, Lifecycle
from proxy.hosts.revocation import (
    HostBusy,
    Removal,
    RevocationFailed,
    Revoker,
    remove_host,
    revoke_certificate,
)
from proxy.hosts.state_sync import StateSync
from proxy.hosts.verifier import Outcome, Verifier
from proxy.http.host_views import HostViews
from proxy.ops.errors import OpError
from proxy.tls.certificates import CertificateManager, RenewalBusy
from proxy.wire.hostnames import InvalidHostname, normalize_hostname

S = DomainState
ACCOUNT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")
MAX_REASON = 500


@dataclass
class WorkerCaches:
    """This worker's copies of host state, dropped at once on a change (the others follow
    the event feed within `lifecycle.sync_seconds`)."""

    manager: CertificateManager | None = None
    state_sync: StateSync | None = None
    host_views: HostViews | None = None

    def changed(self, hostname: str, *, certificate: bool = True) -> None:
        if certificate and self.manager is not None:
            self.manager.forget(hostname)
        if self.host_views is not None:
            self.host_views.forget(hostname)

    def suspended(self, hostname: str, suspended: bool) -> None:
        if self.state_sync is not None:
            if suspended:
                self.state_sync.suspended.add(hostname)
            else:
                self.state_sync.suspended.discard(hostname)


NO_CACHES = WorkerCaches()


# -- names ---------------------------------------------------------------------------


def hostname(text: object) -> str:
    """A customer's hostname in its one canonical form (IDNA, lower case, no final dot)."""
    if not isinstance(text, str):
        raise OpError(422, "invalid_hostname", "hostname must be a string")
    try:
        return normalize_hostname(text)
    except InvalidHostname as exc:
        raise OpError(422, "invalid_hostname", str(exc)) from None


def customer_hostname(text: object, edge_target: str) -> str:
    """`hostname`, and not one of the edge's own names (`edge.cname_target` or below it)."""
    name = hostname(text)
    target = edge_target.rstrip(".").lower()
    if target and (name == target or name.endswith("." + target)):
        raise OpError(422, "invalid_hostname", f"{name} is one of the edge's own names")
    return name


async def registered(store: CertStore, text: object) -> Domain:
    domain = await store.get_domain(hostname(text))
    if domain is None:
        raise OpError(404, "not_found", f"{hostname(text)} is not registered")
    return domain


# -- register, remove ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Registration:
    domain: Domain
    created: bool  # False: it was registered to this account already (nothing changed)


class OwnedByAnotherAccount(OpError):
    def __init__(self, hostname: str, owner: str) -> None:
        super().__init__(
            409, "owned_by_another_account", f"{hostname} is registered to another account"
        )
        self.owner = owner  # the CLI's operator may see it; an API caller may not


async def register(
    store: CertStore, text: object, account: object, edge_target: str
) -> Registration:
    """Register a host for an account; registering it again for the same account is a no-op."""
    name = customer_hostname(text, edge_target)
    if not isinstance(account, str) or not ACCOUNT.match(account):
        raise OpError(
            422,
            "invalid_account",
            "account must be 1-128 characters: letters, digits and . _ @ + -",
        )
    try:
        await store.add_domain(name, account)
    except DomainExists:
        existing = await store.get_domain(name)
        if existing is not None and existing.account == account:
            return Registration(existing, created=False)
        raise OwnedByAnotherAccount(name, existing.account if existing else "?") from None
    domain = await store.get_domain(name)
    assert domain is not None
    return Registration(domain, created=True)


async def remove(
    store: CertStore,
    issuer: Revoker | None,
    text: object,
    *,
    force: bool = False,
    caches: WorkerCaches = NO_CACHES,
    clock: Callable[[], float] = time.time,
) -> Removal:
    """Revoke the certificate, then unregister the host and purge its key, options, files.

    A revocation the CA cannot make (`revocation_failed`) or an order in progress
    (`order_in_progress`) removes nothing, unless `force` (then the key is deleted
    unrevoked, event `removed_unrevoked`).
    """
    domain = await registered(store, text)
    try:
        return await remove_host(store, issuer, domain.hostname, force=force, clock=clock)
    except RevocationFailed as exc:
        raise OpError(502, "revocation_failed", f"{exc}; nothing removed") from None
    except HostBusy as exc:
        raise OpError(409, "order_in_progress", f"{exc}; nothing removed") from None
    finally:  # this worker at once (also after a partial failure); the others by events
        caches.changed(domain.hostname)


async def revoke(store: CertStore, issuer: Revoker, text: object) -> str:
    """Revoke the certificate and purge its key; the host stays registered (its next click
    orders a new one). Returns what happened, one line."""
    name = hostname(text)
    if await store.get_certificate(name) is None:
        raise OpError(404, "no_certificate", f"{name} has no certificate")
    try:
        return await revoke_certificate(store, issuer, name)
    except HostBusy as exc:
        raise OpError(409, "order_in_progress", str(exc)) from None


# -- suspend, resume -----------------------------------------------------------------


async def suspend(
    store: CertStore,
    lifecycle: Lifecycle,
    text: object,
    note: object = "",
    *,
    caches: WorkerCaches = NO_CACHES,
) -> Domain:
    """Stop serving and issuing for the host (a kill switch); suspending again is a no-op."""
    domain = await registered(store, text)
    if not isinstance(note, str) or len(note) > MAX_REASON:
        raise OpError(
            422, "invalid_reason", f"reason must be a string of at most {MAX_REASON} characters"
        )
    if domain.state is not S.SUSPENDED:
        reason = "suspended by operator" + (f": {note}" if note else "")
        await _transition(lifecycle, domain, S.SUSPENDED, reason)
    caches.suspended(domain.hostname, True)
    caches.changed(domain.hostname)
    return await registered(store, domain.hostname)


async def resume(
    store: CertStore,
    lifecycle: Lifecycle,
    text: object,
    *,
    caches: WorkerCaches = NO_CACHES,
    clock: Callable[[], float] = time.time,
) -> Domain:
    """Undo a suspension: active again with a valid certificate, else pending; checked at once."""
    domain = await registered(store, text)
    if domain.state is not S.SUSPENDED:
        raise OpError(409, "not_suspended", f"{domain.hostname} is {domain.state.value}")
    cert = await store.get_certificate(domain.hostname)
    has_cert = cert is not None and cert.is_valid_at(clock())
    target = S.ACTIVE if has_cert else S.PENDING
    # check again at once: the host may have moved while it was suspended
    await _transition(lifecycle, domain, target, "resumed by operator", next_check_at=clock())
    caches.suspended(domain.hostname, False)
    caches.changed(domain.hostname)
    return await registered(store, domain.hostname)


async def _transition(
    lifecycle: Lifecycle,
    domain: Domain,
    to: DomainState,
    reason: str,
    next_check_at: float | None = None,
) -> None:
    try:
        changed = await lifecycle.transition(domain, to, reason, next_check_at=next_check_at)
    except InvalidTransition as exc:
        raise OpError(409, "invalid_transition", str(exc)) from None
    if not changed:
        raise OpError(409, "conflict", f"{domain.hostname} changed meanwhile; try again")


# -- verify, renew -------------------------------------------------------------------


async def verify(store: CertStore, verifier: Verifier, text: object) -> Outcome:
    """Run the cname, caa and https checks now and apply what they say."""
    domain = await registered(store, text)
    outcome = await verifier.verify(domain.hostname)
    if outcome is None:  # removed meanwhile
        raise OpError(404, "not_found", f"{domain.hostname} is not registered")
    return outcome


async def renew(
    store: CertStore,
    verifier: Verifier,
    manager: CertificateManager | None,
    text: object,
) -> StoredCertificate:
    """Re-check the CNAME and CAA (not https), then order a new certificate now."""
    domain = await registered(store, text)
    if manager is None:
        raise OpError(503, "unavailable", "this process cannot order certificates")
    if domain.state is S.SUSPENDED:
        raise OpError(409, "suspended", f"{domain.hostname} is suspended; resume it first")
    outcome = await verifier.verify(domain.hostname, https=False, issue=False)
    if outcome is None:
        raise OpError(404, "not_found", f"{domain.hostname} is not registered")
    if outcome.domain.state not in (S.VERIFIED, S.ACTIVE):
        raise OpError(
            409,
            "not_verified",
            f"{domain.hostname} is {outcome.domain.state.value}: {outcome.report.summary}",
        )
    try:
        return await manager.renew_now(domain.hostname)
    except RenewalBusy as exc:
        raise OpError(409, "order_in_progress", str(exc)) from None
    except AcmeError as exc:
        raise OpError(502, "acme_error", f"the CA did not issue: {exc}") from None
