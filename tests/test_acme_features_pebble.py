"""Issue 5 against real Pebble: ARI (through a small renewalInfo server in front of
Pebble), profiles, TLS-ALPN-01, backoff of a failing host across restarts, a fallback
CA with External Account Binding, and revocation from the command line."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from acme import client as acme_lib_client
from aiohttp import web
from cryptography import x509
from support.edge import FakeClock, client_context
from support.net import free_port
from support.pebble import running_pebble
from support.renewal import Edge, new_edge_config, served_serial

from acme_client import AcmeError, AcmeIssuer, AcmeSettings
from certstore import Store, generate_key_text, open_store
from certstore.crypto import parse_key_text
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer

EAB_KID = "kid-1"
EAB_KEY = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"


def jws_payloads(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the acme library actually signed and sent (it logs each payload at DEBUG)."""
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("JWS payload")]


async def _start_edge(
    tmp_path: Path, pebble: PebbleServer, dns: DNSServer, backend_url: str, **overrides: object
) -> tuple[Edge, Store, str]:
    config, key_text, ip, target = new_edge_config(tmp_path, pebble, dns, backend_url)
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        setattr(getattr(config, section), key, value)
    edge = await Edge(config, key_text, FakeClock(), ip).start()
    return edge, await edge.open_store(), target


async def _register(store: Store, dns: DNSServer, host: str, target: str) -> None:
    await store.add_domain(host, "acct")
    dns.set_cname(host, target)


# -- ARI and profiles ------------------------------------------------------------------


class AriFront:
    """An HTTPS directory in front of Pebble adding `renewalInfo` (and profiles):
    every other URL still points at Pebble. Uses Pebble's own listener identity."""

    def __init__(self, pebble: PebbleServer, profiles: dict[str, str] | None = None) -> None:
        self.pebble = pebble
        self.profiles = profiles
        self.window = (0.0, 0.0)
        self.retry_after = 120
        self.requested: list[str] = []
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}/dir"
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/dir", self._directory)
        app.router.add_get("/ari/{cert_id}", self._renewal_info)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls_dir = self.pebble.workdir / "tls"
        tls.load_cert_chain(tls_dir / "cert.pem", tls_dir / "key.pem")
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=tls).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _directory(self, _request: web.Request) -> web.Response:
        ctx = ssl.create_default_context(cafile=str(self.pebble.ca_bundle))
        async with aiohttp.ClientSession() as session:
            async with session.get(self.pebble.directory_url, ssl=ctx) as resp:
                directory = await resp.json()
        directory["renewalInfo"] = f"https://127.0.0.1:{self.port}/ari"
        if self.profiles is not None:
            directory.setdefault("meta", {})["profiles"] = self.profiles
        return web.json_response(directory)

    async def _renewal_info(self, request: web.Request) -> web.Response:
        self.requested.append(request.match_info["cert_id"])
        start, end = (
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment)) for moment in self.window
        )
        return web.json_response(
            {"suggestedWindow": {"start": start, "end": end}},
            headers={"Retry-After": str(self.retry_after)},
        )


@pytest.fixture
async def ari_front(pebble: PebbleServer) -> AsyncIterator[AriFront]:
    front = AriFront(pebble, profiles={"shortlived": "6 days", "classic": "90 days"})
    await front.start()
    yield front
    await front.stop()


