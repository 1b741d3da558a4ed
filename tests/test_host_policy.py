"""HostPolicy details that the end-to-end tests cannot reach: the public port 443 left out
of upgrade redirects, request targets in absolute form, If-None-Match lists."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from certstore import StoredCertificate, open_store
from proxy.http.host_policy import HostPolicy, _matches
from proxy.http.host_views import HostViews
from proxy.http.request_target import BadRequest
from proxy.http.request_target import origin_form as _origin_form

HOST = "links.policy.test"
VALID = (1_000.0, 10_000.0)


@pytest.fixture
async def views(tmp_path: Path):
    store = await open_store(tmp_path / "s.db", os.urandom(32))
    await store.add_domain(HOST, "acct")
    await store.put_options(HOST, {"hsts_max_age": 60, "https_upgrade": True})
    yield HostViews(store)
    await store.close()


async def give_certificate(views: HostViews) -> None:
    """Store a certificate valid from 1,000 to 10,000 (fake clock) and drop the cached view."""
    await views._store.put_certificate(
        StoredCertificate(
            hostname=HOST,
            chain_pem=b"(not read here)",
            key_pem=b"(not read here)",
            names=(HOST,),
            not_before=VALID[0],
            not_after=VALID[1],
            issuer="test",
            created_at=VALID[0],
        )
    )
    views.forget(HOST)


@pytest.mark.parametrize(
    ("port", "target", "location"),
    [
        (443, "/c/1?x=%41", f"https://{HOST}/c/1?x=%41"),
        (8443, "/c/1?x=%41", f"https://{HOST}:8443/c/1?x=%41"),
        (443, f"http://{HOST}", f"https://{HOST}/"),
        (443, f"http://{HOST}?q=1", f"https://{HOST}/?q=1"),
        (443, f"HTTP://{HOST}:80/p/../q?r=/s", f"https://{HOST}/p/../q?r=/s"),
    ],
)
async def test_upgrade_location(views: HostViews, port: int, target: str, location: str) -> None:
    now = 5_000.0
    policy = HostPolicy(views, https_public_port=port, clock=lambda: now)
    request = make_mocked_request("GET", target, headers={"Host": HOST})
    assert await policy.answer(request, HOST) is None  # no certificate yet: forwarded
    await give_certificate(views)
    answer = await policy.answer(request, HOST)
    assert answer is not None and answer.status == 308
    assert answer.headers["Location"] == location
    now = VALID[1]  # expired: forwarded again, no redirect into a failing handshake
    assert await policy.answer(request, HOST) is None
    now = 5_000.0
    behind_tls_proxy = HostPolicy(views, clock=lambda: now, is_https=lambda _r: True)
    assert await behind_tls_proxy.answer(request, HOST) is None  # never a redirect loop


async def test_hsts_needs_tls_a_valid_certificate_and_the_option(views: HostViews) -> None:
    now = 5_000.0
    policy = HostPolicy(views, clock=lambda: now)
    tls = ssl.create_default_context()
    secure = make_mocked_request("GET", "/c/1", headers={"Host": HOST}, sslcontext=tls)
    plain = make_mocked_request("GET", "/c/1", headers={"Host": HOST})
    await give_certificate(views)
    assert await policy.answer(secure, HOST) is None  # a click: forwarded, view now cached

    async def sts(request: web.Request) -> list[str]:
        response = web.Response(headers={"Strict-Transport-Security": "max-age=1; preload"})
        await policy._add_headers(request, response)
        return response.headers.getall("Strict-Transport-Security", [])

    assert await sts(secure) == ["max-age=60"]
    assert await sts(plain) == []
    now = VALID[1] + 1
    assert await sts(secure) == []


def test_origin_form_and_if_none_match() -> None:
    assert _origin_form("/a?b") == "/a?b"
    assert _origin_form("http://h/a/b?c") == "/a/b?c"
    assert _origin_form("http://h") == "/"
    assert _origin_form("http://h?q=1") == "/?q=1"
    assert _origin_form("/a#frag") == "/a"
    for bad in ("*", "links.test:443", "ftp://h/a", "h/a"):
        with pytest.raises(BadRequest):
            _origin_form(bad)
    etag = '"sha256-abc"'
    assert _matches(['"x", W/"sha256-abc"'], etag)
    assert _matches(['"x"', '"sha256-abc"'], etag)  # repeated header fields
    assert _matches(["*"], etag)
    assert not _matches(['"sha256-ab"', '"x"'], etag)
    assert not _matches([], etag)
