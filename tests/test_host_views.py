"""The host_files table, its events, and the per-worker cache of hosts (real SQLite)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from certstore import DomainState, Store, open_store
from proxy.hosts.association_files import APPLE, etag
from proxy.hosts.state_sync import StateSync
from proxy.http.host_views import CHANGE_EVENTS, HostViews

HOST = "links.views.test"


@pytest.fixture
async def store(tmp_path: Path):
    s = await open_store(tmp_path / "s.db", os.urandom(32))
    yield s
    await s.close()


class CountingStore:
    """The real store, with a count of reads and an optional gate on certificate_validity."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.reads: dict[str, int] = {}
        self.gate: asyncio.Event | None = None

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.store, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.reads[name] = self.reads.get(name, 0) + 1
            if name == "certificate_validity" and self.gate is not None:
                await self.gate.wait()
            return await method(*args, **kwargs)

        return counted


async def kinds_after(store: Store, cursor: int) -> list[tuple[str | None, str, str]]:
    return [(e.hostname, e.kind, e.detail) for e in await store.events_after(cursor)]


async def test_host_files_round_trip_and_every_write_is_an_event(store: Store) -> None:
    await store.add_domain(HOST, "acct")
    cursor = await store.last_event_id()
    v1 = b'{"applinks": {"details": []}}'
    stored = await store.put_host_file(HOST, APPLE, v1, etag(v1))
    assert (stored.content, stored.etag) == (v1, etag(v1))
    assert await store.get_host_file(HOST, APPLE) == stored
    assert await store.get_host_file(HOST, "assetlinks.json") is None
    v2 = b"[]"
    await store.put_host_file(HOST, APPLE, v2, etag(v2))
    await store.put_host_file(HOST, "assetlinks.json", v2, etag(v2))
    assert [f.kind for f in await store.list_host_files(HOST)] == [APPLE, "assetlinks.json"]
    assert (await store.get_host_file(HOST, APPLE)).content == v2  # type: ignore[union-attr]
    assert await store.delete_host_file(HOST, APPLE) is True
    assert await store.delete_host_file(HOST, APPLE) is False
    await store.put_options(HOST, {"hsts_max_age": 60, "https_upgrade": True})
    assert await kinds_after(store, cursor) == [
        (HOST, "file_updated", f"{APPLE}: {len(v1)} bytes, ETag {etag(v1)}"),
        (HOST, "file_updated", f"{APPLE}: 2 bytes, ETag {etag(v2)}"),
        (HOST, "file_updated", f"assetlinks.json: 2 bytes, ETag {etag(v2)}"),
        (HOST, "file_deleted", APPLE),
        (HOST, "options_changed", '{"hsts_max_age": 60, "https_upgrade": true}'),
    ]
    cursor = await store.last_event_id()
    await store.remove_domain(HOST)  # takes its files with it
    assert await store.list_host_files(HOST) == []
    assert [k for _h, k, _d in await kinds_after(store, cursor)] == ["file_deleted", "removed"]


async def test_one_store_read_per_host_however_many_requests(store: Store) -> None:
    await store.add_domain(HOST, "acct")
    counting = CountingStore(store)
    views = HostViews(counting)  # type: ignore[arg-type]
    results = await asyncio.gather(*(views.get(HOST) for _ in range(50)))
    assert {r.hostname for r in results if r is not None} == {HOST}
    assert counting.reads["get_domain"] == 1
    for _ in range(10):
        assert await views.get(HOST) is results[0]
        assert await views.get("links.unknown.test") is None
    assert counting.reads["get_domain"] == 2  # the host once, the unknown name once
    assert views.store_reads == 2


