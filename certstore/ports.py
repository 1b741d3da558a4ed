"""The storage contract, one small protocol per role; every backend implements all of them.

Components are typed against the narrowest role they use (the ACME challenge sink against
:class:`ChallengeStore`, the event follower against :class:`EventLog`, ...); the wiring
holds a :class:`Store`, the composite that :func:`certstore.open_store` returns.

Rules that hold for every method of every role, in every backend:

- **One call, one atomic step.** A method either happens completely (with every event it
  emits, see :class:`EventLog`) or not at all, whatever other processes do meanwhile. No
  method holds anything (a lock, a transaction) across calls.
- **Shared by processes.** Several worker processes, on one or several nodes, use the same
  store at once; nothing here is process-local except what a method says it is (e.g. the
  node and pid a lease records).
- **Time comes from the store's clock** (the `clock` given to `open_store`), so tests can
  move it; arguments named `now` are the caller's.
- **Private keys are sealed** (:class:`certstore.crypto.Sealer`, AES-256-GCM bound to the
  row they belong to) before they reach the backend, and opened only with the store key:
  a backend never stores, logs or returns a key in clear except as the decrypted field of
  the record a caller asked for. A store opened with a wrong key refuses to open.
- **Hostnames are normalised by the caller** (`proxy.hostnames`); the store compares bytes.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Protocol

from .models import (
    AcmeAccount,
    CaBreakerState,
    Domain,
    DomainState,
    Event,
    HostBackoff,
    HostFile,
    HostImport,
    HostRecord,
    PendingOrder,
    RenewalPlan,
    StoredCertificate,
)


class DomainExists(Exception):
    """The hostname is already registered (possibly by another account)."""


class Keep:
    """Sentinel type: leave a column as it is (see :data:`KEEP`)."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP = Keep()


class HostStore(Protocol):
    """Registered hosts: registration, lifecycle state, check results and schedule.

    State changes only through :meth:`transition_domain`, a compare-and-set that emits a
    ``state`` event atomically with the change; check results and the background schedule
    only through :meth:`update_checks`, which never changes the state.
    """

    async def add_domain(self, hostname: str, account: str) -> Domain:
        """Register `hostname` as ``pending``, due for a check now; emits ``registered``.

        Raises :class:`DomainExists` when it is registered already (by any account).
        """
        ...

    async def remove_domain(self, hostname: str) -> bool:
        """Unregister it and delete, in the same step, its certificate (and sealed key),
        renewal plan, backoff, challenges, options and files; emits ``removed``.
        False (and nothing emitted) when it was not registered."""
        ...

    async def get_domain(self, hostname: str) -> Domain | None: ...

    async def list_domains(self) -> list[Domain]:
        """Every host, by hostname (small installations and the CLI; the API pages)."""
        ...

    async def list_domains_page(
        self,
        *,
        after: str | None = None,
        limit: int = 100,
        account: str | None = None,
        state: DomainState | None = None,
    ) -> list[Domain]:
        """Keyset page: hosts with hostname > `after`, in ascending hostname order (byte
        order), at most `limit`, optionally filtered. Following ``after = page[-1].hostname``
        visits every host that exists throughout, exactly once, however deep."""
        ...

    async def transition_domain(
        self,
        hostname: str,
        expected: Collection[DomainState],
        to: DomainState,
        reason: str,
        *,
        next_check_at: float | None | Keep = KEEP,
    ) -> bool:
        """Compare-and-set: if the host's state is one of `expected`, set it to `to` with
        `reason`, the store's time as ``state_changed_at``, ``failed_checks = 0`` and
        (unless KEEP) the next background check. True when it changed; False when the host
        is gone or in another state (re-read and decide again). A change of state emits
        one ``state`` event (from, to, reason) atomically with it; `to` equal to the
        current state updates reason and schedule without an event."""
        ...

    async def update_checks(
        self,
        hostname: str,
        *,
        report: dict[str, Any] | Keep = KEEP,
        reason: str | Keep = KEEP,
        passed: bool | None = None,
        cname_target_seen: str | None | Keep = KEEP,
        next_check_at: float | None | Keep = KEEP,
        reset_failures: bool = False,
    ) -> None:
        """Record check results and/or the schedule; never the state, never an event.

        `passed` True or False is a completed check: ``last_check_at`` becomes now,
        ``failed_checks`` is reset (passed, or `reset_failures`) or counts one more, and a
        pass sets ``verified_at``. `passed` None amends only the given fields (a check
        added to the last report, a schedule change). Nothing happens to an unknown host.
        """
        ...

    async def due_for_check(self, now: float, limit: int) -> list[str]:
        """Hosts whose ``next_check_at`` is set and <= `now`, most overdue first."""
        ...

    async def restore_domain(self, domain: Domain) -> bool:
        """Import: make the host's record exactly `domain`, every field as given (account,
        state and reason, timestamps, check results, schedule), nothing taken from the
        store's clock. For copying a store (``certstore.transfer``), not for lifecycle
        decisions, which go through :meth:`transition_domain`.

        True when the host was new: it is inserted and ``registered`` is emitted with it
        (its time is the record's ``created_at``, as for :meth:`add_domain`), so running
        workers learn of it like of any new host. False when it existed: the record is
        overwritten; if that changes the state, one ``state`` event (from, to, the
        record's ``state_reason``, at its ``state_changed_at``) is emitted with it, as
        every change of state is; otherwise nothing is emitted. Either outcome is one
        atomic step; the host's other records (certificate, options, ...) are untouched.
        """
        ...


