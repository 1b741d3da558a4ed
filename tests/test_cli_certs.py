"""`linkedge certs list` shows time left and renewal state; `certs revoke` errors."""

from __future__ import annotations

import asyncio
import json
import time

from test_cli import assert_clean_error, run_cli, store_env  # noqa: F401  (fixture)

from certstore import HostBackoff, RenewalPlan, StoredCertificate, open_store
from certstore.crypto import load_key


async def _seed(env: dict[str, str]) -> float:
    key = load_key(env["LINKEDGE_STORE_KEY_FILE"], None)
    store = await open_store(env["LINKEDGE_STORE_PATH"], key)
    now = time.time()
    for host, days_left in (("later.shop.test", 40), ("soon.shop.test", 2)):
        await store.add_domain(host, "acct")
        await store.put_certificate(
            StoredCertificate(
                host,
                b"chain",
                b"key",
                (host,),
                now - 50 * 86400,
                now + days_left * 86400,
                "CN=Test CA",
                now,
                serial="abc",
                directory_url="https://ca.test/dir",
            )
        )
    due = now - 86400
    await store.put_renewal(
        RenewalPlan("soon.shop.test", due, now + 600, "ratio", "order for soon: rateLimited")
    )
    await store.put_backoff(HostBackoff("soon.shop.test", 2, now + 600, "rateLimited"))
    await store.close()
    return due


def test_certs_list_shows_days_left_due_time_and_last_error(store_env: dict[str, str]) -> None:  # noqa: F811
    due = asyncio.run(_seed(store_env))
    text = run_cli("certs", "list", env=store_env)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split() == [
        "HOST",
        "EXPIRES",
        "(UTC)",
        "DAYS",
        "LEFT",
        "RENEWAL",
        "DUE",
        "(UTC)",
        "BY",
        "LAST",
        "RENEWAL",
        "ERROR",
    ]
    assert lines[1].startswith("soon.shop.test") and lines[2].startswith("later.shop.test")
    assert "2.0" in lines[1] and "order for soon: rateLimited" in lines[1]
    assert time.strftime("%Y-%m-%d %H:%M", time.gmtime(due)) in lines[1]
    assert "~" in lines[2] and "unplanned" in lines[2]  # not visited by maintenance yet

    rows = json.loads(run_cli("certs", "list", "--json", env=store_env).stdout)
    soon = rows[0]
    assert soon["hostname"] == "soon.shop.test" and 1.9 < soon["days_left"] < 2.1
    assert soon["renewal_due_at"] == due and soon["renewal_source"] == "ratio"
    assert soon["last_renewal_error"] == "order for soon: rateLimited"
    assert soon["failures"] == 2 and soon["next_attempt_at"] > time.time()


def test_certs_revoke_without_certificate_is_a_clear_error(
    store_env: dict[str, str],  # noqa: F811
) -> None:
    assert run_cli("domains", "add", "links.nocert.test", env=store_env).returncode == 0
    assert_clean_error(
        run_cli("certs", "revoke", "links.nocert.test", env=store_env), 1, "has no certificate"
    )
    assert_clean_error(run_cli("certs", "revoke", "bad_name!", env=store_env), 2)
    # a host without certificate is removed without talking to any CA
    removed = run_cli("domains", "remove", "links.nocert.test", env=store_env)
    assert removed.returncode == 0 and "no certificate" in removed.stdout