async def test_a_load_overtaken_by_a_change_is_not_kept(store: Store) -> None:
    await store.add_domain(HOST, "acct")
    counting = CountingStore(store)
    counting.gate = asyncio.Event()
    views = HostViews(counting)  # type: ignore[arg-type]
    first = asyncio.ensure_future(views.get(HOST))
    while counting.reads.get("certificate_validity", 0) == 0:  # options read, still loading
        await asyncio.sleep(0)
    await store.put_options(HOST, {"hsts_max_age": 300, "https_upgrade": False})
    views.forget(HOST)  # what state_sync does when it sees options_changed
    counting.gate.set()
    stale = await first  # answers its own request with what it read...
    assert stale is not None and stale.hsts_max_age is None
    view = await views.get(HOST)  # ...but is not kept: the next request reads the store again
    assert view is not None and view.hsts_max_age == 300
    assert counting.reads["get_domain"] == 2


async def test_unknown_names_are_forgotten_when_registered_and_bounded(
    store: Store,
) -> None:
    views = HostViews(store, max_unknown=3)
    assert await views.get(HOST) is None
    await store.add_domain(HOST, "acct")
    assert await views.get(HOST) is None  # remembered as unknown...
    views.forget(HOST)  # ...until the "registered" event arrives
    assert (await views.get(HOST)) is not None
    for i in range(5):
        assert await views.get(f"links.flood{i}.test") is None
    assert views.peek(HOST) is not None  # a flood of unknown names never evicts a host
    assert len(views._unknown) == 3


async def test_hosts_and_file_bytes_are_bounded(store: Store) -> None:
    body = b'{"applinks": {"details": []}}' + b" " * 1000
    for i in range(4):
        await store.add_domain(f"links.h{i}.test", "acct")
        await store.put_host_file(f"links.h{i}.test", APPLE, body, etag(body))
    views = HostViews(store, max_hosts=3, max_file_bytes=2 * len(body))
    for i in range(4):
        assert await views.get(f"links.h{i}.test") is not None
        found = await views.file(f"links.h{i}.test", APPLE)
        assert found is not None and found.content == body
    assert len(views) <= 2  # the byte budget holds two files, the oldest hosts went first
    assert views.peek("links.h3.test") is not None and views.peek("links.h0.test") is None
    assert views._file_bytes == sum(e.file_bytes for e in views._entries.values())


async def test_state_sync_drops_changed_hosts_from_another_process(
    tmp_path: Path,
) -> None:
    key = os.urandom(32)
    writer = await open_store(tmp_path / "s.db", key)  # the admin worker
    reader = await open_store(tmp_path / "s.db", key)  # another worker
    try:
        await writer.add_domain(HOST, "acct")
        views = HostViews(reader)
        sync = StateSync(reader, lambda _h: None)
        sync.follow(CHANGE_EVENTS, views.forget)
        await sync.start()
        v1 = b'{"applinks": {"details": []}}'
        await writer.put_host_file(HOST, APPLE, v1, etag(v1))
        assert await views.get(HOST) is not None
        assert (await views.file(HOST, APPLE)).content == v1  # type: ignore[union-attr]
        reads = views.store_reads

        v2 = b'{"applinks": {"details": [ ]}}'
        await writer.put_host_file(HOST, APPLE, v2, etag(v2))
        await writer.put_options(HOST, {"hsts_max_age": 60, "https_upgrade": True})
        await writer.transition_domain(HOST, list(DomainState), DomainState.SUSPENDED, "operator")
        assert (await views.file(HOST, APPLE)).content == v1  # type: ignore[union-attr]
        assert views.store_reads == reads  # memory only until the feed says otherwise
        assert await sync.poll() == 4  # both uploads, the options, the suspension
        view = await views.get(HOST)
        assert view is not None and view.suspended and view.hsts_max_age == 60
        assert (await views.file(HOST, APPLE)).content == v2  # type: ignore[union-attr]

        await writer.delete_host_file(HOST, APPLE)
        await sync.poll()
        await views.get(HOST)
        assert await views.file(HOST, APPLE) is None
    finally:
        await writer.close()
        await reader.close()