class HostContentStore(Protocol):
    """What the edge serves itself per host: options and files (app association files).

    Every write emits an event atomically with it (``options_changed``, ``file_updated``,
    ``file_deleted``): that is how every worker's cache of them is invalidated.
    """

    async def get_options(self, hostname: str) -> dict[str, Any] | None: ...

    async def put_options(self, hostname: str, options: dict[str, Any]) -> None:
        """Replace the host's options (a JSON object the caller validated); emits
        ``options_changed`` with the JSON as detail."""
        ...

    async def get_host_file(self, hostname: str, kind: str) -> HostFile | None: ...

    async def list_host_files(self, hostname: str) -> list[HostFile]:
        """The host's files, by kind."""
        ...

    async def put_host_file(self, hostname: str, kind: str, content: bytes, etag: str) -> HostFile:
        """Store or replace the file byte for byte; emits ``file_updated``."""
        ...

    async def delete_host_file(self, hostname: str, kind: str) -> bool:
        """Emits ``file_deleted`` when there was one; False (no event) otherwise."""
        ...


class CertificateStore(Protocol):
    """Certificates (chain in clear, key sealed) and ACME accounts (key sealed)."""

    async def get_certificate(self, hostname: str) -> StoredCertificate | None:
        """The certificate with its key opened (raises StoreKeyError on a wrong key or
        a sealed key copied from another row)."""
        ...

    async def put_certificate(
        self, cert: StoredCertificate, event: tuple[str, str] | None = None
    ) -> None:
        """Store or replace the host's certificate. In the same atomic step: the host's
        renewal plan is dropped (a new certificate gets a new plan), its pending order
        (:meth:`PendingOrderStore.put_pending_order`) ends, and `event` (kind, detail),
        if given, is recorded for the host (``issued``/``renewed``): a process killed
        right after the certificate was stored cannot leave it without its event."""
        ...

    async def delete_certificate(self, hostname: str) -> bool:
        """Purge the certificate, its sealed key and its renewal plan."""
        ...

    async def list_certificates(self) -> list[StoredCertificate]:
        """Every certificate with its key opened, soonest expiry first."""
        ...

    async def certificate_serial(self, hostname: str) -> str | None:
        """The serial alone (is a cached context current?); no key is opened."""
        ...

    async def certificate_validity(
        self, hostnames: Collection[str]
    ) -> dict[str, tuple[float, float, str]]:
        """(not_before, not_after, issuer) per host that has one; no key is opened."""
        ...

    async def get_account(self, directory_url: str) -> AcmeAccount | None: ...

    async def save_account(self, account: AcmeAccount) -> None:
        """Insert or replace the account for its directory URL (key sealed)."""
        ...

    async def list_accounts(self) -> list[AcmeAccount]:
        """Every ACME account (one per directory URL) with its key opened, by directory
        URL (raises StoreKeyError like :meth:`get_certificate`). For copying a store."""
        ...


