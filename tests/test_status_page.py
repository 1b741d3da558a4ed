"""The status page in a real headless Chromium: log in, read the statuses, screenshot.

Chromium is Debian's (`deploy/bootstrap.sh --test` installs it), driven by Playwright;
the screenshot goes to $LINKEDGE_ARTIFACTS (default: the test's tmp dir).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from conftest import ADMIN_TOKEN, EdgeHandle, enable_admin
from playwright.async_api import async_playwright

from proxy.demo.dnsserver import DNSServer

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
async def admin(edge_config: EdgeHandle, tmp_path: Path) -> AsyncIterator[tuple[EdgeHandle, str]]:
    base = enable_admin(edge_config, tmp_path)
    await edge_config.start()
    yield edge_config, base
    await edge_config.stop()


async def test_status_page_shows_checks_in_chromium(
    admin, dns_server: DNSServer, tmp_path: Path
) -> None:
    assert shutil.which(CHROMIUM), "Debian chromium missing: run deploy/bootstrap.sh --test"
    edge, base = admin
    n = edge.ip.split(".")[-1]
    green, nodns, proxied, caa, paused, idn = (
        f"links.{k}-{n}.test" for k in ("green", "nodns", "proxied", "caa", "paused", "bücher")
    )
    dns_server.set_cname(green, edge.target)
    dns_server.set_cname(paused, edge.target)
    dns_server.set_a(proxied, ["198.51.100.20"])  # DNS data only: a CDN proxy's answer
    dns_server.set_cname(caa, edge.target)
    dns_server.set_caa(caa.split(".", 1)[1], [(0, "issue", "digicert.com")])
    async with aiohttp.ClientSession(base_url=base, headers=AUTH) as api:
        for host in (green, nodns, proxied, caa, paused, idn):
            async with api.post("/v1/hosts", json={"hostname": host, "account": "shop"}) as r:
                assert r.status == 201
                created = await r.json()
            async with api.post(f"/v1/hosts/{created['hostname']}/checks") as r:
                assert r.status == 200
        async with api.post(f"/v1/hosts/{paused}/suspend", json={"reason": "billing"}) as r:
            assert r.status == 200

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = await browser.new_page(viewport={"width": 1500, "height": 900})
            await page.goto(f"{base}/status")
            assert page.url == f"{base}/status/login"  # not logged in: the form
            await page.fill("#token", "not-the-token-at-all")
            await page.click("button[type=submit]")
            assert await page.inner_text(".error") == "Wrong token."
            await page.fill("#token", ADMIN_TOKEN)
            await page.click("button[type=submit]")
            assert page.url == f"{base}/status"

            async def cell(host: str, check: str) -> tuple[str | None, str]:
                loc = page.locator(f'tr[data-host="{host}"] td[data-check="{check}"]')
                return await loc.get_attribute("data-state"), await loc.inner_text()

            async def state(host: str) -> str:
                return await page.inner_text(f'tr[data-host="{host}"] [data-field="state"]')

            assert await state(green) == "active"
            for check in ("cname", "caa", "https"):
                assert (await cell(green, check))[0] == "pass"
            assert "days left" in await page.inner_text(f'tr[data-host="{green}"]')
            assert await state(nodns) == "pending"
            got = await cell(nodns, "cname")
            assert got[0] == "fail" and "does not exist in DNS" in got[1]
            got = await cell(proxied, "cname")
            assert got[0] == "fail" and "CDN proxy" in got[1]
            assert (await cell(proxied, "https"))[0] == "skipped"
            got = await cell(caa, "caa")
            assert got[0] == "fail" and "digicert.com" in got[1]
            assert await state(caa) == "pending"
            assert await state(paused) == "suspended"
            assert "billing" in await page.inner_text(f'tr[data-host="{paused}"]')
            idn_ascii = idn.encode("idna").decode()
            assert idn in await page.inner_text(f'tr[data-host="{idn_ascii}"]')  # shown in Unicode
            assert "active 1" in await page.inner_text(".summary")
            events = await page.inner_text("#events")
            assert "verified → active" in events and "active → suspended" in events

            out = Path(os.environ.get("LINKEDGE_ARTIFACTS") or tmp_path)
            out.mkdir(parents=True, exist_ok=True)
            shot = out / "status-page.png"
            await page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000

            await page.click("text=Log out")  # the cookie is gone: back to the form
            await page.goto(f"{base}/status")
            assert page.url == f"{base}/status/login"
        finally:
            await browser.close()
