"""Keep the click path off a remote store's database: a circuit and a local read-through copy.

A fleet's store is a database on the network (PostgreSQL). When it cannot be reached the
edge must keep serving what it can, fail fast on what it cannot, and come back by itself.
:class:`ReadThroughStore` wraps such a store (every role of :class:`certstore.Store`):

* **A circuit.** The first :class:`StoreUnavailable` a call raises opens it (one WARNING);
  a :class:`StoreSlow` (a statement or pool acquire timed out: in a busy worker that
  happens while the database idles) does not: it fails that call only, and one check on
  a fresh connection (`probe_connection`) decides whether the database is unreachable;
  from then on every call fails at once with StoreUnavailable instead of each waiting out
  a dead database, while one background probe asks the store every `retry_seconds`.
  The first answer closes it (one INFO, with how long it lasted). Nothing needs a restart.
* **A local copy** (a SQLite file, `store.local_copy`, shared by a node's workers). What the
  click path reads about a host — its registration and state, its certificate (the key
  sealed with the store key, never in clear on disk), its options and association files —
  is copied there after the first successful read (one snapshot of the host, refreshed at
  most every `refresh_seconds` and after every event about it), and so are the ACME
  challenges this node reads or writes. While the circuit is open those reads answer from
  the copy; a host the copy does not hold raises StoreUnavailable (the caller refuses it
  fast: an unknown name might be a new customer or a random scanner, the copy cannot tell).
  The copy holds at most `max_hosts` hosts, the least recently used leave first.
* **Events keep it true.** :meth:`ReadThroughStore.host_changed` (called by the worker's
  event follower for every event that changes what a host serves) deletes the host from the
  copy at once, then snapshots it again: a suspended, removed or revoked host is never
  served from the copy after its event.

Everything else (writes, leases, the event log, summaries) is delegated through the
circuit unchanged. A SQLite store is local already and is never wrapped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from .crypto import Sealer, StoreKeyError
from .errors import StoreSlow, StoreUnavailable
from .factory import _SCHEME
from .models import Domain, DomainState, HostFile, StoredCertificate
from .ports import ROLES, Store

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_SECONDS = 1.0  # while the circuit is open, the store is probed this often
REFRESH_SECONDS = 600.0  # a host read again is re-copied at most this often (events: at once)
CHALLENGE_SECONDS = 86_400.0  # challenges older than this leave the copy
MAX_PENDING_WRITES = 1_000  # the copy is best effort: beyond this, new writes are skipped
# A host's snapshot waits this long after the read that asked for it: the click path's
# reads (certificate and domain) are done by then and handed over (`_given`), so the
# snapshot reads only the rest, and never competes with the handshake that read the host.
SNAPSHOT_DELAY = 0.05
_SCHEMA_VERSION = "1"


def needs_read_through(url_or_path: str) -> bool:
    """Whether the store at `url_or_path` is remote (not SQLite, not a bare path)."""
    match = _SCHEME.match(url_or_path.strip())
    return match is not None and match.group(1).lower() != "sqlite"


class StoreCircuit:
    """Fail fast while the store is unreachable; probe it in the background until it answers.

    `probe` is one cheap read of the store. Per process: each worker finds out for itself.
    """

    def __init__(
        self,
        probe: Callable[[], Awaitable[object]],
        *,
        retry_seconds: float = RETRY_SECONDS,
        on_recovered: Callable[[], None] | None = None,
        reachable: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self._probe = probe
        # after a slow call: does a fresh connection still get an answer? (default: probe)
        self._reachable = reachable or probe
        self._checker: asyncio.Task[None] | None = None
        self._checked_at: float | None = None  # time.monotonic() of the last check
        self.slow_calls = 0  # StoreSlow seen (tests, benchmarks)
        self._retry = retry_seconds
        self._on_recovered = on_recovered
        self.down_since: float | None = None  # time.monotonic() of the loss
        self.reason = ""
        self.outages = 0  # how many times the store was lost (tests, status)
        self.last_outage_seconds: float | None = None
        self._prober: asyncio.Task[None] | None = None

    @property
    def retry_seconds(self) -> float:
        return self._retry

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def check(self) -> None:
        """Raise StoreUnavailable at once while the circuit is open."""
        if self.down_since is not None:
            raise StoreUnavailable(self.reason)

    def lost(self, exc: StoreUnavailable) -> None:
        """A call found the store unreachable: open the circuit (once) and start probing.
        A slow call (StoreSlow) only starts a reachability check."""
        if isinstance(exc, StoreSlow):
            self.slow(exc)
            return
        if self.down_since is not None:
            return
        self.down_since = time.monotonic()
        self.outages += 1
        self.reason = f"the store is unreachable: {exc}"
        log.warning(
            "%s; serving cached certificates and the local copy, probing every %g s",
            self.reason,
            self._retry,
            extra={"event": "store_unavailable", "reason": str(exc)},
        )
        self._prober = asyncio.ensure_future(self._probe_until_back())

    def slow(self, exc: StoreSlow) -> None:
        """A call timed out: no evidence of an outage by itself (the worker's loop or its
        pool may have been the slow part). One check at a time on a fresh connection:
        the circuit opens only if that fails too."""
        self.slow_calls += 1
        if self.down_since is not None or self._checker is not None:
            return
        now = time.monotonic()
        if self._checked_at is not None and now - self._checked_at < self._retry:
            return  # checked a moment ago: a burst of slow calls opens one connection
        self._checked_at = now
        self._checker = asyncio.ensure_future(self._check_reachable(exc))

    async def _check_reachable(self, exc: StoreSlow) -> None:
        try:
            await self._reachable()
        except StoreSlow:
            pass  # a reachability check never raises this; a fake one may: still no proof
        except StoreUnavailable as lost:
            self.lost(StoreUnavailable(f"{exc}; a fresh connection failed too: {lost}"))
        except Exception as other:  # not an outage (e.g. a refusal): the calls report it
            log.debug("store reachability check: %s: %s", type(other).__name__, other)
        finally:
            self._checker = None

    async def _probe_until_back(self) -> None:
        while self.down_since is not None:
            await asyncio.sleep(self._retry)
            try:
                await self._probe()
            except StoreUnavailable:
                continue
            except Exception as exc:  # any other failure: still not usable, keep probing
                log.debug("store probe failed: %s: %s", type(exc).__name__, exc)
                continue
            took = time.monotonic() - self.down_since
            self.last_outage_seconds = took
            self.down_since = None
            self.reason = ""
            log.info(
                "the store is reachable again after %.1f s",
                took,
                extra={"event": "store_recovered", "duration": took},
            )
            if self._on_recovered is not None:
                self._on_recovered()

    async def close(self) -> None:
        tasks = [t for t in (self._prober, self._checker) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(frozen=True, slots=True)
class HostSnapshot:
    """What the click path needs to know about one host, as the store had it."""

    domain: Domain
    certificate: StoredCertificate | None
    options: dict[str, Any] | None
    files: dict[str, HostFile] = field(default_factory=dict)


_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS hosts (
    hostname TEXT PRIMARY KEY,
    domain TEXT NOT NULL,
    certificate TEXT,
    sealed_key BLOB,
    options TEXT,
    used_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS hosts_used_at ON hosts (used_at);
CREATE TABLE IF NOT EXISTS files (
    hostname TEXT NOT NULL,
    kind TEXT NOT NULL,
    content BLOB NOT NULL,
    etag TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (hostname, kind)
);
CREATE TABLE IF NOT EXISTS challenges (
    token TEXT PRIMARY KEY, key_authorization TEXT NOT NULL, stored_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS alpn_challenges (
    hostname TEXT PRIMARY KEY, key_authorization TEXT NOT NULL, stored_at REAL NOT NULL
);
"""