class RenewalStore(Protocol):
    """Renewal plans, written by the maintenance loop (dropped by put_certificate)."""

    async def get_renewal(self, hostname: str) -> RenewalPlan | None: ...

    async def put_renewal(self, plan: RenewalPlan) -> None: ...

    async def list_renewals(self) -> list[RenewalPlan]: ...

    async def hosts_needing_maintenance(self, now: float, limit: int) -> list[str]:
        """Certificates without a plan (first) or whose plan's next_check_at <= `now`."""
        ...

    async def next_maintenance_at(self) -> float | None:
        """The earliest next_check_at over all certificates (0 for one without a plan);
        None without certificates."""
        ...

    async def renewal_load(self, start: float, end: float, slot: float) -> list[int]:
        """Plans per slot: element k counts the plans whose ``due_at`` lies in
        [start + k·slot, start + (k+1)·slot), for k up to ceil((end - start) / slot)
        (empty when end <= start). What the leveling scheduler spreads renewals over
        (acme_client.renewal_slots); it runs once per maintenance pass, so it must read
        an index range over the span, not every plan."""
        ...


class ChallengeStore(Protocol):
    """ACME challenge answers, readable by every worker (any of them may be asked)."""

    async def put_challenge(self, token: str, key_authorization: str, hostname: str) -> None:
        """HTTP-01: insert or replace the answer for `token`."""
        ...

    async def get_challenge(self, token: str) -> str | None: ...

    async def delete_challenge(self, token: str) -> None:
        """Idempotent."""
        ...

    async def put_alpn_challenge(self, hostname: str, key_authorization: str) -> None:
        """TLS-ALPN-01: one key authorization per name, insert or replace."""
        ...

    async def get_alpn_challenge(self, hostname: str) -> str | None: ...

    async def delete_alpn_challenge(self, hostname: str) -> None:
        """Idempotent."""
        ...


class LeaseStore(Protocol):
    """Named leases: at most one holder per name until released or expired.

    Like certmagic's Locker, a lease is advisory and expires: a holder that may outlive
    the ttl must refresh it (``proxy.certificates.kept_lease`` refreshes every third of
    it), and after acquiring one a caller must re-check the state it protects (another
    holder may have finished the work while it waited: e.g. re-read the certificate
    before ordering one).
    """

    async def try_acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        """Atomically take the lease if free or expired, or refresh it if `holder` holds
        it; either way it then expires `ttl` seconds after the store's now. Records this
        process's node and pid. True when `holder` holds it; exactly one of several
        concurrent callers for a free lease gets True."""
        ...

    async def release_lease(self, name: str, holder: str) -> None:
        """Release it if `holder` holds it (anyone else's release changes nothing)."""
        ...

    async def release_dead_leases(self) -> list[str]:
        """Release the leases held by processes of this node (hostname) that are no longer
        running (zombies count as dead); the names released. Run at process start."""
        ...


