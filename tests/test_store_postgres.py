"""What only the PostgreSQL backend has: a server that can be down, frozen, restarted or
reached over TLS, passwords, concurrent first starts, commit order under held locks, and
query plans that stay index scans on a big store. (What every backend does is
tests/test_store_contract.py, which runs on PostgreSQL too.)"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import trustme
from support.postgres import PostgresServer

from certstore import (
    DomainState,
    Store,
    StoreError,
    StoreUnavailable,
    generate_key_text,
    open_store,
)
from certstore.crypto import parse_key_text
from certstore.postgres import mask_url
from certstore.postgres.schema import SCHEMA_VERSION
from proxy.app import wiring
from proxy.app.config import Config

KEY = parse_key_text(generate_key_text(), "test")
GUARD = 60.0  # only keeps a broken backend from hanging the suite; never a timing goal


@pytest.fixture
def database(postgres: PostgresServer) -> str:
    return postgres.create_database()


@pytest.fixture
async def store(postgres: PostgresServer, database: str) -> AsyncIterator[Store]:
    s = await open_store(postgres.url(database), KEY)
    yield s
    await s.close()


async def guarded(awaitable: object) -> object:
    return await asyncio.wait_for(awaitable, GUARD)  # type: ignore[arg-type]


# -- event ids in commit order ------------------------------------------------------------


async def test_an_event_id_waits_for_the_previous_event_to_commit(
    postgres: PostgresServer, database: str, store: Store
) -> None:
    """Two transactions: the first takes an id and stays open; the second's insert waits
    for it (the advisory lock in the id trigger) instead of taking the next id and
    committing first, which would let a follower's cursor pass the first for good."""
    url = postgres.url(database)
    held, other, watcher = [await asyncpg.connect(url) for _ in range(3)]
    insert = (
        "INSERT INTO events (at, hostname, kind, detail) VALUES (1, NULL, $1, '-') RETURNING id"
    )
    try:
        start = await store.last_event_id()
        tx = held.transaction()
        await tx.start()
        first = await held.fetchval(insert, "held")
        second_task = asyncio.create_task(other.fetchval(insert, "second"))
        while not await watcher.fetchval(  # the second insert is parked on the lock
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        ):
            assert not second_task.done(), "the second event did not wait for the first"
            await asyncio.sleep(0.01)
        assert await store.events_after(start) == []  # nothing visible out of order
        await tx.commit()
        second = await guarded(second_task)
        assert isinstance(second, int) and second > first
        assert [e.kind for e in await store.events_after(start)] == ["held", "second"]
    finally:
        for conn in (held, other, watcher):
            await conn.close()


# -- a database that is down, frozen or restarted -----------------------------------------


