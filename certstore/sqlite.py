"""SQLite implementation of :class:`certstore.base.CertStore` (aiosqlite, WAL).

Several worker processes open the same file: WAL lets readers run beside the one
writer, `busy_timeout` absorbs short write contention, and every statement runs in
autocommit so no process ever holds a write lock across an await.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import aiosqlite

from .base import DomainExists
from .crypto import SecretBox, StoreKeyError
from .models import (
    AcmeAccount,
    Domain,
    DomainState,
    Event,
    HostBackoff,
    RenewalPlan,
    StoredCertificate,
)
from .schema import MIGRATIONS, SCHEMA_VERSION

_KEY_CHECK = b"linkedge-store-key-check"
Clock = Callable[[], float]


class StoreError(Exception):
    """The store cannot be opened or used (clear message, no traceback needed)."""


class SQLiteStore:
    def __init__(self, db: aiosqlite.Connection, box: SecretBox, clock: Clock) -> None:
        self._db = db
        self._box = box
        self._clock = clock

    @classmethod
    async def open(cls, path: str | Path, key: bytes, clock: Clock = time.time) -> SQLiteStore:
        path = Path(path)
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = await aiosqlite.connect(str(path), isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from None
        try:
            await db.execute("PRAGMA busy_timeout = 10000")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = NORMAL")
            await _migrate(db, path)
            store = cls(db, SecretBox(key), clock)
            await store._check_key()
        except BaseException:
            await db.close()
            raise
        if str(path) != ":memory:":
            os.chmod(path, 0o600)
        return store

    async def close(self) -> None:
        await self._db.close()

    async def _check_key(self) -> None:
        """Fail at start-up, not at the first handshake, when the key is wrong."""
        row = await self._one("SELECT value FROM meta WHERE key = 'key_check'")
        if row is None:
            sealed = self._box.seal(_KEY_CHECK, "meta:key_check")
            await self._db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('key_check', ?)", (sealed,)
            )
            row = await self._one("SELECT value FROM meta WHERE key = 'key_check'")
            assert row is not None
        try:
            ok = self._box.open(row[0], "meta:key_check") == _KEY_CHECK
        except StoreKeyError:
            ok = False
        if not ok:
            raise StoreKeyError("the store key does not match this store (wrong key?)")

    async def _one(self, sql: str, args: Iterable[Any] = ()) -> sqlite3.Row | None:
        async with self._db.execute(sql, tuple(args)) as cur:
            return await cur.fetchone()

    async def _all(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        async with self._db.execute(sql, tuple(args)) as cur:
            return list(await cur.fetchall())

    # -- domains ---------------------------------------------------------------

    async def add_domain(self, hostname: str, account: str) -> Domain:
        try:
            await self._db.execute(
                "INSERT INTO domains (hostname, account, state, created_at) VALUES (?, ?, ?, ?)",
                (hostname, account, DomainState.PENDING.value, self._clock()),
            )
        except sqlite3.IntegrityError:
            raise DomainExists(hostname) from None
        await self.record_event(hostname, "registered", f"account {account}")
        domain = await self.get_domain(hostname)
        assert domain is not None
        return domain

    async def remove_domain(self, hostname: str) -> bool:
        cur = await self._db.execute("DELETE FROM domains WHERE hostname = ?", (hostname,))
        removed = cur.rowcount > 0
        await self._db.execute("DELETE FROM certificates WHERE hostname = ?", (hostname,))
        await self._db.execute("DELETE FROM challenges WHERE hostname = ?", (hostname,))
        for table in ("renewals", "host_backoff", "alpn_challenges"):
            await self._db.execute(f"DELETE FROM {table} WHERE hostname = ?", (hostname,))
        if removed:
            await self.record_event(hostname, "removed", "domain and its certificate deleted")
        return removed

    async def get_domain(self, hostname: str) -> Domain | None:
        row = await self._one(f"SELECT {_DOMAIN_COLS} FROM domains WHERE hostname = ?", (hostname,))
        return _domain(row) if row else None

    async def list_domains(self) -> list[Domain]:
        rows = await self._all(f"SELECT {_DOMAIN_COLS} FROM domains ORDER BY hostname")
        return [_domain(r) for r in rows]

    async def record_check(
        self,
        hostname: str,
        *,
        state: DomainState,
        cname_target_seen: str | None,
        reason: str,
        verified: bool,
    ) -> None:
        now = self._clock()
        await self._db.execute(
            "UPDATE domains SET state = ?, cname_target_seen = ?, last_check_at = ?,"
            " last_check_reason = ?,"
            " verified_at = CASE WHEN ? THEN ? ELSE verified_at END"
            " WHERE hostname = ?",
            (state.value, cname_target_seen, now, reason, verified, now, hostname),
        )

    async def set_domain_state(self, hostname: str, state: DomainState) -> None:
        await self._db.execute(
            "UPDATE domains SET state = ? WHERE hostname = ?", (state.value, hostname)
        )

    # -- ACME account ----------------------------------------------------------

    async def get_account(self, directory_url: str) -> AcmeAccount | None:
        row = await self._one(
            "SELECT uri, key_sealed FROM acme_accounts WHERE directory_url = ?", (directory_url,)
        )
        if row is None:
            return None
        key = self._box.open(row[1], f"account:{directory_url}")
        return AcmeAccount(directory_url=directory_url, uri=row[0], key_pem=key)

    async def save_account(self, account: AcmeAccount) -> None:
        sealed = self._box.seal(account.key_pem, f"account:{account.directory_url}")
        await self._db.execute(
            "INSERT INTO acme_accounts (directory_url, uri, key_sealed, created_at)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (directory_url) DO UPDATE SET"
            " uri = excluded.uri, key_sealed = excluded.key_sealed",
            (account.directory_url, account.uri, sealed, self._clock()),
        )

    # -- certificates ----------------------------------------------------------

    async def get_certificate(self, hostname: str) -> StoredCertificate | None:
        row = await self._one(
            f"SELECT {_CERT_COLS} FROM certificates WHERE hostname = ?", (hostname,)
        )
        return self._certificate(row) if row else None

    async def put_certificate(self, cert: StoredCertificate) -> None:
        """Store (or replace) a host's certificate; a new certificate starts a new renewal plan."""
        sealed = self._box.seal(cert.key_pem, f"cert:{cert.hostname}")
        await self._db.execute(
            "INSERT INTO certificates (hostname, chain_pem, key_sealed, names, not_before,"
            " not_after, issuer, created_at, serial, directory_url)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (hostname) DO UPDATE SET chain_pem = excluded.chain_pem,"
            " key_sealed = excluded.key_sealed, names = excluded.names,"
            " not_before = excluded.not_before, not_after = excluded.not_after,"
            " issuer = excluded.issuer, created_at = excluded.created_at,"
            " serial = excluded.serial, directory_url = excluded.directory_url",
            (
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
            ),
        )
        await self._db.execute("DELETE FROM renewals WHERE hostname = ?", (cert.hostname,))

    async def delete_certificate(self, hostname: str) -> bool:
        """Purge a certificate and its sealed key (after revocation)."""
        cur = await self._db.execute("DELETE FROM certificates WHERE hostname = ?", (hostname,))
        await self._db.execute("DELETE FROM renewals WHERE hostname = ?", (hostname,))
        return cur.rowcount > 0

    async def certificate_serial(self, hostname: str) -> str | None:
        """The serial alone: a cheap check whether a cached context is still current."""
        row = await self._one("SELECT serial FROM certificates WHERE hostname = ?", (hostname,))
        return str(row[0]) if row else None

    async def list_certificates(self) -> list[StoredCertificate]:
        rows = await self._all(f"SELECT {_CERT_COLS} FROM certificates ORDER BY not_after")
        return [self._certificate(r) for r in rows]

    def _certificate(self, row: sqlite3.Row) -> StoredCertificate:
        hostname = row[0]
        return StoredCertificate(
            hostname=hostname,
            chain_pem=bytes(row[1]),
            key_pem=self._box.open(row[2], f"cert:{hostname}"),
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
        now = self._clock()
        cur = await self._db.execute(
            "INSERT INTO leases (name, holder, expires_at) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,"
            " expires_at = excluded.expires_at"
            " WHERE leases.expires_at <= ? OR leases.holder = excluded.holder",
            (name, holder, now + ttl, now),
        )
        return cur.rowcount > 0

    async def release_lease(self, name: str, holder: str) -> None:
        await self._db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

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
            "INSERT OR REPLACE INTO renewals"
            " (hostname, due_at, next_check_at, source, last_error, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
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

    async def hosts_needing_maintenance(self, now: float, limit: int) -> list[str]:
        """Certificates without a plan yet, or whose plan wants a visit by `now`."""
        rows = await self._all(
            "SELECT c.hostname FROM certificates c LEFT JOIN renewals r USING (hostname)"
            " WHERE r.hostname IS NULL OR r.next_check_at <= ?"
            " ORDER BY COALESCE(r.next_check_at, 0) LIMIT ?",
            (now, limit),
        )
        return [str(r[0]) for r in rows]

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
                "SELECT id, at, hostname, kind, detail FROM events ORDER BY id DESC LIMIT ?",
                (limit,),
            )
        else:
            rows = await self._all(
                "SELECT id, at, hostname, kind, detail FROM events WHERE hostname = ?"
                " ORDER BY id DESC LIMIT ?",
                (hostname, limit),
            )
        return [Event(id=r[0], at=r[1], hostname=r[2], kind=r[3], detail=r[4]) for r in rows]


_DOMAIN_COLS = (
    "hostname, account, state, cname_target_seen, verified_at, last_check_at,"
    " last_check_reason, created_at"
)
_CERT_COLS = (
    "hostname, chain_pem, key_sealed, names, not_before, not_after, issuer, created_at,"
    " serial, directory_url"
)


def _renewal(row: sqlite3.Row) -> RenewalPlan:
    return RenewalPlan(
        hostname=row[0], due_at=row[1], next_check_at=row[2], source=row[3], last_error=row[4]
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
    return [s.strip() for s in script.split(";") if s.strip()]
