"""Issue 9, admin surfaces: sessions, slowed-down guessing, strict JSON, TLS, Unix socket.

A real edge with its admin listener (plain, TLS with a certificate from the demo PKI,
or a Unix socket); clients are aiohttp and raw sockets.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import stat
import time
from pathlib import Path

import aiohttp
import pytest
from support.edge import ADMIN_TOKEN, EdgeHandle, enable_admin

from proxy.admin.auth import THROTTLE, AuthThrottle
from proxy.app.wiring import admin_socket
from proxy.demo.pki import write_tls_identity

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def raw(ip: str, port: int, request: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(ip, port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return int(data.split(b" ", 2)[1]), data


async def login(session: aiohttp.ClientSession, token: str = ADMIN_TOKEN) -> aiohttp.ClientResponse:
    async with session.post("/status/login", data={"token": token}, allow_redirects=False) as resp:
        await resp.read()
        return resp


@pytest.fixture
async def admin(edge_config: EdgeHandle, tmp_path: Path):
    base = enable_admin(edge_config, tmp_path)
    await edge_config.start()
    yield edge_config, base
    await edge_config.stop()


async def test_malformed_session_cookies_are_401_never_500(admin) -> None:
    edge, base = admin
    host, port = base.removeprefix("http://").rsplit(":", 1)
    for value in (
        "²².x",  # str.isdigit() is true for "²", int() is not
        "1" * 5000 + ".ab",  # over Python's int-string limit
        "abc",
        ".",
        "9999999999.zz.yy",
        "\xff\xfe",
        '"quoted.value"',
        str(int(time.time()) + 3600) + "." + "0" * 32 + "." + "0" * 64,  # forged
    ):
        request = (
            f"GET /status HTTP/1.1\r\nHost: {host}\r\nCookie: linkedge_status={value}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        status, data = await raw(host, int(port), request)
        assert status == 401, (value[:20], data[:300])
        assert b"Server: linkedge\r\n" in data


async def test_logout_ends_the_session_on_the_server(admin) -> None:
    edge, base = admin
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for an IP address
    async with aiohttp.ClientSession(base_url=base, cookie_jar=jar) as browser:
        resp = await login(browser)
        assert resp.status == 303
        cookie = resp.cookies["linkedge_status"]
        assert cookie["httponly"] and cookie["samesite"] == "Strict"
        assert not cookie["secure"]  # plain HTTP listener
        copied = cookie.value
        async with browser.get("/status", allow_redirects=False) as page:
            assert page.status == 200
        async with browser.post("/status/logout", allow_redirects=False) as out:
            assert out.status == 303
    # the copied cookie no longer opens the page
    async with (
        aiohttp.ClientSession(base_url=base, cookies={"linkedge_status": copied}) as thief,
        thief.get("/status", allow_redirects=False) as page,
    ):
        assert page.status == 401


async def test_wrong_tokens_are_slowed_down_per_source_and_counted(
    edge_config: EdgeHandle, tmp_path: Path
) -> None:
    base = enable_admin(edge_config, tmp_path)
    edge_config.config.admin.auth_delay_seconds = 0.1
    edge_config.config.admin.auth_max_delay_seconds = 0.4
    await edge_config.start()
    try:
        assert edge_config.worker is not None and edge_config.worker.admin_app is not None
        throttle = edge_config.worker.admin_app[THROTTLE]
        wrong = {"Authorization": "Bearer not-the-token-0123456789"}
        async with aiohttp.ClientSession(base_url=base) as client:
            took = []
            for _ in range(4):
                t0 = time.monotonic()
                async with client.get("/v1/hosts", headers=wrong) as resp:
                    assert resp.status == 401
                took.append(time.monotonic() - t0)
            # 1st answered at once, then 0.1 s, 0.2 s, 0.4 s (the cap)
            assert took[0] < 0.1 and took[1] >= 0.09 and took[2] >= 0.19 and took[3] >= 0.38
            # parallel guesses take turns; those queued beyond the cap get 429 unchecked
            statuses = await asyncio.gather(*(_status(client, wrong) for _ in range(6)))
            assert statuses.count(429) >= 4 and set(statuses) <= {401, 429}, statuses
            # the login form shares the source's turns
            await asyncio.sleep(0.5)
            resp = await login(client, "wrong-token-wrong-token")
            assert resp.status == 401
            # the right token still works (after its turn) and clears the source
            await asyncio.sleep(0.5)
            async with client.get("/v1/hosts", headers=AUTH) as resp:
                assert resp.status == 200
            t0 = time.monotonic()
            async with client.get("/v1/hosts", headers=wrong) as resp:
                assert resp.status == 401
            assert time.monotonic() - t0 < 0.1
            # no token at all is not a guess: never slowed down
            async with client.get("/v1/hosts") as resp:
                assert resp.status == 401
        assert throttle.failures == 4 + statuses.count(401) + 2
        assert throttle.refused == statuses.count(429)
    finally:
        await edge_config.stop()


async def _status(client: aiohttp.ClientSession, headers: dict[str, str]) -> int:
    async with client.get("/v1/hosts", headers=headers) as resp:
        return resp.status


def test_throttle_table_is_bounded() -> None:
    now = [1000.0]
    throttle = AuthThrottle(1.0, 8.0, max_sources=100, forget_after=60, clock=lambda: now[0])
    for i in range(1000):
        throttle.failed(f"192.0.2.{i % 250}-{i}")
    assert len(throttle) == 100 and throttle.failures == 1000
    for _ in range(6):
        throttle.failed("198.51.100.1")
    assert throttle.turn("198.51.100.1") == 8.0  # the capped step
    assert throttle.turn("198.51.100.1") is None  # the turn after is beyond the cap
    now[0] += 61
    assert throttle.turn("198.51.100.1") == 0.0  # forgotten after a quiet minute


async def test_json_the_parser_rejects_is_a_4xx_naming_the_problem(admin) -> None:
    edge, base = admin
    host = f"links.json-{edge.ip.split('.')[-1]}.test"
    async with aiohttp.ClientSession(base_url=base, headers=AUTH) as api:
        async with api.post("/v1/hosts", json={"hostname": host, "account": "a"}) as resp:
            assert resp.status == 201
        big = b"1" * 5000
        uploads = {
            "apple-app-site-association": b'{"applinks": {"details": [' + big + b"]}}",
            "assetlinks.json": b"[" + b"-" + big + b"]",
        }
        for kind, body in uploads.items():
            async with api.put(
                f"/v1/hosts/{host}/files/{kind}",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as resp:
                answer = await resp.json()
                assert resp.status == 400, answer
                assert answer["error"] == "malformed_json"
                assert "5000 digits" in answer["message"] and "4300" in answer["message"]
        async with api.put(
            f"/v1/hosts/{host}/options",
            data=b'{"hsts_max_age": ' + big + b"}",
            headers={"Content-Type": "application/json"},
        ) as resp:
            answer = await resp.json()
            assert resp.status == 400 and "4300 digits" in answer["message"], answer


async def test_admin_listener_over_tls_sets_secure_cookies(
    edge_config: EdgeHandle, tmp_path: Path
) -> None:
    base = enable_admin(edge_config, tmp_path)
    identity = write_tls_identity(tmp_path / "admin-tls", [edge_config.ip])
    edge_config.config.admin.tls_cert = str(identity.cert_path)
    edge_config.config.admin.tls_key = str(identity.key_path)
    await edge_config.start()
    try:
        tls_base = base.replace("http://", "https://")
        ctx = ssl.create_default_context(cafile=str(identity.ca_path))
        async with aiohttp.ClientSession(
            base_url=tls_base, connector=aiohttp.TCPConnector(ssl=ctx)
        ) as client:
            async with client.get("/v1/hosts", headers=AUTH) as resp:
                assert resp.status == 200
                assert resp.headers["Server"] == "linkedge"
            resp = await login(client)
            assert resp.status == 303
            cookie = resp.cookies["linkedge_status"]
            assert cookie["secure"] and cookie["httponly"]
        # plain HTTP on the TLS port gets nowhere
        host, port = base.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /v1/hosts HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert b"200 OK" not in data
    finally:
        await edge_config.stop()


async def test_admin_listener_on_a_unix_socket(edge_config: EdgeHandle, tmp_path: Path) -> None:
    enable_admin(edge_config, tmp_path)
    path = tmp_path / "run" / "admin.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)  # a killed edge's leftover: nobody listens
    stale.bind(str(path))
    stale.close()
    edge_config.config.admin.listen = f"unix:{path}"
    await edge_config.start()
    try:
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        async with aiohttp.ClientSession(
            base_url="http://admin", connector=aiohttp.UnixConnector(path=str(path))
        ) as client:
            async with client.get("/v1/hosts", headers=AUTH) as resp:
                assert resp.status == 200
            async with client.get("/v1/hosts") as resp:
                assert resp.status == 401
            resp = await login(client)
            assert resp.status == 303 and not resp.cookies["linkedge_status"]["secure"]
        # a second edge cannot take over a socket that is in use
        with pytest.raises(OSError, match="in use"):
            admin_socket(f"unix:{path}")
    finally:
        await edge_config.stop()
    assert not path.exists()  # removed on shutdown
