"""`linkedge store migrate`: a faithful, idempotent, resumable and verified copy of a store.

Run as an operator runs it (the command in a subprocess), into SQLite and into a real
PostgreSQL; every record of the source is compared with the target's through the ports.
"""

from __future__ import annotations

import asyncio
import os
import pty
import select
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.net import free_port
from support.postgres import PostgresServer

from certstore import (
    AcmeAccount,
    CaBreakerState,
    DomainState,
    HostBackoff,
    PendingOrder,
    RenewalPlan,
    Store,
    StoredCertificate,
    StoreKeyError,
    generate_key_text,
    open_store,
)
from certstore.crypto import parse_key_text
from certstore.schema import SCHEMA_VERSION
from certstore.transfer import PAGE
from proxy.app.cli import main

S = DomainState
ACCOUNTS = (
    AcmeAccount("https://ca-a.test/dir", "https://ca-a.test/acct/1", b"ACCOUNT-KEY-A-secret"),
    AcmeAccount("https://ca-b.test/dir", "https://ca-b.test/acct/7", b"ACCOUNT-KEY-B-secret"),
)


class Clock:
    """Times like time.time()'s (fractions), moving on between writes."""

    def __init__(self) -> None:
        self.now = 1764489600.123456

    def __call__(self) -> float:
        self.now += 1.375001
        return self.now


@dataclass
class Site:
    """A source store on disk and the environment that makes it the configured store."""

    tmp: Path
    key_text: str

    @property
    def db(self) -> Path:
        return self.tmp / "source.db"

    @property
    def key(self) -> bytes:
        return parse_key_text(self.key_text, "test")

    @property
    def env(self) -> dict[str, str]:
        key_file = self.tmp / "store.key"
        if not key_file.exists():
            key_file.write_text(self.key_text)
        return {
            "LINKEDGE_STORE_PATH": str(self.db),
            "LINKEDGE_STORE_URL": "",
            "LINKEDGE_STORE_KEY_FILE": str(key_file),
            "LINKEDGE_STORE_KEY_ENV": "",
        }

    async def open(self) -> Store:
        return await open_store(self.db, self.key)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path, generate_key_text())


@pytest.fixture
async def source(site: Site) -> AsyncIterator[Store]:
    store = await open_store(site.db, site.key, clock=Clock())
    await fill(store)
    yield store
    await store.close()


def cert(host: str, serial: str, key: bytes) -> StoredCertificate:
    chain = b"-----BEGIN CERTIFICATE-----\n" + host.encode() * 20 + b"\n-----END CERTIFICATE-----\n"
    return StoredCertificate(
        host, chain, key, (host, f"www.{host}"), 1764000000.5, 1771776000.25, "Test CA",
        1764000001.75, serial, "https://ca-a.test/dir",
    )  # fmt: skip


