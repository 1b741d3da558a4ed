"""Unit tests (fakes allowed): TLS-ALPN-01 certificates, profile choice, the newOrder
body, the fallback policy, config validation and the store migration."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from acme import messages
from cryptography import x509

from acme_client import (
    AcmeError,
    AcmeUnavailable,
    AuthorizationFailed,
    FailoverIssuer,
    IssuedCertificate,
    OrderLimitReached,
    RateLimited,
    tls_alpn01_certificate,
)
from acme_client.issuer import NewOrderRequest, choose_profile
from acme_client.solvers import ACME_IDENTIFIER_OID, TLSALPN01
from certstore import generate_key_text, open_store
from certstore.crypto import Sealer, parse_key_text
from certstore.schema import MIGRATIONS
from proxy.app.config import ConfigError, load_config, require_serving


def test_tls_alpn01_certificate_follows_rfc_8737() -> None:
    key_authorization = "token123.thumbprint456"
    cert_pem, key_pem = tls_alpn01_certificate("links.shop.test", key_authorization)
    cert = x509.load_pem_x509_certificate(cert_pem)
    ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert ext.critical
    assert isinstance(ext.value, x509.UnrecognizedExtension)
    digest = hashlib.sha256(key_authorization.encode()).digest()
    assert ext.value.value == b"\x04\x20" + digest  # DER OCTET STRING of the SHA-256
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["links.shop.test"]
    assert cert.issuer == cert.subject  # self-signed
    assert b"PRIVATE KEY" in key_pem


def test_tls_alpn01_challenge_is_understood_from_the_ca_json() -> None:
    body = messages.ChallengeBody.from_json(
        {
            "type": "tls-alpn-01",
            "url": "https://ca.test/chall/1",
            "status": "pending",
            "token": "dGVzdHRva2VuLXRlc3R0b2tlbi10ZXN0dG9rZW4",
        }
    )
    assert isinstance(body.chall, TLSALPN01)
    assert body.chall.to_partial_json()["type"] == "tls-alpn-01"


def _directory(meta: dict[str, object] | None) -> messages.Directory:
    jobj: dict[str, object] = {"newOrder": "https://ca.test/new-order"}
    if meta is not None:
        jobj["meta"] = meta
    return messages.Directory.from_json(jobj)


def test_profile_is_requested_only_when_the_ca_offers_it() -> None:
    offering = _directory({"profiles": {"classic": "90 days", "shortlived": "6 days"}})
    assert choose_profile(offering, "shortlived") == "shortlived"
    assert choose_profile(offering, "tlsserver") is None
    assert choose_profile(offering, None) is None
    assert choose_profile(_directory({}), "shortlived") is None
    assert choose_profile(_directory(None), "shortlived") is None


def test_new_order_body_carries_profile_and_replaces_only_when_set() -> None:
    ident = [messages.Identifier(typ=messages.IDENTIFIER_FQDN, value="a.test")]
    plain = NewOrderRequest(identifiers=ident, profile=None, replaces=None).to_partial_json()
    assert "profile" not in plain and "replaces" not in plain
    full = json.loads(
        NewOrderRequest(identifiers=ident, profile="shortlived", replaces="aYhb.AIdl").json_dumps()
    )
    assert full["profile"] == "shortlived" and full["replaces"] == "aYhb.AIdl"


class FakeIssuer:
    def __init__(self, url: str, error: AcmeError | None) -> None:
        self.directory_url = url
        self.error = error
        self.calls: list[dict[str, object]] = []

    async def issue(self, hostname: str, sink: object, **kwargs: object) -> IssuedCertificate:
        self.calls.append(kwargs)
        if self.error is not None:
            raise self.error
        return IssuedCertificate(hostname, b"", b"", (hostname,), 0, 1, "fake", "1", self.url)

    @property
    def url(self) -> str:
        return self.directory_url

    async def start(self) -> None: ...
    async def close(self) -> None: ...


def _failed(exc: AcmeError, authz: int) -> AcmeError:
    exc.failed_authorizations = authz
    return exc


@pytest.mark.parametrize(
    ("error", "falls_back"),
    [
        (AcmeUnavailable("down"), True),
        (RateLimited("the CA's rate limit"), True),
        (AcmeError("order became invalid: serverInternal"), True),
        (AuthorizationFailed("a.test: http-01 failed: connection refused"), False),
        (AuthorizationFailed("a.test: http-01 failed: CAA record forbids issuance"), True),
        (OrderLimitReached("limits.per_domain"), False),
    ],
)
async def test_fallback_only_for_the_cas_own_failures(error: AcmeError, falls_back: bool) -> None:
    primary = FakeIssuer("https://primary.test/dir", error)
    fallback = FakeIssuer("https://fallback.test/dir", None)
    issuer = FailoverIssuer(primary, fallback)  # type: ignore[arg-type]
    if falls_back:
        issued = await issuer.issue("a.test", object(), replaces="x.y", exempt=True)  # type: ignore[arg-type]
        assert issued.directory_url == "https://fallback.test/dir"
        # `replaces` names a primary certificate; the fallback's orders are not exempt
        assert "replaces" not in fallback.calls[0] and fallback.calls[0]["exempt"] is False
    else:
        with pytest.raises(type(error)):
            await issuer.issue("a.test", object())  # type: ignore[arg-type]
        assert fallback.calls == []


async def test_fallback_respects_the_failed_authorization_budget() -> None:
    primary = FakeIssuer("p", _failed(AuthorizationFailed("CAA forbids"), 2))
    fallback = FakeIssuer("f", _failed(AuthorizationFailed("CAA forbids too"), 1))
    issuer = FailoverIssuer(primary, fallback)  # type: ignore[arg-type]
    with pytest.raises(AcmeError) as raised:
        await issuer.issue("a.test", object(), authz_budget=3)  # type: ignore[arg-type]
    assert fallback.calls[0]["authz_budget"] == 1
    assert raised.value.failed_authorizations == 3
    fallback.calls.clear()
    with pytest.raises(AuthorizationFailed):
        await issuer.issue("a.test", object(), authz_budget=2)  # type: ignore[arg-type]
    assert fallback.calls == []  # budget spent at the primary


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LINKEDGE_ACME_CHALLENGES": "http-01,dns-01"}, "unknown challenge type 'dns-01'"),
        ({"LINKEDGE_ACME_CHALLENGES": ""}, "at least one challenge type"),
        ({"LINKEDGE_FALLBACK_EAB_KID": "kid-1"}, "fallback.eab_kid and fallback.eab_hmac_key"),
        ({"LINKEDGE_ACME_EAB_HMAC_KEY": "abc"}, "acme.eab_kid and acme.eab_hmac_key"),
        (
            {"LINKEDGE_FALLBACK_DIRECTORY": "https://acme-v02.api.letsencrypt.org/directory"},
            "must differ",
        ),
        ({"LINKEDGE_LIMITS_PER_DOMAIN": "-1"}, "must not be negative"),
    ],
)
def test_bad_acme_config_is_a_clear_error(env: dict[str, str], message: str) -> None:
    base = {
        "LINKEDGE_BACKEND_URL": "http://b.test",
        "LINKEDGE_EDGE_CNAME_TARGET": "e.test",
        "LINKEDGE_ADMIN_LISTEN": "",
    }
    with pytest.raises(ConfigError, match=message):
        require_serving(load_config(None, environ={**base, **env}))


async def test_schema_v1_store_migrates_and_keeps_its_certificates(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    key = parse_key_text(generate_key_text(), "t")
    # a genuine version-1 store (first migration only) holding one certificate
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0])
    db.execute(
        "INSERT INTO certificates VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            "a.test",
            b"chain",
            Sealer(key).seal(b"key", "cert:a.test"),
            "a.test",
            1.0,
            2.0,
            "CA",
            0.5,
        ),
    )
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()

    store = await open_store(path, key)
    try:
        cert = await store.get_certificate("a.test")
        assert cert is not None and cert.key_pem == b"key"
        assert cert.serial == "" and cert.directory_url == ""
        assert await store.hosts_needing_maintenance(0.0, 10) == ["a.test"]
    finally:
        await store.close()
