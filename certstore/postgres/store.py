"""PostgreSQL backend of the store roles in :mod:`certstore.ports` (asyncpg pool).

Opened through :func:`certstore.open_store` (``postgresql://...``); nothing outside
`certstore` names this class.

Every method is one short transaction on a pooled connection (one statement, or a few
in an explicit transaction where the contract needs a lock or the store's time inside a
trigger): nothing is held across calls. The pool is small (a node's workers share the
database with every other node's), bounded in time (connect, acquire and statements
each time out), and recovers by itself: a connection the server dropped is replaced at
the next acquire, so the same store object works again once the database is back.
Connection trouble surfaces as :class:`certstore.errors.StoreUnavailable` with the URL's
password masked, never as a hang or a driver traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import asyncpg

from ..crypto import Sealer
from ..errors import StoreError, StoreUnavailable
from ..models import (
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
from ..nodes import NODE as _NODE
from ..nodes import process_alive
from ..ports import KEEP, DomainExists, Keep
from .connect import BROKEN, connect, connect_kwargs, mask_url, translate
from .listener import EventListener
from .schema import (
    EXPIRY_BUCKET_SECONDS,
    MIGRATION_LOCK,
    MIGRATIONS,
    NOTIFY_CHANNEL,
    RATE_LOCK_CLASS,
    SCHEMA_VERSION,
)

Clock = Callable[[], float]
log = logging.getLogger(__name__)

DEFAULT_POOL_SIZE = 5
# A statement (and a pool acquire) may take this long: generous, because in a busy worker
# the time includes waiting for the event loop and for a pooled connection, not only the
# database (store.timeout_seconds). Its expiry is StoreSlow (that call failed), not an outage.
DEFAULT_TIMEOUT = 10.0
# Opening a connection: short, its expiry is evidence of an outage (store.connect_timeout_seconds)
DEFAULT_CONNECT_TIMEOUT = 5.0
BULK_TIMEOUT = 120.0  # list_domains / list_certificates / list_renewals on a big store


class PostgresStore:
    def __init__(
        self,
        pool: asyncpg.Pool,
        sealer: Sealer,
        clock: Clock,
        url: str,
        password: str | None,
        timeout: float,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self._pool = pool
        self._sealer = sealer
        self._clock = clock
        self._url = url
        self._password = password
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._listener = EventListener(
            connect_kwargs(url, password, connect_timeout), NOTIFY_CHANNEL, timeout, mask_url(url)
        )

    @classmethod
    async def open(
        cls,
        url: str,
        key: bytes,
        clock: Clock = time.time,
        *,
        password: str | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
        bound: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> PostgresStore:
        if pool_size < 1:
            raise StoreError("store pool size must be at least 1")
        try:
            pool = await asyncpg.create_pool(
                **connect_kwargs(url, password, connect_timeout),
                connect=connect,  # a connect timeout is told apart from a slow statement
                # No floor: asyncpg restores a floor in the background during an outage,
                # logging a traceback per retry. The first call opens a connection (the
                # migration, at once) and a busy worker keeps its connections warm.
                min_size=0,
                max_size=pool_size,
                command_timeout=bound,
                # a connection idle this long is closed: a node does not keep its peak
                # number of connections to a shared database for ever
                max_inactive_connection_lifetime=120.0,
                # No reset query on release (asyncpg's default runs one per release: half
                # an idle fleet's statements). It undoes session state, and the pool's
                # connections keep none: no LISTEN (that is the listener's own
                # connection), no SET (linkedge.now is set_config(..., true): the
                # transaction's), only transaction-scoped advisory locks, no cursors or
                # prepared statements outside asyncpg's own cache. asyncpg still ends an
                # open transaction and drops listeners before calling this.
                reset=_no_reset,
            )
        except Exception as exc:
            error = translate(exc, url, password)
            if error is None:
                raise
            raise error from None
        store = cls(pool, Sealer(key), clock, url, password, bound, connect_timeout)
        try:
            await store._migrate()
            await store._check_key()
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        await self._listener.close()
        try:
            await asyncio.wait_for(self._pool.close(), self._timeout)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            self._pool.terminate()  # a dead server: do not wait for goodbyes

    # -- connections -------------------------------------------------------------------

    async def probe_connection(self) -> None:
        """Open a fresh connection (not the pool's) and ask one trivial question: after a
        slow call, this tells "the database is unreachable" (StoreUnavailable) from "this
        worker or its pool was busy" (returns). Bounded by the connect timeout."""
        conn: asyncpg.Connection | None = None
        try:
            conn = await connect(**connect_kwargs(self._url, self._password, self._connect_timeout))
            await conn.fetchval("SELECT 1", timeout=self._connect_timeout)
        except Exception as exc:
            error = translate(exc, self._url, self._password)
            if error is None:
                raise
            if isinstance(exc, TimeoutError):  # the trivial question timed out: not answering
                error = StoreUnavailable(str(error))
            raise error from None
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):  # close() aborts by itself on failure
                    await conn.close(timeout=self._connect_timeout)

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection for one call; connection trouble becomes StoreUnavailable."""
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                try:
                    yield conn
                except BROKEN:
                    conn.terminate()  # released as closed: the next acquire opens a new one
                    raise
        except Exception as exc:
            error = translate(exc, self._url, self._password)
            if error is None:
                raise
            raise error from None

    @contextlib.asynccontextmanager
    async def _tx(self, *, now: float | None = None) -> AsyncIterator[asyncpg.Connection]:
        """A transaction; with `now`, the store's time for triggers (``linkedge_now()``)."""
        async with self._conn() as conn, conn.transaction():
            if now is not None:
                await conn.execute("SELECT set_config('linkedge.now', $1, true)", repr(now))
            yield conn

    async def _execute(self, sql: str, *args: Any) -> str:
        async with self._conn() as conn:
            return str(await conn.execute(sql, *args))

    async def _fetch(self, sql: str, *args: Any, bulk: bool = False) -> list[Any]:
        async with self._conn() as conn:
            return list(await conn.fetch(sql, *args, timeout=BULK_TIMEOUT if bulk else None))

    async def _fetchrow(self, sql: str, *args: Any) -> Any:
        async with self._conn() as conn:
            return await conn.fetchrow(sql, *args)

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        async with self._conn() as conn:
            return await conn.fetchval(sql, *args)

    async def _migrate(self) -> None:
        """Apply missing migrations. The advisory lock serialises processes starting at
        once: the second waits, then finds the schema current."""
        async with self._conn() as conn:
            # Every start asks first, in one read without the lock: a current schema
            # (nearly always) costs one round trip instead of a locked transaction per
            # migration, before the first click. Anything else takes the locked path.
            with contextlib.suppress(asyncpg.UndefinedTableError):
                current = await conn.fetchval("SELECT max(version) FROM schema_version")
                if current == SCHEMA_VERSION:
                    return
            for target in range(1, SCHEMA_VERSION + 1):
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
                    await conn.execute(
                        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
                    )
                    version = await conn.fetchval("SELECT max(version) FROM schema_version")
                    version = int(version or 0)
                    if version > SCHEMA_VERSION:
                        raise StoreError(
                            f"store {mask_url(self._url)} has schema version {version}, newer"
                            f" than this linkedge ({SCHEMA_VERSION}); upgrade linkedge"
                        )
                    if version >= target:
                        continue
                    await conn.execute(MIGRATIONS[target - 1], timeout=BULK_TIMEOUT)
                    await conn.execute("DELETE FROM schema_version")
                    await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", target)

    async def _check_key(self) -> None:
        """Fail at start-up, not at the first handshake, when the key is wrong."""
        await self._execute(
            "INSERT INTO meta (key, value) VALUES ('key_check', $1) ON CONFLICT DO NOTHING",
            self._sealer.key_check(),
        )
        sealed = await self._fetchval("SELECT value FROM meta WHERE key = 'key_check'")
        self._sealer.verify_key_check(bytes(sealed))

    # -- domains ---------------------------------------------------------------------

    async def add_domain(self, hostname: str, account: str) -> Domain:
        now = self._clock()
        try:
            # next_check_at = now: the background verifier looks at a new host at once;
            # the `registered` event: trigger domain_registered_event, same statement
            row = await self._fetchrow(
                "INSERT INTO domains (hostname, account, state, created_at, state_reason,"
                " state_changed_at, next_check_at) VALUES ($1, $2, $3, $4, $5, $4, $4)"
                f" RETURNING {_DOMAIN_COLS}",
                hostname,
                account,
                DomainState.PENDING.value,
                now,
                "registered; waiting for the CNAME",
            )
        except asyncpg.UniqueViolationError as exc:
            if exc.table_name != "domains":
                raise
            raise DomainExists(hostname) from None
        return _domain(row)

    async def remove_domain(self, hostname: str) -> bool:
        """One statement: the trigger `domain_removed` deletes everything of the host and
        records the `removed` event with it."""
        async with self._tx(now=self._clock()) as conn:
            status = await conn.execute("DELETE FROM domains WHERE hostname = $1", hostname)
            if _count(status) > 0:
                return True
            # leftovers of a host registered by nobody (never normally)
            for table in _HOST_TABLES:
                await conn.execute(f"DELETE FROM {table} WHERE hostname = $1", hostname)
            return False

    async def get_domain(self, hostname: str) -> Domain | None:
        row = await self._fetchrow(
            f"SELECT {_DOMAIN_COLS} FROM domains WHERE hostname = $1", hostname
        )
        return _domain(row) if row else None

    async def list_domains(self) -> list[Domain]:
        rows = await self._fetch(f"SELECT {_DOMAIN_COLS} FROM domains ORDER BY hostname", bulk=True)
        return [_domain(r) for r in rows]

    async def list_domains_page(
        self,
        *,
        after: str | None = None,
        limit: int = 100,
        account: str | None = None,
        state: DomainState | None = None,
    ) -> list[Domain]:
        """Keyset pagination by hostname (byte order: the column is COLLATE "C"); each
        page is a range scan of the primary key or of (account|state, hostname)."""
        where: list[str] = ["hostname > $1"]
        args: list[Any] = [after or ""]
        if account is not None:
            args.append(account)
            where.append(f"account = ${len(args)}")
        if state is not None:
            args.append(state.value)
            where.append(f"state = ${len(args)}")
        args.append(limit)
        rows = await self._fetch(
            f"SELECT {_DOMAIN_COLS} FROM domains WHERE {' AND '.join(where)}"
            f" ORDER BY hostname LIMIT ${len(args)}",
            *args,
        )
        return [_domain(r) for r in rows]

    async def count_domains_by_state(self) -> dict[DomainState, int]:
        # kept by triggers (migration 4): a few rows, not a scan of every host
        rows = await self._fetch("SELECT state, n FROM domain_counts WHERE n > 0")
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
        """Compare-and-set the state (a concurrent update is re-checked against the new
        row: READ COMMITTED re-evaluates the WHERE); the trigger `domain_state_event`
        records a change of state in the same statement."""
        if not expected:
            return False
        sets = "state = $1, state_reason = $2, state_changed_at = $3, failed_checks = 0"
        args: list[Any] = [to.value, reason, self._clock()]
        if not isinstance(next_check_at, Keep):
            args.append(next_check_at)
            sets += f", next_check_at = ${len(args)}"
        args += [hostname, [s.value for s in expected]]
        status = await self._execute(
            f"UPDATE domains SET {sets} WHERE hostname = ${len(args) - 1}"
            f" AND state = ANY(${len(args)}::text[])",
            *args,
        )
        return _count(status) > 0

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

        def put(expr: str, *values: Any) -> None:
            marks = []
            for value in values:
                args.append(value)
                marks.append(f"${len(args)}")
            sets.append(expr.format(*marks))

        if not isinstance(report, Keep):
            put("last_report = {}", json.dumps(report, sort_keys=True))
        if not isinstance(reason, Keep):
            put("last_check_reason = {}", reason)
        if not isinstance(cname_target_seen, Keep):
            put("cname_target_seen = {}", cname_target_seen)
        if not isinstance(next_check_at, Keep):
            put("next_check_at = {}::double precision", next_check_at)
        if passed is not None:
            now = self._clock()
            put("last_check_at = {}", now)
            put(
                "failed_checks = CASE WHEN {} THEN 0 ELSE failed_checks + 1 END",
                passed or reset_failures,
            )
            put(
                "verified_at = CASE WHEN {} THEN {}::double precision ELSE verified_at END",
                passed,
                now,
            )
        if not sets:
            return
        args.append(hostname)
        await self._execute(
            f"UPDATE domains SET {', '.join(sets)} WHERE hostname = ${len(args)}",
            *args,
        )

    async def due_for_check(self, now: float, limit: int) -> list[str]:
        rows = await self._fetch(
            "SELECT hostname FROM domains WHERE next_check_at IS NOT NULL"
            " AND next_check_at <= $1 ORDER BY next_check_at LIMIT $2",
            now,
            limit,
        )
        return [r[0] for r in rows]

    async def restore_domain(self, domain: Domain) -> bool:
        """Insert the record as given, or overwrite the existing one with it: two single
        statements (like the SQLite backend's), each atomic with the event its trigger
        emits (`domain_registered_event` on the insert, `domain_state_event` on an update
        that changes the state); a host removed between the two is inserted next round."""
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
        columns = [c.strip() for c in _DOMAIN_COLS.split(",")]
        marks = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
        sets = ", ".join(f"{c} = ${i}" for i, c in enumerate(columns[1:], start=2))
        while True:
            status = await self._execute(
                f"INSERT INTO domains ({_DOMAIN_COLS}) VALUES ({marks})"
                " ON CONFLICT (hostname) DO NOTHING",
                domain.hostname,
                *fields,
            )
            if _count(status) > 0:
                return True
            status = await self._execute(
                f"UPDATE domains SET {sets} WHERE hostname = $1", domain.hostname, *fields
            )
            if _count(status) > 0:
                return False

    # -- per-host options and files -----------------------------------------------------

    async def get_options(self, hostname: str) -> dict[str, Any] | None:
        value = await self._fetchval(
            "SELECT options FROM host_options WHERE hostname = $1", hostname
        )
        return json.loads(value) if value is not None else None

    async def put_options(self, hostname: str, options: dict[str, Any]) -> None:
        await self._execute(
            "INSERT INTO host_options (hostname, options, updated_at) VALUES ($1, $2, $3)"
            " ON CONFLICT (hostname) DO UPDATE SET options = EXCLUDED.options,"
            " updated_at = EXCLUDED.updated_at",
            hostname,
            json.dumps(options, sort_keys=True),
            self._clock(),
        )

    async def get_host_file(self, hostname: str, kind: str) -> HostFile | None:
        row = await self._fetchrow(
            f"SELECT {_FILE_COLS} FROM host_files WHERE hostname = $1 AND kind = $2",
            hostname,
            kind,
        )
        return _host_file(row) if row else None

    async def list_host_files(self, hostname: str) -> list[HostFile]:
        rows = await self._fetch(
            f"SELECT {_FILE_COLS} FROM host_files WHERE hostname = $1 ORDER BY kind", hostname
        )
        return [_host_file(r) for r in rows]

    async def put_host_file(self, hostname: str, kind: str, content: bytes, etag: str) -> HostFile:
        """Store (or replace) a file; a trigger records the `file_updated` event with it."""
        now = self._clock()
        await self._execute(
            "INSERT INTO host_files (hostname, kind, content, etag, updated_at)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (hostname, kind) DO UPDATE SET"
            " content = EXCLUDED.content, etag = EXCLUDED.etag,"
            " updated_at = EXCLUDED.updated_at",
            hostname,
            kind,
            content,
            etag,
            now,
        )
        return HostFile(hostname, kind, content, etag, now)

    async def delete_host_file(self, hostname: str, kind: str) -> bool:
        async with self._tx(now=self._clock()) as conn:
            status = await conn.execute(
                "DELETE FROM host_files WHERE hostname = $1 AND kind = $2", hostname, kind
            )
        return _count(status) > 0

    # -- ACME accounts -------------------------------------------------------------------

    async def get_account(self, directory_url: str) -> AcmeAccount | None:
        row = await self._fetchrow(
            "SELECT uri, key_sealed FROM acme_accounts WHERE directory_url = $1", directory_url
        )
        if row is None:
            return None
        key = self._sealer.open(bytes(row[1]), Sealer.row("account", directory_url))
        return AcmeAccount(directory_url=directory_url, uri=row[0], key_pem=key)

    async def save_account(self, account: AcmeAccount) -> None:
        sealed = self._sealer.seal(account.key_pem, Sealer.row("account", account.directory_url))
        await self._execute(
            "INSERT INTO acme_accounts (directory_url, uri, key_sealed, created_at)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (directory_url) DO UPDATE SET"
            " uri = EXCLUDED.uri, key_sealed = EXCLUDED.key_sealed",
            account.directory_url,
            account.uri,
            sealed,
            self._clock(),
        )

    async def list_accounts(self) -> list[AcmeAccount]:
        rows = await self._fetch(
            "SELECT directory_url, uri, key_sealed FROM acme_accounts"
            ' ORDER BY directory_url COLLATE "C"'
        )
        return [
            AcmeAccount(
                directory_url=r[0],
                uri=r[1],
                key_pem=self._sealer.open(bytes(r[2]), Sealer.row("account", r[0])),
            )
            for r in rows
        ]

    # -- certificates ----------------------------------------------------------------------

    async def get_certificate(self, hostname: str) -> StoredCertificate | None:
        row = await self._fetchrow(
            f"SELECT {_CERT_COLS} FROM certificates WHERE hostname = $1", hostname
        )
        return self._certificate(row) if row else None

    async def put_certificate(
        self, cert: StoredCertificate, event: tuple[str, str] | None = None
    ) -> None:
        """Store (or replace); the trigger `certificates_stored` ends the host's pending
        order and drops its renewal plan in the same statement. With `event`, its event
        is recorded in the same transaction."""
        sealed = self._sealer.seal(cert.key_pem, Sealer.row("cert", cert.hostname))
        async with self._tx() as conn:
            await self._put_certificate(conn, cert, sealed)
            if event is not None:
                await conn.execute(
                    "INSERT INTO events (at, hostname, kind, detail) VALUES ($1, $2, $3, $4)",
                    self._clock(),
                    cert.hostname,
                    *event,
                )

    @staticmethod
    async def _put_certificate(
        conn: asyncpg.Connection, cert: StoredCertificate, sealed: bytes
    ) -> None:
        await conn.execute(
            "INSERT INTO certificates (hostname, chain_pem, key_sealed, names, not_before,"
            " not_after, issuer, created_at, serial, directory_url)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            " ON CONFLICT (hostname) DO UPDATE SET chain_pem = EXCLUDED.chain_pem,"
            " key_sealed = EXCLUDED.key_sealed, names = EXCLUDED.names,"
            " not_before = EXCLUDED.not_before, not_after = EXCLUDED.not_after,"
            " issuer = EXCLUDED.issuer, created_at = EXCLUDED.created_at,"
            " serial = EXCLUDED.serial, directory_url = EXCLUDED.directory_url",
            cert.hostname,
            cert.chain_pem,
            sealed,
            ",".join(cert.names),
            float(cert.not_before),
            float(cert.not_after),
            cert.issuer,
            float(cert.created_at),
            cert.serial,
            cert.directory_url,
        )

    async def delete_certificate(self, hostname: str) -> bool:
        """Purge a certificate, its sealed key and its renewal plan (after revocation)."""
        async with self._tx() as conn:
            status = await conn.execute("DELETE FROM certificates WHERE hostname = $1", hostname)
            await conn.execute("DELETE FROM renewals WHERE hostname = $1", hostname)
        return _count(status) > 0

    async def certificate_serial(self, hostname: str) -> str | None:
        value = await self._fetchval(
            "SELECT serial FROM certificates WHERE hostname = $1", hostname
        )
        return None if value is None else str(value)

    async def certificate_validity(
        self, hostnames: Collection[str]
    ) -> dict[str, tuple[float, float, str]]:
        if not hostnames:
            return {}
        rows = await self._fetch(
            "SELECT hostname, not_before, not_after, issuer FROM certificates"
            " WHERE hostname = ANY($1::text[])",
            list(hostnames),
        )
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    async def soonest_expiries(self, limit: int) -> list[tuple[str, float, float, str]]:
        rows = await self._fetch(
            "SELECT hostname, not_before, not_after, issuer FROM certificates"
            " ORDER BY not_after LIMIT $1",
            limit,
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    async def list_certificates(self) -> list[StoredCertificate]:
        rows = await self._fetch(
            f"SELECT {_CERT_COLS} FROM certificates ORDER BY not_after", bulk=True
        )
        return [self._certificate(r) for r in rows]

    async def certificate_summary(self, now: float, horizon: float) -> dict[str, Any]:
        """From the counters per hour of expiry (migration 4): certificates expired by
        a time t are those of the hours before t's, plus those of t's own hour up to t
        (an index range of one hour's expiries); no scan of every certificate."""
        row = await self._fetchrow(
            "SELECT (SELECT COALESCE(sum(n), 0) FROM certificate_expiry_counts),"
            f" {_EXPIRED_BY.format(t='$1')}, {_EXPIRED_BY.format(t='$2')},"
            " (SELECT min(not_after) FROM certificates)",
            float(now),
            float(now + horizon),
        )
        total, expired = int(row[0]), int(row[1])
        expiring = int(row[2]) - expired
        return {
            "valid": total - expired - expiring,
            "expiring": expiring,
            "expired": expired,
            "soonest_expiry": row[3],
        }

    def _certificate(self, row: Any) -> StoredCertificate:
        hostname = row[0]
        return StoredCertificate(
            hostname=hostname,
            chain_pem=bytes(row[1]),
            key_pem=self._sealer.open(bytes(row[2]), Sealer.row("cert", hostname)),
            names=tuple(n for n in row[3].split(",") if n),
            not_before=row[4],
            not_after=row[5],
            issuer=row[6],
            created_at=row[7],
            serial=row[8],
            directory_url=row[9],
        )

    # -- challenges ------------------------------------------------------------------------

    async def put_challenge(self, token: str, key_authorization: str, hostname: str) -> None:
        await self._execute(
            "INSERT INTO challenges (token, key_authorization, hostname, created_at)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (token) DO UPDATE SET"
            " key_authorization = EXCLUDED.key_authorization, hostname = EXCLUDED.hostname,"
            " created_at = EXCLUDED.created_at",
            token,
            key_authorization,
            hostname,
            self._clock(),
        )

    async def get_challenge(self, token: str) -> str | None:
        value = await self._fetchval(
            "SELECT key_authorization FROM challenges WHERE token = $1", token
        )
        return None if value is None else str(value)

    async def delete_challenge(self, token: str) -> None:
        await self._execute("DELETE FROM challenges WHERE token = $1", token)

    async def put_alpn_challenge(self, hostname: str, key_authorization: str) -> None:
        await self._execute(
            "INSERT INTO alpn_challenges (hostname, key_authorization, created_at)"
            " VALUES ($1, $2, $3) ON CONFLICT (hostname) DO UPDATE SET"
            " key_authorization = EXCLUDED.key_authorization, created_at = EXCLUDED.created_at",
            hostname,
            key_authorization,
            self._clock(),
        )

    async def get_alpn_challenge(self, hostname: str) -> str | None:
        value = await self._fetchval(
            "SELECT key_authorization FROM alpn_challenges WHERE hostname = $1", hostname
        )
        return None if value is None else str(value)

    async def delete_alpn_challenge(self, hostname: str) -> None:
        await self._execute("DELETE FROM alpn_challenges WHERE hostname = $1", hostname)

    # -- leases ----------------------------------------------------------------------------

    async def try_acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        """One statement: insert, or take over an expired lease / refresh our own. Of
        concurrent callers for a free name one inserts; the others wait for its row
        lock and re-check the WHERE against its row (READ COMMITTED), so they lose."""
        now = self._clock()
        row = await self._fetchrow(
            "INSERT INTO leases (name, holder, expires_at, node, pid)"
            " VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder,"
            " expires_at = EXCLUDED.expires_at, node = EXCLUDED.node, pid = EXCLUDED.pid"
            " WHERE leases.expires_at <= $6 OR leases.holder = EXCLUDED.holder"
            " RETURNING 1",
            name,
            holder,
            now + ttl,
            _NODE,
            os.getpid(),
            now,
        )
        return row is not None

    async def release_lease(self, name: str, holder: str) -> None:
        await self._execute("DELETE FROM leases WHERE name = $1 AND holder = $2", name, holder)

    async def release_dead_leases(self) -> list[str]:
        """Free the leases of processes on this node that are no longer running."""
        rows = await self._fetch(
            "SELECT DISTINCT pid FROM leases WHERE node = $1 AND pid != $2 AND pid > 0",
            _NODE,
            os.getpid(),
        )
        released: list[str] = []
        for (pid,) in rows:
            if process_alive(int(pid)):
                continue
            gone = await self._fetch(
                "DELETE FROM leases WHERE node = $1 AND pid = $2 RETURNING name", _NODE, pid
            )
            released.extend(str(r[0]) for r in gone)
        return released

    # -- orders in flight --------------------------------------------------------------------

    async def put_pending_order(self, order: PendingOrder) -> None:
        sealed = self._sealer.seal(order.key_pem, Sealer.row("order", order.hostname))
        await self._execute(
            "INSERT INTO pending_orders (hostname, directory_url, order_url, account_uri,"
            " key_sealed, names, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)"
            " ON CONFLICT (hostname) DO UPDATE SET directory_url = EXCLUDED.directory_url,"
            " order_url = EXCLUDED.order_url, account_uri = EXCLUDED.account_uri,"
            " key_sealed = EXCLUDED.key_sealed, names = EXCLUDED.names,"
            " created_at = EXCLUDED.created_at",
            order.hostname,
            order.directory_url,
            order.order_url,
            order.account_uri,
            sealed,
            ",".join(order.names),
            float(order.created_at),
        )

    async def get_pending_order(self, hostname: str) -> PendingOrder | None:
        row = await self._fetchrow(
            f"SELECT {_ORDER_COLS} FROM pending_orders WHERE hostname = $1", hostname
        )
        return None if row is None else self._pending_order(row)

    def _pending_order(self, row: Any) -> PendingOrder:
        return PendingOrder(
            hostname=row[0],
            directory_url=row[1],
            order_url=row[2],
            account_uri=row[3],
            key_pem=self._sealer.open(bytes(row[4]), Sealer.row("order", row[0])),
            names=tuple(n for n in row[5].split(",") if n),
            created_at=row[6],
        )

    async def delete_pending_order(self, hostname: str, order_url: str) -> None:
        await self._execute(
            "DELETE FROM pending_orders WHERE hostname = $1 AND order_url = $2",
            hostname,
            order_url,
        )

    # -- per-CA circuit breaker -------------------------------------------------------------

    async def get_ca_breaker(self, directory_url: str) -> CaBreakerState | None:
        row = await self._fetchrow(
            "SELECT directory_url, state, failures, opened_at, next_probe_at, last_error"
            " FROM ca_breakers WHERE directory_url = $1",
            directory_url,
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
        await self._execute(
            "INSERT INTO ca_breakers (directory_url, state, failures, opened_at,"
            " next_probe_at, last_error, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7)"
            " ON CONFLICT (directory_url) DO UPDATE SET state = EXCLUDED.state,"
            " failures = EXCLUDED.failures, opened_at = EXCLUDED.opened_at,"
            " next_probe_at = EXCLUDED.next_probe_at, last_error = EXCLUDED.last_error,"
            " updated_at = EXCLUDED.updated_at",
            state.directory_url,
            state.state,
            state.failures,
            _float_or_none(state.opened_at),
            _float_or_none(state.next_probe_at),
            state.last_error,
            self._clock(),
        )

    async def claim_ca_probe(self, directory_url: str, now: float, next_probe_at: float) -> bool:
        """One UPDATE: of concurrent claimers, the first to lock the row moves
        next_probe_at past `now`; the others re-check the WHERE on its new row and
        match nothing."""
        status = await self._execute(
            "UPDATE ca_breakers SET state = 'half_open', next_probe_at = $1, updated_at = $2"
            " WHERE directory_url = $3 AND state != 'closed' AND next_probe_at <= $2",
            float(next_probe_at),
            float(now),
            directory_url,
        )
        return _count(status) > 0

    # -- renewal plans -----------------------------------------------------------------------

    async def get_renewal(self, hostname: str) -> RenewalPlan | None:
        row = await self._fetchrow(
            "SELECT hostname, due_at, next_check_at, source, last_error FROM renewals"
            " WHERE hostname = $1",
            hostname,
        )
        return _renewal(row) if row else None

    async def put_renewal(self, plan: RenewalPlan) -> None:
        await self._execute(
            "INSERT INTO renewals (hostname, due_at, next_check_at, source, last_error,"
            " updated_at) VALUES ($1, $2, $3, $4, $5, $6)"
            " ON CONFLICT (hostname) DO UPDATE SET due_at = EXCLUDED.due_at,"
            " next_check_at = EXCLUDED.next_check_at, source = EXCLUDED.source,"
            " last_error = EXCLUDED.last_error, updated_at = EXCLUDED.updated_at",
            plan.hostname,
            float(plan.due_at),
            float(plan.next_check_at),
            plan.source,
            plan.last_error,
            self._clock(),
        )

    async def list_renewals(self) -> list[RenewalPlan]:
        rows = await self._fetch(
            "SELECT hostname, due_at, next_check_at, source, last_error FROM renewals",
            bulk=True,
        )
        return [_renewal(r) for r in rows]

    async def renewal_summary(self, now: float, overdue_after: float) -> dict[str, int]:
        # index ranges (renewals_by_due, the partial renewals_failing), not every plan
        row = await self._fetchrow(
            "SELECT (SELECT count(*) FROM renewals WHERE due_at <= $1),"
            " (SELECT count(*) FROM renewals WHERE due_at <= $2),"
            " (SELECT count(*) FROM renewals WHERE last_error IS NOT NULL AND last_error != '')",
            now,
            now - overdue_after,
        )
        return {"due": int(row[0]), "overdue": int(row[1]), "failing": int(row[2])}

    async def hosts_needing_maintenance(self, now: float, limit: int) -> list[str]:
        """Certificates without a plan (first; `unplanned_certificates`, kept by
        triggers), then plans due by `now`: two index scans however big the store."""
        rows = await self._fetch(
            "(SELECT hostname, 0::double precision AS at FROM unplanned_certificates"
            "  LIMIT $2)"
            " UNION ALL"
            " (SELECT r.hostname, r.next_check_at FROM renewals r"
            "  WHERE r.next_check_at <= $1"
            "  AND EXISTS (SELECT 1 FROM certificates c WHERE c.hostname = r.hostname)"
            "  ORDER BY r.next_check_at LIMIT $2)"
            " ORDER BY at LIMIT $2",
            now,
            limit,
        )
        return [str(r[0]) for r in rows]

    async def next_maintenance_at(self) -> float | None:
        """The earliest moment a certificate needs a visit (no plan yet: 0); None: none.
        Each maintenance loop asks after every pass: index lookups, no join of
        every certificate with its plan."""
        value = await self._fetchval(
            "SELECT CASE WHEN EXISTS (SELECT 1 FROM unplanned_certificates) THEN 0"
            " ELSE (SELECT r.next_check_at FROM renewals r WHERE EXISTS"
            "  (SELECT 1 FROM certificates c WHERE c.hostname = r.hostname)"
            "  ORDER BY r.next_check_at LIMIT 1) END"
        )
        return None if value is None else float(value)

    async def renewal_load(self, start: float, end: float, slot: float) -> list[int]:
        """Plans per slot: one index-only range scan of renewals_by_due."""
        count = max(math.ceil((end - start) / slot), 0)
        loads = [0] * count
        if not count:
            return loads
        rows = await self._fetch(
            "SELECT floor((due_at - $1) / $2)::bigint AS k, count(*) FROM renewals"
            " WHERE due_at >= $1 AND due_at < $3 GROUP BY k",
            start,
            slot,
            start + count * slot,
        )
        for k, n in rows:
            if 0 <= k < count:
                loads[k] += int(n)
        return loads

    # -- rate limits (sliding windows) --------------------------------------------------------

    async def take_rate_token(self, bucket: str, limit: int, window: float) -> int | None:
        """One call of ``linkedge_take_rate_token`` (migration 3): the bucket's advisory
        lock, the count and the insert happen server-side, so the lock is held for
        microseconds, not across client round trips; why two callers can never both take
        the last token is said in the function's migration."""
        now = self._clock()
        token = await self._fetchval(
            "SELECT linkedge_take_rate_token($1, $2, $3, $4, $5)",
            RATE_LOCK_CLASS,
            bucket,
            now,
            now - window,
            limit,
        )
        return None if token is None else int(token)

    async def add_rate_event(self, bucket: str) -> None:
        await self._execute(
            "INSERT INTO rate_log (bucket, at) VALUES ($1, $2)", bucket, self._clock()
        )

    async def refund_rate_token(self, token_id: int) -> None:
        await self._execute("DELETE FROM rate_log WHERE id = $1", token_id)

    async def rate_usage(self, bucket: str, window: float) -> tuple[int, float | None]:
        row = await self._fetchrow(
            "SELECT count(*), min(at) FROM rate_log WHERE bucket = $1 AND at > $2",
            bucket,
            self._clock() - window,
        )
        return int(row[0]), row[1]

    async def prune_rate_log(self, older_than: float) -> None:
        await self._execute("DELETE FROM rate_log WHERE at <= $1", float(older_than))

    # -- per-host failure backoff ----------------------------------------------------------------

    async def get_backoff(self, hostname: str) -> HostBackoff | None:
        row = await self._fetchrow(
            "SELECT hostname, failures, next_attempt_at, last_error FROM host_backoff"
            " WHERE hostname = $1",
            hostname,
        )
        if row is None:
            return None
        return HostBackoff(
            hostname=row[0], failures=row[1], next_attempt_at=row[2], last_error=row[3]
        )

    async def put_backoff(self, backoff: HostBackoff) -> None:
        await self._execute(
            "INSERT INTO host_backoff (hostname, failures, next_attempt_at, last_error,"
            " updated_at) VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (hostname) DO UPDATE SET failures = EXCLUDED.failures,"
            " next_attempt_at = EXCLUDED.next_attempt_at, last_error = EXCLUDED.last_error,"
            " updated_at = EXCLUDED.updated_at",
            backoff.hostname,
            backoff.failures,
            float(backoff.next_attempt_at),
            backoff.last_error,
            self._clock(),
        )

    async def clear_backoff(self, hostname: str) -> None:
        await self._execute("DELETE FROM host_backoff WHERE hostname = $1", hostname)

    # -- events ---------------------------------------------------------------------------------

    async def record_event(self, hostname: str | None, kind: str, detail: str) -> None:
        await self._execute(
            "INSERT INTO events (at, hostname, kind, detail) VALUES ($1, $2, $3, $4)",
            self._clock(),
            hostname,
            kind,
            detail,
        )

    async def list_events(self, hostname: str | None = None, limit: int = 100) -> list[Event]:
        if hostname is None:
            rows = await self._fetch(
                f"SELECT {_EVENT_COLS} FROM events ORDER BY id DESC LIMIT $1", limit
            )
        else:
            rows = await self._fetch(
                f"SELECT {_EVENT_COLS} FROM events WHERE hostname = $1 ORDER BY id DESC LIMIT $2",
                hostname,
                limit,
            )
        return [_event(r) for r in rows]

    async def events_after(self, after_id: int, limit: int = 500) -> list[Event]:
        rows = await self._fetch(
            f"SELECT {_EVENT_COLS} FROM events WHERE id > $1 ORDER BY id LIMIT $2",
            after_id,
            limit,
        )
        return [_event(r) for r in rows]

    async def last_event_id(self) -> int:
        value = await self._fetchval("SELECT COALESCE(max(id), 0) FROM events")
        return int(value)

    async def wait_for_events(self, after_id: int, timeout: float) -> None:  # noqa: ASYNC109
        """Pushed: the listener's connection hears every event's NOTIFY (see
        :class:`EventListener`)."""
        await self._listener.wait(after_id, timeout)

    def events_pushed(self) -> bool:
        """Whether :meth:`wait_for_events` is woken by the database right now (the
        listener is connected): a follower may then wait long between reads."""
        return self._listener.live

    # -- small named values (cursors) ------------------------------------------------------------

    async def get_meta(self, key: str) -> str | None:
        value = await self._fetchval("SELECT value FROM meta WHERE key = $1", f"v:{key}")
        return None if value is None else bytes(value).decode()

    async def put_meta(self, key: str, value: str) -> None:
        await self._execute(
            "INSERT INTO meta (key, value) VALUES ($1, $2)"
            " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            f"v:{key}",
            value.encode(),
        )

    # -- whole hosts in pages (copying a store) ----------------------------------------------

    async def export_hosts(
        self, *, after: str | None = None, through: str | None = None, limit: int | None = None
    ) -> list[HostRecord]:
        """One read-only REPEATABLE READ transaction (one snapshot): the page's hosts,
        then each other kind of record as one range of its primary key."""
        args: list[Any] = [after or ""]
        where = "hostname > $1"
        if through is not None:
            args.append(through)
            where += f" AND hostname <= ${len(args)}"
        sql = f"SELECT {_DOMAIN_COLS} FROM domains WHERE {where} ORDER BY hostname"
        if limit is not None:
            args.append(limit)
            sql += f" LIMIT ${len(args)}"
        async with (
            self._conn() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            domains = [_domain(r) for r in await conn.fetch(sql, *args, timeout=BULK_TIMEOUT)]
            if not domains:
                return []
            span = (after or "", domains[-1].hostname)
            page = "WHERE hostname > $1 AND hostname <= $2"

            async def rows(sql: str) -> list[Any]:
                return list(await conn.fetch(sql, *span, timeout=BULK_TIMEOUT))

            options = {
                r[0]: json.loads(r[1])
                for r in await rows(f"SELECT hostname, options FROM host_options {page}")
            }
            files: dict[str, list[HostFile]] = {}
            for r in await rows(f"SELECT {_FILE_COLS} FROM host_files {page} ORDER BY 1, 2"):
                files.setdefault(r[0], []).append(_host_file(r))
            certs = {
                r[0]: self._certificate(r)
                for r in await rows(f"SELECT {_CERT_COLS} FROM certificates {page}")
            }
            plans = {
                r[0]: _renewal(r)
                for r in await rows(
                    "SELECT hostname, due_at, next_check_at, source, last_error FROM renewals"
                    f" {page}"
                )
            }
            orders = {
                r[0]: self._pending_order(r)
                for r in await rows(f"SELECT {_ORDER_COLS} FROM pending_orders {page}")
            }
            backoffs = {
                r[0]: HostBackoff(r[0], r[1], r[2], r[3])
                for r in await rows(
                    "SELECT hostname, failures, next_attempt_at, last_error FROM host_backoff"
                    f" {page}"
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
        """One transaction. Hosts, certificates and plans go in one statement per kind
        over arrays (``unnest``): their triggers that keep counters and queues (migration
        4) work per statement, so once per page, not once per row. The other kinds are
        pipelined executemany (one round trip per kind). Each row meets the row triggers
        the single-host methods meet, so every event is emitted as they would emit it.
        The event lock (migration 1) is held from the first event to the commit, so
        other writers that emit events wait for the page: a copy's target should be
        quiet."""
        now = self._clock()
        c = changes
        cert_rows = [
            (
                x.hostname, x.chain_pem,
                self._sealer.seal(x.key_pem, Sealer.row("cert", x.hostname)),
                ",".join(x.names), float(x.not_before), float(x.not_after), x.issuer,
                float(x.created_at), x.serial, x.directory_url,
            )
            for x in c.certificates
        ]  # fmt: skip
        order_rows = [
            (
                o.hostname, o.directory_url, o.order_url, o.account_uri,
                self._sealer.seal(o.key_pem, Sealer.row("order", o.hostname)),
                ",".join(o.names), float(o.created_at),
            )
            for o in c.pending_orders
        ]  # fmt: skip
        domain_columns = [col.strip() for col in _DOMAIN_COLS.split(",")]
        from_domains = (
            f"unnest({', '.join(f'${i}::{t}[]' for i, t in enumerate(_DOMAIN_TYPES, 1))})"
            f" AS u ({_DOMAIN_COLS})"
        )
        from_certs = (
            f"unnest({', '.join(f'${i}::{t}[]' for i, t in enumerate(_CERT_TYPES, 1))})"
            f" AS u ({_CERT_COLS})"
        )
        # In HostImport's order; certificates first also keeps the lock order of a
        # host's removal (certificate counters, then the event lock, then host counters).
        bulk: list[tuple[str, list[tuple[Any, ...]]]] = [
            ("DELETE FROM certificates WHERE hostname = ANY($1::text[])",
             [(h,) for h in c.certificates_removed]),
            ("DELETE FROM renewals WHERE hostname = ANY($1::text[])",
             [(h,) for h in c.certificates_removed]),
            (
                f"INSERT INTO certificates ({_CERT_COLS}) SELECT * FROM {from_certs}"
                " ON CONFLICT (hostname) DO UPDATE SET chain_pem = EXCLUDED.chain_pem,"
                " key_sealed = EXCLUDED.key_sealed, names = EXCLUDED.names,"
                " not_before = EXCLUDED.not_before, not_after = EXCLUDED.not_after,"
                " issuer = EXCLUDED.issuer, created_at = EXCLUDED.created_at,"
                " serial = EXCLUDED.serial, directory_url = EXCLUDED.directory_url",
                cert_rows,
            ),
            (
                "INSERT INTO renewals (hostname, due_at, next_check_at, source, last_error,"
                " updated_at) SELECT * FROM unnest($1::text[], $2::float8[], $3::float8[],"
                " $4::text[], $5::text[], $6::float8[])"
                " ON CONFLICT (hostname) DO UPDATE SET due_at = EXCLUDED.due_at,"
                " next_check_at = EXCLUDED.next_check_at, source = EXCLUDED.source,"
                " last_error = EXCLUDED.last_error, updated_at = EXCLUDED.updated_at",
                [
                    (p.hostname, float(p.due_at), float(p.next_check_at), p.source,
                     p.last_error, now)
                    for p in c.renewals
                ],
            ),
        ]  # fmt: skip
        many: list[tuple[str, list[tuple[Any, ...]]]] = [
            (
                "DELETE FROM pending_orders WHERE hostname = $1 AND order_url = $2",
                list(c.pending_orders_removed),
            ),
            (
                f"INSERT INTO pending_orders ({_ORDER_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
                " ON CONFLICT (hostname) DO UPDATE SET directory_url = EXCLUDED.directory_url,"
                " order_url = EXCLUDED.order_url, account_uri = EXCLUDED.account_uri,"
                " key_sealed = EXCLUDED.key_sealed, names = EXCLUDED.names,"
                " created_at = EXCLUDED.created_at",
                order_rows,
            ),
            (
                "DELETE FROM host_backoff WHERE hostname = $1",
                [(h,) for h in c.backoffs_removed],
            ),
            (
                "INSERT INTO host_backoff (hostname, failures, next_attempt_at, last_error,"
                " updated_at) VALUES ($1, $2, $3, $4, $5)"
                " ON CONFLICT (hostname) DO UPDATE SET failures = EXCLUDED.failures,"
                " next_attempt_at = EXCLUDED.next_attempt_at, last_error = EXCLUDED.last_error,"
                " updated_at = EXCLUDED.updated_at",
                [
                    (b.hostname, b.failures, float(b.next_attempt_at), b.last_error, now)
                    for b in c.backoffs
                ],
            ),
        ]
        hosts: list[tuple[str, list[tuple[Any, ...]]]] = [
            (
                f"INSERT INTO domains ({_DOMAIN_COLS}) SELECT * FROM {from_domains}"
                " ON CONFLICT (hostname) DO NOTHING",
                [_domain_row(d) for d in c.new_domains],
            ),
            (
                "UPDATE domains AS d SET "
                + ", ".join(f"{col} = u.{col}" for col in domain_columns[1:])
                + f" FROM {from_domains} WHERE d.hostname = u.hostname",
                [_domain_row(d) for d in c.domains],
            ),
        ]
        content: list[tuple[str, list[tuple[Any, ...]]]] = [
            (
                "INSERT INTO host_options (hostname, options, updated_at) VALUES ($1, $2, $3)"
                " ON CONFLICT (hostname) DO UPDATE SET options = EXCLUDED.options,"
                " updated_at = EXCLUDED.updated_at",
                [(h, json.dumps(o, sort_keys=True), now) for h, o in c.options],
            ),
            (
                "INSERT INTO host_files (hostname, kind, content, etag, updated_at)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (hostname, kind) DO UPDATE SET"
                " content = EXCLUDED.content, etag = EXCLUDED.etag,"
                " updated_at = EXCLUDED.updated_at",
                [(f.hostname, f.kind, f.content, f.etag, float(f.updated_at)) for f in c.files],
            ),
            (
                "DELETE FROM host_files WHERE hostname = $1 AND kind = $2",
                list(c.files_removed),
            ),
        ]
        async with self._tx(now=now) as conn:
            for statements, arrays in (
                (bulk, True),
                (many, False),
                (hosts, True),
                (content, False),
            ):
                for sql, rows in statements:
                    if not rows:
                        continue
                    if arrays:
                        await conn.execute(sql, *_columns(rows), timeout=BULK_TIMEOUT)
                    else:
                        await conn.executemany(sql, rows, timeout=BULK_TIMEOUT)

    async def count_host_records(self) -> dict[str, int]:
        registered = "WHERE hostname IN (SELECT hostname FROM domains)"
        async with self._conn() as conn:
            row = await conn.fetchrow(
                f"SELECT (SELECT count(*) FROM host_options {registered}),"
                f" (SELECT count(*) FROM host_files {registered}),"
                f" (SELECT count(*) FROM renewals {registered}),"
                f" (SELECT count(*) FROM host_backoff {registered}),"
                f" (SELECT count(*) FROM pending_orders {registered})",
                timeout=BULK_TIMEOUT,
            )
        kinds = ("options", "files", "renewals", "backoffs", "pending_orders")
        return {kind: int(n) for kind, n in zip(kinds, row, strict=True)}


async def _no_reset(_conn: asyncpg.Connection) -> None:
    """The pool's reset on release: nothing to undo (see PostgresStore.open)."""


_HOST_TABLES = (
    "certificates",
    "unplanned_certificates",
    "challenges",
    "renewals",
    "host_backoff",
    "alpn_challenges",
    "host_options",
    "host_files",
)
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

# Certificates expired by the time {t} (see certificate_summary): the counters of the hours
# before t's, plus t's own hour up to t. The index range of that hour is a second wider on
# each side; which hour a certificate is in is decided by the trigger's own function,
# float rounding included.
_EXPIRED_BY = (
    "((SELECT COALESCE(sum(n), 0) FROM certificate_expiry_counts"
    "   WHERE hour < linkedge_expiry_hour({t}))"
    " + (SELECT count(*) FROM certificates"
    f"   WHERE not_after >= (linkedge_expiry_hour({{t}}) * {EXPIRY_BUCKET_SECONDS} - 1)::float8"
    f"   AND not_after < ((linkedge_expiry_hour({{t}}) + 1) * {EXPIRY_BUCKET_SECONDS} + 1)::float8"
    "   AND linkedge_expiry_hour(not_after) = linkedge_expiry_hour({t}) AND not_after <= {t}))"
)

# the columns' types, for arrays of them (import_hosts)
_DOMAIN_TYPES = (
    "text", "text", "text", "text", "float8", "float8", "text", "float8", "text", "float8",
    "float8", "int4", "text",
)  # fmt: skip
_CERT_TYPES = (
    "text", "bytea", "bytea", "text", "float8", "float8", "text", "float8", "text", "text"
)  # fmt: skip


def _columns(rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows as one list per column (the arrays an ``unnest`` statement takes)."""
    return [list(column) for column in zip(*rows, strict=True)]


def _count(status: str) -> int:
    """Rows a command touched, from its status tag ("UPDATE 1", "DELETE 0", ...)."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _float_or_none(value: float | None) -> float | None:
    return None if value is None else float(value)


def _renewal(row: Any) -> RenewalPlan:
    return RenewalPlan(
        hostname=row[0], due_at=row[1], next_check_at=row[2], source=row[3], last_error=row[4]
    )


def _host_file(row: Any) -> HostFile:
    return HostFile(
        hostname=row[0], kind=row[1], content=bytes(row[2]), etag=row[3], updated_at=row[4]
    )


def _domain(row: Any) -> Domain:
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
        d.hostname, d.account, d.state.value, d.cname_target_seen,
        _float_or_none(d.verified_at), _float_or_none(d.last_check_at), d.last_check_reason,
        float(d.created_at), d.state_reason, _float_or_none(d.state_changed_at),
        _float_or_none(d.next_check_at), d.failed_checks, d.last_report,
    )  # fmt: skip


def _event(r: Any) -> Event:
    return Event(
        id=r[0], at=r[1], hostname=r[2], kind=r[3], detail=r[4], from_state=r[5], to_state=r[6]
    )