async def test_ari_window_drives_renewal_with_replaces_and_profile(
    tmp_path: Path,
    pebble: PebbleServer,
    dns_server: DNSServer,
    backend,
    ari_front: AriFront,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="acme.client")
    edge, store, target = await _start_edge(
        tmp_path,
        pebble,
        dns_server,
        backend[0],
        acme__directory=ari_front.url,
        acme__profile="shortlived",
    )
    try:
        clock = edge.clock
        host = f"links.ari-{edge.ip.split('.')[-1]}.test"
        await _register(store, dns_server, host, target)
        first = await edge.served_serial(host, pebble)
        # the CA offers the profile: the order asked for it
        assert any('"profile": "shortlived"' in p for p in jws_payloads(caplog))

        ari_front.window = (clock() + 1000, clock() + 2000)
        assert await edge.run_maintenance() == 1
        cert = await store.get_certificate(host)
        plan = await store.get_renewal(host)
        assert cert is not None and plan is not None
        assert plan.source == "ari" and clock() + 1000 <= plan.due_at <= clock() + 2000
        assert plan.next_check_at <= clock() + ari_front.retry_after + 1  # Retry-After honoured
        leaf = x509.load_pem_x509_certificates(cert.chain_pem)[0]
        # the certificate ID as the acme library computes it independently
        expected_id = acme_lib_client._renewal_info_path_component(leaf)
        assert ari_front.requested == [expected_id]
        orders_used, _ = await store.rate_usage("orders", 3 * 3600)

        # the CA moves the window into the past (e.g. a mass revocation): renew now
        ari_front.window = (clock() - 200, clock() - 100)
        clock.advance(ari_front.retry_after + 1)
        caplog.clear()
        assert await edge.run_maintenance() == 1
        renewed = await store.get_certificate(host)
        assert renewed is not None and renewed.serial != first
        assert ari_front.requested == [expected_id, expected_id]
        assert any(f'"replaces": "{expected_id}"' in p for p in jws_payloads(caplog))
        assert await edge.served_serial(host, pebble) == renewed.serial
        # ARI renewals are exempt from the CA's limits: no token taken
        assert (await store.rate_usage("orders", 3 * 3600))[0] == orders_used
    finally:
        await store.close()
        await edge.stop()


# -- TLS-ALPN-01 -----------------------------------------------------------------------


@pytest.mark.parametrize("challenges", [["tls-alpn-01"], ["http-01", "tls-alpn-01"]])
async def test_tls_alpn_01_validated_by_pebble(
    tmp_path: Path,
    pebble: PebbleServer,
    dns_server: DNSServer,
    backend,
    challenges: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="acme.client")
    config, key_text, ip, target = new_edge_config(tmp_path, pebble, dns_server, backend[0])
    config.listen.https = f"{ip}:{pebble.tls_port}"  # where Pebble validates TLS-ALPN-01
    config.listen.http = f"{ip}:{free_port(ip)}"  # not Pebble's HTTP-01 port: http-01 fails
    config.acme.challenges = challenges
    config.acme.profile = "shortlived"  # Pebble offers no profiles: none may be sent
    edge = await Edge(config, key_text, FakeClock(), ip).start()
    store = await edge.open_store()
    try:
        host = f"links.alpn-{ip.split('.')[-1]}.test"
        await _register(store, dns_server, host, target)
        orders = pebble.order_count()
        serial = await edge.served_serial(host, pebble)
        cert = await store.get_certificate(host)
        assert cert is not None and cert.serial == serial
        assert await store.get_alpn_challenge(host) is None  # cleaned up
        # Pebble's validation handshakes (ALPN acme-tls/1) reached our listener
        assert edge.worker.meter.value("certificates", "alpn_challenges_answered") >= 1
        payloads = jws_payloads(caplog)
        assert payloads and not any('"profile"' in p for p in payloads)
        failed_authz, _ = await store.rate_usage(f"authz-failed:{host}", 3600)
        if challenges == ["tls-alpn-01"]:
            assert pebble.order_count() == orders + 1 and failed_authz == 0
        else:  # http-01 failed, a second order with tls-alpn-01 succeeded
            assert pebble.order_count() == orders + 2 and failed_authz == 1
        kinds = [e.kind for e in await store.list_events(host)]
        assert kinds.count("order_started") == 1 and "issued" in kinds

        # a client offering acme-tls/1 with no challenge pending gets no certificate
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.set_alpn_protocols(["acme-tls/1"])
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            await served_serial(ip, pebble.tls_port, host, ctx)
    finally:
        await store.close()
        await edge.stop()


# -- a failing host backs off, across restarts ------------------------------------------


