"""SQLite backend of the store roles in :mod:`certstore.ports` (aiosqlite, WAL).

Opened through :func:`certstore.open_store` (``sqlite:///path`` or a bare path); nothing
outside `certstore` names this class.

Several worker processes open the same file: WAL lets readers run beside the one
writer, `busy_timeout` absorbs short write contention, and every statement runs in
autocommit so no process ever holds a write lock across an await.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from .crypto import Sealer
from .errors import StoreError
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
from .nodes import NODE as _NODE
from .nodes import process_alive
from .ports import KEEP, DomainExists, Keep
from .schema import MIGRATIONS, RENEWAL_SLOT_SECONDS, SCHEMA_VERSION

Clock = Callable[[], float]
T = TypeVar("T")
_WAIT_POLL = 0.1  # wait_for_events: how often the store's files are looked at
# ... and how often the newest event id is read even though they look unchanged
_WAIT_RECHECK = 1.0


class _FileState:
    """The database file's and its WAL's inode, size and modification time, as one value: a
    commit by any connection, in any process, writes to the WAL (a checkpoint to the
    database file), so an unchanged value means, nearly always, no new event. Nearly:
    a file's time stamp is only as fine as the kernel's coarse clock (a few ms), and a
    WAL restarted after a checkpoint is rewritten at the same size, so a commit within
    that same tick after a look could leave the value as it was; `_WAIT_RECHECK` bounds
    how long that goes unnoticed. A `stat` each: no query, no thread hand-off."""

    __slots__ = ("_paths",)

    def __init__(self, path: Path) -> None:
        self._paths = (str(path), f"{path}-wal")

    def look(self) -> tuple[tuple[int, int, int] | None, ...]:
        state: list[tuple[int, int, int] | None] = []
        for path in self._paths:
            try:
                info = os.stat(path)
            except OSError:  # the WAL is gone while no connection is open
                state.append(None)
            else:
                state.append((info.st_ino, info.st_size, info.st_mtime_ns))
        return tuple(state)


def _private_files(path: Path) -> None:
    """The store and its -wal/-shm are 0600 whatever the umask: a new store file is
    created 0600 before SQLite opens it (SQLite gives -wal and -shm the database file's
    mode), and loose files left by an older version are tightened.

    An existing store file is never opened here: closing any descriptor of a file drops
    every POSIX lock this process holds on it, including SQLite's (other connections of
    this process, e.g. a second store object in the same worker).
    """
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            if name.stat().st_mode & 0o077:
                os.chmod(name, 0o600)
        except FileNotFoundError:
            pass


_PUT_CERTIFICATE = (
    "INSERT INTO certificates (hostname, chain_pem, key_sealed, names, not_before,"
    " not_after, issuer, created_at, serial, directory_url)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (hostname) DO UPDATE SET chain_pem = excluded.chain_pem,"
    " key_sealed = excluded.key_sealed, names = excluded.names,"
    " not_before = excluded.not_before, not_after = excluded.not_after,"
    " issuer = excluded.issuer, created_at = excluded.created_at,"
    " serial = excluded.serial, directory_url = excluded.directory_url"
)


class SQLiteStore:
    def __init__(
        self, db: aiosqlite.Connection, sealer: Sealer, clock: Clock, path: Path | None = None
    ) -> None:
        self._db = db
        self._sealer = sealer
        self._clock = clock
        self._files = _FileState(path) if path is not None else None
        self._newest: tuple[object, float, int] | None = None  # (files, when, id) last read

    @classmethod
    async def open(cls, path: str | Path, key: bytes, clock: Clock = time.time) -> SQLiteStore:
        path = Path(path)
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
            _private_files(path)
        try:
            db = await aiosqlite.connect(str(path), isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from None
        try:
            await db.execute("PRAGMA busy_timeout = 10000")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = NORMAL")
            await _migrate(db, path)
            store = cls(db, Sealer(key), clock, path if str(path) != ":memory:" else None)
            await store._check_key()
        except BaseException:
            await db.close()
            raise
        if str(path) != ":memory:":
            _private_files(path)  # -wal and -shm exist now
        return store

    async def close(self) -> None:
        await self._db.close()

    async def _check_key(self) -> None:
        """Fail at start-up, not at the first handshake, when the key is wrong."""
        row = await self._one("SELECT value FROM meta WHERE key = 'key_check'")
        if row is None:
            await self._db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('key_check', ?)",
                (self._sealer.key_check(),),
            )
            row = await self._one("SELECT value FROM meta WHERE key = 'key_check'")
            assert row is not None
        self._sealer.verify_key_check(row[0])

    # Every read runs to completion in one call on the connection's thread: a cursor left
    # half-read across an await keeps a read transaction open, and another task's write
    # on this connection then fails at once with "database is locked" (a stale WAL
    # snapshot cannot be upgraded, so SQLite does not even wait busy_timeout).
    async def _one(self, sql: str, args: Iterable[Any] = ()) -> sqlite3.Row | None:
        rows = await self._db.execute_fetchall(sql, tuple(args))
        return next(iter(rows), None)

    async def _all(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        return list(await self._db.execute_fetchall(sql, tuple(args)))

    # -- domains ---------------------------------------------------------------

    async def add_domain(self, hostname: str, account: str) -> Domain:
        now = self._clock()
        try:
            # next_check_at = now: the background verifier looks at a new host at once.
            await self._db.execute(
                "INSERT INTO domains (hostname, account, state, created_at, state_reason,"
                " state_changed_at, next_check_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    hostname,
                    account,
                    DomainState.PENDING.value,
                    now,
                    "registered; waiting for the CNAME",
                    now,
                    now,
                ),
            )
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" not in str(exc):
                raise  # e.g. the event log refused the `registered` event: nothing stored
            raise DomainExists(hostname) from None
        # the `registered` event: trigger domain_registered_event, same statement
        domain = await self.get_domain(hostname)
        assert domain is not None
        return domain

    async def remove_domain(self, hostname: str) -> bool:
        """One statement: the trigger `domain_removed` deletes everything of the host and
        records the `removed` event with it."""
        cur = await self._db.execute("DELETE FROM domains WHERE hostname = ?", (hostname,))
        removed = cur.rowcount > 0
        if not removed:  # leftovers of a host registered by nobody (never normally)
            for table in ("certificates", "challenges", "renewals", "host_backoff"):
                await self._db.execute(f"DELETE FROM {table} WHERE hostname = ?", (hostname,))
            for table in ("alpn_challenges", "host_options", "host_files"):
                await self._db.execute(f"DELETE FROM {table} WHERE hostname = ?", (hostname,))
        return removed

    async def get_domain(self, hostname: str) -> Domain | None:
        row = await self._one(f"SELECT {_DOMAIN_COLS} FROM domains WHERE hostname = ?", (hostname,))
        return _domain(row) if row else None

    async def list_domains(self) -> list[Domain]:
        rows = await self._all(f"SELECT {_DOMAIN_COLS} FROM domains ORDER BY hostname")
        return [_domain(r) for r in rows]

    async def list_domains_page(
        self,
        *,
        after: str | None = None,
        limit: int = 100,
        account: str | None = None,
        state: DomainState | None = None,
    ) -> list[Domain]:
        """Keyset pagination by hostname: each page is an index range scan, however deep."""
        where, args = ["hostname > ?"], [after or ""]
        if account is not None:
            where.append("account = ?")
            args.append(account)
        if state is not None:
            where.append("state = ?")
            args.append(state.value)
        rows = await self._all(
            f"SELECT {_DOMAIN_COLS} FROM domains WHERE {' AND '.join(where)}"
            " ORDER BY hostname LIMIT ?",
            (*args, limit),
        )
        return [_domain(r) for r in rows]

    async def count_domains_by_state(self) -> dict[DomainState, int]:
        # kept by triggers (migration 8): a few rows, not a scan of every host
        rows = await self._all("SELECT state, n FROM domain_counts WHERE n > 0")
        return {DomainState(r[0]): int(r[1]) for r in rows}

    async def transition_domain(
        self,
        hostname: str,
        expected: Collection[DomainState],
        to: DomainState,
        reason: str,
        *,
        next_check_at: float | None | Keep = KEEP,
    ) -> bool:
        """Compare-and-set the state; False when the host is gone or in another state.

        The trigger `domain_state_event` records the transition as an event, in the
        same statement, so no transition ever goes unlogged.
        """
        if not expected:
            return False
        marks = ",".join("?" * len(expected))
        sets = "state = ?, state_reason = ?, state_changed_at = ?, failed_checks = 0"
        args: list[Any] = [to.value, reason, self._clock()]
        if not isinstance(next_check_at, Keep):
            sets += ", next_check_at = ?"
            args.append(next_check_at)
        cur = await self._db.execute(
            f"UPDATE domains SET {sets} WHERE hostname = ? AND state IN ({marks})",
            (*args, hostname, *(s.value for s in expected)),
        )
        return cur.rowcount > 0

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
        """Check results and schedule in one UPDATE; the state is not touched here."""
        sets: list[str] = []
        args: list[Any] = []
        if not isinstance(report, Keep):
            sets.append("last_report = ?")
            args.append(json.dumps(report, sort_keys=True))
        if not isinstance(reason, Keep):
            sets.append("last_check_reason = ?")
            args.append(reason)
        if not isinstance(cname_target_seen, Keep):
            sets.append("cname_target_seen = ?")
            args.append(cname_target_seen)
        if not isinstance(next_check_at, Keep):
            sets.append("next_check_at = ?")
            args.append(next_check_at)
        if passed is not None:
            now = self._clock()
            sets.append("last_check_at = ?")
            sets.append("failed_checks = CASE WHEN ? THEN 0 ELSE failed_checks + 1 END")
            sets.append("verified_at = CASE WHEN ? THEN ? ELSE verified_at END")
            args.extend([now, passed or reset_failures, passed, now])
        if not sets:
            return
        await self._db.execute(
            f"UPDATE domains SET {', '.join(sets)} WHERE hostname = ?", (*args, hostname)
        )

    async def restore_domain(self, domain: Domain) -> bool:
        """Insert the record as given, or overwrite the existing one with it.

        Two single statements rather than one upsert, because SQLite does not tell an
        upsert's insert from its update and the caller is owed that answer. Each is one
        atomic step with the event its trigger emits (`domain_registered_event` on the
        insert, `domain_state_event` on an update that changes the state); a host removed
        between the two is inserted on the next round.
        """
        fields = (
            domain.account,
            domain.state.value,
            domain.cname_target_seen,
            domain.verified_at,
            domain.last_check_at,
            domain.last_check_reason,
            domain.created_at,
            domain.state_reason,
            domain.state_changed_at,
            domain.next_check_at,
            domain.failed_checks,
            domain.last_report,
        )
        marks = ", ".join("?" * (len(fields) + 1))
        sets = ", ".join(f"{c.strip()} = ?" for c in _DOMAIN_COLS.split(",")[1:])
        while True:
            cur = await self._db.execute(
                f"INSERT INTO domains ({_DOMAIN_COLS}) VALUES ({marks})"
                " ON CONFLICT (hostname) DO NOTHING",
                (domain.hostname, *fields),
            )
            if cur.rowcount > 0:
                return True
            cur = await self._db.execute(
                f"UPDATE domains SET {sets} WHERE hostname = ?", (*fields, domain.hostname)
            )
            if cur.rowcount > 0:
                return False

    async def due_for_check(self, now: float, limit: int) -> list[str]:
        rows = await self._all(
            "SELECT hostname FROM domains WHERE next_check_at IS NOT NULL AND next_check_at <= ?"
            " ORDER BY next_check_at LIMIT ?",
            (now, limit),
        )
        return [r[0] for r in rows]

    # -- per-host options --------------------------------------------------------

    async def get_options(self, hostname: str) -> dict[str, Any] | None:
        row = await self._one("SELECT options FROM host_options WHERE hostname = ?", (hostname,))
        return json.loads(row[0]) if row else None

    async def put_options(self, hostname: str, options: dict[str, Any]) -> None:
        await self._db.execute(
            "INSERT INTO host_options (hostname, options, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT (hostname) DO UPDATE SET options = excluded.options,"
            " updated_at = excluded.updated_at",
            (hostname, json.dumps(options, sort_keys=True), self._clock()),
        )

    # -- files served per host ----------------------------------------------------

    async def get_host_file(self, hostname: str, kind: str) -> HostFile | None:
        row = await self._one(
            f"SELECT {_FILE_COLS} FROM host_files WHERE hostname = ? AND kind = ?",
            (hostname, kind),
        )
        return _host_file(row) if row else None

    async def list_host_files(self, hostname: str) -> list[HostFile]:
        rows = await self._all(
            f"SELECT {_FILE_COLS} FROM host_files WHERE hostname = ? ORDER BY kind", (hostname,)
        )
        return [_host_file(r) for r in rows]

    async def put_host_file(self, hostname: str, kind: str, content: bytes, etag: str) -> HostFile:
        """Store (or replace) a file; a trigger records the `file_updated` event with it."""
        now = self._clock()
        await self._db.execute(
            "INSERT INTO host_files (hostname, kind, content, etag, updated_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (hostname, kind) DO UPDATE SET"
            " content = excluded.content, etag = excluded.etag, updated_at = excluded.updated_at",
            (hostname, kind, content, etag, now),
        )
        return HostFile(hostname, kind, content, etag, now)

    async def delete_host_file(self, hostname: str, kind: str) -> bool:
        cur = await self._db.execute(
            "DELETE FROM host_files WHERE hostname = ? AND kind = ?", (hostname, kind)
        )
        return cur.rowcount > 0

    # -- ACME account ----------------------------------------------------------

    async def get_account(self, directory_url: str) -> AcmeAccount | None:
        row = await self._one(
            "SELECT uri, key_sealed FROM acme_accounts WHERE directory_url = ?", (directory_url,)
        )
        if row is None:
            return None
        key = self._sealer.open(row[1], Sealer.row("account", directory_url))
        return AcmeAccount(directory_url=directory_url, uri=row[0], key_pem=key)

    async def save_account(self, account: AcmeAccount) -> None:
        sealed = self._sealer.seal(account.key_pem, Sealer.row("account", account.directory_url))
        await self._db.execute(
            "INSERT INTO acme_accounts (directory_url, uri, key_sealed, created_at)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (directory_url) DO UPDATE SET"
            " uri = excluded.uri, key_sealed = excluded.key_sealed",
            (account.directory_url, account.uri, sealed, self._clock()),
        )

    async def list_accounts(self) -> list[AcmeAccount]:
        rows = await self._all(
            "SELECT directory_url, uri, key_sealed FROM acme_accounts ORDER BY directory_url"
        )
        return [
            AcmeAccount(
                directory_url=r[0],
                uri=r[1],
                key_pem=self._sealer.open(r[2], Sealer.row("account", r[0])),
            )
            for r in rows
        ]

    # -- certificates ----------------------------------------------------------

    async def get_certificate(self, hostname: str) -> StoredCertificate | None:
        row = await self._one(
            f"SELECT {_CERT_COLS} FROM certificates WHERE hostname = ?", (hostname,)
        )
        return self._certificate(row) if row else None

    async def put_certificate(
        self, cert: StoredCertificate, event: tuple[str, str] | None = None
    ) -> None:
        """Store (or replace) a host's certificate; a new certificate starts a new renewal
        plan. With `event`, its event is recorded in the same transaction."""
        sealed = self._sealer.seal(cert.key_pem, Sealer.row("cert", cert.hostname))
        row = (
            cert.hostname,
            cert.chain_pem,
            sealed,
            ",".join(cert.names),
            cert.not_before,
            cert.not_after,
            cert.issuer,
            cert.created_at,
            cert.serial,
            cert.directory_url,
        )
        at = self._clock()

        def store(conn: sqlite3.Connection) -> None:
            conn.execute(_PUT_CERTIFICATE, row)
            conn.execute("DELETE FROM renewals WHERE hostname = ?", (cert.hostname,))
            if event is not None:
                conn.execute(
                    "INSERT INTO events (at, hostname, kind, detail) VALUES (?, ?, ?, ?)",
                    (at, cert.hostname, *event),
                )

        await self._in_transaction(store, write=True)

    async def delete_certificate(self, hostname: str) -> bool:
        """Purge a certificate and its sealed key (after revocation)."""
        cur = await self._db.execute("DELETE FROM certificates WHERE hostname = ?", (hostname,))
        await self._db.execute("DELETE FROM renewals WHERE hostname = ?", (hostname,))
        return cur.rowcount > 0

    async def certificate_serial(self, hostname: str) -> str | None:
        """The serial alone: a cheap check whether a cached context is still current."""
        row = await self._one("SELECT serial FROM certificates WHERE hostname = ?", (hostname,))
        return str(row[0]) if row else None

    async def certificate_validity(
        self, hostnames: Collection[str]
    ) -> dict[str, tuple[float, float, str]]:
        """(not_before, not_after, issuer) per host, without opening any private key."""
        if not hostnames:
            return {}
        marks = ",".join("?" * len(hostnames))
        rows = await self._all(
            "SELECT hostname, not_before, not_after, issuer FROM certificates"
            f" WHERE hostname IN ({marks})",
            tuple(hostnames),
        )
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    async def soonest_expiries(self, limit: int) -> list[tuple[str, float, float, str]]:
        """(hostname, not_before, not_after, issuer), soonest expiry first; no key is opened."""
        return [
            (r[0], r[1], r[2], r[3])
            for r in await self._all(
                "SELECT hostname, not_before, not_after, issuer FROM certificates"
                " ORDER BY not_after LIMIT ?",
                (limit,),
            )
        ]

    async def list_certificates(self) -> list[StoredCertificate]:
        rows = await self._all(f"SELECT {_CERT_COLS} FROM certificates ORDER BY not_after")
        return [self._certificate(r) for r in rows]

    async def certificate_summary(self, now: float, horizon: float) -> dict[str, Any]:
        """Counts for monitoring (one aggregate row, no keys opened): valid, expiring
        within `horizon`, expired, and the soonest expiry (None without certificates)."""
        # each a range of certificates_by_expiry (COUNT(*) walks that small index)
        row = await self._one(
            "SELECT (SELECT COUNT(*) FROM certificates),"
            " (SELECT COUNT(*) FROM certificates WHERE not_after <= ?),"
            " (SELECT COUNT(*) FROM certificates WHERE not_after > ? AND not_after <= ?),"
            " (SELECT MIN(not_after) FROM certificates)",
            (now, now, now + horizon),
        )
        assert row is not None
        total, expired, expiring = int(row[0]), int(row[1]), int(row[2])
        return {
            "valid": total - expired - expiring,
            "expiring": expiring,
            "expired": expired,
            "soonest_expiry": row[3],
        }

    def _certificate(self, row: sqlite3.Row) -> StoredCertificate:
        hostname = row[0]
        return StoredCertificate(
            hostname=hostname,
            chain_pem=bytes(row[1]),
            key_pem=self._sealer.open(row[2], Sealer.row("cert", hostname)),
            names=tuple(n for n in row[3].split(",") if n),
            not_before=row[4],
            not_after=row[5],
            issuer=row[6],
            created_at=row[7],
            serial=row[8],
            directory_url=row[9],
        )

    # -- challenges ------------------------------------------------------------

    async def put_challenge(self, token: str, key_authorization: str, hostname: str) -> None:
        await self._db.execute(
            "INSERT OR REPLACE INTO challenges (token, key_authorization, hostname, created_at)"
            " VALUES (?, ?, ?, ?)",
            (token, key_authorization, hostname, self._clock()),
        )

    async def get_challenge(self, token: str) -> str | None:
        row = await self._one("SELECT key_authorization FROM challenges WHERE token = ?", (token,))
        return row[0] if row else None

    async def delete_challenge(self, token: str) -> None:
        await self._db.execute("DELETE FROM challenges WHERE token = ?", (token,))

    # -- leases ----------------------------------------------------------------

    async def try_acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        """Take a free or expired lease, or extend our own (same holder): True if held."""
        now = self._clock()
        cur = await self._db.execute(
            "INSERT INTO leases (name, holder, expires_at, node, pid) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,"
            " expires_at = excluded.expires_at, node = excluded.node, pid = excluded.pid"
            " WHERE leases.expires_at <= ? OR leases.holder = excluded.holder",
            (name, holder, now + ttl, _NODE, os.getpid(), now),
        )
        return cur.rowcount > 0

    async def release_lease(self, name: str, holder: str) -> None:
        await self._db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

    async def release_dead_leases(self) -> list[str]:
        """Free the leases of processes on this node that are no longer running."""
        rows = await self._all(
            "SELECT DISTINCT pid FROM leases WHERE node = ? AND pid != ? AND pid > 0",
            (_NODE, os.getpid()),
        )
        released: list[str] = []
        for (pid,) in rows:
            if process_alive(int(pid)):
                continue
            names = await self._all(
                "SELECT name FROM leases WHERE node = ? AND pid = ?", (_NODE, pid)
            )
            await self._db.execute("DELETE FROM leases WHERE node = ? AND pid = ?", (_NODE, pid))
            released.extend(str(n[0]) for n in names)
        return released

    # -- orders in flight --------------------------------------------------------

    async def put_pending_order(self, order: PendingOrder) -> None:
        sealed = self._sealer.seal(order.key_pem, Sealer.row("order", order.hostname))
        await self._db.execute(
            "INSERT OR REPLACE INTO pending_orders (hostname, directory_url, order_url,"
            " account_uri, key_sealed, names, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                order.hostname,
                order.directory_url,
                order.order_url,
                order.account_uri,
                sealed,
                ",".join(order.names),
                order.created_at,
            ),
        )

    async def get_pending_order(self, hostname: str) -> PendingOrder | None:
        row = await self._one(
            "SELECT hostname, directory_url, order_url, account_uri, key_sealed, names,"
            " created_at FROM pending_orders WHERE hostname = ?",
            (hostname,),
        )
        return None if row is None else self._pending_order(row)

    def _pending_order(self, row: sqlite3.Row) -> PendingOrder:
        return PendingOrder(
            hostname=row[0],
            directory_url=row[1],
            order_url=row[2],
            account_uri=row[3],
            key_pem=self._sealer.open(row[4], Sealer.row("order", row[0])),
            names=tuple(n for n in row[5].split(",") if n),
            created_at=row[6],
        )

    async def delete_pending_order(self, hostname: str, order_url: str) -> None:
        await self._db.execute(
            "DELETE FROM pending_orders WHERE hostname = ? AND order_url = ?",
            (hostname, order_url),
        )

    # -- per-CA circuit breaker ----------------------------------------------------

    async def get_ca_breaker(self, directory_url: str) -> CaBreakerState | None:
        row = await self._one(
            "SELECT directory_url, state, failures, opened_at, next_probe_at, last_error"
            " FROM ca_breakers WHERE directory_url = ?",
            (directory_url,),
        )
        if row is None:
            return None
        return CaBreakerState(
            directory_url=row[0],
            state=row[1],
            failures=row[2],
            opened_at=row[3],
            next_probe_at=row[4],
            last_error=row[5],
        )

    async def put_ca_breaker(self, state: CaBreakerState) -> None:
        await self._db.execute(
            "INSERT OR REPLACE INTO ca_breakers (directory_url, state, failures, opened_at,"
            " next_probe_at, last_error, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                state.directory_url,
                state.state,
                state.failures,
                state.opened_at,
                state.next_probe_at,
                state.last_error,
                self._clock(),
            ),
        )

    async def claim_ca_probe(self, directory_url: str, now: float, next_probe_at: float) -> bool:
        """Atomically: an open breaker whose probe is due becomes half-open, for one caller."""
        cur = await self._db.execute(
            "UPDATE ca_breakers SET state = 'half_open', next_probe_at = ?, updated_at = ?"
            " WHERE directory_url = ? AND state != 'closed' AND next_probe_at <= ?",
            (next_probe_at, now, directory_url, now),
        )
        return cur.rowcount > 0

    # -- TLS-ALPN-01 key authorizations (one per name) ------------------------

    async def put_alpn_challenge(self, hostname: str, key_authorization: str) -> None:
        await self._db.execute(
            "INSERT OR REPLACE INTO alpn_challenges (hostname, key_authorization, created_at)"
            " VALUES (?, ?, ?)",
            (hostname, key_authorization, self._clock()),
        )

    async def get_alpn_challenge(self, hostname: str) -> str | None:
        row = await self._one(
            "SELECT key_authorization FROM alpn_challenges WHERE hostname = ?", (hostname,)
        )
        return str(row[0]) if row else None

    async def delete_alpn_challenge(self, hostname: str) -> None:
        await self._db.execute("DELETE FROM alpn_challenges WHERE hostname = ?", (hostname,))

    # -- renewal plans ---------------------------------------------------------

    async def get_renewal(self, hostname: str) -> RenewalPlan | None:
        row = await self._one(
            "SELECT hostname, due_at, next_check_at, source, last_error FROM renewals"
            " WHERE hostname = ?",
            (hostname,),
        )
        return _renewal(row) if row else None

    async def put_renewal(self, plan: RenewalPlan) -> None:
        await self._db.execute(
            # an upsert, not OR REPLACE: a replaced row would fire no delete trigger, and
            # renewal_slots would count the old due time forever
            "INSERT INTO renewals"
            " (hostname, due_at, next_check_at, source, last_error, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (hostname) DO UPDATE SET"
            " due_at = excluded.due_at, next_check_at = excluded.next_check_at,"
            " source = excluded.source, last_error = excluded.last_error,"
            " updated_at = excluded.updated_at",
            (
                plan.hostname,
                plan.due_at,
                plan.next_check_at,
                plan.source,
                plan.last_error,
                self._clock(),
            ),
        )

    async def list_renewals(self) -> list[RenewalPlan]:
        rows = await self._all(
            "SELECT hostname, due_at, next_check_at, source, last_error FROM renewals"
        )
        return [_renewal(r) for r in rows]

    async def renewal_summary(self, now: float, overdue_after: float) -> dict[str, int]:
        """Counts for monitoring: renewals due, due for more than `overdue_after`, and
        plans whose last attempt left an error (index ranges: renewals_by_due and the
        partial renewals_failing, never every plan)."""
        row = await self._one(
            "SELECT (SELECT COUNT(*) FROM renewals WHERE due_at <= ?),"
            " (SELECT COUNT(*) FROM renewals WHERE due_at <= ?),"
            " (SELECT COUNT(*) FROM renewals WHERE last_error IS NOT NULL AND last_error != '')",
            (now, now - overdue_after),
        )
        assert row is not None
        return {"due": int(row[0]), "overdue": int(row[1]), "failing": int(row[2])}

    async def hosts_needing_maintenance(self, now: float, limit: int) -> list[str]:
        """Certificates without a plan yet (`unplanned_certificates`, kept by triggers),
        then those whose plan wants a visit by `now` (renewals_by_next_check): index ranges,
        however many certificates there are. A plan whose certificate is gone is skipped."""
        rows = await self._all(
            "SELECT hostname FROM (SELECT hostname FROM unplanned_certificates"
            " ORDER BY hostname LIMIT ?)"
            " UNION ALL SELECT hostname FROM (SELECT r.hostname FROM renewals r"
            " WHERE r.next_check_at <= ? AND EXISTS (SELECT 1 FROM certificates c"
            " WHERE c.hostname = r.hostname) ORDER BY r.next_check_at LIMIT ?)",
            (limit, now, limit),
        )
        return [str(r[0]) for r in rows][:limit]

    async def next_maintenance_at(self) -> float | None:
        """The earliest moment a certificate needs a visit (no plan yet: 0); None: none."""
        row = await self._one(
            "SELECT CASE WHEN EXISTS (SELECT 1 FROM unplanned_certificates) THEN 0 ELSE"
            " (SELECT r.next_check_at FROM renewals r WHERE EXISTS (SELECT 1 FROM"
            " certificates c WHERE c.hostname = r.hostname) ORDER BY r.next_check_at LIMIT 1)"
            " END"
        )
        return None if row is None or row[0] is None else float(row[0])

    async def renewal_load(self, start: float, end: float, slot: float) -> list[int]:
        """Plans per slot: on the scheduler's grid, the counts the triggers keep
        (renewal_slots, migration 9: one row per slot); otherwise a COUNT over one range
        of renewals_by_due per slot, in one statement (a GROUP BY over a computed slot
        sorts every plan of the span first: 30 times slower with a million plans)."""
        count = max(math.ceil((end - start) / slot), 0)
        if not count:
            return []
        if slot == RENEWAL_SLOT_SECONDS and start % slot == 0:  # the scheduler's grid
            first = int(start // slot)
            loads = [0] * count
            for k, n in await self._all(
                "SELECT slot, n FROM renewal_slots WHERE slot >= ? AND slot < ?",
                (first, first + count),
            ):
                loads[int(k) - first] = int(n)
            return loads
        rows = await self._all(
            "WITH RECURSIVE s(k) AS (SELECT 0 UNION ALL SELECT k + 1 FROM s WHERE k + 1 < ?)"
            " SELECT (SELECT COUNT(*) FROM renewals WHERE due_at >= ? + k * ?"
            " AND due_at < ? + (k + 1) * ?) FROM s ORDER BY k",
            (count, start, slot, start, slot),
        )
        return [int(r[0]) for r in rows]

    # -- rate limits (sliding windows) ------------------------------------------

    async def take_rate_token(self, bucket: str, limit: int, window: float) -> int | None:
        """Record one use of `bucket` if fewer than `limit` happened within `window`.

        One statement, so concurrent workers cannot both take the last token.
        Returns the token's id (for a refund) or None when the bucket is full.
        """
        now = self._clock()
        cur = await self._db.execute(
            "INSERT INTO rate_log (bucket, at) SELECT ?, ?"
            " WHERE (SELECT COUNT(*) FROM rate_log WHERE bucket = ? AND at > ?) < ?",
            (bucket, now, bucket, now - window, limit),
        )
        return cur.lastrowid if cur.rowcount > 0 else None

    async def add_rate_event(self, bucket: str) -> None:
        await self._db.execute(
            "INSERT INTO rate_log (bucket, at) VALUES (?, ?)", (bucket, self._clock())
        )

    async def refund_rate_token(self, token_id: int) -> None:
        await self._db.execute("DELETE FROM rate_log WHERE id = ?", (token_id,))

    async def rate_usage(self, bucket: str, window: float) -> tuple[int, float | None]:
        """How many uses within `window`, and when the oldest of them happened."""
        row = await self._one(
            "SELECT COUNT(*), MIN(at) FROM rate_log WHERE bucket = ? AND at > ?",
            (bucket, self._clock() - window),
        )
        assert row is not None
        return int(row[0]), row[1]

    async def prune_rate_log(self, older_than: float) -> None:
        await self._db.execute("DELETE FROM rate_log WHERE at <= ?", (older_than,))

    # -- per-host failure backoff -----------------------------------------------

    async def get_backoff(self, hostname: str) -> HostBackoff | None:
        row = await self._one(
            "SELECT hostname, failures, next_attempt_at, last_error FROM host_backoff"
            " WHERE hostname = ?",
            (hostname,),
        )
        if row is None:
            return None
        return HostBackoff(
            hostname=row[0], failures=row[1], next_attempt_at=row[2], last_error=row[3]
        )

    async def put_backoff(self, backoff: HostBackoff) -> None:
        await self._db.execute(
            "INSERT OR REPLACE INTO host_backoff"
            " (hostname, failures, next_attempt_at, last_error, updated_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (
                backoff.hostname,
                backoff.failures,
                backoff.next_attempt_at,
                backoff.last_error,
                self._clock(),
            ),
        )

    async def clear_backoff(self, hostname: str) -> None:
        await self._db.execute("DELETE FROM host_backoff WHERE hostname = ?", (hostname,))

    # -- events ----------------------------------------------------------------

    async def record_event(self, hostname: str | None, kind: str, detail: str) -> None:
        await self._db.execute(
            "INSERT INTO events (at, hostname, kind, detail) VALUES (?, ?, ?, ?)",
            (self._clock(), hostname, kind, detail),
        )

    async def list_events(self, hostname: str | None = None, limit: int = 100) -> list[Event]:
        if hostname is None:
            rows = await self._all(
                f"SELECT {_EVENT_COLS} FROM events ORDER BY id DESC LIMIT ?", (limit,)
            )
        else:
            rows = await self._all(
                f"SELECT {_EVENT_COLS} FROM events WHERE hostname = ? ORDER BY id DESC LIMIT ?",
                (hostname, limit),
            )
        return [_event(r) for r in rows]

    async def events_after(self, after_id: int, limit: int = 500) -> list[Event]:
        """Events in id order after a cursor: how workers and the webhook sender follow changes."""
        rows = await self._all(
            f"SELECT {_EVENT_COLS} FROM events WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
        )
        return [_event(r) for r in rows]

    async def last_event_id(self) -> int:
        row = await self._one("SELECT COALESCE(MAX(id), 0) FROM events")
        return int(row[0]) if row else 0

    def events_pushed(self) -> bool:
        """:meth:`wait_for_events` returns within `_WAIT_POLL` of a new event whatever
        its timeout (it looks itself): a follower may wait long between reads."""
        return True

    async def wait_for_events(self, after_id: int, timeout: float) -> None:  # noqa: ASYNC109
        """SQLite has no push between processes: every `_WAIT_POLL` seconds, look at the
        newest id until it passes `after_id`. The id is read again only when the
        database's files changed since the last read (`_FileState`), or `_WAIT_RECHECK`
        seconds after it: two followers per worker (hosts, webhooks) read it 20 times a
        second otherwise, each a hand-off to the connection's thread, ~5 ms of CPU per
        second of an idle edge."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                if await self._newest_event_id(loop) > after_id:
                    return
            except (sqlite3.Error, ValueError):
                return  # the caller's next read reports it
            left = deadline - loop.time()
            if left <= 0:
                return
            await asyncio.sleep(min(_WAIT_POLL, left))

    async def _newest_event_id(self, loop: asyncio.AbstractEventLoop) -> int:
        """`last_event_id`, or the last one read when nothing can have changed since."""
        files = self._files.look() if self._files is not None else None
        now = loop.time()
        newest = self._newest
        if files is not None and newest is not None:
            seen, read_at, event_id = newest
            if files == seen and now - read_at < _WAIT_RECHECK:
                return event_id
        # the files' state is taken before the read: a commit after it changes them
        event_id = await self.last_event_id()
        self._newest = (files, now, event_id)
        return event_id

    # -- small named values (cursors) --------------------------------------------

    async def get_meta(self, key: str) -> str | None:
        row = await self._one("SELECT value FROM meta WHERE key = ?", (f"v:{key}",))
        return None if row is None else str(row[0])

    async def put_meta(self, key: str, value: str) -> None:
        await self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (f"v:{key}", value),
        )

    # -- whole hosts in pages (copying a store) -------------------------------------

    async def _in_transaction(self, work: Callable[[sqlite3.Connection], T], *, write: bool) -> T:
        """`work` on the connection's own thread, inside one transaction, in one call:
        no other call of this store object can run between its statements (the methods
        above are single statements; this is for the few that need several at once).
        aiosqlite has no public way to run a function on its thread; `_execute` is the
        one its own `iterdump` and `backup` use."""
        db = self._db

        def run() -> T:
            conn = db._conn
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                result = work(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        result: T = await db._execute(run)
        return result

    async def export_hosts(
        self, *, after: str | None = None, through: str | None = None, limit: int | None = None
    ) -> list[HostRecord]:
        """One read transaction (one snapshot): the page's hosts, then each other kind
        of record as one range of its primary key over the page's hostnames."""
        return await self._in_transaction(
            lambda conn: self._export(conn, after or "", through, limit), write=False
        )

    def _export(
        self, conn: sqlite3.Connection, after: str, through: str | None, limit: int | None
    ) -> list[HostRecord]:
        where, args = "hostname > ?", [after]
        if through is not None:
            where += " AND hostname <= ?"
            args.append(through)
        sql = f"SELECT {_DOMAIN_COLS} FROM domains WHERE {where} ORDER BY hostname"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        domains = [_domain(r) for r in conn.execute(sql, args)]
        if not domains:
            return []
        span = (after, domains[-1].hostname)
        page = "WHERE hostname > ? AND hostname <= ?"
        options = {
            r[0]: json.loads(r[1])
            for r in conn.execute(f"SELECT hostname, options FROM host_options {page}", span)
        }
        files: dict[str, list[HostFile]] = {}
        for r in conn.execute(f"SELECT {_FILE_COLS} FROM host_files {page} ORDER BY 1, 2", span):
            files.setdefault(r[0], []).append(_host_file(r))
        certs = {
            r[0]: self._certificate(r)
            for r in conn.execute(f"SELECT {_CERT_COLS} FROM certificates {page}", span)
        }
        plans = {
            r[0]: _renewal(r)
            for r in conn.execute(
                f"SELECT hostname, due_at, next_check_at, source, last_error FROM renewals {page}",
                span,
            )
        }
        orders = {
            r[0]: self._pending_order(r)
            for r in conn.execute(f"SELECT {_ORDER_COLS} FROM pending_orders {page}", span)
        }
        backoffs = {
            r[0]: HostBackoff(r[0], r[1], r[2], r[3])
            for r in conn.execute(
                f"SELECT hostname, failures, next_attempt_at, last_error FROM host_backoff {page}",
                span,
            )
        }
        return [
            HostRecord(
                domain=d,
                options=options.get(d.hostname),
                files=tuple(files.get(d.hostname, ())),
                certificate=certs.get(d.hostname),
                renewal=plans.get(d.hostname),
                pending_order=orders.get(d.hostname),
                backoff=backoffs.get(d.hostname),
            )
            for d in domains
        ]

    async def import_hosts(self, changes: HostImport) -> None:
        """One write transaction of a few executemany: each statement and trigger is the
        one the single-host method runs, so every event is emitted as it would be."""
        now = self._clock()
        c = changes
        # sealed for this store (the record carries the key opened by the source's)
        certs = [
            (
                x.hostname, x.chain_pem,
                self._sealer.seal(x.key_pem, Sealer.row("cert", x.hostname)),
                ",".join(x.names), x.not_before, x.not_after, x.issuer, x.created_at, x.serial,
                x.directory_url,
            )
            for x in c.certificates
        ]  # fmt: skip
        orders = [
            (
                o.hostname, o.directory_url, o.order_url, o.account_uri,
                self._sealer.seal(o.key_pem, Sealer.row("order", o.hostname)),
                ",".join(o.names), o.created_at,
            )
            for o in c.pending_orders
        ]  # fmt: skip
        columns = [col.strip() for col in _DOMAIN_COLS.split(",")]
        sets = ", ".join(f"{col} = ?" for col in columns[1:])

        def apply(conn: sqlite3.Connection) -> None:
            conn.executemany(
                f"INSERT INTO domains ({_DOMAIN_COLS}) VALUES ({', '.join('?' * len(columns))})"
                " ON CONFLICT (hostname) DO NOTHING",
                [_domain_row(d) for d in c.new_domains],
            )
            conn.executemany(
                f"UPDATE domains SET {sets} WHERE hostname = ?",
                [(*_domain_row(d)[1:], d.hostname) for d in c.domains],
            )
            conn.executemany(
                "INSERT INTO host_options (hostname, options, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (hostname) DO UPDATE SET options = excluded.options,"
                " updated_at = excluded.updated_at",
                [(h, json.dumps(o, sort_keys=True), now) for h, o in c.options],
            )
            conn.executemany(
                "INSERT INTO host_files (hostname, kind, content, etag, updated_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (hostname, kind) DO UPDATE SET"
                " content = excluded.content, etag = excluded.etag,"
                " updated_at = excluded.updated_at",
                [(f.hostname, f.kind, f.content, f.etag, f.updated_at) for f in c.files],
            )
            conn.executemany(
                "DELETE FROM host_files WHERE hostname = ? AND kind = ?", c.files_removed
            )
            removed = [(h,) for h in c.certificates_removed]
            conn.executemany("DELETE FROM certificates WHERE hostname = ?", removed)
            conn.executemany("DELETE FROM renewals WHERE hostname = ?", removed)
            conn.executemany(_PUT_CERTIFICATE, certs)
            conn.executemany("DELETE FROM renewals WHERE hostname = ?", [(x[0],) for x in certs])
            conn.executemany(
                "INSERT INTO renewals"
                " (hostname, due_at, next_check_at, source, last_error, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (hostname) DO UPDATE SET"
                " due_at = excluded.due_at, next_check_at = excluded.next_check_at,"
                " source = excluded.source, last_error = excluded.last_error,"
                " updated_at = excluded.updated_at",
                [
                    (p.hostname, p.due_at, p.next_check_at, p.source, p.last_error, now)
                    for p in c.renewals
                ],
            )
            conn.executemany(
                "DELETE FROM pending_orders WHERE hostname = ? AND order_url = ?",
                c.pending_orders_removed,
            )
            conn.executemany(
                f"INSERT OR REPLACE INTO pending_orders ({_ORDER_COLS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                orders,
            )
            conn.executemany(
                "DELETE FROM host_backoff WHERE hostname = ?", [(h,) for h in c.backoffs_removed]
            )
            conn.executemany(
                "INSERT OR REPLACE INTO host_backoff"
                " (hostname, failures, next_attempt_at, last_error, updated_at)"
                " VALUES (?, ?, ?, ?, ?)",
                [
                    (b.hostname, b.failures, b.next_attempt_at, b.last_error, now)
                    for b in c.backoffs
                ],
            )

        await self._in_transaction(apply, write=True)

    async def count_host_records(self) -> dict[str, int]:
        registered = "WHERE hostname IN (SELECT hostname FROM domains)"
        row = await self._one(
            f"SELECT (SELECT COUNT(*) FROM host_options {registered}),"
            f" (SELECT COUNT(*) FROM host_files {registered}),"
            f" (SELECT COUNT(*) FROM renewals {registered}),"
            f" (SELECT COUNT(*) FROM host_backoff {registered}),"
            f" (SELECT COUNT(*) FROM pending_orders {registered})"
        )
        assert row is not None
        kinds = ("options", "files", "renewals", "backoffs", "pending_orders")
        return {kind: int(n) for kind, n in zip(kinds, row, strict=True)}


_DOMAIN_COLS = (
    "hostname, account, state, cname_target_seen, verified_at, last_check_at,"
    " last_check_reason, created_at, state_reason, state_changed_at, next_check_at,"
    " failed_checks, last_report"
)
_EVENT_COLS = "id, at, hostname, kind, detail, from_state, to_state"
_FILE_COLS = "hostname, kind, content, etag, updated_at"
_ORDER_COLS = "hostname, directory_url, order_url, account_uri, key_sealed, names, created_at"
_CERT_COLS = (
    "hostname, chain_pem, key_sealed, names, not_before, not_after, issuer, created_at,"
    " serial, directory_url"
)


def _renewal(row: sqlite3.Row) -> RenewalPlan:
    return RenewalPlan(
        hostname=row[0], due_at=row[1], next_check_at=row[2], source=row[3], last_error=row[4]
    )


def _host_file(row: sqlite3.Row) -> HostFile:
    return HostFile(
        hostname=row[0], kind=row[1], content=bytes(row[2]), etag=row[3], updated_at=row[4]
    )


def _domain(row: sqlite3.Row) -> Domain:
    return Domain(
        hostname=row[0],
        account=row[1],
        state=DomainState(row[2]),
        cname_target_seen=row[3],
        verified_at=row[4],
        last_check_at=row[5],
        last_check_reason=row[6],
        created_at=row[7],
        state_reason=row[8],
        state_changed_at=row[9],
        next_check_at=row[10],
        failed_checks=row[11],
        last_report=row[12],
    )


def _domain_row(d: Domain) -> tuple[Any, ...]:
    """A domain as the values of _DOMAIN_COLS, in order."""
    return (
        d.hostname, d.account, d.state.value, d.cname_target_seen, d.verified_at,
        d.last_check_at, d.last_check_reason, d.created_at, d.state_reason,
        d.state_changed_at, d.next_check_at, d.failed_checks, d.last_report,
    )  # fmt: skip


def _event(r: sqlite3.Row) -> Event:
    return Event(
        id=r[0], at=r[1], hostname=r[2], kind=r[3], detail=r[4], from_state=r[5], to_state=r[6]
    )


async def _migrate(db: aiosqlite.Connection, path: Path) -> None:
    async with db.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"store {path} has schema version {version}, newer than this linkedge "
            f"({SCHEMA_VERSION}); upgrade linkedge"
        )
    # BEGIN IMMEDIATE serialises concurrent first starts of several workers.
    for target in range(version + 1, SCHEMA_VERSION + 1):
        await db.execute("BEGIN IMMEDIATE")
        try:
            async with db.execute("PRAGMA user_version") as cur:
                row = await cur.fetchone()
            if row and int(row[0]) >= target:
                await db.execute("COMMIT")
                continue
            for statement in _statements(MIGRATIONS[target - 1]):
                await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {target}")
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise


def _statements(script: str) -> list[str]:
    """Split a script on `;`, keeping trigger bodies (BEGIN ... END) whole."""
    statements, pending = [], ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                statements.append(pending.strip())
            pending = ""
    if pending.strip(" \n;"):
        statements.append(pending.strip())
    return statements
