"""The PostgreSQL the fleet tests stand on: real server, password required, restartable."""

from __future__ import annotations

import asyncpg
import pytest
from support.postgres import PostgresServer


async def test_a_database_is_reachable_with_the_password_only(postgres: PostgresServer) -> None:
    name = postgres.create_database()
    conn = await asyncpg.connect(postgres.url(name))
    try:
        assert await conn.fetchval("SELECT current_database()") == name
    finally:
        await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(postgres.url(name).replace(postgres.password, "wrong"))


async def test_data_survives_a_stop_and_start(postgres: PostgresServer) -> None:
    name = postgres.create_database()
    postgres.psql("CREATE TABLE t (v int); INSERT INTO t VALUES (7)", name)
    postgres.stop()
    with pytest.raises(OSError):
        await asyncpg.connect(postgres.url(name), timeout=5)
    postgres.start()
    assert postgres.psql("SELECT v FROM t", name).strip() == "7"