async def test_failing_host_backs_off_and_the_backoff_survives_a_restart(
    tmp_path: Path, pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    config, key_text, ip, target = new_edge_config(tmp_path, pebble, dns_server, backend[0])
    config.listen.http = f"{ip}:{free_port(ip)}"  # Pebble cannot reach our HTTP-01 answers
    config.acme.challenges = ["http-01"]
    clock = FakeClock()
    edge = await Edge(config, key_text, clock, ip).start()
    store = await edge.open_store()
    host = f"links.broken-{ip.split('.')[-1]}.test"
    ctx = client_context(pebble)

    async def click_fails() -> None:
        with pytest.raises(ssl.SSLError, match="INTERNAL_ERROR"):
            await served_serial(ip, edge.https_port, host, ctx)

    try:
        await _register(store, dns_server, host, target)
        orders = pebble.order_count()
        for _ in range(5):
            await click_fails()
        assert pebble.order_count() == orders + 1  # five clicks, one order
        backoff = await store.get_backoff(host)
        assert backoff is not None and backoff.failures == 1
        assert backoff.next_attempt_at == pytest.approx(clock() + 60, abs=5)
        assert "http-01" in backoff.last_error

        await edge.restart()  # new worker, same store: still backing off
        for _ in range(3):
            await click_fails()
        assert pebble.order_count() == orders + 1

        clock.advance(61)  # first step over: one more order, then 10 minutes
        await click_fails()
        await click_fails()
        assert pebble.order_count() == orders + 2
        backoff = await store.get_backoff(host)
        assert backoff is not None and backoff.failures == 2
        assert backoff.next_attempt_at == pytest.approx(clock() + 600, abs=5)
        assert (await store.rate_usage(f"authz-failed:{host}", 3600))[0] == 2
        kinds = [e.kind for e in await store.list_events(host)]
        assert kinds.count("issuance_failed") == 2
    finally:
        await store.close()
        await edge.stop()


# -- fallback CA with External Account Binding -----------------------------------------


@pytest.fixture(scope="module")
def ca_pair(
    dns_server: DNSServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[PebbleServer, PebbleServer]]:
    """A primary Pebble and an EAB-requiring fallback Pebble validating on the same port."""
    http_port = free_port()
    eab = {"externalAccountBindingRequired": True, "externalAccountMACKeys": {EAB_KID: EAB_KEY}}
    with (
        running_pebble(
            tmp_path_factory.mktemp("primary"), dns_server, http_port=http_port
        ) as primary,
        running_pebble(
            tmp_path_factory.mktemp("fallback-eab"),
            dns_server,
            http_port=http_port,
            extra_config=eab,
        ) as fallback,
    ):
        yield primary, fallback


async def test_fallback_ca_with_eab_issues_when_the_primary_is_down(
    tmp_path: Path, ca_pair: tuple[PebbleServer, PebbleServer], dns_server: DNSServer, backend
) -> None:
    primary, fallback = ca_pair
    config, key_text, ip, target = new_edge_config(tmp_path, primary, dns_server, backend[0])
    config.fallback.directory = fallback.directory_url
    config.fallback.ca_bundle = str(fallback.ca_bundle)
    config.fallback.eab_kid = EAB_KID
    config.fallback.eab_hmac_key = EAB_KEY
    edge = await Edge(config, key_text, FakeClock(), ip).start()
    store = await edge.open_store()
    try:
        # the CAs are connected lazily, in the background (issue 8): wait for the account
        for _ in range(200):
            if await store.get_account(fallback.directory_url) is not None:
                break
            await asyncio.sleep(0.05)
        assert await store.get_account(fallback.directory_url) is not None  # EAB accepted
        host = f"links.fallback-{ip.split('.')[-1]}.test"
        await _register(store, dns_server, host, target)
        primary.stop()
        try:
            serial = await served_serial(ip, edge.https_port, host, client_context(fallback))
            # the primary's breaker is open now: the next order goes straight to the
            # fallback, without the primary's seconds of retries first (issue 8)
            quick = f"links.fallback-quick-{ip.split('.')[-1]}.test"
            await _register(store, dns_server, quick, target)
            started = time.monotonic()
            await served_serial(ip, edge.https_port, quick, client_context(fallback))
            assert time.monotonic() - started < 2.0
            breaker = await store.get_ca_breaker(primary.directory_url)
            assert breaker is not None and breaker.state != "closed"
            assert await store.get_backoff(host) is None and await store.get_backoff(quick) is None
        finally:
            primary.start()
        cert = await store.get_certificate(host)
        assert cert is not None and cert.serial == serial
        assert cert.directory_url == fallback.directory_url
        assert fallback.certificate_status(serial)["Status"] == "Valid"

        # an edge (re)started while the primary is down still starts, on the fallback
        primary.stop()
        try:
            await edge.restart()
            other = f"links.fallback2-{ip.split('.')[-1]}.test"
            await _register(store, dns_server, other, target)
            await served_serial(ip, edge.https_port, other, client_context(fallback))
        finally:
            primary.start()
    finally:
        await store.close()
        await edge.stop()


async def test_eab_required_but_not_configured_is_a_clear_error(
    tmp_path: Path, ca_pair: tuple[PebbleServer, PebbleServer]
) -> None:
    _, fallback = ca_pair
    store = await open_store(tmp_path / "s.db", parse_key_text(generate_key_text(), "t"))
    issuer = AcmeIssuer(
        AcmeSettings(directory_url=fallback.directory_url, ca_bundle=str(fallback.ca_bundle)),
        store,
    )
    try:
        with pytest.raises(AcmeError, match="requires external account binding"):
            await issuer.start()
    finally:
        await issuer.close()
        await store.close()


# -- revocation from the command line ---------------------------------------------------


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


async def test_revocation_visible_at_pebble_and_remove_policy(
    tmp_path: Path, pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    edge, store, target = await _start_edge(tmp_path, pebble, dns_server, backend[0])
    env = {
        "LINKEDGE_STORE_PATH": edge.config.store.path,
        "LINKEDGE_STORE_KEY": edge.key_text,
        "LINKEDGE_ACME_DIRECTORY": pebble.directory_url,
        "LINKEDGE_ACME_CA_BUNDLE": str(pebble.ca_bundle),
        "LINKEDGE_EDGE_CNAME_TARGET": target,
    }
    try:
        n = edge.ip.split(".")[-1]
        revoked_host, removed_host = f"links.revoke-{n}.test", f"links.remove-{n}.test"
        for host in (revoked_host, removed_host):
            await _register(store, dns_server, host, target)
        serial = await edge.served_serial(revoked_host, pebble)
        assert pebble.certificate_status(serial)["Status"] == "Valid"

        result = _cli(env, "certs", "revoke", revoked_host)
        assert result.returncode == 0, result.stderr
        assert f"certificate {serial} revoked" in result.stdout
        status = pebble.certificate_status(serial)
        assert status["Status"] == "Revoked" and status["Reason"] == 5
        assert await store.get_certificate(revoked_host) is None  # key purged
        assert await store.get_domain(revoked_host) is not None  # host still registered

        # `domains remove` with the CA unreachable: nothing removed without --force
        removed_serial = await edge.served_serial(removed_host, pebble)
        down = {**env, "LINKEDGE_ACME_DIRECTORY": f"https://127.0.0.1:{free_port()}/dir"}
        result = _cli(down, "domains", "remove", removed_host)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "cannot revoke" in result.stderr and "--force" in result.stderr
        assert await store.get_domain(removed_host) is not None
        assert await store.get_certificate(removed_host) is not None

        # reachable: revoked, then removed
        result = _cli(env, "domains", "remove", removed_host)
        assert result.returncode == 0, result.stderr
        assert pebble.certificate_status(removed_serial)["Status"] == "Revoked"
        assert await store.get_domain(removed_host) is None
        assert await store.get_certificate(removed_host) is None

        # --force when the CA is down: removed locally, the event says it was not revoked
        await _register(store, dns_server, removed_host, target)
        edge.worker.manager.forget(removed_host)  # type: ignore[union-attr]
        await edge.served_serial(removed_host, pebble)
        result = _cli(down, "domains", "remove", "--force", removed_host)
        assert result.returncode == 0 and "NOT revoked" in result.stdout
        assert await store.get_domain(removed_host) is None
        kinds = [e.kind for e in await store.list_events(removed_host)]
        assert "removed_unrevoked" in kinds

        listed = json.loads(_cli(env, "certs", "list", "--json").stdout)
        assert listed == []
    finally:
        await store.close()
        await edge.stop()
