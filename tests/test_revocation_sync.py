"""Issue 8, part 4: revoking or removing a host takes effect in every worker.

Two EdgeWorkers on one store (A with the admin API, B a plain worker), real Pebble and
DNS. B has the host's context cached; after a revocation or removal made through the
CLI (its own process) or A's API, B must stop serving that certificate within
`lifecycle.sync_seconds` (tls.revalidate_seconds is set far beyond, so only the event
feed can do it).
"""

from __future__ import annotations

import asyncio
import copy
import os
import ssl
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from support.clicks import certify, edge_store, ssl_error_text
from support.edge import ADMIN_TOKEN, EdgeHandle, client_context, enable_admin
from support.net import free_port
from support.renewal import served_serial

from acme_client import AcmeError, FailoverIssuer
from proxy.app.wiring import EdgeWorker
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer

SYNC = 0.5  # lifecycle.sync_seconds in these tests
SLACK = 2.5  # a loaded 2-core machine: handshakes, a new order, the poll's own step


@dataclass
class Pair:
    a: EdgeHandle  # runs the admin API
    b: EdgeHandle  # another worker on the same store
    api: str

    def env(self, pebble: PebbleServer) -> dict[str, str]:
        """What the CLI needs to reach the same store and CA."""
        return {
            "LINKEDGE_STORE_PATH": self.a.config.store.path,
            "LINKEDGE_STORE_KEY": self.a.key_text,
            "LINKEDGE_ACME_DIRECTORY": pebble.directory_url,
            "LINKEDGE_ACME_CA_BUNDLE": str(pebble.ca_bundle),
            "LINKEDGE_EDGE_CNAME_TARGET": self.a.target,
        }


@pytest.fixture
async def pair(edge_config: EdgeHandle, tmp_path: Path) -> AsyncIterator[Pair]:
    a = edge_config
    a.config.lifecycle.sync_seconds = SYNC
    a.config.tls.revalidate_seconds = 3600  # only the event feed may drop a cached context
    api = enable_admin(a, tmp_path)
    b_config = copy.deepcopy(a.config)
    b_config.listen.https = f"{a.ip}:{free_port(a.ip)}"  # its own port: a handshake picks it
    b_config.admin.listen = ""
    b = EdgeHandle(ip=a.ip, target=a.target, config=b_config, key_text=a.key_text)
    await a.start()
    b.worker = EdgeWorker(b_config, primary=False)
    try:
        await b.worker.start()
        yield Pair(a, b, api)
    finally:
        await b.stop()
        await a.stop()


async def serial_or_refusal(edge: EdgeHandle, host: str, ctx: ssl.SSLContext) -> str:
    try:
        return await served_serial(edge.ip, edge.https_port, host, ctx)
    except ssl.SSLError as exc:
        return f"refused: {ssl_error_text(exc)}"


async def until_not_serving(edge: EdgeHandle, host: str, serial: str, ctx: ssl.SSLContext):
    """Handshakes until `serial` is no longer served; (seconds, what is served now)."""
    started = time.monotonic()
    while True:
        now = await serial_or_refusal(edge, host, ctx)
        elapsed = time.monotonic() - started
        if now != serial or elapsed > SYNC + SLACK:
            return elapsed, now
        await asyncio.sleep(0.05)


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.app.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def certified_everywhere(pair: Pair, pebble: PebbleServer, dns: DNSServer) -> tuple[str, str]:
    """A host with a certificate that both workers have in their context caches."""
    host = await certify(pair.a, pebble, dns)  # the first click, through A
    ctx = client_context(pebble)
    serial = await served_serial(pair.a.ip, pair.a.https_port, host, ctx)
    # let B apply the issuance's own events first: they drop the host from its cache too,
    # and must not be what makes B forget the certificate later
    await asyncio.sleep(3 * SYNC)
    assert await served_serial(pair.b.ip, pair.b.https_port, host, ctx) == serial  # cached in B
    assert pair.b.worker is not None and pair.b.worker.manager is not None
    assert pair.b.worker.manager.cached_context(host) is not None
    return host, serial


