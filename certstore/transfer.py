"""Copy one store into another through the storage ports (``linkedge store migrate``).

Backend-neutral: the source is read and the target written only through
:mod:`certstore.ports`, so SQLite -> PostgreSQL is the same code as SQLite -> SQLite.
Private keys are opened with the source's store key and sealed again by the target.

**What is copied**: every ACME account; every host as a faithful record
(:meth:`~certstore.ports.HostStore.restore_domain`: account, state and reason, timestamps,
check results and schedule as they are, not a re-registration), with its options, files
(content, ETag and time of upload), certificate, renewal plan, backoff and order in flight.

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
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from .factory import sqlite_path
from .models import Domain, DomainState
from .ports import Store

PAGE = 500  # hosts per keyset page (and per recorded resume point)
CONCURRENCY = 8  # hosts of a page in flight at once (a server backend answers in parallel)
CURSOR_KEY = "migrate.cursor."

Progress = Callable[[int, int], None]  # (hosts done, hosts in the source)
T = TypeVar("T")

# The time a copied record carries, for the target's clock while that record is written.
# A context variable, not a plain attribute: the hosts of a page are copied by concurrent
# tasks, and each sees only its own.
_REPLAYED: ContextVar[float | None] = ContextVar("linkedge_replayed_time", default=None)


class ReplayClock:
    """The clock to open a copy's target with: the source's time while a record that
    carries one is written (a file's ``updated_at``, and so its ``file_updated`` event),
    the real time otherwise. A target opened with another clock gets each file stamped
    with the time of the copy, and every later run sees it differ and writes it again."""

    def __init__(self, base: Callable[[], float] = time.time) -> None:
        self._base = base

    def __call__(self) -> float:
        replayed = _REPLAYED.get()
        return self._base() if replayed is None else replayed


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

    `source_id` names the source for the resume point (:func:`store_identity`). Open the
    target with ``clock=ReplayClock()`` so files keep their time of upload.
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
    while domains := await source.list_domains_page(after=after, limit=page):
        for written in await _each(domains, lambda d: _copy_host(source, target, d)):
            result.written.update(written)
        after = domains[-1].hostname
        # after the whole page: a run killed inside a page copies that page again
        await target.put_meta(cursor_key, after)
        result.hosts += len(domains)
        done += len(domains)
        if progress is not None:
            progress(done, max(total, done))
    await target.put_meta(cursor_key, "")  # complete: the next run starts from the top
    return result


async def _copy_host(source: Store, target: Store, domain: Domain) -> Counter[str]:
    """Make the target's records of one host the source's; what was written, by kind."""
    host = domain.hostname
    written: Counter[str] = Counter()
    new = False
    if await target.get_domain(host) != domain:
        new = await target.restore_domain(domain)
        written["hosts new" if new else "hosts updated"] += 1
    # A host new to the target has nothing else there yet (removing a host takes all its
    # records with it), so its target side is not read: half the queries of a first copy.

    options = await source.get_options(host)
    if options is not None and (new or options != await target.get_options(host)):
        await target.put_options(host, options)
        written["options"] += 1

    stale = {} if new else {f.kind: f for f in await target.list_host_files(host)}
    for file in await source.list_host_files(host):
        if stale.pop(file.kind, None) != file:
            token = _REPLAYED.set(file.updated_at)
            try:
                await target.put_host_file(host, file.kind, file.content, file.etag)
            finally:
                _REPLAYED.reset(token)
            written["files"] += 1
    for kind in stale:
        await target.delete_host_file(host, kind)
        written["files removed"] += 1

    # The certificate before its renewal plan and order in flight: storing a certificate
    # drops the host's plan and ends its order (CertificateStore.put_certificate).
    cert = await source.get_certificate(host)
    have_cert = None if new else await target.get_certificate(host)
    plan = await source.get_renewal(host)
    have_plan = None if new else await target.get_renewal(host)
    order = await source.get_pending_order(host)
    have_order = None if new else await target.get_pending_order(host)
    if cert is None:
        if have_cert is not None:
            await target.delete_certificate(host)
            written["certificates removed"] += 1
            have_plan = None
    elif cert != have_cert or (plan is None and have_plan is not None):
        await target.put_certificate(cert)
        written["certificates"] += 1
        have_plan = have_order = None
    if plan is not None and plan != have_plan:
        await target.put_renewal(plan)
        written["renewal plans"] += 1
    if order is None:
        if have_order is not None:
            await target.delete_pending_order(host, have_order.order_url)
            written["pending orders removed"] += 1
    elif order != have_order:
        await target.put_pending_order(order)
        written["pending orders"] += 1

    backoff = await source.get_backoff(host)
    have_backoff = None if new else await target.get_backoff(host)
    if backoff is None:
        if have_backoff is not None:
            await target.clear_backoff(host)
            written["backoffs removed"] += 1
    elif backoff != have_backoff:
        await target.put_backoff(backoff)
        written["backoffs"] += 1
    return written


async def _each(domains: Sequence[Domain], work: Callable[[Domain], Awaitable[T]]) -> list[T]:
    """`work` for every host of a page, at most CONCURRENCY at once; the first failure
    cancels the rest and is raised as itself (not wrapped in a group)."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(domain: Domain) -> T:
        async with gate:
            return await work(domain)

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(d)) for d in domains]
    except BaseExceptionGroup as failed:
        first: BaseException = failed
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return [t.result() for t in tasks]


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


async def inventory(store: Store, page: int = PAGE) -> dict[str, int]:
    """How many of each copied kind `store` holds (:data:`COUNTED`), through the ports.

    Hosts, certificates and accounts are counted by aggregates; what only a host's own
    reads show (options, files, plans, backoffs, orders) by visiting every host."""
    counts = dict.fromkeys(COUNTED, 0)
    for state, n in (await store.count_domains_by_state()).items():
        counts[f"hosts {state.value}"] = n
    summary = await store.certificate_summary(time.time(), 0.0)
    counts["certificates"] = summary["valid"] + summary["expiring"] + summary["expired"]
    counts["accounts"] = len(await store.list_accounts())

    async def of_host(domain: Domain) -> Counter[str]:
        host = domain.hostname
        found: Counter[str] = Counter()
        found["options"] += await store.get_options(host) is not None
        found["files"] += len(await store.list_host_files(host))
        found["renewal plans"] += await store.get_renewal(host) is not None
        found["backoffs"] += await store.get_backoff(host) is not None
        found["pending orders"] += await store.get_pending_order(host) is not None
        return found

    after = None
    while domains := await store.list_domains_page(after=after, limit=page):
        for found in await _each(domains, of_host):
            for kind, n in found.items():
                counts[kind] += n
        after = domains[-1].hostname
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
