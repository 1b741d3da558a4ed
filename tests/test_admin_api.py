"""The admin API over real HTTP on the edge's admin listener (Pebble, DNS server, TLS)."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from support.edge import (
    ADMIN_TOKEN,
    EdgeHandle,
    client_context,
    enable_admin,
    https_session,
    tls_handshake,
)

from proxy.admin.api import ROUTES
from proxy.admin.openapi import SCHEMAS, document
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer
from proxy.hosts.leases import lease_name

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
async def admin(edge_config: EdgeHandle, tmp_path: Path) -> AsyncIterator[tuple[EdgeHandle, str]]:
    base = enable_admin(edge_config, tmp_path)
    await edge_config.start()
    yield edge_config, base
    await edge_config.stop()


@pytest.fixture
async def api(admin) -> AsyncIterator[aiohttp.ClientSession]:
    _edge, base = admin
    async with aiohttp.ClientSession(base_url=base, headers=AUTH) as session:
        yield session


def n(edge: EdgeHandle) -> str:
    return edge.ip.split(".")[-1]


async def call(
    session: aiohttp.ClientSession, method: str, path: str, **kw: Any
) -> tuple[int, Any]:
    async with session.request(method, path, **kw) as resp:
        text = await resp.text()
        body = None
        if resp.content_type == "application/json" and text:
            body = await resp.json()
        return resp.status, body


async def snapshot(api: aiohttp.ClientSession) -> tuple[Any, int]:
    """Everything an invalid request must leave untouched: hosts and the event count."""
    _status, page = await call(api, "GET", "/v1/hosts?limit=1000")
    events = 0
    for host in page["hosts"]:
        _s, body = await call(api, "GET", f"/v1/hosts/{host['hostname']}/events?limit=500")
        events += len(body["events"])
    return page["hosts"], events


# -- authentication ------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-wrong-token"},
        {"Authorization": ADMIN_TOKEN},  # no scheme
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
    ],
    ids=["missing", "wrong", "no-scheme", "basic", "longer"],
)
async def test_missing_or_wrong_token_is_401_and_nothing_else(admin, api, headers) -> None:
    edge, base = admin
    await call(
        api, "POST", "/v1/hosts", json={"hostname": f"links.keep-{n(edge)}.test", "account": "a"}
    )
    before = await snapshot(api)
    paths = [(m, p.replace("{host}", f"links.keep-{n(edge)}.test")) for m, p, _h, _s in ROUTES]
    paths += [("GET", "/v1/openapi.json"), ("GET", "/v1/nope"), ("DELETE", "/v1/hosts/x.test")]
    async with aiohttp.ClientSession(base_url=base, headers=headers) as anon:
        for method, path in paths:
            async with anon.request(
                method, path, json={"hostname": "links.evil.test", "account": "x"}
            ) as resp:
                assert resp.status == 401, (method, path)
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                assert await resp.json() == {
                    "error": "unauthorized",
                    "message": "missing or wrong bearer token",
                }
        async with anon.get("/status", allow_redirects=False) as resp:  # a person: log in first
            assert resp.status == 303 and resp.headers["Location"] == "/status/login"
    assert await snapshot(api) == before


# -- hosts ---------------------------------------------------------------------------


async def test_add_list_get_delete_with_idn_round_trip(admin, api) -> None:
    edge, _ = admin
    unicode_name = f"Links.Bücher-{n(edge)}.Test."
    status, host = await call(
        api, "POST", "/v1/hosts", json={"hostname": unicode_name, "account": "shop1"}
    )
    assert status == 201, host
    ascii_name = host["hostname"]
    assert ascii_name.startswith("links.xn--") and ascii_name.endswith(".test")
    assert host["hostname_unicode"] == unicode_name.lower().rstrip(".")
    assert (host["account"], host["state"], host["certificate"]) == ("shop1", "pending", None)
    assert [e["kind"] for e in host["events"]] == ["registered"]
    assert_schema(host, "Host")

    # the same host, named three ways, is one host
    for name in (quote(unicode_name.lower()), ascii_name.upper(), ascii_name + "."):
        status, got = await call(api, "GET", f"/v1/hosts/{name}")
        assert status == 200 and got["hostname"] == ascii_name
    status, again = await call(
        api, "POST", "/v1/hosts", json={"hostname": ascii_name, "account": "shop1"}
    )
    assert status == 200 and again["hostname"] == ascii_name  # idempotent for its owner

    status, page = await call(api, "GET", "/v1/hosts")
    assert status == 200 and [h["hostname"] for h in page["hosts"]] == [ascii_name]
    assert page["next"] is None
    assert_schema(page, "HostPage")

    status, _ = await call(api, "DELETE", f"/v1/hosts/{quote(unicode_name)}")
    assert status == 204
    assert (await call(api, "GET", f"/v1/hosts/{ascii_name}"))[0] == 404
    assert (await call(api, "DELETE", f"/v1/hosts/{ascii_name}"))[0] == 404


BAD_ADDS: list[tuple[Any, int, str]] = [
    ({"hostname": "192.0.2.1", "account": "a"}, 422, "IP address"),
    ({"hostname": "[2001:db8::1]", "account": "a"}, 422, "IP address"),
    ({"hostname": "*.shop.test", "account": "a"}, 422, "wildcards"),
    ({"hostname": "a" * 64 + ".test", "account": "a"}, 422, "longer than 63"),
    ({"hostname": ("a" * 60 + ".") * 5 + "test", "account": "a"}, 422, "longer than 253"),
    ({"hostname": "localhost", "account": "a"}, 422, "two labels"),
    ({"hostname": "bad_name.test", "account": "a"}, 422, "letters, digits"),
    ({"hostname": "xn--zz.test", "account": "a"}, 422, "punycode"),
    ({"hostname": "EDGE_TARGET", "account": "a"}, 422, "edge's own names"),
    ({"hostname": "cdn.EDGE_TARGET", "account": "a"}, 422, "edge's own names"),
    ({"hostname": "links.owned.test", "account": "other"}, 409, "another account"),
    ({"hostname": "links.x.test", "account": "a", "admin": True}, 422, "unknown field 'admin'"),
    ({"hostname": "links.x.test"}, 422, "missing field 'account'"),
    ({"hostname": 42, "account": "a"}, 422, "must be a string"),
    ({"hostname": "links.x.test", "account": ""}, 422, "account must be"),
    ({"hostname": "links.x.test", "account": "a b"}, 422, "account must be"),
    (["links.x.test"], 422, "JSON object"),
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe", 400, "not UTF-8 (byte 0)"),
    (b'{"hostname": ' + b"1" * 5000 + b"}", 400, "(4300 digits)"),
    (b"[" * 10_000 + b"]" * 10_000, 400, "nested too deeply"),
]


@pytest.mark.parametrize(("body", "status", "fragment"), BAD_ADDS)
async def test_bad_input_is_a_4xx_with_a_reason_and_changes_nothing(
    admin, api, body, status, fragment
) -> None:
    edge, _ = admin
    await call(api, "POST", "/v1/hosts", json={"hostname": "links.owned.test", "account": "shop"})
    before = await snapshot(api)
    if isinstance(body, bytes):
        got_status, got = await call(
            api, "POST", "/v1/hosts", data=body, headers={"Content-Type": "application/json"}
        )
    else:
        if isinstance(body, dict) and isinstance(body.get("hostname"), str):
            body = {**body, "hostname": body["hostname"].replace("EDGE_TARGET", edge.target)}
        got_status, got = await call(api, "POST", "/v1/hosts", json=body)
    assert got_status == status, got
    assert fragment in got["message"], got
    assert_schema(got, "Error")
    assert await snapshot(api) == before


async def test_bad_paths_and_queries(api) -> None:
    for path, status in [
        ("/v1/hosts/not_a_host", 422),
        ("/v1/hosts/192.0.2.1", 422),
        ("/v1/hosts/links.unknown.test", 404),
        ("/v1/hosts?limit=0", 422),
        ("/v1/hosts?limit=1001", 422),
        ("/v1/hosts?limit=ten", 422),
        ("/v1/hosts?state=asleep", 422),
        ("/v1/hosts?sort=desc", 422),
        ("/v1/hosts/links.unknown.test/events?limit=0", 404),
    ]:
        got_status, body = await call(api, "GET", path)
        assert got_status == status, (path, body)
        assert body["message"]


async def test_keyset_pagination_visits_every_host_once(admin, api) -> None:
    names = [f"links.page{i:02d}.test" for i in range(7)]
    for i, name in enumerate(names):
        await call(api, "POST", "/v1/hosts", json={"hostname": name, "account": f"acct{i % 2}"})
    seen, after, pages = [], None, 0
    while True:
        query = "limit=3" + (f"&after={after}" if after else "")
        status, page = await call(api, "GET", f"/v1/hosts?{query}")
        assert status == 200
        seen += [h["hostname"] for h in page["hosts"]]
        pages += 1
        after = page["next"]
        if after is None:
            break
    assert seen == names and pages == 3
    _s, only = await call(api, "GET", "/v1/hosts?account=acct1")
    assert [h["hostname"] for h in only["hosts"]] == names[1::2]
    _s, pending = await call(api, "GET", "/v1/hosts?state=pending&limit=2")
    assert len(pending["hosts"]) == 2 and pending["next"] == names[1]


# -- checks, certificate, renewal, suspension -----------------------------------------


async def test_checks_now_then_certificate_renewal_and_events(
    admin, api, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    edge, _ = admin
    host = f"links.renew-{n(edge)}.test"
    await call(api, "POST", "/v1/hosts", json={"hostname": host, "account": "shop"})
    status, body = await call(api, "POST", f"/v1/hosts/{host}/checks")
    assert status == 200 and body["state"] == "pending"
    assert {c["name"]: c["code"] for c in body["checks"]} == {
        "cname": "nxdomain",
        "caa": "no_records",
        "https": "skipped",
    }
    assert (await call(api, "GET", f"/v1/hosts/{host}/certificate"))[0] == 404

    dns_server.set_cname(host, edge.target)
    status, body = await call(api, "POST", f"/v1/hosts/{host}/checks")
    assert status == 200 and body["state"] == "active", body  # verified, then issued at once
    assert [c["state"] for c in body["checks"]] == ["pass", "pass", "pass"]
    assert_schema(body, "Host")

    status, first = await call(api, "GET", f"/v1/hosts/{host}/certificate")
    assert status == 200 and first["names"] == [host] and "BEGIN CERTIFICATE" in first["chain_pem"]
    assert "PRIVATE" not in str(first)
    assert_schema(first, "Certificate")

    status, renewed = await call(api, "POST", f"/v1/hosts/{host}/renew")
    assert status == 200, renewed
    assert renewed["serial"] != first["serial"]
    obj = await tls_handshake(edge.ip, edge.https_port, host, client_context(pebble))
    assert obj is not None
    served = obj.getpeercert()
    assert format(int(served["serialNumber"], 16), "x") == renewed["serial"]  # the new one is live

    status, events = await call(api, "GET", f"/v1/hosts/{host}/events")
    kinds = [(e["kind"], e["to_state"]) for e in events["events"]]
    assert ("state", "verified") in kinds and ("state", "active") in kinds
    assert [k for k, _ in kinds].count("issued") == 1  # the first certificate
    assert [k for k, _ in kinds].count("renewed") == 1  # the forced renewal
    assert_schema(events, "Events")


async def _active_host(edge: EdgeHandle, api: aiohttp.ClientSession, dns_server: DNSServer) -> str:
    host = f"links.busy-{n(edge)}.test"
    await call(api, "POST", "/v1/hosts", json={"hostname": host, "account": "shop"})
    dns_server.set_cname(host, edge.target)
    status, body = await call(api, "POST", f"/v1/hosts/{host}/checks")
    assert status == 200 and body["state"] == "active", body
    return host


async def test_renewal_waits_for_another_holders_lease(admin, api, dns_server) -> None:
    """The host's issuance lease is held elsewhere (a proactive order that finds the
    certificate stored, a first click in another worker) and released soon: the forced
    renewal waits for it instead of answering 409 (seen in CI under load, right after
    the host's first certificate)."""
    edge, _ = admin
    host = await _active_host(edge, api, dns_server)
    _, first = await call(api, "GET", f"/v1/hosts/{host}/certificate")
    store = await edge.open_store()
    try:
        assert await store.try_acquire_lease(lease_name(host), "another-worker", 30)

        async def release_soon() -> None:
            await asyncio.sleep(0.5)
            await store.release_lease(lease_name(host), "another-worker")

        releaser = asyncio.create_task(release_soon())
        status, renewed = await call(api, "POST", f"/v1/hosts/{host}/renew")
        await releaser
    finally:
        await store.close()
    assert status == 200, renewed
    assert renewed["serial"] != first["serial"]


async def test_renewal_answers_409_while_another_order_keeps_the_lease(
    admin, api, dns_server
) -> None:
    edge, _ = admin
    host = await _active_host(edge, api, dns_server)
    _, first = await call(api, "GET", f"/v1/hosts/{host}/certificate")
    manager = edge.worker.manager
    assert manager is not None
    manager._settings = dataclasses.replace(manager._settings, renew_wait_seconds=0.5)
    store = await edge.open_store()
    try:
        assert await store.try_acquire_lease(lease_name(host), "another-worker", 30)
        status, body = await call(api, "POST", f"/v1/hosts/{host}/renew")
        await store.release_lease(lease_name(host), "another-worker")
    finally:
        await store.close()
    assert status == 409 and body["error"] == "order_in_progress", body
    _, after = await call(api, "GET", f"/v1/hosts/{host}/certificate")
    assert after["serial"] == first["serial"]  # nothing was ordered or replaced


async def test_renewal_refused_for_a_host_that_does_not_verify(admin, api, dns_server) -> None:
    edge, _ = admin
    host = f"links.norenew-{n(edge)}.test"
    await call(api, "POST", "/v1/hosts", json={"hostname": host, "account": "shop"})
    dns_server.set_cname(host, "elsewhere.example.test")
    status, body = await call(api, "POST", f"/v1/hosts/{host}/renew")
    assert (
        status == 409
        and "pending" in body["message"]
        and "elsewhere.example.test" in body["message"]
    )


async def test_suspend_refuses_tls_and_http_then_resume(
    admin, api, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    edge, _ = admin
    host = f"links.kill-{n(edge)}.test"
    await call(api, "POST", "/v1/hosts", json={"hostname": host, "account": "shop"})
    dns_server.set_cname(host, edge.target)
    async with https_session(edge, pebble) as session:
        async with session.get(f"https://{host}:{edge.https_port}/c/1", allow_redirects=False) as r:
            assert r.status == 302

    status, body = await call(
        api, "POST", f"/v1/hosts/{host}/suspend", json={"reason": "abuse #12"}
    )
    assert status == 200 and body["state"] == "suspended"
    assert body["state_reason"] == "suspended by operator: abuse #12"
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        await tls_handshake(edge.ip, edge.https_port, host, client_context(pebble))
    async with aiohttp.ClientSession() as plain:
        url = f"http://{edge.ip}:{edge.http_port}/c/2"
        async with plain.get(url, headers={"Host": host}, allow_redirects=False) as r:
            assert r.status == 503 and await r.text() == f"{host} is suspended on this edge.\n"
    status, _ = await call(api, "POST", f"/v1/hosts/{host}/renew")
    assert status == 409
    assert (await call(api, "POST", f"/v1/hosts/{host}/suspend", data=b"{x"))[0] == 400

    status, body = await call(api, "POST", f"/v1/hosts/{host}/resume")
    assert status == 200 and body["state"] == "active"
    assert (await call(api, "POST", f"/v1/hosts/{host}/resume"))[0] == 409
    async with https_session(edge, pebble) as session:
        async with session.get(f"https://{host}:{edge.https_port}/c/3", allow_redirects=False) as r:
            assert r.status == 302
    _s, events = await call(api, "GET", f"/v1/hosts/{host}/events")
    transitions = [
        (e["from_state"], e["to_state"], e["detail"])
        for e in events["events"]
        if e["kind"] == "state"
    ]
    assert transitions[:2] == [
        ("suspended", "active", "resumed by operator"),
        ("active", "suspended", "suspended by operator: abuse #12"),
    ]


# -- options -------------------------------------------------------------------------


async def test_options_are_validated(admin, api) -> None:
    edge, _ = admin
    host = f"links.opts-{n(edge)}.test"
    await call(api, "POST", "/v1/hosts", json={"hostname": host, "account": "shop"})
    path = f"/v1/hosts/{host}/options"
    assert await call(api, "GET", path) == (200, {"hsts_max_age": None, "https_upgrade": False})
    status, body = await call(
        api, "PUT", path, json={"hsts_max_age": 31536000, "https_upgrade": True}
    )
    assert (status, body) == (200, {"hsts_max_age": 31536000, "https_upgrade": True})
    assert_schema(body, "Options")
    for bad, status, fragment in [
        ({"hsts_max_age": True}, 422, "integer or null, not boolean"),
        ({"hsts_max_age": "1"}, 422, "not string"),
        ({"hsts_max_age": -1}, 422, "between 0 and"),
        ({"https_upgrade": 1}, 422, "must be boolean"),
        ({"redirect_all": True}, 422, "unknown option 'redirect_all'"),
        ([], 422, "JSON object"),
    ]:
        got_status, got = await call(api, "PUT", path, json=bad)
        assert (got_status, fragment in got["message"]) == (status, True), got
    got_status, _ = await call(
        api, "PUT", path, data=b"{", headers={"Content-Type": "application/json"}
    )
    assert got_status == 400
    assert await call(api, "GET", path) == (200, {"hsts_max_age": 31536000, "https_upgrade": True})
    assert (await call(api, "GET", "/v1/hosts/links.none.test/options"))[0] == 404
    # PUT replaces: omitted fields return to their defaults
    assert await call(api, "PUT", path, json={"https_upgrade": True}) == (
        200,
        {"hsts_max_age": None, "https_upgrade": True},
    )


# -- OpenAPI -------------------------------------------------------------------------


async def test_openapi_document_matches_the_router(admin, api) -> None:
    edge, _ = admin
    assert edge.worker is not None
    status, served = await call(api, "GET", "/v1/openapi.json")
    assert status == 200 and served == document()
    documented = {(method.upper(), path) for path, ops in served["paths"].items() for method in ops}
    from proxy.admin.app import make_admin_app
    from proxy.admin.deps import AdminDeps

    app = make_admin_app(
        AdminDeps(store=None, verifier=None, lifecycle=None, edge_target="e", token="t" * 16)
    )  # type: ignore[arg-type]
    routed = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD"
        and route.resource is not None
        and route.resource.canonical.startswith("/v1/")
    }
    assert routed == documented
    for path, ops in served["paths"].items():
        for method, op in ops.items():
            assert "401" in op["responses"], (method, path)
            for response in op["responses"].values():
                for content in response.get("content", {}).values():
                    ref = content.get("schema", {}).get("$ref")
                    if ref:
                        assert ref.rsplit("/", 1)[1] in SCHEMAS


def assert_schema(value: Any, name: str) -> None:
    """A small JSON Schema subset (type, enum, required, properties, additionalProperties,
    items, $ref): enough to keep the OpenAPI document true to the real responses."""
    _check(value, {"$ref": f"#/components/schemas/{name}"}, name)


_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "null": type(None),
}


def _check(value: Any, schema: dict[str, Any], where: str) -> None:
    if "$ref" in schema:
        ref = schema["$ref"].rsplit("/", 1)[1]
        _check(value, SCHEMAS[ref], f"{where}<{ref}>")
        return
    if "enum" in schema:
        assert value in schema["enum"], (where, value)
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        ok = any(
            isinstance(value, _TYPES[t])
            and not (t in ("integer", "number") and isinstance(value, bool))
            for t in types
        )
        assert ok, (where, value, types)
    if isinstance(value, dict) and "properties" in schema:
        for key in schema.get("required", []):
            assert key in value, (where, key)
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(schema["properties"]), (
                where,
                set(value) - set(schema["properties"]),
            )
        for key, sub in schema["properties"].items():
            if key in value:
                _check(value[key], sub, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _check(item, schema["items"], f"{where}[{i}]")