async def test_a_stopped_database_fails_fast_and_the_same_store_recovers(
    postgres: PostgresServer, database: str, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await store.add_domain("a.test", "acct")
    cursor = await store.last_event_id()
    await guarded(store.wait_for_events(cursor - 1, 3600))  # the listener is up
    waiting = asyncio.create_task(store.wait_for_events(cursor, 3600))
    postgres.stop()
    try:
        for call in (store.get_domain("a.test"), store.add_domain("b.test", "acct")):
            with pytest.raises(StoreUnavailable) as info:
                await guarded(call)
            assert postgres.password not in str(info.value)
            assert "***" in str(info.value)  # the URL, password masked
        await guarded(store.wait_for_events(cursor, 0.2))  # never raises for an outage
        with pytest.raises(StoreUnavailable):
            await guarded(open_store(postgres.url(database), KEY))
    finally:
        postgres.start()
    # the same object: the pool replaces the connections the restart dropped
    domain = await guarded(store.get_domain("a.test"))
    assert domain is not None
    # the listener reconnected, waking its waiter (it re-reads by cursor: nothing missed)
    await guarded(waiting)
    other = await open_store(postgres.url(database), KEY)
    try:
        cursor = await store.last_event_id()
        woken = asyncio.create_task(store.wait_for_events(cursor, 3600))
        await asyncio.sleep(0.1)
        assert await other.transition_domain(
            "a.test", [DomainState.PENDING], DomainState.SUSPENDED, "op"
        )
        await guarded(woken)
        assert [e.kind for e in await store.events_after(cursor)] == ["state"]
    finally:
        await other.close()
    # an outage is a line or two, not a traceback per retry
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    assert not any(postgres.password in r.getMessage() for r in caplog.records)


async def test_a_frozen_backend_times_out_instead_of_hanging(
    postgres: PostgresServer, database: str
) -> None:
    """A server that accepted the query and went silent (a partition, a frozen VM) is
    cut off by the statement timeout; the pool goes on with a new connection."""
    store = await open_store(postgres.url(database), KEY, pool_size=1)
    try:
        await store.add_domain("a.test", "acct")
        # the one pooled connection's server process
        pids = postgres.psql(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid != pg_backend_pid() AND backend_type = 'client backend'",
            database,
        ).split()
        assert len(pids) == 1
        pid = int(pids[0])
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(StoreUnavailable, match="timed out"):
                await guarded(store.get_domain("a.test"))
        finally:
            os.kill(pid, signal.SIGCONT)
        assert await guarded(store.get_domain("a.test")) is not None
    finally:
        await store.close()


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


async def test_a_server_that_never_answers_is_unavailable_not_a_hang() -> None:
    with silent_server() as port:
        url = f"postgresql://linkedge:secret-in-url@127.0.0.1:{port}/linkedge"
        with pytest.raises(StoreUnavailable, match="timed out") as info:
            await guarded(open_store(url, KEY))
    assert "secret-in-url" not in str(info.value)


# -- passwords -------------------------------------------------------------------------------


def test_urls_are_shown_with_the_password_masked() -> None:
    assert mask_url("postgresql://u:p%40ss@db:5432/x?sslmode=require") == (
        "postgresql://u:***@db:5432/x?sslmode=require"
    )
    assert mask_url("postgres://u@db/x") == "postgres://u@db/x"
    assert mask_url("postgresql://db/x") == "postgresql://db/x"


async def test_the_password_comes_from_the_url_else_the_argument(
    postgres: PostgresServer, database: str
) -> None:
    bare = postgres.url(database, with_password=False)
    store = await open_store(bare, KEY, password=postgres.password)
    await store.close()
    # the URL's password wins over the argument
    store = await open_store(postgres.url(database), KEY, password="not-this-one")
    await store.close()
    wrong = postgres.url(database).replace(postgres.password, "wrong-password")
    with pytest.raises(StoreError, match="refused") as info:
        await guarded(open_store(wrong, KEY))
    assert not isinstance(info.value, StoreUnavailable)  # an operator's problem, not an outage
    assert "wrong-password" not in str(info.value)
    with pytest.raises(StoreError):
        await guarded(open_store(bare, KEY))  # none at all


async def test_the_config_reads_the_password_from_its_file_or_variable(
    postgres: PostgresServer,
    database: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key_file = tmp_path / "store.key"
    key_file.write_text(generate_key_text())
    password_file = tmp_path / "db.password"
    password_file.write_text(postgres.password + "\n")
    config = Config()
    config.store.url = postgres.url(database, with_password=False)
    config.store.key_file = str(key_file)
    config.store.key_env = ""
    config.store.password_file = str(password_file)
    config.store.pool_size = 2
    monkeypatch.delenv("LINKEDGE_STORE_PASSWORD", raising=False)
    store = await wiring.open_store(config)
    await store.close()
    # the variable wins over the file
    password_file.write_text("wrong\n")
    monkeypatch.setenv("LINKEDGE_STORE_PASSWORD", postgres.password)
    store = await wiring.open_store(config)
    await store.close()
    monkeypatch.delenv("LINKEDGE_STORE_PASSWORD")
    with pytest.raises(StoreError):
        await wiring.open_store(config)


# -- TLS to the database ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PostgresServer, Path]]:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    server = PostgresServer(
        ssl_cert=b"".join(blob.bytes() for blob in leaf.cert_chain_pems),
        ssl_key=leaf.private_key_pem.bytes(),
    )
    ca_file = tmp_path_factory.mktemp("pg-tls") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    try:
        server.start()
        yield server, ca_file
    finally:
        server.destroy()


async def test_verified_tls_to_the_database(
    tls_postgres: tuple[PostgresServer, Path], tmp_path: Path
) -> None:
    server, ca_file = tls_postgres
    database = server.create_database()
    url = f"{server.url(database)}?sslmode=verify-full&sslrootcert={ca_file}"
    store = await open_store(url, KEY)
    try:
        await store.add_domain("a.test", "acct")
        cursor = await store.last_event_id()
        await guarded(store.wait_for_events(cursor - 1, 3600))  # the listener speaks TLS too
    finally:
        await store.close()
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    finally:
        await conn.close()
    # a server whose certificate another CA signed is refused, and it is not an outage
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    wrong = f"{server.url(database)}?sslmode=verify-full&sslrootcert={other_ca}"
    with pytest.raises(StoreError, match="certificate verify failed") as info:
        await guarded(open_store(wrong, KEY))
    assert not isinstance(info.value, StoreUnavailable)
    assert server.password not in str(info.value)


# -- schema and migrations -----------------------------------------------------------------------


async def test_concurrent_first_starts_migrate_once(
    postgres: PostgresServer, database: str
) -> None:
    stores = await guarded(
        asyncio.gather(*(open_store(postgres.url(database), KEY) for _ in range(6)))
    )
    assert isinstance(stores, list)
    for s in stores:
        await s.close()
    assert postgres.psql("SELECT version FROM schema_version", database).split() == [
        str(SCHEMA_VERSION)
    ]


async def test_a_newer_schema_is_refused(postgres: PostgresServer, database: str) -> None:
    store = await open_store(postgres.url(database), KEY)
    await store.close()
    postgres.psql(f"UPDATE schema_version SET version = {SCHEMA_VERSION + 1}", database)
    with pytest.raises(StoreError, match="newer than this linkedge"):
        await open_store(postgres.url(database), KEY)


async def test_queries_stay_index_scans_on_a_big_store(
    postgres: PostgresServer, database: str, store: Store
) -> None:
    """With 40,000 hosts (and their certificates, plans and events) the planner picks an
    index for every per-host lookup and every queue the loops poll (the small
    `unplanned_certificates` is read from its start, whatever its size)."""
    postgres.psql(
        # bulk test data: the store's triggers (one event per row) stay off meanwhile
        "SET session_replication_role = replica;"
        "INSERT INTO domains (hostname, account, state, created_at, next_check_at)"
        " SELECT 'h' || i || '.test', 'acct' || (i % 100), 'active', 0, i"
        " FROM generate_series(1, 40000) i;"
        "INSERT INTO certificates (hostname, chain_pem, key_sealed, names, not_before,"
        " not_after, issuer, created_at)"
        " SELECT 'h' || i || '.test', 'c', 'k', '', 0, i, 'ca', 0"
        " FROM generate_series(1, 40000) i;"
        "INSERT INTO renewals (hostname, due_at, next_check_at, source, updated_at)"
        " SELECT 'h' || i || '.test', i, i, 'ratio', 0 FROM generate_series(1, 40000) i;"
        "INSERT INTO events (id, at, hostname, kind, detail)"
        " SELECT nextval('events_id_seq'), 0, 'h' || (i % 1000) || '.test', 'x', ''"
        " FROM generate_series(1, 40000) i;"
        "ANALYZE",
        database,
    )
    queries = {
        "host": "SELECT * FROM domains WHERE hostname = 'h5.test'",
        "due checks": "SELECT hostname FROM domains WHERE next_check_at IS NOT NULL"
        " AND next_check_at <= 50 ORDER BY next_check_at LIMIT 10",
        "page by state": "SELECT hostname FROM domains WHERE hostname > 'h5' AND state ="
        " 'suspended' ORDER BY hostname LIMIT 100",
        "page by account": "SELECT hostname FROM domains WHERE hostname > 'h5' AND account ="
        " 'acct7' ORDER BY hostname LIMIT 100",
        "maintenance": "(SELECT hostname, 0::float8 AS at FROM unplanned_certificates"
        " LIMIT 10) UNION ALL (SELECT r.hostname, r.next_check_at FROM renewals r"
        " WHERE r.next_check_at <= 50 AND EXISTS (SELECT 1 FROM certificates c"
        " WHERE c.hostname = r.hostname) ORDER BY r.next_check_at LIMIT 10)"
        " ORDER BY at LIMIT 10",
        "next maintenance": "SELECT CASE WHEN EXISTS (SELECT 1 FROM unplanned_certificates)"
        " THEN 0 ELSE (SELECT r.next_check_at FROM renewals r WHERE EXISTS"
        " (SELECT 1 FROM certificates c WHERE c.hostname = r.hostname)"
        " ORDER BY r.next_check_at LIMIT 1) END",
        "events by host": "SELECT id FROM events WHERE hostname = 'h5.test'"
        " ORDER BY id DESC LIMIT 100",
        "events after": "SELECT id FROM events WHERE id > 5 ORDER BY id LIMIT 500",
        "soonest expiry": "SELECT hostname FROM certificates ORDER BY not_after LIMIT 5",
    }
    for what, sql in queries.items():
        plan = postgres.psql(f"EXPLAIN {sql}", database)
        for table in ("domains", "certificates", "renewals", "events"):
            assert f"Seq Scan on {table}" not in plan, f"{what}:\n{plan}"
    # keyset order is byte order whatever the database's locale
    collations = postgres.psql(
        "SELECT DISTINCT collation_name FROM information_schema.columns"
        " WHERE column_name = 'hostname' AND table_schema = 'public'",
        database,
    ).split()
    assert collations == ["C"]


# -- followers ---------------------------------------------------------------------------------


async def test_state_sync_applies_another_nodes_change_without_waiting_its_interval(
    postgres: PostgresServer, database: str, store: Store
) -> None:
    """The follower's interval is an hour: only the pushed notification can wake it."""
    from proxy.hosts.state_sync import StateSync

    await store.add_domain("a.test", "acct")
    reader = await open_store(postgres.url(database), KEY)
    forgotten: asyncio.Queue[str] = asyncio.Queue()
    sync = StateSync(reader, forgotten.put_nowait, interval=3600)
    await sync.start()
    follower = asyncio.create_task(sync.run_forever())
    try:
        await asyncio.sleep(0.2)  # typically parked in wait_for_events by now (not required)
        assert await store.transition_domain(
            "a.test", [DomainState.PENDING], DomainState.SUSPENDED, "op"
        )
        assert await guarded(forgotten.get()) == "a.test"
        assert sync.is_suspended("a.test")
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        await reader.close()
