"""The store backends the contract suite (tests/test_store_contract.py) runs against.

A backend is a URL scheme of `certstore.open_store` plus the few things a test needs to
see from outside the interface: everything it persisted (to look for clear-text keys) and
a way to make its event log fail (to show a change and its event are one step).
PostgreSQL runs on the session's `postgres` fixture, a fresh database per test.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from certstore import Store, generate_key_text, open_store
from certstore.crypto import parse_key_text
from support.postgres import PostgresServer

BACKENDS = ["sqlite", "postgres"]


class Backend:
    name = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.key_text = generate_key_text()
        self.key = parse_key_text(self.key_text, "test")

    @property
    def url(self) -> str:
        raise NotImplementedError

    async def open(
        self, *, key: bytes | None = None, clock: Callable[[], float] = time.time
    ) -> Store:
        return await open_store(self.url, self.key if key is None else key, clock=clock)

    def persisted_bytes(self) -> bytes:
        """Everything the backend keeps at rest (files, table dumps)."""
        raise NotImplementedError

    @asynccontextmanager
    async def failing_event_log(self) -> AsyncIterator[None]:
        """While inside, every append to the event log fails (in every connection)."""
        raise NotImplementedError
        yield


class SQLiteBackend(Backend):
    name = "sqlite"

    @property
    def url(self) -> str:
        return f"sqlite://{self.workdir / 'store.db'}"  # sqlite:///abs/path

    def persisted_bytes(self) -> bytes:
        base = self.workdir / "store.db"
        return b"".join(
            p.read_bytes()
            for p in (base, Path(f"{base}-wal"), Path(f"{base}-journal"))
            if p.exists()
        )

    @asynccontextmanager
    async def failing_event_log(self) -> AsyncIterator[None]:
        path = self.workdir / "store.db"

        def ddl(sql: str) -> None:
            with sqlite3.connect(path, timeout=10) as db:
                db.execute(sql)

        ddl(
            "CREATE TRIGGER contract_events_fail BEFORE INSERT ON events"
            " BEGIN SELECT RAISE(ABORT, 'event log unavailable (injected)'); END"
        )
        try:
            yield
        finally:
            ddl("DROP TRIGGER contract_events_fail")


class PostgresBackend(Backend):
    name = "postgres"

    def __init__(self, workdir: Path, server: PostgresServer) -> None:
        super().__init__(workdir)
        self.server = server
        self.database = server.create_database()

    @property
    def url(self) -> str:
        return self.server.url(self.database)

    def persisted_bytes(self) -> bytes:
        """The database's files as the server keeps them on disk (after a checkpoint
        writes every page out), the cluster's write-ahead log and the server's log."""
        self.server.psql("CHECKPOINT", self.database)
        oid = self.server.psql(
            f"SELECT oid FROM pg_database WHERE datname = '{self.database}'"
        ).strip()
        data = self.server.datadir
        files = sorted((data / "base" / oid).iterdir()) + sorted((data / "pg_wal").glob("0*"))
        files.append(self.server.logfile)
        return b"".join(p.read_bytes() for p in files if p.is_file())

    @asynccontextmanager
    async def failing_event_log(self) -> AsyncIterator[None]:
        self.server.psql(
            "CREATE FUNCTION contract_events_fail() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'event log unavailable (injected)'; END $$;"
            " CREATE TRIGGER contract_events_fail BEFORE INSERT ON events"
            " FOR EACH ROW EXECUTE FUNCTION contract_events_fail();",
            self.database,
        )
        try:
            yield
        finally:
            self.server.psql(
                "DROP TRIGGER contract_events_fail ON events;"
                " DROP FUNCTION contract_events_fail();",
                self.database,
            )


def make_backend(name: str, workdir: Path, postgres: PostgresServer | None = None) -> Backend:
    if name == "sqlite":
        return SQLiteBackend(workdir)
    if name == "postgres":
        assert postgres is not None, "the postgres backend needs the `postgres` fixture"
        return PostgresBackend(workdir, postgres)
    raise ValueError(f"no test backend {name!r}")


# -- work done by separate processes (multiprocessing, spawn) ----------------------------


def writer_process(url: str, key_text: str, worker: int, hosts: int, bucket_limit: int) -> None:
    """One of several processes writing the same store at once (see the contract suite)."""
    asyncio.run(_writer(url, key_text, worker, hosts, bucket_limit))


async def _writer(url: str, key_text: str, worker: int, hosts: int, bucket_limit: int) -> None:
    store = await open_store(url, parse_key_text(key_text, "test"))
    try:
        for i in range(hosts):
            host = f"w{worker}-{i:03d}.shop.test"
            await store.add_domain(host, f"acct{worker}")
            await store.put_options(host, {"hsts_max_age": i, "https_upgrade": False})
            await store.take_rate_token("contract:orders", bucket_limit, 3600)
            await store.record_event(host, "contract_write", str(os.getpid()))
            # a read-modify-write under a lease: the lease must exclude the other
            # process, or increments are lost
            holder = f"worker{worker}"
            while not await store.try_acquire_lease("contract:counter", holder, 30):
                await asyncio.sleep(0.001)
            try:
                count = int(await store.get_meta("contract:counter") or "0")
                await asyncio.sleep(0)  # widen the window a lost update would need
                await store.put_meta("contract:counter", str(count + 1))
            finally:
                await store.release_lease("contract:counter", holder)
    finally:
        await store.close()
