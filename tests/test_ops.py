"""proxy/ops/hosts.py: the host operations the CLI and the admin API both call.

The same rules from both doors: the edge's own names and malformed accounts are
refused, registering a host again for its account changes nothing, a host of another
account is refused, suspend/resume follow the lifecycle and drop this worker's caches.
In-process against a real store; the API's side is in test_admin_api.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from certstore import DomainState, Store, generate_key_text, open_store
from certstore.crypto import parse_key_text
from proxy.app.cli import main
from proxy.hosts.lifecycle import Lifecycle
from proxy.hosts.schedule import Schedule
from proxy.ops import hosts as ops
from proxy.ops.errors import OpError

TARGET = "edge.linkedge.test"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await open_store(tmp_path / "ops.db", parse_key_text(generate_key_text(), "t"))
    yield s
    await s.close()


async def test_register_is_idempotent_per_account(store: Store) -> None:
    first = await ops.register(store, "Links.Shop.Test.", "shop1", TARGET)
    assert first.created and first.domain.hostname == "links.shop.test"
    again = await ops.register(store, "links.shop.test", "shop1", TARGET)
    assert not again.created and again.domain.account == "shop1"
    with pytest.raises(ops.OwnedByAnotherAccount) as other:
        await ops.register(store, "links.shop.test", "shop2", TARGET)
    assert other.value.status == 409 and other.value.owner == "shop1"
    assert "shop1" not in str(other.value)  # an API caller is not told whose it is


@pytest.mark.parametrize(
    ("hostname", "account", "code"),
    [
        (TARGET, "a", "invalid_hostname"),
        ("x." + TARGET, "a", "invalid_hostname"),
        ("bad_name.test", "a", "invalid_hostname"),
        (7, "a", "invalid_hostname"),
        ("links.shop.test", "", "invalid_account"),
        ("links.shop.test", "a b", "invalid_account"),
        ("links.shop.test", None, "invalid_account"),
    ],
)
async def test_register_refusals(
    store: Store, hostname: object, account: object, code: str
) -> None:
    with pytest.raises(OpError) as refused:
        await ops.register(store, hostname, account, TARGET)
    assert refused.value.status == 422 and refused.value.code == code
    assert await store.list_domains() == []


class _Seen:
    def __init__(self) -> None:
        self.forgotten: list[str] = []

    def forget(self, hostname: str) -> None:
        self.forgotten.append(hostname)


async def test_suspend_resume_and_this_workers_caches(store: Store) -> None:
    await ops.register(store, "links.shop.test", "shop1", TARGET)
    lifecycle = Lifecycle(store, Schedule())
    views = _Seen()
    caches = ops.WorkerCaches(host_views=views)  # type: ignore[arg-type]
    with pytest.raises(OpError) as not_suspended:
        await ops.resume(store, lifecycle, "links.shop.test", caches=caches)
    assert not_suspended.value.code == "not_suspended"
    with pytest.raises(OpError) as bad_reason:
        await ops.suspend(store, lifecycle, "links.shop.test", "x" * 501)
    assert bad_reason.value.code == "invalid_reason"
    domain = await ops.suspend(store, lifecycle, "links.shop.test", "abuse", caches=caches)
    assert domain.state is DomainState.SUSPENDED
    assert domain.state_reason == "suspended by operator: abuse"
    again = await ops.suspend(store, lifecycle, "links.shop.test", caches=caches)
    assert again.state_reason == "suspended by operator: abuse"  # a no-op
    resumed = await ops.resume(store, lifecycle, "links.shop.test", caches=caches)
    assert resumed.state is DomainState.PENDING  # no certificate yet
    assert views.forgotten == ["links.shop.test"] * 3
    with pytest.raises(OpError) as missing:
        await ops.suspend(store, lifecycle, "nope.test")
    assert (missing.value.status, missing.value.code) == (404, "not_found")


async def test_remove_without_a_certificate_and_unknown_hosts(store: Store) -> None:
    await ops.register(store, "links.shop.test", "shop1", TARGET)
    removal = await ops.remove(store, None, "LINKS.shop.test")
    assert removal.hostname == "links.shop.test" and not removal.revoked
    assert await store.get_domain("links.shop.test") is None
    with pytest.raises(OpError) as missing:
        await ops.remove(store, None, "links.shop.test")
    assert missing.value.code == "not_found"


def test_cli_register_again_for_the_same_account_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LINKEDGE_STORE_PATH", str(tmp_path / "store.db"))
    monkeypatch.setenv("LINKEDGE_STORE_KEY", generate_key_text())
    monkeypatch.setenv("LINKEDGE_STORE_KEY_ENV", "LINKEDGE_STORE_KEY")
    monkeypatch.setenv("LINKEDGE_EDGE_CNAME_TARGET", TARGET)
    assert main(["domains", "add", "links.shop.test", "--account", "shop1"]) == 0
    capsys.readouterr()
    assert main(["domains", "add", "links.shop.test", "--account", "shop1"]) == 0
    assert "already registered (account shop1); unchanged" in capsys.readouterr().out
    assert main(["domains", "add", "links.shop.test", "--account", "a b"]) == 2
    assert "account must be" in capsys.readouterr().err