async def fill(store: Store) -> None:
    """One host in every state, each with the records its history leaves, plus what a
    copy must leave behind (challenges, leases, rate log, breakers, events, cursors)."""
    for account in ACCOUNTS:
        await store.save_account(account)

    await store.add_domain("pending.shop.test", "acct-1")
    await store.update_checks(
        "pending.shop.test", report={"cname": "missing"}, reason="no CNAME yet", passed=False,
        next_check_at=1764490000.5,
    )  # fmt: skip

    await store.add_domain("verified.shop.test", "acct-1")
    await store.update_checks(
        "verified.shop.test", report={"cname": "ok"}, reason="cname ok", passed=True,
        cname_target_seen="edge.linkedge.test",
    )  # fmt: skip
    await store.transition_domain("verified.shop.test", [S.PENDING], S.VERIFIED, "cname ok")
    # an order in flight, no certificate yet
    await store.put_pending_order(
        PendingOrder(
            "verified.shop.test", "https://ca-a.test/dir", "https://ca-a.test/order/1",
            "https://ca-a.test/acct/1", b"ORDER-KEY-1-secret", ("verified.shop.test",),
            1764489700.25,
        )
    )  # fmt: skip

    for host, owner in (("active.shop.test", "acct-2"), ("xn--bcher-kva.shop.test", "acct-2")):
        await store.add_domain(host, owner)
        await store.transition_domain(host, [S.PENDING], S.VERIFIED, "cname ok")
        await store.put_certificate(cert(host, f"0a{len(host)}", f"CERT-KEY-{host}".encode()))
        await store.transition_domain(host, [S.VERIFIED], S.ACTIVE, "certificate issued")
        await store.put_renewal(RenewalPlan(host, 1769000000.5, 1764500000.25, "ari", "ARI 503"))
        await store.put_options(host, {"hsts_max_age": 31536000, "https_upgrade": True})
        await store.put_host_file(host, "assetlinks.json", b'[{"relation": []}]', '"etag-al"')
        await store.put_host_file(
            host, "apple-app-site-association", b'{"applinks": {}}', '"etag-aasa"'
        )
    # a renewal under way: certificate, plan, backoff and a new order at once
    await store.put_backoff(HostBackoff("active.shop.test", 2, 1764493600.5, "rateLimited"))
    await store.put_pending_order(
        PendingOrder(
            "active.shop.test", "https://ca-b.test/dir", "https://ca-b.test/order/9",
            "https://ca-b.test/acct/7", b"ORDER-KEY-2-secret", ("active.shop.test",),
            1764489800.5,
        )
    )  # fmt: skip

    await store.add_domain("failed.shop.test", "acct-3")
    await store.transition_domain("failed.shop.test", [S.PENDING], S.VERIFIED, "cname ok")
    await store.transition_domain("failed.shop.test", [S.VERIFIED], S.FAILED, "CAA forbids")
    await store.put_backoff(HostBackoff("failed.shop.test", 5, 1764600000.0, "caa"))

    await store.add_domain("suspended.shop.test", "acct-3")
    await store.put_certificate(cert("suspended.shop.test", "0b", b"CERT-KEY-S"))
    await store.transition_domain(
        "suspended.shop.test", [S.PENDING], S.SUSPENDED, "abuse report", next_check_at=None
    )
    await store.put_options("suspended.shop.test", {"hsts_max_age": 0})

    await store.add_domain("moved.shop.test", "acct-3")
    await store.put_certificate(cert("moved.shop.test", "0c", b"CERT-KEY-M"))
    await store.transition_domain("moved.shop.test", [S.PENDING], S.MOVED, "CNAME elsewhere")

    # what a copy leaves behind
    await store.put_challenge("token-1", "token-1.thumb", "verified.shop.test")
    await store.put_alpn_challenge("verified.shop.test", "ka")
    assert await store.try_acquire_lease("order:verified.shop.test", "worker-1", 3600)
    assert await store.take_rate_token("orders:acct-1", 10, 3600) is not None
    await store.put_ca_breaker(CaBreakerState("https://ca-a.test/dir", "open", 3, 1.0, 2.0, "x"))
    await store.record_event("active.shop.test", "issued", "serial 0a")
    await store.put_meta("webhooks.cursor", "5")


async def assert_same(source: Store, target: Store) -> int:
    """Every copied record of the source is in the target, equal field for field; the
    number of hosts compared."""
    domains = await source.list_domains()
    assert await target.list_domains() == domains
    assert await target.list_accounts() == await source.list_accounts()

    async def same_records(host: str) -> None:
        for read in ("get_options", "list_host_files", "get_certificate", "get_renewal",
                     "get_backoff", "get_pending_order"):  # fmt: skip
            have, want = await asyncio.gather(
                getattr(target, read)(host), getattr(source, read)(host)
            )
            assert have == want, (host, read)

    for start in range(0, len(domains), 50):
        await asyncio.gather(*(same_records(d.hostname) for d in domains[start : start + 50]))
    return len(domains)