class LocalCopy:
    """The copy's SQLite file. Synchronous: :class:`ReadThroughStore` calls it from one
    thread of its own, so the event loop never waits on the disk."""

    def __init__(self, path: str, sealer: Sealer, max_hosts: int) -> None:
        self.path = path
        self._sealer = sealer
        self._max_hosts = max(1, max_hosts)
        self._db = self._connect()
        self._writes = 0

    def _connect(self) -> sqlite3.Connection:
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # private before SQLite opens it
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA busy_timeout = 2000")  # the node's other workers share it
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")  # a cache: losing the last writes is fine
            db.executescript(_TABLES)
            self._check_key_and_version(db)
        except sqlite3.DatabaseError:
            # a damaged copy is only a cache: start a new one rather than not serving
            db.close()
            log.warning("local store copy %s is unreadable; starting a new one", path)
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{path}{suffix}")
            return self._connect()
        return db

    def _check_key_and_version(self, db: sqlite3.Connection) -> None:
        """A copy sealed with another store key (or an older layout) is emptied."""
        rows = dict(db.execute("SELECT key, value FROM meta").fetchall())
        sealed = rows.get("key_check")
        ok = rows.get("version") == _SCHEMA_VERSION.encode() and sealed is not None
        if ok and sealed is not None:
            try:
                self._sealer.verify_key_check(sealed)
            except StoreKeyError:
                ok = False
        if ok:
            return
        db.execute("BEGIN IMMEDIATE")
        for table in ("hosts", "files", "challenges", "alpn_challenges", "meta"):
            db.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed table names
        db.execute(
            "INSERT INTO meta (key, value) VALUES ('key_check', ?), ('version', ?)",
            (self._sealer.key_check(), _SCHEMA_VERSION.encode()),
        )
        db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    # -- hosts ----------------------------------------------------------------------

    def put_host(self, snap: HostSnapshot, now: float) -> None:
        host = snap.domain.hostname
        cert = snap.certificate
        meta = sealed = None
        if cert is not None:
            fields = asdict(cert)
            key_pem: bytes = fields.pop("key_pem")
            fields["chain_pem"] = cert.chain_pem.decode("ascii")
            meta = json.dumps(fields)
            sealed = self._sealer.seal(key_pem, Sealer.row("copy-cert", host))
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "INSERT OR REPLACE INTO hosts"
                " (hostname, domain, certificate, sealed_key, options, used_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    host,
                    json.dumps(asdict(snap.domain)),
                    meta,
                    sealed,
                    json.dumps(snap.options),
                    now,
                ),
            )
            db.execute("DELETE FROM files WHERE hostname = ?", (host,))
            db.executemany(
                "INSERT INTO files (hostname, kind, content, etag, updated_at)"
                " VALUES (?, ?, ?, ?, ?)",
                [(host, f.kind, f.content, f.etag, f.updated_at) for f in snap.files.values()],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._writes += 1
        if self._writes % 100 == 1:
            self.evict(now)

    def delete_host(self, hostname: str) -> bool:
        """Forget the host; True when the copy held it."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            gone = db.execute("DELETE FROM hosts WHERE hostname = ?", (hostname,)).rowcount
            db.execute("DELETE FROM files WHERE hostname = ?", (hostname,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return gone > 0

    def host(self, hostname: str, now: float) -> HostSnapshot | None:
        """The host as last copied (its use recorded), or None when the copy lacks it."""
        row = self._db.execute(
            "SELECT domain, certificate, sealed_key, options FROM hosts WHERE hostname = ?",
            (hostname,),
        ).fetchone()
        if row is None:
            return None
        domain_json, cert_json, sealed, options_json = row
        fields = json.loads(domain_json)
        fields["state"] = DomainState(fields["state"])
        domain = Domain(**fields)
        cert = None
        if cert_json is not None:
            meta = json.loads(cert_json)
            try:
                key_pem = self._sealer.open(sealed, Sealer.row("copy-cert", hostname))
            except StoreKeyError:
                self.delete_host(hostname)  # tampered or foreign: not served
                return None
            meta["chain_pem"] = meta["chain_pem"].encode("ascii")
            meta["names"] = tuple(meta["names"])
            cert = StoredCertificate(key_pem=key_pem, **meta)
        files = {
            kind: HostFile(hostname, kind, content, etag, updated_at)
            for kind, content, etag, updated_at in self._db.execute(
                "SELECT kind, content, etag, updated_at FROM files WHERE hostname = ?",
                (hostname,),
            )
        }
        self._db.execute("UPDATE hosts SET used_at = ? WHERE hostname = ?", (now, hostname))
        return HostSnapshot(domain, cert, json.loads(options_json), files)

    def host_count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM hosts").fetchone()[0])

    def evict(self, now: float) -> int:
        """Down to 90 % of the bound, least recently used first; old challenges go too."""
        db = self._db
        db.execute("DELETE FROM challenges WHERE stored_at < ?", (now - CHALLENGE_SECONDS,))
        db.execute("DELETE FROM alpn_challenges WHERE stored_at < ?", (now - CHALLENGE_SECONDS,))
        excess = self.host_count() - self._max_hosts
        if excess <= 0:
            return 0
        excess += self._max_hosts // 10
        db.execute("BEGIN IMMEDIATE")
        try:
            victims = [
                h
                for (h,) in db.execute(
                    "SELECT hostname FROM hosts ORDER BY used_at LIMIT ?", (excess,)
                )
            ]
            db.executemany("DELETE FROM hosts WHERE hostname = ?", [(h,) for h in victims])
            db.executemany("DELETE FROM files WHERE hostname = ?", [(h,) for h in victims])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return len(victims)

    # -- challenges -------------------------------------------------------------------

    def put_challenge(self, token: str, key_authorization: str, now: float) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO challenges (token, key_authorization, stored_at)"
            " VALUES (?, ?, ?)",
            (token, key_authorization, now),
        )

    def get_challenge(self, token: str) -> str | None:
        row = self._db.execute(
            "SELECT key_authorization FROM challenges WHERE token = ?", (token,)
        ).fetchone()
        return None if row is None else str(row[0])

    def delete_challenge(self, token: str) -> None:
        self._db.execute("DELETE FROM challenges WHERE token = ?", (token,))

    def put_alpn_challenge(self, hostname: str, key_authorization: str, now: float) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO alpn_challenges (hostname, key_authorization, stored_at)"
            " VALUES (?, ?, ?)",
            (hostname, key_authorization, now),
        )

    def get_alpn_challenge(self, hostname: str) -> str | None:
        row = self._db.execute(
            "SELECT key_authorization FROM alpn_challenges WHERE hostname = ?", (hostname,)
        ).fetchone()
        return None if row is None else str(row[0])

    def delete_alpn_challenge(self, hostname: str) -> None:
        self._db.execute("DELETE FROM alpn_challenges WHERE hostname = ?", (hostname,))


class ReadThroughStore:
    """A remote :class:`Store` behind a circuit, with a local copy for the click path.

    Every method of every role is here: the click-path reads below answer from the copy
    while the circuit is open; the rest are delegated through the circuit (generated at
    the end of this module). `copy` None: the circuit alone.
    """

    def __init__(
        self,
        primary: Store,
        copy: LocalCopy | None,
        *,
        retry_seconds: float = RETRY_SECONDS,
        refresh_seconds: float = REFRESH_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.primary = primary
        self.copy = copy
        self.circuit = StoreCircuit(
            primary.last_event_id,
            retry_seconds=retry_seconds,
            reachable=getattr(primary, "probe_connection", None),
        )
        self._refresh = refresh_seconds
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="linkedge-copy")
        self._copied: OrderedDict[str, float] = OrderedDict()  # host -> when this process copied it
        self._max_copied = copy._max_hosts if copy is not None else 0
        self._snapshots: dict[str, asyncio.Task[None]] = {}
        self._stale: set[str] = set()  # changed while its snapshot was being read
        # what the click path has just read about a host, for that host's snapshot
        self._given: dict[str, dict[str, Any]] = {}
        self._writes: set[asyncio.Future[Any]] = set()
        self._copy_failed = False
        self.copy_reads = 0  # answers given from the copy (tests, benchmarks)

    @classmethod
    async def open(
        cls,
        primary: Store,
        key: bytes,
        local_copy: str,
        max_hosts: int,
        **kwargs: Any,
    ) -> ReadThroughStore:
        """Wrap `primary`; `local_copy` "" means no copy (the circuit alone)."""
        copy = None
        if local_copy:
            sealer = Sealer(key)
            try:
                copy = await asyncio.to_thread(LocalCopy, local_copy, sealer, max_hosts)
            except (OSError, sqlite3.Error) as exc:
                # e.g. a read-only file system: serving without the copy beats not serving
                log.warning(
                    "local store copy %s cannot be used (%s); running without it: only "
                    "cached hosts are served while the store is unreachable",
                    local_copy,
                    exc,
                )
        return cls(primary, copy, **kwargs)

    async def close(self) -> None:
        await self.circuit.close()
        tasks = list(self._snapshots.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._writes, return_exceptions=True)
        if self.copy is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.copy.close)
        self._executor.shutdown(wait=False)
        await self.primary.close()

    # -- the circuit ---------------------------------------------------------------------

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self.circuit.check()
        try:
            return await getattr(self.primary, name)(*args, **kwargs)
        except StoreUnavailable as exc:
            self.circuit.lost(exc)
            raise

    # -- the copy --------------------------------------------------------------------------

    async def _in_copy(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _write(self, fn: Callable[..., object], *args: Any) -> None:
        """Queue a write to the copy (in order, off the loop); never delays the caller."""
        if self.copy is None or len(self._writes) >= MAX_PENDING_WRITES:
            return
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        self._writes.add(future)
        future.add_done_callback(self._written)

    def _written(self, future: asyncio.Future[Any]) -> None:
        self._writes.discard(future)
        if future.cancelled() or future.exception() is None:
            return
        exc = future.exception()
        # the copy is a cache: its failure is logged once, never a caller's error
        if not self._copy_failed:
            self._copy_failed = True
            log.warning("writing the local store copy failed: %s: %s", type(exc).__name__, exc)
        else:
            log.debug("writing the local store copy failed: %s", exc)

    async def _copied_host(self, hostname: str, reason: StoreUnavailable) -> HostSnapshot:
        """The host from the copy, or StoreUnavailable when the copy does not hold it."""
        snap = None
        if self.copy is not None:
            snap = await self._in_copy(self.copy.host, hostname, self._clock())
        if snap is None:
            raise StoreUnavailable(f"{reason}; {hostname} is not in the local copy") from None
        self.copy_reads += 1
        return snap

    def _seen(self, hostname: str, **read: Any) -> None:
        """The store answered about this host (`read`: what it answered, by method): make
        sure the copy has it, fresh enough."""
        if self.copy is None:
            return
        copied = self._copied.get(hostname)
        if copied is not None and self._clock() - copied < self._refresh:
            return
        self._given.setdefault(hostname, {}).update(read)
        self._snapshot_soon(hostname)

    def _snapshot_soon(self, hostname: str) -> None:
        if hostname in self._snapshots:
            return
        task = asyncio.ensure_future(self._snapshot(hostname))
        self._snapshots[hostname] = task
        task.add_done_callback(lambda _t: self._snapshots.pop(hostname, None))

    async def _snapshot(self, hostname: str) -> None:
        assert self.copy is not None
        while True:
            self._stale.discard(hostname)  # an event from here on reads the host again
            await asyncio.sleep(SNAPSHOT_DELAY)
            given = self._given.pop(hostname, {})
            try:
                domain = given.get("get_domain") or await self._call("get_domain", hostname)
                if domain is None:
                    self._forget_copied(hostname)
                    self._write(self.copy.delete_host, hostname)
                    return
                if "get_certificate" in given:
                    cert = given["get_certificate"]
                else:
                    cert = await self._call("get_certificate", hostname)
                options = await self._call("get_options", hostname)
                files = await self._call("list_host_files", hostname)
            except StoreUnavailable:
                return  # copied again when it is next read
            except Exception as exc:  # never the caller's problem; the next read tries again
                log.debug("copying %s failed: %s: %s", hostname, type(exc).__name__, exc)
                return
            # An event arrived meanwhile: read it again, in this task (a new one would
            # find this one still registered in `_snapshots`, and never run).
            if hostname not in self._stale:
                break
        now = self._clock()
        snap = HostSnapshot(domain, cert, options, {f.kind: f for f in files})
        self._write(self.copy.put_host, snap, now)
        self._copied[hostname] = now
        self._copied.move_to_end(hostname)
        while len(self._copied) > self._max_copied:
            self._copied.popitem(last=False)

    def _forget_copied(self, hostname: str) -> None:
        self._copied.pop(hostname, None)

    def host_changed(self, hostname: str) -> None:
        """An event changed what this host serves: drop it from the copy now, and copy it
        again if the copy held it. (The worker's event follower calls this.)"""
        if self.copy is None:
            return
        self._forget_copied(hostname)
        self._given.pop(hostname, None)  # read before the change
        if hostname in self._snapshots:
            self._stale.add(hostname)
        if len(self._writes) >= MAX_PENDING_WRITES:
            return
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self.copy.delete_host, hostname)
        self._writes.add(future)

        def deleted(done: asyncio.Future[bool]) -> None:
            self._written(done)
            if not done.cancelled() and done.exception() is None and done.result():
                self._snapshot_soon(hostname)

        future.add_done_callback(deleted)

    # -- click-path reads -------------------------------------------------------------------

    async def get_domain(self, hostname: str) -> Domain | None:
        try:
            domain: Domain | None = await self._call("get_domain", hostname)
        except StoreUnavailable as exc:
            return (await self._copied_host(hostname, exc)).domain
        if domain is not None:
            self._seen(hostname, get_domain=domain)
        elif hostname in self._copied:  # removed: the event will say so too
            self.host_changed(hostname)
        return domain

    async def get_certificate(self, hostname: str) -> StoredCertificate | None:
        try:
            cert: StoredCertificate | None = await self._call("get_certificate", hostname)
        except StoreUnavailable as exc:
            return (await self._copied_host(hostname, exc)).certificate
        if cert is not None:
            self._seen(hostname, get_certificate=cert)
        return cert

    async def certificate_serial(self, hostname: str) -> str | None:
        try:
            serial: str | None = await self._call("certificate_serial", hostname)
        except StoreUnavailable as exc:
            cert = (await self._copied_host(hostname, exc)).certificate
            return None if cert is None else cert.serial
        if serial is not None:
            self._seen(hostname)
        return serial

    async def certificate_validity(
        self, hostnames: Collection[str]
    ) -> dict[str, tuple[float, float, str]]:
        try:
            found: dict[str, tuple[float, float, str]] = await self._call(
                "certificate_validity", hostnames
            )
        except StoreUnavailable as exc:
            validity = {}
            for hostname in hostnames:
                cert = (await self._copied_host(hostname, exc)).certificate
                if cert is not None:
                    validity[hostname] = (cert.not_before, cert.not_after, cert.issuer)
            return validity
        for hostname in found:
            self._seen(hostname)
        return found

    async def get_options(self, hostname: str) -> dict[str, Any] | None:
        try:
            options: dict[str, Any] | None = await self._call("get_options", hostname)
        except StoreUnavailable as exc:
            return (await self._copied_host(hostname, exc)).options
        return options

    async def get_host_file(self, hostname: str, kind: str) -> HostFile | None:
        try:
            found: HostFile | None = await self._call("get_host_file", hostname, kind)
        except StoreUnavailable as exc:
            return (await self._copied_host(hostname, exc)).files.get(kind)
        return found

    async def list_host_files(self, hostname: str) -> list[HostFile]:
        try:
            files: list[HostFile] = await self._call("list_host_files", hostname)
        except StoreUnavailable as exc:
            snap = await self._copied_host(hostname, exc)
            return [snap.files[kind] for kind in sorted(snap.files)]
        return files

    # -- challenges: written through, read back while the store is away ----------------------

    async def put_challenge(self, token: str, key_authorization: str, hostname: str) -> None:
        await self._call("put_challenge", token, key_authorization, hostname)
        if self.copy is not None:
            self._write(self.copy.put_challenge, token, key_authorization, self._clock())

    async def get_challenge(self, token: str) -> str | None:
        try:
            answer: str | None = await self._call("get_challenge", token)
        except StoreUnavailable as exc:
            known = await self._in_copy(self.copy.get_challenge, token) if self.copy else None
            if known is None:
                raise StoreUnavailable(f"{exc}; challenge token not in the local copy") from None
            self.copy_reads += 1
            return known
        if answer is not None and self.copy is not None:
            self._write(self.copy.put_challenge, token, answer, self._clock())
        return answer

    async def delete_challenge(self, token: str) -> None:
        if self.copy is not None:
            self._write(self.copy.delete_challenge, token)
        await self._call("delete_challenge", token)

    async def put_alpn_challenge(self, hostname: str, key_authorization: str) -> None:
        await self._call("put_alpn_challenge", hostname, key_authorization)
        if self.copy is not None:
            self._write(self.copy.put_alpn_challenge, hostname, key_authorization, self._clock())

    async def get_alpn_challenge(self, hostname: str) -> str | None:
        try:
            answer: str | None = await self._call("get_alpn_challenge", hostname)
        except StoreUnavailable as exc:
            known = (
                await self._in_copy(self.copy.get_alpn_challenge, hostname) if self.copy else None
            )
            if known is None:
                reason = f"{exc}; no TLS-ALPN-01 challenge in the local copy"
                raise StoreUnavailable(reason) from None
            self.copy_reads += 1
            return known
        if answer is not None and self.copy is not None:
            self._write(self.copy.put_alpn_challenge, hostname, answer, self._clock())
        return answer

    async def delete_alpn_challenge(self, hostname: str) -> None:
        if self.copy is not None:
            self._write(self.copy.delete_alpn_challenge, hostname)
        await self._call("delete_alpn_challenge", hostname)

    async def wait_for_events(self, after_id: int, timeout: float) -> None:  # noqa: ASYNC109
        """The follower's wait (EventLog): never raises for a lost store; while the circuit
        is open it just waits, and the follower's next read reports the outage."""
        wait = getattr(self.primary, "wait_for_events", None)
        # while the store is away, the followers wait long; they try again soon after it
        # is back (at most a probe interval late), not a whole wait later
        outage = min(timeout, self.circuit.retry_seconds)
        if wait is None or self.circuit.down:
            await asyncio.sleep(outage if self.circuit.down else timeout)
            return
        try:
            await wait(after_id, timeout)
        except StoreUnavailable as exc:
            self.circuit.lost(exc)
            await asyncio.sleep(outage)

    def events_pushed(self) -> bool:
        """The wrapped store's (False while the circuit is open: followers poll)."""
        return not self.circuit.down and self.primary.events_pushed()

    def as_store(self) -> Store:
        """This object as the composite it implements (its role methods are generated)."""
        return cast(Store, self)

    async def settle(self) -> None:
        """Wait until the snapshots and copy writes queued so far are done (tests)."""
        while self._snapshots or self._writes:
            await asyncio.gather(*self._snapshots.values(), *self._writes, return_exceptions=True)


def _delegate(name: str) -> Callable[..., Awaitable[Any]]:
    async def through_circuit(self: ReadThroughStore, *args: Any, **kwargs: Any) -> Any:
        return await self._call(name, *args, **kwargs)

    through_circuit.__name__ = through_circuit.__qualname__ = name
    through_circuit.__doc__ = f"`{name}` of the wrapped store, through the circuit."
    return through_circuit


def role_methods() -> set[str]:
    """Every method name of every store role (what a wrapper must provide)."""
    names: set[str] = set()
    for role in ROLES:
        for klass in role.__mro__:
            if klass.__module__ != __name__.rsplit(".", 1)[0] + ".ports":
                continue
            names.update(n for n, v in vars(klass).items() if callable(v) and n[0] != "_")
    return names


for _name in sorted(role_methods()):
    if _name not in vars(ReadThroughStore):
        setattr(ReadThroughStore, _name, _delegate(_name))