class RateLog(Protocol):
    """Sliding-window counters: timestamped uses per bucket (the order limiters)."""

    async def take_rate_token(self, bucket: str, limit: int, window: float) -> int | None:
        """Atomically record a use of `bucket` if fewer than `limit` uses happened in the
        last `window` seconds (a use at exactly now - window is outside it); the token id
        (for a refund) or None. Two concurrent callers can never both take the last one."""
        ...

    async def add_rate_event(self, bucket: str) -> None:
        """Record a use unconditionally (e.g. a failed authorization)."""
        ...

    async def refund_rate_token(self, token_id: int) -> None: ...

    async def rate_usage(self, bucket: str, window: float) -> tuple[int, float | None]:
        """Uses within the last `window` seconds and the time of the oldest (None: none)."""
        ...

    async def prune_rate_log(self, older_than: float) -> None:
        """Forget uses at or before `older_than`."""
        ...


class BackoffStore(Protocol):
    """Per-host backoff after failed orders."""

    async def get_backoff(self, hostname: str) -> HostBackoff | None: ...

    async def put_backoff(self, backoff: HostBackoff) -> None: ...

    async def clear_backoff(self, hostname: str) -> None: ...


class BreakerStore(Protocol):
    """One circuit-breaker row per CA directory, shared by the workers."""

    async def get_ca_breaker(self, directory_url: str) -> CaBreakerState | None: ...

    async def put_ca_breaker(self, state: CaBreakerState) -> None:
        """Insert or replace (the last writer wins; the state machine tolerates it)."""
        ...

    async def claim_ca_probe(self, directory_url: str, now: float, next_probe_at: float) -> bool:
        """Atomically: a breaker that is not closed and whose next probe is due (<= `now`)
        becomes half-open with `next_probe_at`. Of concurrent callers exactly one gets
        True per due probe; the others must not probe."""
        ...


class PendingOrderStore(Protocol):
    """ACME orders placed but not yet stored as a certificate (crash safety)."""

    async def put_pending_order(self, order: PendingOrder) -> None:
        """Insert or replace the host's order in flight (certificate key sealed)."""
        ...

    async def get_pending_order(self, hostname: str) -> PendingOrder | None: ...

    async def delete_pending_order(self, hostname: str, order_url: str) -> None:
        """End that order only (a newer order for the host is kept). Storing the host's
        certificate ends it too, atomically (CertificateStore.put_certificate)."""
        ...


class Coordination(LeaseStore, RateLog, BackoffStore, BreakerStore, PendingOrderStore, Protocol):
    """What the workers coordinate through: leases, limits, backoffs, breakers, orders."""


class EventLog(Protocol):
    """The append-only decision log, followed by id (state_sync, webhooks, the API).

    Events the store itself emits, each atomically with its change (both or neither are
    visible to any reader):

    ========================= ===================================== ====================
    kind                      emitted by                            detail
    ========================= ===================================== ====================
    ``registered``            HostStore.add_domain,                 ``account <name>``
                              HostStore.restore_domain (a new host)
    ``removed``               HostStore.remove_domain               what was deleted
    ``state``                 HostStore.transition_domain,          the reason; from_state
                              HostStore.restore_domain (a change    and to_state are set
                              of state only)
    ``options_changed``       HostContentStore.put_options          the options' JSON
    ``file_updated``          HostContentStore.put_host_file        kind, size, ETag
    ``file_deleted``          HostContentStore.delete_host_file     the kind
    ========================= ===================================== ====================

    Every other kind (``issued``, ``renewed``, ``revoked``, ``purged``, ``refused``,
    ``order_deferred``, ``renewal_skipped``, ``checks_stopped``, ...) is appended by its
    caller through :meth:`record_event`, after its change (not atomically with it).

    Ids are assigned in commit order and increase strictly: a reader that remembers the
    last id it handled and asks :meth:`events_after` misses nothing and sees nothing twice.
    """

    async def record_event(self, hostname: str | None, kind: str, detail: str) -> None: ...

    async def list_events(self, hostname: str | None = None, limit: int = 100) -> list[Event]:
        """Newest first (by id), optionally of one host."""
        ...

    async def events_after(self, after_id: int, limit: int = 500) -> list[Event]:
        """Events with id > `after_id`, oldest first: the read-after cursor."""
        ...

    async def last_event_id(self) -> int:
        """The newest id (0 when empty): where a new follower starts."""
        ...

    async def wait_for_events(self, after_id: int, timeout: float) -> None:  # noqa: ASYNC109 (a deadline, not a cancellation scope)
        """Return as soon as events after `after_id` may exist, or after `timeout` seconds.

        A follower's wait between two reads of :meth:`events_after`: it may return early
        (the caller just reads nothing new), never late by more than `timeout`. Never
        raises for a lost connection: the caller's next read reports it. Pushed where
        the backend can (PostgreSQL: LISTEN/NOTIFY), else polled."""
        ...

    async def get_meta(self, key: str) -> str | None:
        """Small named values, e.g. a follower's cursor."""
        ...

    async def put_meta(self, key: str, value: str) -> None: ...

    def events_pushed(self) -> bool:
        """Whether :meth:`wait_for_events` is woken by the store itself right now (a new
        event ends the wait within moments, whatever its timeout), so a follower may wait
        long between reads; False: it must read every poll interval. Never blocks."""
        ...


