"""Issue 2, scenario 8 (no private key in clear at rest) and the SQLite backend's own
tests (schema migrations, key text). What every backend must do is in
tests/test_store_contract.py."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from support.clicks import certify, edge_store
from support.edge import EdgeHandle

from certstore import (
    DomainState,
    Sealer,
    Store,
    StoreError,
    StoreKeyError,
    generate_key_text,
    open_store,
)
from certstore import sqlite as sqlite_store
from certstore.crypto import parse_key_text
from certstore.schema import SCHEMA_VERSION
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer


def db_bytes(path: str) -> bytes:
    """Everything SQLite has on disk for this store: the main file and its WAL."""
    data = b""
    for suffix in ("", "-wal", "-journal"):
        p = Path(path + suffix)
        if p.exists():
            data += p.read_bytes()
    return data


def private_scalar(key_pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key.private_numbers().private_value.to_bytes(32, "big")


def pem_body_lines(pem: bytes) -> list[bytes]:
    return [line for line in pem.splitlines() if line and not line.startswith(b"-----")]


# -- scenario 8: after a real issuance -----------------------------------------------------


async def test_no_private_key_in_clear_on_disk(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    host = await certify(edge, pebble, dns_server)
    path = edge.config.store.path
    async with edge_store(edge) as store:
        cert = await store.get_certificate(host)
        account = await store.get_account(edge.config.acme.directory)
    assert cert is not None and account is not None

    raw = db_bytes(path)
    # sanity: we are looking at the right bytes (the public chain is stored in clear)
    assert b"BEGIN CERTIFICATE" in raw
    assert host.encode() in raw
    assert b"PRIVATE KEY" not in raw
    for key_pem in (cert.key_pem, account.key_pem):
        assert b"PRIVATE KEY" in key_pem  # what the store handed back is a real key
        assert private_scalar(key_pem) not in raw
        assert not any(line in raw for line in pem_body_lines(key_pem))
        assert serialization.load_pem_private_key(key_pem, password=None).public_key()
    # the key is the certificate's key
    leaf = x509.load_pem_x509_certificates(cert.chain_pem)[0]
    assert (
        leaf.public_key()
        == serialization.load_pem_private_key(cert.key_pem, password=None).public_key()
    )
    assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600

    # the sealed blob opens with the right key and this row's context only
    with sqlite3.connect(path) as db:
        (sealed,) = db.execute(
            "SELECT key_sealed FROM certificates WHERE hostname = ?", (host,)
        ).fetchone()
    right = Sealer(parse_key_text(edge.key_text, "test"))
    assert right.open(sealed, f"cert:{host}") == cert.key_pem
    with pytest.raises(StoreKeyError):
        right.open(sealed, "cert:some-other.host.test")  # copied to another row: refused
    wrong = Sealer(parse_key_text(generate_key_text(), "test"))
    with pytest.raises(StoreKeyError):
        wrong.open(sealed, f"cert:{host}")
    with pytest.raises(StoreKeyError):
        await open_store(path, parse_key_text(generate_key_text(), "test"))


# -- the SQLite backend's own tests ------------------------------------------------------


@pytest.fixture
def key() -> bytes:
    return parse_key_text(generate_key_text(), "test")


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


async def test_migrations_on_fresh_file_and_reopen(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "sub" / "fresh.db"
    s = await open_store(path, key)
    await s.add_domain("links.shop.test", "acct")
    await s.close()
    assert user_version(path) == SCHEMA_VERSION >= 1
    assert {"meta", "domains", "acme_accounts", "certificates", "challenges", "leases"} <= tables(
        path
    )
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    s = await open_store(path, key)  # reopening migrates nothing and keeps data
    try:
        domain = await s.get_domain("links.shop.test")
    finally:
        await s.close()
    assert domain is not None and domain.state is DomainState.PENDING
    assert user_version(path) == SCHEMA_VERSION


async def test_newer_schema_is_refused(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "future.db"
    s = await open_store(path, key)
    await s.close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this linkedge"):
        await open_store(path, key)


def test_key_text_validation() -> None:
    with pytest.raises(StoreKeyError, match="base64"):
        parse_key_text("***", "test")
    with pytest.raises(StoreKeyError, match="32 bytes"):
        parse_key_text("AAAA", "test")
    assert len(parse_key_text(generate_key_text() + "\n", "test")) == 32


# -- following the event log on SQLite -----------------------------------------------------


class _CountedReads:
    """A store's `last_event_id`, counted (what `wait_for_events` reads the newest id with)."""

    def __init__(self, store: Store) -> None:
        self.reads = 0
        self._read = store.last_event_id
        store.last_event_id = self  # type: ignore[method-assign]

    async def __call__(self) -> int:
        self.reads += 1
        return await self._read()


async def test_an_idle_follower_reads_the_newest_event_only_when_the_files_change(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`wait_for_events` looks every 0.1 s, but reads the newest id only when the store's
    files changed (here: never by its own recheck, pushed out of reach)."""
    path = tmp_path / "follow.db"
    follower, writer = await open_store(path, key), await open_store(path, key)
    try:
        await writer.record_event(None, "first", "-")
        cursor = await follower.last_event_id()
        counted = _CountedReads(follower)
        monkeypatch.setattr(sqlite_store, "_WAIT_RECHECK", 3600.0)
        await follower.wait_for_events(cursor, 0.6)  # six looks, nothing new
        assert counted.reads == 1
        for round_ in range(3):  # another connection's commit is noticed by its files
            woken = asyncio.create_task(follower.wait_for_events(cursor, 3600))
            await asyncio.sleep(0.25)  # typically parked by now (not required)
            await writer.record_event(f"r{round_}.test", "follow", "-")
            await asyncio.wait_for(woken, 60)
            cursor = await writer.last_event_id()
        assert counted.reads <= 1 + 3 * 2
        await follower.wait_for_events(cursor, 0.6)  # quiet again: no read
        assert counted.reads <= 1 + 3 * 2 + 1
    finally:
        await follower.close()
        await writer.close()


async def test_a_commit_the_files_do_not_show_is_read_at_the_recheck(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "recheck.db"
    follower, writer = await open_store(path, key), await open_store(path, key)
    try:
        cursor = await follower.last_event_id()
        # the rare commit within the clock tick of a look: the files look the same
        monkeypatch.setattr(sqlite_store._FileState, "look", lambda _self: ("same",))
        monkeypatch.setattr(sqlite_store, "_WAIT_RECHECK", 0.3)
        await follower.wait_for_events(cursor, 0.2)  # read once: the files' state kept
        waiting = asyncio.create_task(follower.wait_for_events(cursor, 3600))
        await writer.record_event("late.test", "follow", "-")
        await asyncio.wait_for(waiting, 60)
        assert [e.hostname for e in await follower.events_after(cursor)] == ["late.test"]
    finally:
        await follower.close()
        await writer.close()
