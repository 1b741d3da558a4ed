"""Issue 2, scenario 8 (no private key in clear at rest) and unit tests of certstore."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest
from conftest import EdgeHandle
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from helpers_edge import certify, edge_store

from certstore import (
    AcmeAccount,
    DomainExists,
    DomainState,
    SecretBox,
    SQLiteStore,
    StoredCertificate,
    StoreError,
    StoreKeyError,
    generate_key_text,
)
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
    right = SecretBox(parse_key_text(edge.key_text, "test"))
    assert right.open(sealed, f"cert:{host}") == cert.key_pem
    with pytest.raises(StoreKeyError):
        right.open(sealed, "cert:some-other.host.test")  # copied to another row: refused
    wrong = SecretBox(parse_key_text(generate_key_text(), "test"))
    with pytest.raises(StoreKeyError):
        wrong.open(sealed, f"cert:{host}")
    with pytest.raises(StoreKeyError):
        await SQLiteStore.open(path, parse_key_text(generate_key_text(), "test"))


# -- unit tests ------------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def key() -> bytes:
    return parse_key_text(generate_key_text(), "test")


@pytest.fixture
async def store(tmp_path: Path, key: bytes):
    clock = Clock()
    s = await SQLiteStore.open(tmp_path / "s.db", key, clock=clock)
    s.test_clock = clock  # type: ignore[attr-defined]
    yield s
    await s.close()


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


async def test_migrations_on_fresh_file_and_reopen(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "sub" / "fresh.db"
    s = await SQLiteStore.open(path, key)
    await s.add_domain("links.shop.test", "acct")
    await s.close()
    assert user_version(path) == SCHEMA_VERSION >= 1
    assert {"meta", "domains", "acme_accounts", "certificates", "challenges", "leases"} <= tables(
        path
    )
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    s = await SQLiteStore.open(path, key)  # reopening migrates nothing and keeps data
    try:
        domain = await s.get_domain("links.shop.test")
    finally:
        await s.close()
    assert domain is not None and domain.state is DomainState.PENDING
    assert user_version(path) == SCHEMA_VERSION


async def test_newer_schema_is_refused(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "future.db"
    s = await SQLiteStore.open(path, key)
    await s.close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this linkedge"):
        await SQLiteStore.open(path, key)


async def test_wrong_key_is_refused_at_open(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "k.db"
    s = await SQLiteStore.open(path, key)
    await s.close()
    with pytest.raises(StoreKeyError, match="does not match"):
        await SQLiteStore.open(path, parse_key_text(generate_key_text(), "test"))
    s = await SQLiteStore.open(path, key)  # still fine with the right one
    await s.close()


def test_key_text_validation() -> None:
    with pytest.raises(StoreKeyError, match="base64"):
        parse_key_text("***", "test")
    with pytest.raises(StoreKeyError, match="32 bytes"):
        parse_key_text("AAAA", "test")
    assert len(parse_key_text(generate_key_text() + "\n", "test")) == 32


async def test_leases(store: SQLiteStore) -> None:
    clock: Clock = store.test_clock  # type: ignore[attr-defined]
    assert await store.try_acquire_lease("issue:a.test", "w1", ttl=10)
    assert not await store.try_acquire_lease("issue:a.test", "w2", ttl=10)
    assert await store.try_acquire_lease("issue:b.test", "w2", ttl=10)  # per name
    clock.now += 5
    assert await store.try_acquire_lease("issue:a.test", "w1", ttl=10)  # renew: until +15
    clock.now += 9  # past the first expiry, before the renewed one
    assert not await store.try_acquire_lease("issue:a.test", "w2", ttl=10)
    await store.release_lease("issue:a.test", "w2")  # not the holder: no effect
    assert not await store.try_acquire_lease("issue:a.test", "w2", ttl=10)
    clock.now += 1.5  # expired
    assert await store.try_acquire_lease("issue:a.test", "w2", ttl=10)
    assert not await store.try_acquire_lease("issue:a.test", "w1", ttl=10)
    await store.release_lease("issue:a.test", "w2")
    assert await store.try_acquire_lease("issue:a.test", "w1", ttl=10)


async def test_challenges(store: SQLiteStore) -> None:
    assert await store.get_challenge("tok") is None
    await store.put_challenge("tok", "tok.thumb", "a.test")
    assert await store.get_challenge("tok") == "tok.thumb"
    await store.put_challenge("tok", "tok.thumb2", "a.test")  # replace
    assert await store.get_challenge("tok") == "tok.thumb2"
    await store.delete_challenge("tok")
    assert await store.get_challenge("tok") is None
    await store.delete_challenge("tok")  # idempotent


async def test_domains(store: SQLiteStore) -> None:
    clock: Clock = store.test_clock  # type: ignore[attr-defined]
    domain = await store.add_domain("a.shop.test", "acct1")
    assert domain.state is DomainState.PENDING and domain.created_at == clock.now
    assert not domain.may_issue
    with pytest.raises(DomainExists):
        await store.add_domain("a.shop.test", "acct2")
    assert (await store.get_domain("a.shop.test")).account == "acct1"  # type: ignore[union-attr]

    clock.now += 1
    await store.record_check(
        "a.shop.test",
        state=DomainState.VERIFIED,
        cname_target_seen="edge.test",
        reason="ok",
        verified=True,
    )
    clock.now += 1
    await store.record_check(
        "a.shop.test",
        state=DomainState.PENDING,
        cname_target_seen=None,
        reason="gone",
        verified=False,
    )
    d = await store.get_domain("a.shop.test")
    assert d is not None
    assert d.verified_at == clock.now - 1  # not overwritten by a failed check
    assert d.last_check_at == clock.now and d.last_check_reason == "gone"

    await store.put_certificate(
        StoredCertificate("a.shop.test", b"chain", b"secret", ("a.shop.test",), 0, 1e12, "ca", 0)
    )
    await store.put_challenge("t1", "ka", "a.shop.test")
    assert [x.hostname for x in await store.list_domains()] == ["a.shop.test"]
    assert await store.remove_domain("a.shop.test")
    assert await store.get_domain("a.shop.test") is None
    assert await store.get_certificate("a.shop.test") is None
    assert await store.get_challenge("t1") is None
    assert not await store.remove_domain("a.shop.test")


async def test_certificate_and_account_round_trip(store: SQLiteStore) -> None:
    cert = StoredCertificate("c.test", b"chain", b"key-1", ("c.test",), 10, 20, "ca", 5)
    await store.put_certificate(cert)
    got = await store.get_certificate("c.test")
    assert got == cert
    assert "key-1" not in repr(got)
    await store.put_certificate(
        StoredCertificate("c.test", b"chain2", b"key-2", ("c.test",), 15, 25, "ca", 6)
    )
    got = await store.get_certificate("c.test")
    assert got is not None and got.key_pem == b"key-2" and got.not_after == 25
    assert got.is_valid_at(15) and not got.is_valid_at(25)

    await store.save_account(AcmeAccount("https://ca/dir", "https://ca/acct/1", b"acct-key"))
    account = await store.get_account("https://ca/dir")
    assert account == AcmeAccount("https://ca/dir", "https://ca/acct/1", b"acct-key")
    assert await store.get_account("https://other/dir") is None


async def test_events_newest_first(store: SQLiteStore) -> None:
    clock: Clock = store.test_clock  # type: ignore[attr-defined]
    for i, kind in enumerate(["one", "two", "three"]):
        clock.now += 1
        await store.record_event("e.test" if i != 1 else "f.test", kind, f"d{i}")
    await store.record_event(None, "global", "-")
    assert [e.kind for e in await store.list_events("e.test")] == ["three", "one"]
    events = await store.list_events()
    assert [e.kind for e in events] == ["global", "three", "two", "one"]
    assert [e.id for e in events] == sorted((e.id for e in events), reverse=True)
    assert [e.kind for e in await store.list_events(limit=2)] == ["global", "three"]
