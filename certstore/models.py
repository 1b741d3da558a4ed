"""Plain records the store hands out; no behaviour beyond small derived facts."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class DomainState(StrEnum):
    PENDING = "pending"  # registered, CNAME not (yet) seen reaching the edge
    VERIFIED = "verified"  # CNAME reaches the edge; no certificate yet
    ACTIVE = "active"  # certificate issued
    FAILED = "failed"  # issuance failed; see events
    SUSPENDED = "suspended"  # operator kill switch: neither served nor issued
    MOVED = "moved"  # CNAME no longer reaches the edge: served for a grace period, not renewed


@dataclass(frozen=True, slots=True)
class Domain:
    hostname: str
    account: str
    state: DomainState
    cname_target_seen: str | None
    verified_at: float | None
    last_check_at: float | None
    last_check_reason: str | None
    created_at: float
    state_reason: str = ""
    state_changed_at: float | None = None
    next_check_at: float | None = None  # None: no background checks (suspended, given up)
    failed_checks: int = 0  # consecutive checks that did not pass (drives the backoff)
    last_report: str | None = None  # JSON of the last check report

    @property
    def may_issue(self) -> bool:
        # FAILED and PENDING need a passing check first; MOVED is served but never renewed.
        return self.state in (DomainState.VERIFIED, DomainState.ACTIVE)


@dataclass(frozen=True, slots=True)
class AcmeAccount:
    directory_url: str
    uri: str
    key_pem: bytes  # decrypted; only ever held in memory


@dataclass(frozen=True, slots=True)
class StoredCertificate:
    hostname: str
    chain_pem: bytes  # leaf first, then intermediates
    key_pem: bytes  # decrypted; only ever held in memory
    names: tuple[str, ...]
    not_before: float
    not_after: float
    issuer: str
    created_at: float
    serial: str = ""  # hex, as the CA's tools show it
    directory_url: str = ""  # the ACME CA that issued it (revocation, ARI)

    def is_valid_at(self, now: float) -> bool:
        return self.not_before <= now < self.not_after

    def __repr__(self) -> str:  # never print key material
        return (
            f"StoredCertificate(hostname={self.hostname!r}, names={self.names!r}, "
            f"not_after={self.not_after!r}, issuer={self.issuer!r}, serial={self.serial!r})"
        )


@dataclass(frozen=True, slots=True)
class RenewalPlan:
    """When the maintenance loop renews a certificate, and when it looks again."""

    hostname: str
    due_at: float  # renew at or after this time
    next_check_at: float  # the loop's next visit (ARI poll, retry after a failure)
    source: str  # "ratio" (share of lifetime) or "ari" (the CA's suggested window)
    last_error: str | None = None  # the last failed or skipped renewal, until one succeeds


@dataclass(frozen=True, slots=True)
class HostBackoff:
    """Consecutive failed orders for one host and when it may be tried again."""

    hostname: str
    failures: int
    next_attempt_at: float
    last_error: str


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    at: float
    hostname: str | None
    kind: str
    detail: str
    from_state: str | None = None  # set on kind "state" (a lifecycle transition)
    to_state: str | None = None


@dataclass(frozen=True, slots=True)
class HostFile:
    """A document the edge serves itself for a host (an app association file)."""

    hostname: str
    kind: str  # e.g. "apple-app-site-association", "assetlinks.json"
    content: bytes  # exactly as uploaded
    etag: str  # strong entity tag, quoted, derived from the content
    updated_at: float

    def __repr__(self) -> str:
        return (
            f"HostFile(hostname={self.hostname!r}, kind={self.kind!r}, "
            f"size={len(self.content)}, etag={self.etag!r})"
        )


@dataclass(frozen=True, slots=True)
class PendingOrder:
    """An ACME order placed but not yet turned into a stored certificate.

    Recorded before the CA is asked to validate, so a process that takes over after a
    crash resumes this order (and downloads a certificate the CA already issued)
    instead of placing a second one. Ended by storing the host's certificate.
    """

    hostname: str
    directory_url: str
    order_url: str
    account_uri: str
    key_pem: bytes  # sealed in the store
    names: tuple[str, ...]
    created_at: float

    def __repr__(self) -> str:  # never the key
        return f"PendingOrder(hostname={self.hostname!r}, order_url={self.order_url!r})"


@dataclass(frozen=True, slots=True)
class CaBreakerState:
    """One CA's circuit breaker as the workers share it (see acme_client.breaker)."""

    directory_url: str
    state: str = "closed"  # closed | open | half_open
    failures: int = 0  # consecutive CA-level failures
    opened_at: float | None = None
    next_probe_at: float | None = None  # open: when the next probe may go
    last_error: str = ""


@dataclass(frozen=True, slots=True)
class HostRecord:
    """One registered host with every record a copy of the store carries
    (:meth:`certstore.ports.HostTransfer.export_hosts`); private keys opened."""

    domain: Domain
    options: dict[str, Any] | None = None
    files: tuple[HostFile, ...] = ()  # by kind
    certificate: StoredCertificate | None = None
    renewal: RenewalPlan | None = None
    pending_order: PendingOrder | None = None
    backoff: HostBackoff | None = None

    @property
    def hostname(self) -> str:
        return self.domain.hostname


@dataclass(slots=True)
class HostImport:
    """The writes that make a page of hosts in a store what they are in another
    (:meth:`certstore.ports.HostTransfer.import_hosts`), applied in one step in this
    order: a certificate is stored before its host's plan and order in flight, as storing
    one drops both (:meth:`certstore.ports.CertificateStore.put_certificate`)."""

    new_domains: list[Domain] = field(default_factory=list)  # inserted: `registered`
    domains: list[Domain] = field(default_factory=list)  # overwritten: `state` if changed
    options: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    files: list[HostFile] = field(default_factory=list)  # with their own updated_at
    files_removed: list[tuple[str, str]] = field(default_factory=list)  # (hostname, kind)
    certificates_removed: list[str] = field(default_factory=list)  # with their plans
    certificates: list[StoredCertificate] = field(default_factory=list)
    renewals: list[RenewalPlan] = field(default_factory=list)
    pending_orders_removed: list[tuple[str, str]] = field(default_factory=list)  # (host, url)
    pending_orders: list[PendingOrder] = field(default_factory=list)
    backoffs_removed: list[str] = field(default_factory=list)
    backoffs: list[HostBackoff] = field(default_factory=list)
