"""Listing stays an index range scan with 100,000 hosts (keyset pagination).

Proven without timing assertions: the query plan of every page query is a search on
an index with no sort step, and walking all 100k hosts page by page returns each once.
Timings are measured by tests/benchmarks/bench_pagination.py.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import aiohttp
import pytest
from support.edge import ADMIN_TOKEN, EdgeHandle, enable_admin

from certstore import DomainState, open_store

HOSTS = 100_000


def bulk_insert(path: Path, count: int) -> list[str]:
    """100k registered hosts in one transaction (add_domain one by one takes minutes)."""
    names = [f"links.shop{i:06d}.test" for i in range(count)]
    states = ["pending", "active", "verified", "suspended"]
    db = sqlite3.connect(path)
    with db:
        db.executemany(
            "INSERT INTO domains (hostname, account, state, created_at, state_changed_at,"
            " next_check_at) VALUES (?, ?, ?, 0, 0, ?)",
            ((n, f"acct{i % 50}", states[i % 4], float(i)) for i, n in enumerate(names)),
        )
    db.close()
    return names


PAGE_QUERIES = [
    ("SELECT hostname FROM domains WHERE hostname > ? ORDER BY hostname LIMIT 100", ("",)),
    (
        "SELECT hostname FROM domains WHERE hostname > ? AND account = ?"
        " ORDER BY hostname LIMIT 100",
        ("links.shop050000.test", "acct7"),
    ),
    (
        "SELECT hostname FROM domains WHERE hostname > ? AND state = ? ORDER BY hostname LIMIT 100",
        ("links.shop050000.test", "active"),
    ),
    (
        "SELECT hostname FROM domains WHERE next_check_at IS NOT NULL AND next_check_at <= ?"
        " ORDER BY next_check_at LIMIT 100",
        (5000.0,),
    ),
]


async def test_100k_hosts_page_by_index(tmp_path: Path) -> None:
    key = os.urandom(32)
    path = tmp_path / "big.db"
    await (await open_store(path, key)).close()  # creates and migrates the schema
    names = bulk_insert(path, HOSTS)

    db = sqlite3.connect(path)
    for sql, args in PAGE_QUERIES:
        plan = " | ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, args))
        assert "USING" in plan and "INDEX" in plan, plan  # a search, not a table scan
        assert "TEMP B-TREE" not in plan, plan  # no sort of the whole table per page
        assert not plan.startswith("SCAN domains"), plan
    db.close()

    store = await open_store(path, key)
    try:
        seen: list[str] = []
        after = None
        while True:
            page = await store.list_domains_page(after=after, limit=1000)
            seen += [d.hostname for d in page]
            if len(page) < 1000:
                break
            after = page[-1].hostname
        assert seen == names  # every host once, in order
        deep = await store.list_domains_page(
            after="links.shop099000.test", limit=5, state=DomainState.ACTIVE, account="acct1"
        )
        # active is i % 4 == 1 and acct1 is i % 50 == 1: i % 100 == 1
        assert [d.hostname for d in deep] == [
            f"links.shop{i:06d}.test" for i in range(99001, 99500, 100)
        ]
        assert len(await store.due_for_check(10_000.0, 100)) == 100
    finally:
        await store.close()


@pytest.fixture
async def admin(edge_config: EdgeHandle, tmp_path: Path):
    base = enable_admin(edge_config, tmp_path)
    await edge_config.start()  # migrates the store
    yield edge_config, base
    await edge_config.stop()


async def test_api_lists_deep_pages_of_100k(admin) -> None:
    edge, base = admin
    names = bulk_insert(Path(edge.config.store.path), HOSTS)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(base_url=base, headers=headers) as api:
        async with api.get("/v1/hosts", params={"limit": "1000", "after": names[98_999]}) as r:
            assert r.status == 200
            page = await r.json()
        assert [h["hostname"] for h in page["hosts"]] == names[99_000:]
        assert page["next"] is None
        async with api.get("/status") as r:  # the status page's counts and first page
            assert r.status == 200
            text = await r.text()
        assert "all 100000" in text and "active 25000" in text and "Next page" in text
