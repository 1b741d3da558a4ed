"""Tracked-link semantics through a real edge: app association files, HTTPS upgrade, HSTS.

Real Pebble certificates, real TLS clients (aiohttp, curl, raw sockets for byte-exact
request targets), the admin API over HTTP, and a recording backend that must never
see the requests the edge answers itself.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support.clicks import certify, edge_store, new_host
from support.edge import ADMIN_TOKEN, EdgeHandle, client_context, enable_admin, https_session
from support.net import free_port
from test_admin_api import assert_schema

from proxy.app.config import Config
from proxy.demo.backend import RecordedRequest
from proxy.demo.client import StaticResolver
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer
from proxy.hosts.association_files import ANDROID, APPLE, etag

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
AASA_PATHS = ("/.well-known/apple-app-site-association", "/apple-app-site-association")
ASSETLINKS_PATH = "/.well-known/assetlinks.json"
FP = ":".join(f"{i:02X}" for i in range(32))
AASA = (
    json.dumps(
        {
            "applinks": {
                "details": [{"appIDs": ["ABCDE12345.com.shop.app"], "components": [{"/": "/c/*"}]}]
            }
        },
        indent=2,
    )
    + "\n"
).encode()
AASA_V2 = AASA.replace(b"/c/*", b"/uni/*")
ASSETLINKS = json.dumps(
    [
        {
            "relation": ["delegate_permission/common.handle_all_urls"],
            "target": {
                "namespace": "android_app",
                "package_name": "com.shop.app",
                "sha256_cert_fingerprints": [FP],
            },
        }
    ]
).encode()


@dataclass
class Setup:
    edge: EdgeHandle
    api: aiohttp.ClientSession
    recorded: list[RecordedRequest]
    admin_url: str


@pytest.fixture
async def setup(edge_config: EdgeHandle, tmp_path: Path, backend) -> AsyncIterator[Setup]:
    base = enable_admin(edge_config, tmp_path)
    edge_config.config.edge.https_public_port = edge_config.https_port
    await edge_config.start()
    try:
        async with aiohttp.ClientSession(base_url=base, headers=AUTH) as api:
            yield Setup(edge_config, api, backend[1], base)
    finally:
        await edge_config.stop()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names, last value wins
    all_headers: list[tuple[str, str]]
    body: bytes


async def https(
    edge: EdgeHandle,
    pebble: PebbleServer,
    host: str,
    path: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
) -> Reply:
    async with (
        https_session(edge, pebble) as session,
        session.request(
            method,
            f"https://{host}:{edge.https_port}{path}",
            headers=headers,
            data=data,
            allow_redirects=False,
        ) as resp,
    ):
        body = await resp.read()
        pairs = [(k.lower(), v) for k, v in resp.headers.items()]
        return Reply(resp.status, dict(pairs), pairs, body)


async def raw_http(edge: EdgeHandle, request: bytes) -> Reply:
    """One hand-written HTTP/1.1 request on the plain listener (exact request target)."""
    reader, writer = await asyncio.open_connection(edge.ip, edge.http_port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)  # the request says Connection: close
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    pairs = [(k.strip().lower(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:])]
    return Reply(int(lines[0].split()[1]), dict(pairs), pairs, body)


def plain_get(host_header: str, target: str, method: str = "GET", body: bytes = b"") -> bytes:
    return (
        f"{method} {target} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def curl(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "10", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err
    return out.decode("latin-1")


def curl_tls(edge: EdgeHandle, pebble: PebbleServer, host: str) -> list[str]:
    return ["--cacert", str(pebble.root_path), "--resolve", f"{host}:{edge.https_port}:{edge.ip}"]


async def call(api: aiohttp.ClientSession, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    async with api.request(method, path, **kw) as resp:
        raw = await resp.read()
        if resp.content_type == "application/json" and raw and method != "GET":
            return resp.status, json.loads(raw)
        if resp.status >= 400 and raw:
            return resp.status, json.loads(raw)
        return resp.status, raw


async def upload(
    api: aiohttp.ClientSession,
    host: str,
    kind: str,
    body: bytes,
    content_type: str = "application/json",
) -> tuple[int, Any]:
    return await call(
        api, "PUT", f"/v1/hosts/{host}/files/{kind}", data=body,
        headers={"Content-Type": content_type},
    )  # fmt: skip


async def set_options(api: aiohttp.ClientSession, host: str, **options: Any) -> None:
    status, body = await call(api, "PUT", f"/v1/hosts/{host}/options", json=options)
    assert status == 200, body


def association_requests(recorded: list[RecordedRequest]) -> list[str]:
    return [
        r.path_qs
        for r in recorded
        if "apple-app-site-association" in r.path_qs or "assetlinks" in r.path_qs
    ]


# -- app association files -------------------------------------------------------------


async def test_association_files_are_served_by_the_edge_with_etag_and_head(
    setup: Setup, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    edge, api = setup.edge, setup.api
    host = await certify(edge, pebble, dns_server)
    status, meta = await upload(api, host, APPLE, AASA)
    assert status == 201, meta
    assert meta["etag"] == etag(AASA) and meta["size"] == len(AASA)
    assert meta["urls"] == [f"https://{host}{p}" for p in AASA_PATHS]
    assert_schema(meta, "HostFile")
    assert (await upload(api, host, ANDROID, ASSETLINKS))[0] == 201
    assert (await upload(api, host, ANDROID, ASSETLINKS))[0] == 200  # a replacement
    status, listing = await call(api, "GET", f"/v1/hosts/{host}/files")
    assert status == 200 and [f["kind"] for f in json.loads(listing)["files"]] == [APPLE, ANDROID]
    assert_schema(json.loads(listing), "HostFiles")
    async with api.get(f"/v1/hosts/{host}/files/{APPLE}") as resp:  # the admin's copy
        assert resp.headers["ETag"] == etag(AASA) and await resp.read() == AASA
    setup.recorded.clear()

    for path, content in [*((p, AASA) for p in AASA_PATHS), (ASSETLINKS_PATH, ASSETLINKS)]:
        got = await https(edge, pebble, host, path)
        assert got.status == 200, (path, got)
        assert got.headers["content-type"] == "application/json"  # exactly, no charset
        assert got.body == content  # byte for byte as uploaded
        assert got.headers["etag"] == etag(content)
        assert got.headers["cache-control"] == "no-cache"
        assert "location" not in got.headers

        for condition in (etag(content), "W/" + etag(content), f'"nope", {etag(content)}', "*"):
            again = await https(edge, pebble, host, path, headers={"If-None-Match": condition})
            assert (again.status, again.body) == (304, b""), condition
            assert again.headers["etag"] == etag(content)
        other = await https(edge, pebble, host, path, headers={"If-None-Match": '"nope"'})
        assert other.status == 200 and other.body == content

        head = await https(edge, pebble, host, path, method="HEAD")
        assert (head.status, head.body) == (200, b"")
        assert head.headers["content-length"] == str(len(content))
        assert head.headers["content-type"] == "application/json"

    with_query = await https(edge, pebble, host, AASA_PATHS[0] + "?refresh=1")
    assert with_query.status == 200 and with_query.body == AASA
    post = await https(edge, pebble, host, ASSETLINKS_PATH, method="POST", data=b"{}")
    assert post.status == 405 and post.headers["allow"] == "GET, HEAD"

    # curl, which is strict about framing, at both Apple paths and with a conditional GET
    for path in AASA_PATHS:
        out = await curl(
            "-i", *curl_tls(edge, pebble, host), f"https://{host}:{edge.https_port}{path}"
        )
        head_text, _, body = out.partition("\r\n\r\n")
        assert head_text.startswith("HTTP/1.1 200")
        assert "\r\ncontent-type: application/json\r\n" in head_text.lower() + "\r\n"
        assert body.encode("latin-1") == AASA
    out = await curl(
        "-i", "-H", f"If-None-Match: {etag(AASA)}", *curl_tls(edge, pebble, host),
        f"https://{host}:{edge.https_port}{AASA_PATHS[0]}",
    )  # fmt: skip
    assert out.startswith("HTTP/1.1 304") and out.endswith("\r\n\r\n")
    out = await curl(
        "-I", *curl_tls(edge, pebble, host), f"https://{host}:{edge.https_port}{ASSETLINKS_PATH}"
    )
    assert out.startswith("HTTP/1.1 200") and f"content-length: {len(ASSETLINKS)}" in out.lower()

    assert setup.recorded == []  # the backend never saw any of it


async def test_missing_files_and_unknown_hosts_get_404_from_the_edge(
    setup: Setup, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    edge, api = setup.edge, setup.api
    host = await certify(edge, pebble, dns_server)
    await upload(api, host, APPLE, AASA)
    setup.recorded.clear()

    missing = await https(edge, pebble, host, ASSETLINKS_PATH)
    assert missing.status == 404 and missing.body == b"No assetlinks.json here.\n"
    assert missing.headers["cache-control"] == "no-store"

    # the Host header names the host, normalised: case, port and trailing dot
    for host_header in (host.upper() + ".", f"{host}:{edge.http_port}", f"{host.upper()}.:80"):
        got = await raw_http(edge, plain_get(host_header, AASA_PATHS[1]))
        assert got.status == 200 and got.body == AASA, host_header

    # unregistered names: 404 from the edge on both listeners, nothing forwarded
    for path in (*AASA_PATHS, ASSETLINKS_PATH):
        got = await raw_http(edge, plain_get("links.unregistered.test", path))
        assert got.status == 404 and got.body == f"No {path.rsplit('/', 1)[1]} here.\n".encode()
        got = await raw_http(edge, plain_get("[::1]:80", path))
        assert got.status == 404
    ghost = await https(edge, pebble, host, AASA_PATHS[0], headers={"Host": "links.ghost.test"})
    assert ghost.status == 421  # SNI names a certified host, Host another one
    assert association_requests(setup.recorded) == []
    # every other path of an unknown name is still the backend's business, as before
    click = await raw_http(edge, plain_get("links.unregistered.test", "/c/other"))
    assert click.status == 302 and setup.recorded[-1].path_qs == "/c/other"

    # deleting stops serving at once (this worker) and is an event
    status, _ = await call(api, "DELETE", f"/v1/hosts/{host}/files/{APPLE}")
    assert status == 204
    assert (await https(edge, pebble, host, AASA_PATHS[0])).status == 404
    assert (await call(api, "DELETE", f"/v1/hosts/{host}/files/{APPLE}"))[0] == 404
    async with edge_store(edge) as store:
        kinds = [e.kind for e in await store.list_events(host)]
    assert kinds[:2] == ["file_deleted", "file_updated"]


BAD_UPLOADS: list[tuple[str, str, bytes, str, int, str, str | None, str]] = [
    # (name, kind, body, content type, status, error code, JSON path, fragment)
    ("invalid-json", APPLE, b'{"applinks": {', "application/json", 400, "malformed_json",
     "$", "not valid JSON: Expecting"),
    ("empty", ANDROID, b"", "application/json", 400, "malformed_json", "$", "empty"),
    ("bom", APPLE, b"\xef\xbb\xbf" + AASA, "application/json", 400, "malformed_json", "$",
     "byte order mark"),
    ("wrong-structure", APPLE, b'{"applinks": {"details": {}}}', "application/json", 422,
     "invalid_file", "$.applinks.details", "must be an array, not an object"),
    ("assetlinks-as-aasa", APPLE, ASSETLINKS, "application/json", 422, "invalid_file", "$",
     "must be an object, not an array"),
    ("bad-team-id", APPLE, AASA.replace(b"ABCDE12345", b"ABCDE1234"), "application/json", 422,
     "invalid_file", "$.applinks.details[0].appIDs[0]", "10 upper-case letters or digits"),
    ("duplicate-key", APPLE, b'{"applinks": {"details": [], "details": []}}',
     "application/json", 422, "invalid_file", "$.applinks", 'the key "details" appears twice'),
    ("bad-fingerprint", ANDROID, ASSETLINKS.replace(b'0B:', b'0b:'), "application/json", 422,
     "invalid_file", "$[0].target.sha256_cert_fingerprints[0]", "upper-case hex"),
    ("short-fingerprint", ANDROID, ASSETLINKS.replace(b':1F"', b'"'), "application/json", 422,
     "invalid_file", "$[0].target.sha256_cert_fingerprints[0]", "32 upper-case hex bytes"),
    ("malformed-relation", ANDROID, ASSETLINKS.replace(b"permission/common.", b"permission/"
     b"common "), "application/json", 422, "invalid_file", "$[0].relation[0]", "kind/detail"),
    ("too-large", APPLE, AASA + b" " * (128 * 1024), "application/json", 413, "too_large",
     None, "larger than 131072 bytes"),
    ("wrong-content-type", APPLE, AASA, "text/plain", 415, "unsupported_media_type", None,
     "Content-Type: application/json (got text/plain)"),
    ("form-upload", ANDROID, ASSETLINKS, "application/x-www-form-urlencoded", 415,
     "unsupported_media_type", None, "request body"),
]  # fmt: skip


async def test_bad_uploads_are_refused_with_a_reason_and_the_previous_file_stays(
    setup: Setup, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    edge, api = setup.edge, setup.api
    host = await certify(edge, pebble, dns_server)
    good = {APPLE: AASA, ANDROID: ASSETLINKS}
    for kind, body in good.items():
        assert (await upload(api, host, kind, body))[0] == 201
    async with edge_store(edge) as store:
        events_before = len(await store.list_events(host, limit=1000))

    async def still_served() -> None:
        for kind, path in ((APPLE, AASA_PATHS[0]), (ANDROID, ASSETLINKS_PATH)):
            got = await https(edge, pebble, host, path)
            assert (got.status, got.body, got.headers["etag"]) == (
                200,
                good[kind],
                etag(good[kind]),
            )
            async with api.get(f"/v1/hosts/{host}/files/{kind}") as resp:
                assert await resp.read() == good[kind]

    for name, kind, body, content_type, status, code, path, fragment in BAD_UPLOADS:
        got_status, error = await upload(api, host, kind, body, content_type)
        assert got_status == status, (name, error)
        assert error["error"] == code and fragment in error["message"], (name, error)
        assert error.get("path") == path, (name, error)
        assert_schema(error, "Error")
        await still_served()

    # too large without a Content-Length (chunked): refused while reading, not after
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b" " * 4096

    status, error = await call(
        api, "PUT", f"/v1/hosts/{host}/files/{APPLE}", data=chunks(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert status == 413 and error["error"] == "too_large"
    # unknown kinds and hosts
    status, error = await upload(api, host, "apple-app-site-association.json", AASA)
    assert (
        status == 404 and "known: apple-app-site-association, assetlinks.json" in error["message"]
    )
    status, error = await upload(api, "links.nobody.test", APPLE, AASA)
    assert status == 404 and error["error"] == "not_found"
    assert (await call(api, "GET", f"/v1/hosts/{host}/files/nope"))[0] == 404
    await still_served()
    async with edge_store(edge) as store:
        assert len(await store.list_events(host, limit=1000)) == events_before  # nothing written


async def test_file_routes_need_the_admin_token(setup: Setup) -> None:
    edge, api = setup.edge, setup.api
    host = new_host(edge)
    await call(api, "POST", "/v1/hosts", json={"hostname": host, "account": "shop"})
    assert (await upload(api, host, ANDROID, ASSETLINKS))[0] == 201
    for headers in ({}, {"Authorization": "Bearer not-the-admin-token-at-all"}):
        async with aiohttp.ClientSession(base_url=setup.admin_url, headers=headers) as anon:
            for method, kind in [
                ("GET", ""),
                ("GET", f"/{ANDROID}"),
                ("PUT", f"/{APPLE}"),
                ("PUT", f"/{ANDROID}"),
                ("DELETE", f"/{ANDROID}"),
            ]:
                status, body = await call(
                    anon, method, f"/v1/hosts/{host}/files{kind}", data=AASA,
                    headers={"Content-Type": "application/json"},
                )  # fmt: skip
                assert status == 401 and body["error"] == "unauthorized", (method, kind)
    status, listing = await call(api, "GET", f"/v1/hosts/{host}/files")
    assert [f["kind"] for f in json.loads(listing)["files"]] == [ANDROID]  # nothing changed
    got = await raw_http(edge, plain_get(host, ASSETLINKS_PATH))
    assert (got.status, got.body) == (200, ASSETLINKS)


# -- HTTPS upgrade ---------------------------------------------------------------------

TARGETS = [
    "/c/abc123?utm=mail&x=1",
    "/c/a%2Fb;p=1?q=%E2%82%AC&q=+&empty=&x=%zz&%26=%3D",
    "//double//slash/./x/../y?",
    "/c/%7euser?a=b=c&&b#not-sent",
    "/?",
]


async def test_https_upgrade_keeps_path_and_query_byte_for_byte(
    setup: Setup, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    edge, api = setup.edge, setup.api
    host = await certify(edge, pebble, dns_server)
    await upload(api, host, APPLE, AASA)
    await upload(api, host, ANDROID, ASSETLINKS)
    off = await raw_http(edge, plain_get(host, "/c/before"))
    assert off.status == 302  # off by default: old http:// links reach the backend
    await set_options(api, host, https_upgrade=True)
    setup.recorded.clear()
    origin = f"https://{host}:{edge.https_port}"

    for target in TARGETS:
        sent = target.split("#")[0]
        got = await raw_http(edge, plain_get(host.upper() + ".", sent))
        assert got.status == 308, (target, got)
        assert got.headers["location"] == origin + sent, target  # byte for byte
        assert got.headers["cache-control"] == "no-store"
        assert "strict-transport-security" not in got.headers
    absolute = await raw_http(edge, plain_get(host, f"http://{host}/c/abs?y=2"))
    assert absolute.headers["location"] == f"{origin}/c/abs?y=2"
    for method in ("POST", "HEAD", "PUT"):  # 308: the client repeats method and body
        got = await raw_http(edge, plain_get(host, "/unsubscribe?id=7", method, b"one-click"))
        assert got.status == 308 and got.headers["location"] == f"{origin}/unsubscribe?id=7"

    # never redirected: the app association files and the CA's challenges
    for path, content in (
        (AASA_PATHS[0], AASA),
        (AASA_PATHS[1], AASA),
        (ASSETLINKS_PATH, ASSETLINKS),
    ):
        got = await raw_http(edge, plain_get(host, path))
        assert (got.status, got.body) == (200, content), path
        assert got.headers["content-type"] == "application/json"
    async with edge_store(edge) as store:
        await store.put_challenge("tok-upgrade_1", "tok-upgrade_1.thumbprint", host)
    got = await raw_http(edge, plain_get(host, "/.well-known/acme-challenge/tok-upgrade_1"))
    assert (got.status, got.body) == (200, b"tok-upgrade_1.thumbprint")
    got = await raw_http(edge, plain_get(host, "/.well-known/acme-challenge/unknown"))
    assert got.status == 404 and "location" not in got.headers
    assert setup.recorded == []  # none of the above reached the backend

    # curl sends the target as typed (--path-as-is) and gets the same Location back
    target = "/c/curl%20x/../y?a=%41&b"
    out = await curl(
        "-i", "--path-as-is", "--resolve", f"{host}:{edge.http_port}:{edge.ip}",
        f"http://{host}:{edge.http_port}{target}",
    )  # fmt: skip
    assert out.startswith("HTTP/1.1 308") and f"\r\nLocation: {origin}{target}\r\n" in out

    # following the redirect lands on the backend over HTTPS with the same path and query
    got = await raw_http(edge, plain_get(host, TARGETS[0]))
    async with (
        https_session(edge, pebble) as session,
        session.get(got.headers["location"], allow_redirects=False) as resp,
    ):
        assert resp.status == 302
    assert setup.recorded[-1].path_qs == TARGETS[0]
    assert [r.headers for r in setup.recorded if ("X-Forwarded-Proto", "https") in r.headers]

    await set_options(api, host, https_upgrade=False)  # off again: forwarded at once
    assert (await raw_http(edge, plain_get(host, "/c/after"))).status == 302
    assert setup.recorded[-1].path_qs == "/c/after"


async def test_https_upgrade_waits_for_a_certificate_and_stops_at_suspension(
    setup: Setup, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    edge, api = setup.edge, setup.api
    fresh = new_host(edge, "nocert")
    async with edge_store(edge) as store:
        await store.add_domain(fresh, "acct")  # registered, no CNAME yet, no certificate
    await set_options(api, fresh, https_upgrade=True)
    got = await raw_http(edge, plain_get(fresh, "/c/pending"))
    assert got.status == 302 and setup.recorded[-1].path_qs == "/c/pending"  # not redirected

    host = await certify(edge, pebble, dns_server)
    await set_options(api, host, https_upgrade=True)
    assert (await raw_http(edge, plain_get(host, "/c/1"))).status == 308
    status, _ = await call(api, "POST", f"/v1/hosts/{host}/suspend", json={"reason": "test"})
    assert status == 200
    suspended = await raw_http(edge, plain_get(host, "/c/2"))
    assert suspended.status == 503 and "location" not in suspended.headers
    assert (await raw_http(edge, plain_get(host, AASA_PATHS[0]))).status == 503
    await call(api, "POST", f"/v1/hosts/{host}/resume")
    assert (await raw_http(edge, plain_get(host, "/c/3"))).status == 308


# -- HSTS ------------------------------------------------------------------------------


async def hsts_backend() -> tuple[web.AppRunner, str]:
    """A backend that sets its own (too broad) HSTS header on every click."""

    async def click(request: web.Request) -> web.Response:
        return web.Response(
            status=302,
            headers={
                "Location": "https://shop.example/landing",
                "Strict-Transport-Security": "max-age=63072000; includeSubDomains; preload",
            },
        )

    app = web.Application()
    app.router.add_get("/c/{id}", click)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def test_hsts_only_over_https_for_opted_in_hosts_while_they_serve(
    edge_config: EdgeHandle, tmp_path: Path, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    runner, url = await hsts_backend()
    edge_config.config.backend.url = url
    base = enable_admin(edge_config, tmp_path)
    edge = edge_config
    await edge.start()
    try:
        async with aiohttp.ClientSession(base_url=base, headers=AUTH) as api:
            opted, plain = (
                await certify(edge, pebble, dns_server),
                await certify(edge, pebble, dns_server),
            )
            await set_options(api, opted, hsts_max_age=600)

            click = await https(edge, pebble, opted, "/c/1")
            assert click.status == 302
            sts = [v for k, v in click.all_headers if k == "strict-transport-security"]
            assert sts == ["max-age=600"]  # the operator's value replaces the backend's
            own = await https(edge, pebble, opted, ASSETLINKS_PATH)  # the edge's own 404
            assert own.status == 404 and own.headers["strict-transport-security"] == "max-age=600"
            await upload(api, opted, APPLE, AASA)
            for extra in ({}, {"If-None-Match": etag(AASA)}):
                own = await https(edge, pebble, opted, AASA_PATHS[0], headers=extra)
                assert own.headers["strict-transport-security"] == "max-age=600"

            other = await https(edge, pebble, plain, "/c/2")  # not opted in
            assert other.status == 302 and "strict-transport-security" not in other.headers
            over_http = await raw_http(edge, plain_get(opted, "/c/3"))  # plain HTTP
            assert over_http.status == 302 and "strict-transport-security" not in over_http.headers

            out = await curl(
                "-sI", *curl_tls(edge, pebble, opted), f"https://{opted}:{edge.https_port}/c/4"
            )
            assert "strict-transport-security: max-age=600\r\n" in out.lower()
            assert "includesubdomains" not in out.lower() and "preload" not in out.lower()

            await set_options(api, opted, hsts_max_age=0)  # how a host withdraws it
            assert (await https(edge, pebble, opted, "/c/5")).headers[
                "strict-transport-security"
            ] == "max-age=0"
            await set_options(api, opted, hsts_max_age=600)

            # a keep-alive connection opened before a suspension gets the 503, without HSTS
            connector = aiohttp.TCPConnector(
                resolver=StaticResolver(edge.ip), ssl=client_context(pebble), limit=1
            )
            async with aiohttp.ClientSession(connector=connector) as session:
                link = f"https://{opted}:{edge.https_port}/c/6"
                async with session.get(link, allow_redirects=False) as resp:
                    await resp.read()
                    assert resp.headers["Strict-Transport-Security"] == "max-age=600"
                status, _ = await call(api, "POST", f"/v1/hosts/{opted}/suspend")
                assert status == 200
                async with session.get(link, allow_redirects=False) as resp:
                    assert resp.status == 503
                    assert "Strict-Transport-Security" not in resp.headers
    finally:
        await edge.stop()
        await runner.cleanup()


# -- other workers ---------------------------------------------------------------------


async def test_another_worker_serves_from_memory_and_follows_changes(
    setup: Setup, pebble: PebbleServer, dns_server: DNSServer, tmp_path: Path
) -> None:
    """A second worker on the same store: no store read per request, changes via events."""
    edge, api = setup.edge, setup.api
    host = await certify(edge, pebble, dns_server)
    await upload(api, host, APPLE, AASA)

    second = EdgeHandle(
        ip=edge.ip, target=edge.target, config=_second_config(edge), key_text=edge.key_text
    )
    await second.start()
    try:
        worker = second.worker
        assert (
            worker is not None and worker.host_views is not None and worker.state_sync is not None
        )
        first = await https(second, pebble, host, AASA_PATHS[0])
        assert first.body == AASA
        reads = worker.host_views.store_reads
        for _ in range(20):
            assert (await https(second, pebble, host, AASA_PATHS[0])).body == AASA
            assert (await https(second, pebble, host, "/c/x")).status == 302
        assert worker.host_views.store_reads == reads  # 40 requests, no store read

        await upload(api, host, APPLE, AASA_V2)
        await set_options(api, host, hsts_max_age=120)
        # the follower wakes on the store's change feed by itself (wait_for_events);
        # reading the feed here as well makes sure both changes are applied now
        await worker.state_sync.poll()
        fresh = await https(
            second, pebble, host, AASA_PATHS[0], headers={"If-None-Match": etag(AASA)}
        )
        assert (fresh.status, fresh.body) == (200, AASA_V2)
        assert fresh.headers["etag"] == etag(AASA_V2)
        assert fresh.headers["strict-transport-security"] == "max-age=120"

        await call(api, "DELETE", f"/v1/hosts/{host}/files/{APPLE}")
        await worker.state_sync.poll()
        assert (await https(second, pebble, host, AASA_PATHS[0])).status == 404
    finally:
        await second.stop()


def _second_config(edge: EdgeHandle) -> Config:
    config = copy.deepcopy(edge.config)
    config.listen.https = f"{edge.ip}:{free_port(edge.ip)}"
    config.listen.http = f"{edge.ip}:{free_port(edge.ip)}"
    config.admin.listen = ""
    config.lifecycle.sync_seconds = 3600  # no periodic re-read: only the change feed
    config.renewal.interval_seconds = 0
    return config


async def _plain_from(edge: EdgeHandle, source_ip: str, request: bytes) -> int:
    """Status of one plain-HTTP request sent from a chosen loopback source address."""
    reader, writer = await asyncio.open_connection(
        edge.ip, edge.http_port, local_addr=(source_ip, 0)
    )
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return int(data.split(b" ", 2)[1])


async def test_upgrade_trusts_x_forwarded_proto_only_from_a_trusted_tls_proxy(
    setup: Setup, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    """Behind a TLS-terminating proxy the edge sees plain HTTP: without trusting its
    X-Forwarded-Proto an upgraded host would redirect forever; from anyone else the
    header is ignored."""
    edge, api = setup.edge, setup.api
    host = await certify(edge, pebble, dns_server)
    await set_options(api, host, https_upgrade=True)
    await edge.stop()
    edge.config.listen.forwarded_trusted = ["127.0.0.5/32"]
    await edge.start()
    claims_https = (
        f"GET /c/fwd HTTP/1.1\r\nHost: {host}\r\nX-Forwarded-Proto: https\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    assert await _plain_from(edge, "127.0.0.5", claims_https) == 302  # forwarded, no loop
    assert await _plain_from(edge, "127.0.0.6", claims_https) == 308  # untrusted: upgraded
    plain = plain_get(host, "/c/plain")
    assert await _plain_from(edge, "127.0.0.5", plain) == 308  # the proxy's own http hop