async def test_cli_certs_revoke_reaches_the_other_worker_within_sync_seconds(
    pair: Pair, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    host, serial = await certified_everywhere(pair, pebble, dns_server)
    code, out, err = await run_cli(pair.env(pebble), "certs", "revoke", host)
    assert code == 0, err
    assert f"certificate {serial} revoked" in out
    assert pebble.certificate_status(serial)["Status"] == "Revoked"

    ctx = client_context(pebble)
    elapsed, now = await until_not_serving(pair.b, host, serial, ctx)
    print(f"worker B stopped serving the revoked certificate after {elapsed:.2f} s")
    assert now != serial and not now.startswith("refused"), now  # a new certificate
    assert elapsed < SYNC + SLACK
    assert pebble.certificate_status(now)["Status"] == "Valid"
    assert await serial_or_refusal(pair.a, host, ctx) == now  # and A serves the new one too


async def test_cli_domains_remove_reaches_the_other_worker(
    pair: Pair, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    host, serial = await certified_everywhere(pair, pebble, dns_server)
    code, out, err = await run_cli(pair.env(pebble), "domains", "remove", host)
    assert code == 0, err
    assert f"removed {host}: certificate {serial} revoked" in out
    elapsed, now = await until_not_serving(pair.b, host, serial, client_context(pebble))
    print(f"worker B refused the removed host after {elapsed:.2f} s")
    assert "unrecognized" in now, now
    assert elapsed < SYNC + SLACK
    assert pebble.certificate_status(serial)["Status"] == "Revoked"


async def api_call(pair: Pair, method: str, path: str) -> tuple[int, dict[str, str] | None]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with (
        aiohttp.ClientSession(pair.api, headers=headers) as session,
        session.request(method, path) as resp,
    ):
        body = await resp.json() if resp.content_type == "application/json" else None
        return resp.status, body


async def test_api_delete_revokes_then_removes_in_every_worker(
    pair: Pair, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    host, serial = await certified_everywhere(pair, pebble, dns_server)
    status, body = await api_call(pair, "DELETE", f"/v1/hosts/{host}?force=maybe")
    assert (status, body and body["error"]) == (422, "invalid_force")

    status, _ = await api_call(pair, "DELETE", f"/v1/hosts/{host}")
    assert status == 204
    assert pebble.certificate_status(serial)["Status"] == "Revoked"
    ctx = client_context(pebble)
    assert "unrecognized" in await serial_or_refusal(pair.a, host, ctx)  # A: at once
    elapsed, now = await until_not_serving(pair.b, host, serial, ctx)
    print(f"worker B refused the deleted host after {elapsed:.2f} s")
    assert "unrecognized" in now, now
    assert elapsed < SYNC + SLACK
    async with edge_store(pair.a) as store:
        assert await store.get_domain(host) is None
        assert await store.get_certificate(host) is None
        kinds = [e.kind for e in await store.list_events(host, limit=50)]
    assert kinds.index("removed") < kinds.index("revoked")  # newest first: revoked, then removed
    assert (await api_call(pair, "DELETE", f"/v1/hosts/{host}"))[0] == 404


async def test_api_delete_when_the_ca_cannot_revoke_needs_force(
    pair: Pair, pebble: PebbleServer, dns_server: DNSServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    host, serial = await certified_everywhere(pair, pebble, dns_server)

    async def unreachable(*_args: object, **_kw: object) -> None:
        raise AcmeError("the CA is unreachable (test)")

    monkeypatch.setattr(FailoverIssuer, "revoke", unreachable)
    status, body = await api_call(pair, "DELETE", f"/v1/hosts/{host}")
    assert status == 502 and body is not None and body["error"] == "revocation_failed"
    assert "nothing removed" in body["message"] and "force=true" in body["message"]
    async with edge_store(pair.a) as store:  # nothing changed
        assert await store.get_domain(host) is not None
        assert await store.get_certificate(host) is not None
    ctx = client_context(pebble)
    assert await serial_or_refusal(pair.a, host, ctx) == serial
    assert await serial_or_refusal(pair.b, host, ctx) == serial

    status, _ = await api_call(pair, "DELETE", f"/v1/hosts/{host}?force=true")
    assert status == 204
    assert pebble.certificate_status(serial)["Status"] == "Valid"  # not revoked, as said
    elapsed, now = await until_not_serving(pair.b, host, serial, ctx)
    assert "unrecognized" in now, now
    assert elapsed < SYNC + SLACK
    async with edge_store(pair.a) as store:
        assert await store.get_domain(host) is None
        kinds = [e.kind for e in await store.list_events(host, limit=50)]
    assert "removed_unrevoked" in kinds and "revoked" not in kinds