async def assert_nothing_transient(target: Store, hosts: int) -> None:
    assert await target.get_challenge("token-1") is None
    assert await target.get_alpn_challenge("verified.shop.test") is None
    assert await target.try_acquire_lease("order:verified.shop.test", "someone-else", 5)
    assert (await target.rate_usage("orders:acct-1", 3600))[0] == 0
    assert await target.get_ca_breaker("https://ca-a.test/dir") is None
    assert await target.get_meta("webhooks.cursor") is None
    events = await target.events_after(0, limit=10_000)
    kinds = {e.kind for e in events}
    # the target's own log: each host announced once, its options and files as written
    assert kinds <= {"registered", "options_changed", "file_updated"}, kinds
    assert sum(e.kind == "registered" for e in events) == hosts


async def migrate(
    site: Site, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "proxy.app.cli", "store", "migrate", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **site.env, **(env or {})},
    )


async def migrate_here(
    site: Site,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    *args: str,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """The command's `main` in this process (refusals: an interpreter start proves nothing)."""
    for name, value in {**site.env, **(env or {})}.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    argv = ["store", "migrate", *args]
    code = await asyncio.to_thread(main, argv)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "verified: the target holds as many of each kind as the source" in result.stdout


def assert_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit 1 and one `linkedge: error:` line (the last on stderr), never a traceback."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("linkedge: error:"), result.stderr
    for fragment in fragments:
        assert fragment in last, last
    return last


# -- SQLite -> SQLite ---------------------------------------------------------------------


async def test_a_faithful_copy_then_nothing_to_do(site: Site, source: Store) -> None:
    target_url = f"sqlite://{site.tmp / 'target.db'}"
    first = await migrate(site, "--to", target_url)
    assert_ok(first)
    assert "7 hosts visited, 7 new" in first.stdout
    assert "2 accounts" in first.stdout and "2 pending orders" in first.stdout
    assert "hosts copied: 7/7 (100%)" in first.stderr  # not a terminal: plain lines
    target = await open_store(target_url, site.key)
    try:
        assert await assert_same(source, target) == 7
        await assert_nothing_transient(target, 7)
        last_event = await target.last_event_id()

        second = await migrate(site, "--to", target_url)
        assert_ok(second)
        assert "7 hosts visited, 0 new; written: nothing" in second.stdout
        assert await target.last_event_id() == last_event  # not one write happened
        await assert_same(source, target)

        # the source moves on; the next run brings the target along, and only that
        await source.transition_domain("pending.shop.test", [S.PENDING], S.SUSPENDED, "op")
        await source.delete_host_file("active.shop.test", "assetlinks.json")
        await source.delete_certificate("moved.shop.test")
        await source.clear_backoff("failed.shop.test")
        await source.delete_pending_order("verified.shop.test", "https://ca-a.test/order/1")
        await source.put_renewal(RenewalPlan("active.shop.test", 1.0, 2.0, "ratio"))
        await source.add_domain("late.shop.test", "acct-1")
        third = await migrate(site, "--to", target_url)
        assert_ok(third)
        assert "8 hosts visited, 1 new;" in third.stdout
        for change in (
            "1 backoffs removed", "1 certificates removed", "1 files removed", "1 hosts new",
            "1 hosts updated", "1 pending orders removed", "1 renewal plans",
        ):  # fmt: skip
            assert change in third.stdout, third.stdout
        assert await assert_same(source, target) == 8
        suspended = [e for e in await target.list_events("pending.shop.test") if e.kind == "state"]
        assert [(e.from_state, e.to_state) for e in suspended] == [("pending", "suspended")]
    finally:
        await target.close()


async def test_the_target_may_have_its_own_key(site: Site, source: Store) -> None:
    target_url = f"sqlite://{site.tmp / 'target.db'}"
    other = generate_key_text()
    (site.tmp / "target.key").write_text(other)
    assert_ok(
        await migrate(site, "--to", target_url, "--to-key-file", str(site.tmp / "target.key"))
    )
    with pytest.raises(StoreKeyError):  # sealed again with the target's key, not the source's
        await open_store(target_url, site.key)
    target = await open_store(target_url, parse_key_text(other, "t"))
    try:
        await assert_same(source, target)  # every private key opens with the new key
    finally:
        await target.close()
    raw = b"".join(p.read_bytes() for p in site.tmp.glob("target.db*"))
    for clear in (b"CERT-KEY", b"ORDER-KEY", b"ACCOUNT-KEY"):
        assert clear not in raw


async def test_a_differing_count_fails_with_the_kinds_that_differ(
    site: Site, source: Store
) -> None:
    target_path = site.tmp / "target.db"
    target_url = f"sqlite://{target_path}"
    assert_ok(await migrate(site, "--to", target_url))

    with sqlite3.connect(target_path) as db:  # behind the store's back
        db.execute("DELETE FROM host_files WHERE hostname = 'active.shop.test'")
        db.execute("DELETE FROM host_backoff")
    checked = await migrate(site, "--to", target_url, "--verify-only")
    line = assert_error(checked, "counts differ", "files 4/2", "backoffs 2/0")
    assert "hosts" not in line
    assert "files" in checked.stdout and "<- differs" in checked.stdout
    assert "copied" not in checked.stdout  # --verify-only copies nothing
    assert_ok(await migrate(site, "--to", target_url))  # a run repairs it

    target = await open_store(target_url, site.key)
    try:
        await target.add_domain("stray.shop.test", "acct-9")  # only in the target
    finally:
        await target.close()
    assert_error(await migrate(site, "--to", target_url), "hosts pending 1/2")


async def test_a_killed_copy_resumes_where_it_stopped(site: Site) -> None:
    hosts = 4 * PAGE
    store = await site.open()
    try:
        await store.save_account(ACCOUNTS[0])

        async def one(i: int) -> None:
            host = f"h{i:05d}.shop.test"
            await store.add_domain(host, f"acct-{i % 7}")
            await store.put_certificate(cert(host, f"{i:x}", b"CERT-KEY-%d" % i))
            await store.put_host_file(host, "assetlinks.json", b"[%d]" % i, f'"e{i}"')

        for start in range(0, hosts, 100):
            await asyncio.gather(*(one(i) for i in range(start, start + 100)))
    finally:
        await store.close()
    target_path = site.tmp / "target.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.app.cli", "store", "migrate", "--to", str(target_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **site.env},
    )
    try:
        # killed as soon as the first resume point is recorded: pages go in one
        # transaction each, a few hundred milliseconds apart, so several are still to come
        while not resume_point(target_path, missing="") and proc.poll() is None:
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.communicate()
    assert count_rows(target_path, "domains") < hosts, "the copy ended before it was killed"
    cursor = resume_point(target_path)
    assert cursor, "no resume point recorded"
    before = int(cursor[1:6]) + 1  # hosts up to the resume point: h00000 ... cursor

    resumed = await migrate(site, "--to", str(target_path))
    assert_ok(resumed)
    assert f"(resumed after {cursor}, {before} hosts copied before)" in resumed.stdout
    assert f": {hosts - before} hosts visited," in resumed.stdout  # only what was left
    assert f"hosts copied: {hosts}/{hosts} (100%)" in resumed.stderr
    assert resume_point(target_path) == ""  # complete: the next run starts from the top
    source, target = await site.open(), await open_store(target_path, site.key)
    try:
        assert await assert_same(source, target) == hosts
        registered = [e for e in await target.events_after(0, 100_000) if e.kind == "registered"]
        assert len(registered) == hosts  # each host announced once, however often it ran
    finally:
        await source.close()
        await target.close()


