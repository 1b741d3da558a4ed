"""The three checks against the real DNS server, the real edge and real TLS servers."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support.edge import EdgeHandle, https_session, register
from support.net import free_port

from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer
from proxy.hosts.checks import CheckSettings, CheckState, HostChecker
from proxy.hosts.checks.caa import CaaRecord, evaluate


def checker_for(dns: DNSServer, target: str, **kw: object) -> HostChecker:
    settings = CheckSettings(
        edge_target=target, nameservers=(dns.nameserver,), dns_timeout=2.0, **kw
    )  # type: ignore[arg-type]
    return HostChecker(settings)


# -- cname -------------------------------------------------------------------------


async def test_cname_follows_the_dns_as_it_changes(dns_server: DNSServer) -> None:
    target, host = "edge-c1.linkedge.test", "links.cname1.test"
    dns_server.set_a(target, ["127.0.0.61"])
    checker = checker_for(dns_server, target)

    async def cname():
        result = (await checker.check_dns(host)).get("cname")
        assert result is not None
        return result

    missing = await cname()
    assert (missing.state, missing.code) == (CheckState.FAIL, "nxdomain")
    assert f"add a CNAME record pointing to {target}" in missing.reason

    dns_server.set_cname(host, "shop.cdn-other.test")
    dns_server.set_a("shop.cdn-other.test", ["198.51.100.7"])  # DNS data only, never contacted
    elsewhere = await cname()
    assert (elsewhere.state, elsewhere.code) == (CheckState.FAIL, "elsewhere")
    assert elsewhere.details["points_to"] == "shop.cdn-other.test"
    assert "points at shop.cdn-other.test, not edge-c1.linkedge.test" in elsewhere.reason

    # the other name resolving to the edge's own addresses (a shared LB, anycast) changes nothing
    dns_server.set_a("shop.cdn-other.test", ["127.0.0.61"])
    shared = await cname()
    assert (shared.state, shared.code) == (CheckState.FAIL, "elsewhere"), shared
    assert "points at shop.cdn-other.test, not edge-c1.linkedge.test" in shared.reason

    dns_server.set_a(host, ["198.51.100.8", "198.51.100.9"])  # a CDN proxy answers instead
    proxied = await cname()
    assert (proxied.state, proxied.code) == (CheckState.FAIL, "proxied")
    assert "198.51.100.8, 198.51.100.9" in proxied.reason and "DNS only" in proxied.reason

    dns_server.set_a(host, ["127.0.0.61"])  # A record straight at the edge: works, but warn
    by_address = await cname()
    assert (by_address.state, by_address.code) == (CheckState.WARN, "via_address")
    assert by_address.passed

    dns_server.set_cname(host, target)  # added late, as customers do
    ok = await cname()
    assert (ok.state, ok.code) == (CheckState.PASS, "ok")
    assert ok.details["chain"] == [target]

    dns_server.set_servfail(host)
    broken = await cname()
    assert (broken.state, broken.code) == (CheckState.UNKNOWN, "dns_error")
    assert "will retry" in broken.reason
    dns_server.set_servfail(host, on=False)


async def test_cname_without_cname_compares_a_and_aaaa_with_the_edge(
    dns_server: DNSServer,
) -> None:
    target, host = "edge-c6.linkedge.test", "links.cname6.test"
    dns_server.set_a(target, ["127.0.0.63"])
    dns_server.set_aaaa(target, ["2001:db8::63"])
    checker = checker_for(dns_server, target)

    async def cname():
        result = (await checker.check_dns(host)).get("cname")
        assert result is not None
        return result

    dns_server.set_a(host, ["127.0.0.63"])
    dns_server.set_aaaa(host, ["2001:db8::63"])
    both = await cname()
    assert (both.state, both.code) == (CheckState.WARN, "via_address"), both
    assert both.details["addresses"] == ["127.0.0.63", "2001:db8::63"]

    dns_server.set_aaaa(host, ["2001:db8::99"])  # one IPv6 address that is not the edge's
    foreign = await cname()
    assert (foreign.state, foreign.code) == (CheckState.FAIL, "proxied"), foreign
    assert "2001:db8::99" in foreign.reason

    dns_server.set_a(host, [])  # IPv6 only, the edge's: still fine
    dns_server.set_aaaa(host, ["2001:db8::63"])
    v6_only = await cname()
    assert (v6_only.state, v6_only.code) == (CheckState.WARN, "via_address"), v6_only

    strict = checker_for(dns_server, target, issue_via_address=False)
    refused = (await strict.check_dns(host)).get("cname")
    assert refused is not None and (refused.state, refused.code) == (CheckState.FAIL, "via_address")
    assert not (await strict.check_dns(host)).may_issue


async def test_cname_timeout_is_unknown() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as blackhole:  # never answers
        blackhole.bind(("127.0.0.1", 0))
        checker = HostChecker(
            CheckSettings(
                edge_target="edge.linkedge.test",
                nameservers=(f"127.0.0.1:{blackhole.getsockname()[1]}",),
                dns_timeout=0.3,
            )
        )
        report = await checker.check_dns("links.timeout.test")
    assert [(r.name, r.state) for r in report.results] == [
        ("cname", CheckState.UNKNOWN),
        ("caa", CheckState.UNKNOWN),
    ]
    assert not report.reaches_edge


# -- caa ---------------------------------------------------------------------------


async def test_caa_climbs_to_the_parent_and_follows_the_cname(dns_server: DNSServer) -> None:
    target, host = "edge-caa.linkedge.test", "links.caa-shop.test"
    dns_server.set_a(target, ["127.0.0.62"])
    dns_server.set_cname(host, target)
    checker = checker_for(dns_server, target)

    async def caa():
        result = (await checker.check_dns(host)).get("caa")
        assert result is not None
        return result

    none = await caa()
    assert (none.state, none.code) == (CheckState.PASS, "no_records")

    dns_server.set_caa("caa-shop.test", [(0, "issue", "digicert.com")])
    forbidden = await caa()
    assert (forbidden.state, forbidden.code) == (CheckState.FAIL, "forbidden")
    assert forbidden.details["owner"] == "caa-shop.test"  # found by climbing from the host
    assert "allows only digicert.com" in forbidden.reason
    assert 'caa-shop.test. CAA 0 issue "letsencrypt.org"' in forbidden.reason

    dns_server.set_caa(
        "caa-shop.test", [(0, "issue", "digicert.com"), (0, "issue", "letsencrypt.org")]
    )
    assert (await caa()).code == "permitted"

    # the CNAME target's own CAA set wins over the host's parents (RFC 8659 §3)
    dns_server.set_caa(target, [(0, "issue", ";")])
    at_target = await caa()
    assert at_target.code == "forbidden" and at_target.details["owner"] == target
    assert "no CA at all" in at_target.reason
    dns_server.set_caa(target, [])

    dns_server.set_servfail("caa-shop.test")
    unknown = await caa()
    assert (unknown.state, unknown.code) == (CheckState.UNKNOWN, "dns_error")
    dns_server.set_servfail("caa-shop.test", on=False)


def test_caa_rules() -> None:
    le = "letsencrypt.org"

    def verdict(*records: tuple[int, str, str], account: str | None = None) -> bool:
        return evaluate([CaaRecord(*r) for r in records], "shop.test", le, account).permitted

    assert verdict((0, "iodef", "mailto:x@shop.test"))  # no issue property: unrestricted
    assert verdict((0, "issue", "LetsEncrypt.org; validationmethods=http-01,dns-01"))
    assert not verdict((0, "issue", "letsencrypt.org; validationmethods=dns-01"))
    assert not verdict((128, "tbs", "unknown"), (0, "issue", le))  # critical, not understood
    assert verdict((128, "issue", le))  # critical but understood
    assert verdict((0, "issue", f"{le}; accounturi=https://ca/acct/1"), account="https://ca/acct/1")
    assert not verdict(
        (0, "issue", f"{le}; accounturi=https://ca/acct/1"), account="https://ca/acct/2"
    )
    assert not verdict((0, "issuewild", le), (0, "issue", "sectigo.com"))


# -- https -------------------------------------------------------------------------


def _write_pki(
    directory: Path, name: str, *, days_before: float, days_after: float
) -> tuple[Path, Path, Path]:
    """A CA and a leaf for `name` valid from now-days_before to now+days_after."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "checks test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=400))
        .not_valid_after(now + dt.timedelta(days=400))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=days_before))
        .not_valid_after(now + dt.timedelta(days=days_after))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, chain_path, key_path = (
        directory / "ca.pem",
        directory / "chain.pem",
        directory / "key.pem",
    )
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, chain_path, key_path


