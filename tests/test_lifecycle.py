"""Lifecycle rules, the schedule and the store's transition log (unit level, real SQLite)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from certstore import DomainState, Store, open_store
from proxy.hosts.checks import CheckReport, CheckResult, CheckState
from proxy.hosts.lifecycle import ALLOWED, InvalidTransition, Lifecycle, decide
from proxy.hosts.schedule import Schedule

S = DomainState


def report(cname: CheckState, caa: CheckState = CheckState.PASS) -> CheckReport:
    return CheckReport(
        "links.shop.test",
        0.0,
        (
            CheckResult("cname", cname, "x", f"cname is {cname}"),
            CheckResult("caa", caa, "x", f"caa is {caa}"),
        ),
    )


@pytest.mark.parametrize(
    ("current", "cname", "caa", "cert", "expected"),
    [
        (S.PENDING, CheckState.PASS, CheckState.PASS, False, S.VERIFIED),
        (S.PENDING, CheckState.WARN, CheckState.PASS, False, S.VERIFIED),  # A records to us
        (S.PENDING, CheckState.PASS, CheckState.UNKNOWN, False, S.VERIFIED),  # CA decides
        (S.PENDING, CheckState.PASS, CheckState.FAIL, False, None),  # CAA forbids: stay
        (S.PENDING, CheckState.FAIL, CheckState.PASS, False, None),
        (S.PENDING, CheckState.UNKNOWN, CheckState.PASS, False, None),
        (S.FAILED, CheckState.PASS, CheckState.PASS, False, S.VERIFIED),
        (S.VERIFIED, CheckState.FAIL, CheckState.PASS, False, S.PENDING),
        (S.VERIFIED, CheckState.PASS, CheckState.FAIL, False, S.PENDING),
        (S.ACTIVE, CheckState.FAIL, CheckState.PASS, True, S.MOVED),
        (S.ACTIVE, CheckState.UNKNOWN, CheckState.PASS, True, None),  # SERVFAIL never moves
        (S.ACTIVE, CheckState.PASS, CheckState.FAIL, True, None),  # serving; renewal will say
        (S.MOVED, CheckState.PASS, CheckState.PASS, True, S.ACTIVE),
        (S.MOVED, CheckState.PASS, CheckState.PASS, False, S.VERIFIED),
        (S.MOVED, CheckState.FAIL, CheckState.PASS, True, None),
        (S.SUSPENDED, CheckState.PASS, CheckState.PASS, True, None),
        (S.SUSPENDED, CheckState.FAIL, CheckState.PASS, True, None),
    ],
)
def test_decide(current, cname, caa, cert, expected) -> None:
    step = decide(current, report(cname, caa), cert)
    assert (step.to if step else None) == expected
    if step is not None:
        assert step.to in ALLOWED[current]
        assert step.reason  # every transition says why


def test_schedule_backs_off_then_gives_up() -> None:
    sched = Schedule(pending_first=60, pending_max=3600, give_up=7 * 86400, active_interval=600)
    waits = [sched.next_check(S.PENDING, n, 1000.0, 0.0) - 1000.0 for n in range(1, 9)]  # type: ignore[operator]
    assert waits == [60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert sched.next_check(S.ACTIVE, 5, 1000.0, 0.0) == 1600.0
    assert sched.next_check(S.SUSPENDED, 0, 1000.0, 0.0) is None
    assert not sched.gave_up(S.PENDING, 7 * 86400 - 1, 0.0)
    assert sched.gave_up(S.PENDING, 7 * 86400, 0.0)
    assert not sched.gave_up(S.ACTIVE, 8 * 86400, 0.0)


def test_schedule_checks_moved_host_when_grace_ends() -> None:
    sched = Schedule(pending_max=3600, moved_grace=100)
    assert sched.next_check(S.MOVED, 0, 1000.0, 950.0) == 1050.0
    assert sched.grace_over(S.MOVED, 1050.0, 950.0)
    assert not sched.grace_over(S.MOVED, 1049.0, 950.0)


@pytest.fixture
async def store(tmp_path: Path):
    st = await open_store(tmp_path / "s.db", os.urandom(32))
    yield st
    await st.close()


async def test_lifecycle_refuses_transitions_the_table_forbids(store: Store) -> None:
    life = Lifecycle(store, Schedule())
    domain = await store.add_domain("links.b.test", "acct")
    with pytest.raises(InvalidTransition):
        await life.transition(domain, S.MOVED, "pending hosts cannot move")
    assert (await store.get_domain("links.b.test")).state is S.PENDING  # type: ignore[union-attr]
    assert await life.transition(domain, S.SUSPENDED, "operator")
    suspended = await store.get_domain("links.b.test")
    assert suspended is not None and suspended.next_check_at is None  # no checks while suspended


async def test_migration_from_schema_1_keeps_hosts_and_schedules_them(tmp_path: Path) -> None:
    import sqlite3

    from certstore.schema import MIGRATIONS
    from certstore.sqlite import _statements

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    for statement in _statements(MIGRATIONS[0]):
        db.execute(statement)
    db.execute("PRAGMA user_version = 1")
    db.execute(
        "INSERT INTO domains (hostname, account, state, created_at) VALUES"
        " ('links.old.test', 'acct', 'active', 5.0), ('links.off.test', 'acct', 'suspended', 6.0)"
    )
    db.commit()
    db.close()
    key = os.urandom(32)
    store = await open_store(path, key)
    try:
        old = await store.get_domain("links.old.test")
        off = await store.get_domain("links.off.test")
        assert old is not None and old.state is S.ACTIVE and old.next_check_at == 0
        assert old.state_changed_at == 5.0
        assert off is not None and off.next_check_at is None
        assert await store.due_for_check(10.0, 10) == ["links.old.test"]
    finally:
        await store.close()


async def test_a_step_another_worker_made_first_is_logged_once(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """Two workers applying the same passing report to the same pending host: one moves it
    and logs the transition; the other's compare-and-set fails and it logs nothing."""
    life = Lifecycle(store, Schedule())
    seen = await store.add_domain("links.c.test", "acct")  # both read it as pending
    passing = report(CheckState.PASS)
    with caplog.at_level("INFO", logger="proxy.hosts.lifecycle"):
        first = await life.apply(seen, passing, has_valid_cert=False)
        second = await life.apply(seen, passing, has_valid_cert=False)
    assert first.state is S.VERIFIED and second.state is S.VERIFIED
    lines = [r.getMessage() for r in caplog.records if "pending -> verified" in r.getMessage()]
    assert len(lines) == 1, lines
    events = [e for e in await store.list_events("links.c.test") if e.kind == "state"]
    assert len(events) == 1