def resume_point(path: Path, missing: str | None = None) -> str:
    """The recorded resume point; `missing` when there is none yet (None: fail)."""
    if missing is not None and not path.exists():
        return missing  # not created here: sqlite3.connect would make an empty file
    try:
        with sqlite3.connect(path, timeout=10) as db:
            row = db.execute(
                "SELECT value FROM meta WHERE key LIKE 'v:migrate.cursor.%'"
            ).fetchone()
    except sqlite3.OperationalError:  # the schema is being created
        row = None
    if row is None and missing is not None:
        return missing
    assert row is not None, "no resume point recorded"
    return str(row[0])


def count_rows(path: Path, table: str) -> int:
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(path, timeout=10) as db:
            return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    except sqlite3.OperationalError:  # the schema is being created
        return 0


async def test_a_progress_bar_on_a_terminal(site: Site, source: Store) -> None:
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.app.cli", "store", "migrate", "--to",
             str(site.tmp / "target.db")],
            stdout=subprocess.PIPE, stderr=follower, env={**os.environ, **site.env},
        )  # fmt: skip
        os.close(follower)
        seen = b""
        while True:
            ready, _, _ = await asyncio.to_thread(select.select, [leader], [], [], 60)
            if not ready:
                break
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal's other side closed: the command is done
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(timeout=60) == 0
    finally:
        os.close(leader)
    assert b"\rhosts [" in seen and b"] 7/7 (100%)" in seen, seen
    assert b"hosts copied:" not in seen  # the bar, not the log lines