async def _tls_server(ip: str, chain: Path, key: Path) -> tuple[asyncio.Server, int]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(chain, key)

    async def serve(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(serve, ip, 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1]


@pytest.fixture
async def https_env(dns_server: DNSServer) -> AsyncIterator[tuple[str, str]]:
    ip, target = "127.0.0.201", "edge-https.linkedge.test"
    dns_server.set_a(target, [ip])
    yield ip, target


@pytest.mark.parametrize(
    ("days_before", "days_after", "state", "code", "fragment"),
    [
        (10, 80, CheckState.PASS, "valid", "expires in 80 days"),
        (40, 5, CheckState.WARN, "expiring", "expires in 5.0 days"),
        (50, -1, CheckState.FAIL, "expired", "expired on"),
    ],
)
async def test_https_validity(
    tmp_path: Path, dns_server: DNSServer, https_env, days_before, days_after, state, code, fragment
) -> None:
    ip, target = https_env
    host = f"links.https-{code}.test"
    dns_server.set_cname(host, target)
    ca, chain, key = _write_pki(tmp_path, host, days_before=days_before, days_after=days_after)
    server, port = await _tls_server(ip, chain, key)
    try:
        checker = checker_for(
            dns_server, target, https_port=port, ca_bundle=str(ca), https_addresses=(ip,)
        )
        result = (await checker.check_all(host)).get("https")
    finally:
        server.close()
        await server.wait_closed()
    assert result is not None
    assert (result.state, result.code) == (state, code), result.reason
    assert fragment in result.reason
    assert result.details["issuer"] == "checks test CA" and result.details["names"] == [host]


async def test_https_untrusted_and_unreachable(
    tmp_path: Path, dns_server: DNSServer, https_env, pebble: PebbleServer
) -> None:
    ip, target = https_env
    host = "links.https-untrusted.test"
    dns_server.set_cname(host, target)
    _ca, chain, key = _write_pki(tmp_path, host, days_before=1, days_after=60)
    server, port = await _tls_server(ip, chain, key)
    try:  # trusting only Pebble's root, as the edge's check does in these tests
        checker = checker_for(
            dns_server,
            target,
            https_port=port,
            ca_bundle=str(pebble.root_path),
            https_addresses=(ip,),
        )
        untrusted = (await checker.check_all(host)).get("https")
    finally:
        server.close()
        await server.wait_closed()
    assert untrusted is not None and untrusted.code == "wrong_certificate"
    assert "not trusted" in untrusted.reason and "checks test CA" in untrusted.reason

    closed = free_port(ip)  # nothing listens there
    checker = checker_for(
        dns_server,
        target,
        https_port=closed,
        ca_bundle=str(pebble.root_path),
        https_addresses=(ip,),
    )
    unreachable = (await checker.check_all(host)).get("https")
    assert unreachable is not None and (unreachable.state, unreachable.code) == (
        CheckState.FAIL,
        "unreachable",
    )
    assert f"cannot connect to {ip}:{closed}" in unreachable.reason

    dns_server.set_cname("links.https-elsewhere.test", "cdn.other.test")
    skipped = (await checker.check_all("links.https-elsewhere.test")).get("https")
    assert skipped is not None and skipped.state is CheckState.SKIPPED


async def test_https_against_the_edge_with_pebble_certificates(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, tmp_path: Path
) -> None:
    n = edge.ip.split(".")[-1]
    good, other, unregistered = (f"links.{k}-{n}.test" for k in ("good", "other", "unregistered"))
    store = await edge.open_store()
    await register(store, dns_server, good, edge.target)
    checker = checker_for(
        dns_server,
        edge.target,
        https_port=edge.https_port,
        ca_bundle=str(pebble.root_path),
        https_addresses=(edge.ip,),
    )
    # the handshake is a first click: the edge gets the certificate, the check sees it
    valid = (await checker.check_all(good)).get("https")
    assert valid is not None and (valid.state, valid.code) == (CheckState.PASS, "valid"), valid
    assert valid.details["names"] == [good] and "Pebble" in valid.details["issuer"]

    dns_server.set_cname(unregistered, edge.target)  # points at us, never registered
    refused = (await checker.check_all(unregistered)).get("https")
    assert refused is not None and refused.code == "unreachable"
    assert "unrecognized_name" in refused.reason

    # another host's Pebble certificate served for `other`: wrong certificate
    cert = await store.get_certificate(good)
    assert cert is not None
    (tmp_path / "chain.pem").write_bytes(cert.chain_pem)
    (tmp_path / "key.pem").write_bytes(cert.key_pem)
    ip = "127.0.0.202"
    dns_server.set_a(f"impostor-{n}.linkedge.test", [ip])
    dns_server.set_cname(other, f"impostor-{n}.linkedge.test")
    server, port = await _tls_server(ip, tmp_path / "chain.pem", tmp_path / "key.pem")
    try:
        impostor = checker_for(
            dns_server,
            f"impostor-{n}.linkedge.test",
            https_port=port,
            ca_bundle=str(pebble.root_path),
            https_addresses=(ip,),
        )
        wrong = (await impostor.check_all(other)).get("https")
    finally:
        server.close()
        await server.wait_closed()
    assert wrong is not None and wrong.code == "wrong_certificate"
    assert wrong.reason == f"the certificate served is for {good}, not {other}"
    async with https_session(edge, pebble) as session:  # and the edge still serves good
        async with session.get(f"https://{good}:{edge.https_port}/c/1", allow_redirects=False) as r:
            assert r.status == 302
    await store.close()
