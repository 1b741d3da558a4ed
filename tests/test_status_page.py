"""The status page in a real headless Chromium: log in, read the statuses, screenshot.

Chromium is Debian's (`deploy/bootstrap.sh --test` installs it), driven by Playwright;
the screenshot goes to $LINKEDGE_ARTIFACTS (default: the test's tmp dir).
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import async_playwright
from support.edge import ADMIN_TOKEN, EdgeHandle, client_context, enable_admin, tls_handshake

from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer
from proxy.hosts.association_files import ANDROID, APPLE

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


FP = ":".join(f"{i:02X}" for i in range(32))
AASA = json.dumps(
    {"applinks": {"details": [{"appIDs": ["ABCDE12345.com.shop.app"], "components": []}]}}
).encode()
ASSETLINKS = json.dumps(
    [
        {
            "relation": ["delegate_permission/common.get_login_creds"],
            "target": {"namespace": "web", "site": "https://shop.example"},
        }
    ]
).encode()


async def test_status_page_live_view_files_and_options_in_chromium(
    admin, dns_server: DNSServer, pebble: PebbleServer, tmp_path: Path
) -> None:
    """The live view (counts by state, soonest expiries, recent failures) refreshes by
    itself; each host shows its files (size, ETag, updated) and HSTS/upgrade options."""
    edge, base = admin
    n = edge.ip.split(".")[-1]
    green, other, broken = (f"links.{k}-live{n}.test" for k in ("green", "other", "broken"))
    dns_server.set_cname(green, edge.target)
    dns_server.set_cname(other, edge.target)
    dns_server.set_cname(broken, "elsewhere.example.test")
    async with aiohttp.ClientSession(base_url=base, headers=AUTH) as api:
        for host in (green, other, broken):
            async with api.post("/v1/hosts", json={"hostname": host, "account": "shop"}) as r:
                assert r.status == 201
        for host in (green, other):
            async with api.post(f"/v1/hosts/{host}/checks") as r:
                assert r.status == 200
        put = {"Content-Type": "application/json"}
        async with api.put(f"/v1/hosts/{green}/files/{APPLE}", data=AASA, headers=put) as r:
            assert r.status == 201
            aasa_etag = (await r.json())["etag"]
        options = {"hsts_max_age": 31536000, "https_upgrade": True}
        async with api.put(f"/v1/hosts/{green}/options", json=options) as r:
            assert r.status == 200
    with pytest.raises((ssl.SSLError, ConnectionError)):  # a refusal, with its reason
        await tls_handshake(edge.ip, edge.https_port, broken, client_context(pebble))

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = await browser.new_page(viewport={"width": 1600, "height": 1000})
            await page.goto(f"{base}/status/login")
            await page.fill("#token", ADMIN_TOKEN)
            await page.click("button[type=submit]")
            await page.goto(f"{base}/status?refresh=2")

            async def text(selector: str) -> str:
                return await page.inner_text(selector)

            assert await text('#by-state tr[data-state="active"] [data-field="count"]') == "2"
            assert await text('#by-state tr[data-state="pending"] [data-field="count"]') == "1"
            assert await text('#by-state [data-field="total"]') == "3"
            expiries = page.locator("#expiries tr[data-expiry-host]")
            assert await expiries.count() == 2
            assert "days" in await expiries.first.inner_text()
            failure = page.locator('#failures tr[data-event="refused"]')
            assert broken in await failure.first.inner_text()
            assert "elsewhere.example.test" in await failure.first.inner_text()

            files = f'tr[data-host="{green}"] [data-field="files"]'
            aasa = page.locator(f'{files} .file[data-kind="{APPLE}"]')
            assert await aasa.get_attribute("data-size") == str(len(AASA))
            assert f"{len(AASA)} B" in await aasa.inner_text()
            assert await aasa.locator("code").get_attribute("title") == aasa_etag
            assert await text(f'{files} [data-option="hsts"]') == "HSTS max-age=31536000"
            assert await text(f'{files} [data-option="upgrade"]') == "HTTPS upgrade on"
            other_files = f'tr[data-host="{other}"] [data-field="files"]'
            assert "no files" in await text(other_files)
            assert await text(f'{other_files} [data-option="hsts"]') == "HSTS off"
            assert "live, refreshes every 2 s" in await text("#live-note")

            # changes show up without anyone reloading the page
            async with aiohttp.ClientSession(base_url=base, headers=AUTH) as api:
                path = f"/v1/hosts/{other}/files/{ANDROID}"
                async with api.put(path, data=ASSETLINKS, headers=put) as r:
                    assert r.status == 201
                async with api.post(f"/v1/hosts/{other}/suspend", json={"reason": "x"}) as r:
                    assert r.status == 200
            await page.wait_for_selector(
                f'{other_files} .file[data-kind="{ANDROID}"]', timeout=10_000
            )
            assert await text('#by-state tr[data-state="suspended"] [data-field="count"]') == "1"
            assert await text('#by-state tr[data-state="active"] [data-field="count"]') == "1"

            out = Path(os.environ.get("LINKEDGE_ARTIFACTS") or tmp_path)
            out.mkdir(parents=True, exist_ok=True)
            shot = out / "status-page-live.png"
            await page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            await browser.close()
