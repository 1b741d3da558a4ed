"""Copy one store into another through the storage ports (``linkedge store migrate``).

Backend-neutral: the source is read and the target written only through
:mod:`certstore.ports`, so SQLite -> PostgreSQL is the same code as SQLite -> SQLite.
Private keys are opened with the source's store key and sealed again by the target.

**What is copied**: every ACME account; every host as a faithful record (account, state
and reason, timestamps, check results and schedule as they are, not a re-registration),
with its options, files (content, ETag and time of upload), certificate, renewal plan,
backoff and order in flight.

**Fast**: hosts move a page at a time (:class:`~certstore.ports.HostTransfer`): one read
of each side per page, one write transaction of what differs (the events each write
emits included), and the source's next page is read while one is written: a handful of
statements per page instead of a dozen round trips per host.

**What is not**: the event log, whose ids and times belong to the source (the source file
stays as the archive of that history; the target's log starts with one ``registered``
event per copied host, which is what tells nodes already following the target about it);
the small named values (followers' cursors point into the source's log, so the target's
followers start at its own end); and what is transient: challenges (they outlive an order
by seconds), leases, the order limiters' rate log (the target's windows start empty) and
the CA circuit breakers.

**Idempotent**: every record is compared with the target's before it is written and an
equal one is left alone (no write, no event), so a second run writes nothing. A host ends
with exactly the source's records: what the target has and the source lacks (a file, a
certificate, a backoff, an order in flight) is removed; hosts only in the target are left
alone and show up in the verified counts.

**Resumable**: hosts go in keyset pages by hostname; after each page the target records the
last hostname (small named value ``migrate.cursor.<source>``), an interrupted run's next
run starts after it, and a run that completes clears it, so the run after that compares
every host again.

**Verified**: :func:`inventory` counts each kind in a store through the ports;
:func:`compare` lists the kinds whose counts differ between source and target.

The source should be quiet while it is copied (its edge stopped): a host that changes
behind the copy is caught by the next run, not by this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from .factory import sqlite_path
from .models import DomainState, HostImport, HostRecord
from .ports import Store

PAGE = 500  # hosts per page: one read of each side, one write (and one resume point)
CONCURRENCY = 4  # connections a side may use (the next page is read while one is written)
CURSOR_KEY = "migrate.cursor."

Progress = Callable[[int, int], None]  # (hosts done, hosts in the source)


@dataclass
class CopyResult:
    hosts: int = 0  # visited by this run
    skipped: int = 0  # before the resume point (copied by an interrupted earlier run)
    resumed_after: str | None = None
    written: Counter[str] = field(default_factory=Counter)  # kind -> records written

    @property
    def new(self) -> int:
        return self.written["hosts new"]

    @property
    def changes(self) -> int:
        return sum(self.written.values())


async def copy_store(
    source: Store,
    target: Store,
    *,
    source_id: str,
    progress: Progress | None = None,
    page: int = PAGE,
) -> CopyResult:
    """Bring `target` to `source`'s accounts and hosts (see the module's docstring).

    `source_id` names the source for the resume point (:func:`store_identity`).
    Per page: one read of the source's hosts
    (:meth:`~certstore.ports.HostTransfer.export_hosts`), one of the target's over the
    same hostnames, a comparison here (:func:`plan_page`), and one write of what
    differs (:meth:`~certstore.ports.HostTransfer.import_hosts`).
    """
    result = CopyResult()
    total = sum((await source.count_domains_by_state()).values())
    for account in await source.list_accounts():
        if await target.get_account(account.directory_url) != account:
            await target.save_account(account)
            result.written["accounts"] += 1
    cursor_key = CURSOR_KEY + source_id
    after = await target.get_meta(cursor_key) or None
    if after is not None:
        result.resumed_after = after
        result.skipped = await _count_through(source, after, page)
    done = result.skipped
    if progress is not None:
        progress(done, max(total, done))
    # Three pages at once: page N+1 of the source is read (its own connection or
    # thread) while page N is compared here and page N-1 is written to the target.
    # Pages cover disjoint hostnames, so nothing one stage does is seen by another.
    ahead = asyncio.ensure_future(source.export_hosts(after=after, limit=page))
    writing: asyncio.Future[None] | None = None

    async def write(changes: HostImport, written: Counter[str], last: str, n: int) -> None:
        nonlocal done
        if written:
            await target.import_hosts(changes)
            result.written.update(written)
        # after the whole page: a run killed inside a page copies that page again
        await target.put_meta(cursor_key, last)
        result.hosts += n
        done += n
        if progress is not None:
            progress(done, max(total, done))

    try:
        while records := await ahead:
            last = records[-1].hostname
            ahead = asyncio.ensure_future(source.export_hosts(after=last, limit=page))
            have = await target.export_hosts(after=after, through=last)
            changes, written = plan_page(records, {r.hostname: r for r in have})
            if writing is not None:
                await writing  # pages are written (and resume points recorded) in order
            writing = asyncio.ensure_future(write(changes, written, last, len(records)))
            after = last
        if writing is not None:
            await writing
    finally:
        for pending in (ahead, writing):
            if pending is not None and not pending.done():
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
    await target.put_meta(cursor_key, "")  # complete: the next run starts from the top
    return result


def plan_page(
    records: list[HostRecord], have: dict[str, HostRecord]
) -> tuple[HostImport, Counter[str]]:
    """The writes that make the target's hosts (`have`, by hostname) the source's
    `records`, and what they are, by kind; nothing for what is equal already."""
    changes = HostImport()
    written: Counter[str] = Counter()
    for record in records:
        _plan_host(record, have.get(record.hostname), changes, written)
    return changes, written


def _plan_host(
    src: HostRecord, have: HostRecord | None, changes: HostImport, written: Counter[str]
) -> None:
    host = src.hostname
    if have is None:
        changes.new_domains.append(src.domain)
        written["hosts new"] += 1
        # a host new to the target has nothing else there (removing a host takes all
        # its records with it): compared with an empty record
        have = HostRecord(src.domain)
    elif have.domain != src.domain:
        changes.domains.append(src.domain)
        written["hosts updated"] += 1

    if src.options is not None and src.options != have.options:
        changes.options.append((host, src.options))
        written["options"] += 1

    stale = {f.kind: f for f in have.files}
    for file in src.files:
        if stale.pop(file.kind, None) != file:
            changes.files.append(file)  # with its own time of upload
            written["files"] += 1
    for kind in stale:
        changes.files_removed.append((host, kind))
        written["files removed"] += 1

    # The certificate before its renewal plan and order in flight: storing a certificate
    # drops the host's plan and ends its order (CertificateStore.put_certificate), and
    # HostImport applies certificates first.
    cert, plan, order = src.certificate, src.renewal, src.pending_order
    have_plan, have_order = have.renewal, have.pending_order
    if cert is None:
        if have.certificate is not None:
            changes.certificates_removed.append(host)
            written["certificates removed"] += 1
            have_plan = None
    elif cert != have.certificate or (plan is None and have_plan is not None):
        changes.certificates.append(cert)
        written["certificates"] += 1
        have_plan = have_order = None
    if plan is not None and plan != have_plan:
        changes.renewals.append(plan)
        written["renewal plans"] += 1
    if order is None:
        if have_order is not None:
            changes.pending_orders_removed.append((host, have_order.order_url))
            written["pending orders removed"] += 1
    elif order != have_order:
        changes.pending_orders.append(order)
        written["pending orders"] += 1

    if src.backoff is None:
        if have.backoff is not None:
            changes.backoffs_removed.append(host)
            written["backoffs removed"] += 1
    elif src.backoff != have.backoff:
        changes.backoffs.append(src.backoff)
        written["backoffs"] += 1


async def _count_through(store: Store, last: str, page: int) -> int:
    """Hosts up to and including `last` (a resumed run's progress starts there)."""
    count, after = 0, None
    while domains := await store.list_domains_page(after=after, limit=page * 4):
        if domains[-1].hostname > last:
            return count + sum(d.hostname <= last for d in domains)
        count += len(domains)
        after = domains[-1].hostname
    return count


# -- verified counts ---------------------------------------------------------------------

COUNTED = (
    *(f"hosts {s.value}" for s in DomainState),
    "certificates",
    "renewal plans",
    "accounts",
    "options",
    "files",
    "backoffs",
    "pending orders",
)
# COUNTED's per-host kinds, as HostTransfer.count_host_records names them
_RECORD_KINDS = {
    "options": "options",
    "files": "files",
    "renewal plans": "renewals",
    "backoffs": "backoffs",
    "pending orders": "pending_orders",
}


async def inventory(store: Store) -> dict[str, int]:
    """How many of each copied kind `store` holds (:data:`COUNTED`): aggregates
    through the ports, no host visited."""
    counts = dict.fromkeys(COUNTED, 0)
    for state, n in (await store.count_domains_by_state()).items():
        counts[f"hosts {state.value}"] = n
    summary = await store.certificate_summary(time.time(), 0.0)
    counts["certificates"] = summary["valid"] + summary["expiring"] + summary["expired"]
    counts["accounts"] = len(await store.list_accounts())
    records = await store.count_host_records()
    for kind, key in _RECORD_KINDS.items():
        counts[kind] = records[key]
    return counts


def compare(source: dict[str, int], target: dict[str, int]) -> list[str]:
    """The kinds whose counts differ, as ``kind source/target``; empty when all agree."""
    return [
        f"{kind} {source.get(kind, 0)}/{target.get(kind, 0)}"
        for kind in COUNTED
        if source.get(kind, 0) != target.get(kind, 0)
    ]


# -- naming stores -----------------------------------------------------------------------


def store_identity(url: str) -> str:
    """Which database a store URL names, whatever its spelling: the resolved file of a
    SQLite store, ``postgresql://host:port/database`` of a server (no user, no password).
    Tells a source from its target and keys the resume point."""
    text = url.strip()
    if text.lower().startswith(("postgresql:", "postgres:")):
        parts = urlsplit(text)
        database = parts.path.lstrip("/") or (parts.username or "")
        return f"postgresql://{parts.hostname or 'localhost'}:{parts.port or 5432}/{database}"
    path = sqlite_path(text)  # any other scheme is refused here, naming the supported ones
    return "sqlite::memory:" if path == ":memory:" else f"sqlite://{os.path.realpath(path)}"


def redact(url: str) -> str:
    """The URL with its password (if any) replaced, for messages."""
    parts = urlsplit(url.strip())
    if parts.password is None:
        return url.strip()
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