class StoreSummaries(Protocol):
    """Read models for metrics and the status page: aggregates, never a key opened."""

    async def count_domains_by_state(self) -> dict[DomainState, int]: ...

    async def certificate_summary(self, now: float, horizon: float) -> dict[str, Any]:
        """``valid``, ``expiring`` (not_after within `horizon`), ``expired`` counts and
        ``soonest_expiry`` (None without certificates)."""
        ...

    async def renewal_summary(self, now: float, overdue_after: float) -> dict[str, int]:
        """Plans ``due``, ``overdue`` (due for more than `overdue_after`), ``failing``."""
        ...

    async def soonest_expiries(self, limit: int) -> list[tuple[str, float, float, str]]:
        """(hostname, not_before, not_after, issuer), soonest expiry first."""
        ...


class HostTransfer(Protocol):
    """Whole hosts in pages, for copying a store into another (``certstore.transfer``):
    each call reads or writes a page of hosts in a few statements instead of a dozen per
    host, so a million hosts move in minutes, not hours."""

    async def export_hosts(
        self, *, after: str | None = None, through: str | None = None, limit: int | None = None
    ) -> list[HostRecord]:
        """Registered hosts with hostname > `after` (and <= `through`), ascending in byte
        order, at most `limit`, each with its options, files, certificate, renewal plan,
        order in flight and backoff (keys opened, as the single reads give them). One
        consistent read: a page never shows half of a concurrent change."""
        ...

    async def import_hosts(self, changes: HostImport) -> None:
        """Apply the writes in the order :class:`HostImport` lists them, as one atomic
        step, with the events each kind of write emits on its own (``registered`` for a
        new host, ``state`` for a changed state, ``options_changed``, ``file_updated``
        at the file's own ``updated_at``, ``file_deleted``). Keys are sealed for this
        store. A new host that exists meanwhile, or a changed one that is gone, is left
        alone (a copy's next run sees it)."""
        ...

    async def count_host_records(self) -> dict[str, int]:
        """Per kind, the records that registered hosts have: ``options``, ``files``,
        ``renewals``, ``backoffs``, ``pending_orders`` (aggregates: the counts a copy is
        verified with, without visiting every host)."""
        ...


class Store(
    HostStore,
    HostContentStore,
    CertificateStore,
    RenewalStore,
    ChallengeStore,
    Coordination,
    EventLog,
    StoreSummaries,
    HostTransfer,
    Protocol,
):
    """Every role, as one object: what :func:`certstore.open_store` returns."""

    async def close(self) -> None:
        """Release the backend's connections; the object is unusable afterwards."""
        ...


ROLES: tuple[type, ...] = (
    HostStore,
    HostContentStore,
    CertificateStore,
    RenewalStore,
    ChallengeStore,
    LeaseStore,
    RateLog,
    BackoffStore,
    BreakerStore,
    PendingOrderStore,
    EventLog,
    StoreSummaries,
    HostTransfer,
)