# -- refusals -----------------------------------------------------------------------------


async def test_clear_errors(
    site: Site, source: Store, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def migrate(site: Site, *args: str, env: dict[str, str] | None = None) -> Any:
        return await migrate_here(site, capsys, monkeypatch, *args, env=env)

    # the same store, spelt another way
    assert_error(await migrate(site, "--to", f"sqlite://{site.db}"), "same store")
    assert_error(await migrate(site, "--to", f"sqlite:{site.db}"), "same store")
    # a target sealed with another key
    other = site.tmp / "other.db"
    elsewhere = await open_store(other, parse_key_text(generate_key_text(), "t"))
    await elsewhere.close()
    assert_error(await migrate(site, "--to", str(other)), "target store", "wrong key")
    # the source with a wrong key
    wrong = site.tmp / "wrong.key"
    wrong.write_text(generate_key_text())
    with_wrong_key = {"LINKEDGE_STORE_KEY_FILE": str(wrong)}
    result = await migrate(site, "--to", str(site.tmp / "t.db"), env=with_wrong_key)
    assert_error(result, "source store", "wrong key")
    # a target written by a newer linkedge
    newer = site.tmp / "newer.db"
    with sqlite3.connect(newer) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    assert_error(await migrate(site, "--to", str(newer)), "target store", "newer", "upgrade")
    # a target that cannot be reached (its directory is a file)
    (site.tmp / "a-file").write_text("")
    assert_error(await migrate(site, "--to", str(site.tmp / "a-file" / "t.db")), "target store")
    # an unknown scheme
    assert_error(await migrate(site, "--to", "mysql://db/linkedge"), "unsupported store URL")
    # nothing was written to the source by any of these
    assert [d.hostname for d in await source.list_domains()][0] == "active.shop.test"


# -- SQLite -> PostgreSQL -----------------------------------------------------------------


async def test_into_postgresql(site: Site, source: Store, postgres: PostgresServer) -> None:
    database = postgres.create_database()
    url = postgres.url(database, with_password=False)
    password_file = site.tmp / "db.password"
    password_file.write_text(postgres.password + "\n")
    first = await migrate(site, "--to", url, "--password-file", str(password_file))
    assert_ok(first)
    assert "7 hosts visited, 7 new" in first.stdout
    assert postgres.password not in first.stdout + first.stderr
    target = await open_store(url, site.key, password=postgres.password)
    try:
        assert await assert_same(source, target) == 7
        await assert_nothing_transient(target, 7)
        last_event = await target.last_event_id()
        again = await migrate(site, "--to", url, env={"LINKEDGE_STORE_PASSWORD": postgres.password})
        assert_ok(again)
        assert "7 hosts visited, 0 new; written: nothing" in again.stdout
        assert await target.last_event_id() == last_event
    finally:
        await target.close()
    # refusals name the target and never show a password
    assert_error(
        await migrate(site, "--to", url, env={"LINKEDGE_STORE_PASSWORD": "wrong"}), "target store"
    )
    unreachable = f"postgresql://linkedge:secret-pw@127.0.0.1:{free_port()}/linkedge"
    refused = assert_error(await migrate(site, "--to", unreachable), "target store")
    assert "secret-pw" not in refused
