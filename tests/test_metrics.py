"""Issue 13: /metrics, /healthz and /readyz on a real edge (Pebble, DNS, backend)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import ssl
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.clicks import certify, edge_store, new_host
from support.edge import ADMIN_TOKEN, EdgeHandle, client_context, enable_admin, tls_handshake
from support.net import free_port

from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(base: str, path: str = "/metrics", **headers: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(base + path, headers=headers) as resp,
    ):
        return resp.status, await resp.text()


async def metrics(base: str) -> Samples:
    status, text = await scrape(base)
    assert status == 200, text
    return parse(text)


async def test_first_click_shows_in_metrics(
    edge_config: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, tmp_path: Path
) -> None:
    admin = enable_admin(edge_config, tmp_path)
    edge_config.config.metrics.store_cache_seconds = 0  # store gauges fresh at each scrape
    await edge_config.start()
    try:
        before = await metrics(admin)
        host = await certify(edge_config, pebble, dns_server)  # a real first click
        # Let the worker follow its own "issued" and "state" events first (they keep the
        # context it cached: tests/test_own_issuance_cache.py), so the gauge below is settled.
        async with edge_store(edge_config) as store:
            issued = await store.last_event_id()
        await edge_config.followed(issued)
        await tls_handshake(edge_config.ip, edge_config.https_port, host, client_context(pebble))
        # a name nobody registered is refused at the handshake
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await tls_handshake(
                edge_config.ip,
                edge_config.https_port,
                new_host(edge_config),
                client_context(pebble),
            )
        after = await metrics(admin)
        async with edge_store(edge_config) as store:
            cert = await store.get_certificate(host)
        assert cert is not None
    finally:
        await edge_config.stop()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("linkedge_acme_orders_total", ca="primary", outcome="issued") == 1
    assert delta("linkedge_acme_order_duration_seconds_count", ca="primary") == 1
    assert 0 < delta("linkedge_acme_order_duration_seconds_sum", ca="primary") < 30
    # the first click waited for its certificate, once
    assert delta("linkedge_tls_certificate_wait_seconds_count") >= 1
    assert delta("linkedge_tls_certificate_wait_seconds_sum") >= 0.01
    assert delta("linkedge_tls_handshakes_total", outcome="served", reason="") >= 1
    assert delta("linkedge_tls_handshakes_total", outcome="refused", reason="not_registered") == 1
    assert delta("linkedge_listener_accepted_connections_total", listener="https") >= 2
    assert delta("linkedge_backend_requests_total", status_class="3xx") == 1  # the 302
    assert delta("linkedge_backend_request_duration_seconds_count") == 1
    # store-derived gauges: this edge's own store
    assert value(after, "linkedge_hosts", state="active") == 1
    assert value(after, "linkedge_hosts", state="pending") == 0
    assert value(after, "linkedge_certificates", state="valid") == 1
    assert value(after, "linkedge_certificates", state="expired") == 0
    soonest = value(after, "linkedge_certificate_soonest_expiry_timestamp_seconds")
    assert soonest == pytest.approx(cert.not_after)
    assert value(after, "linkedge_renewals", state="overdue") == 0
    budget = value(after, "linkedge_acme_order_budget_remaining")
    assert budget == value(after, "linkedge_acme_order_budget_limit") - 1
    assert value(after, "linkedge_backend_up", backend=edge_config.config.backend.url) == 1
    assert value(after, "linkedge_acme_ca_breaker_state", ca="primary", state="open") == 0
    assert value(after, "linkedge_tls_contexts_cached") >= 1


async def test_metrics_need_no_admin_token_but_the_api_still_does(
    edge_config: EdgeHandle, tmp_path: Path
) -> None:
    admin = enable_admin(edge_config, tmp_path)
    await edge_config.start()
    try:
        status, text = await scrape(admin)
        assert status == 200 and "# TYPE linkedge_tls_handshakes_total counter" in text
        status, _ = await scrape(admin, "/v1/hosts")
        assert status == 401
        status, _ = await scrape(admin, "/v1/hosts", Authorization=f"Bearer {ADMIN_TOKEN}")
        assert status == 200
    finally:
        await edge_config.stop()


async def test_metrics_token_and_own_listener(edge_config: EdgeHandle, tmp_path: Path) -> None:
    token = "metrics-token-0123456789abcdef"
    (tmp_path / "metrics.token").write_text(token + "\n")
    config = edge_config.config
    config.metrics.token_file = str(tmp_path / "metrics.token")
    config.metrics.token_env = ""
    port = free_port(edge_config.ip)
    config.metrics.listen = f"{edge_config.ip}:{port}"
    base = f"http://{edge_config.ip}:{port}"
    await edge_config.start()  # no admin listener at all: metrics.listen stands alone
    try:
        status, text = await scrape(base)
        assert status == 401 and "bearer token" in text
        status, _ = await scrape(base, Authorization="Bearer wrong-token-0123456789")
        assert status == 401
        status, text = await scrape(base, Authorization=f"Bearer {token}")
        assert status == 200 and "linkedge_hosts{" in text
        assert await scrape(base, "/healthz") == (200, "ok\n")  # probes need no token
        status, _ = await scrape(base, "/readyz")
        assert status == 200
        status, _ = await scrape(base, "/v1/hosts")  # the API is not on this listener
        assert status == 404
    finally:
        await edge_config.stop()


async def test_metrics_off_means_no_endpoint(edge_config: EdgeHandle, tmp_path: Path) -> None:
    admin = enable_admin(edge_config, tmp_path)
    edge_config.config.metrics.enabled = False
    await edge_config.start()
    try:
        status, _ = await scrape(admin)
        assert status == 401  # an unknown admin path: the API's token check answers
        assert (await scrape(admin, "/healthz"))[0] == 200
    finally:
        await edge_config.stop()


async def test_readyz_ready_then_not_ready_when_the_backend_is_down(
    edge_config: EdgeHandle, tmp_path: Path
) -> None:
    admin = enable_admin(edge_config, tmp_path)
    await edge_config.start()
    try:
        status, text = await scrape(admin, "/readyz")
        assert status == 200, text
        assert '"ready": true' in text and '"store": "ok"' in text
        assert await scrape(admin, "/healthz") == (200, "ok\n")
    finally:
        await edge_config.stop()

    # the same edge with a backend nobody listens on
    dead = f"http://127.0.0.1:{free_port()}"
    config = edge_config.config
    config.backend.url = dead
    config.backend.health_interval = 0.1
    config.backend.unhealthy_after = 1
    await edge_config.start()
    try:
        deadline = time.monotonic() + 10
        while True:
            status, text = await scrape(admin, "/readyz")
            if status == 503 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert status == 503, text
        assert "no healthy backend" in text and dead in text
        assert '"listeners": "ok"' in text and '"store": "ok"' in text
        assert (await scrape(admin, "/healthz"))[0] == 200  # alive, just not ready
        assert value(await metrics(admin), "linkedge_backend_up", backend=dead) == 0
    finally:
        await edge_config.stop()


METRIC_NAME = re.compile(r"\blinkedge_[a-z0-9_]+")
DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def exported_names(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {s.name for s in family.samples}
    return names


async def test_rules_and_dashboard_use_only_exported_metrics(
    edge_config: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, tmp_path: Path
) -> None:
    import json

    admin = enable_admin(edge_config, tmp_path)
    await edge_config.start()
    try:
        await certify(edge_config, pebble, dns_server)  # so every series has a sample
        _, text = await scrape(admin)
    finally:
        await edge_config.stop()
    exported = exported_names(text)
    rules = (DEPLOY / "prometheus" / "linkedge-alerts.yml").read_text()
    dashboard_text = (DEPLOY / "prometheus" / "linkedge-dashboard.json").read_text()
    dashboard = json.loads(dashboard_text)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    used_in_rules = set(METRIC_NAME.findall(rules))
    used_in_dashboard = set(METRIC_NAME.findall(" ".join(exprs)))
    assert len(used_in_rules) >= 5
    assert used_in_rules - exported == set()
    assert used_in_dashboard - exported == set()
    # Prometheus' own linter on the real scrape (names, units, _total suffixes, HELP)
    promtool = shutil.which("promtool")
    if promtool is not None:
        lint = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
        )
        assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout + lint.stderr


async def test_workers_are_aggregated_into_one_scrape(
    tmp_path: Path, pebble: PebbleServer, dns_server: DNSServer, backend
) -> None:
    """`serve --workers 2`: slot 0's /metrics sums both workers (multiprocess mode), and
    keeps the counts of a worker that died."""
    from support.clicks import python_hello, read_to_close
    from test_workers import IP, TARGET, ServeProcess

    from certstore import generate_key_text
    from proxy.app.supervisor import _FAST_EXIT_SECONDS

    dns_server.set_a(TARGET, [IP])
    https_port = free_port(IP)
    admin_port = free_port(IP)
    multiproc = tmp_path / "metrics"
    env = {
        "LINKEDGE_LISTEN_HTTPS": f"{IP}:{https_port}",
        "LINKEDGE_LISTEN_HTTP": f"{IP}:{pebble.http_port}",
        "LINKEDGE_BACKEND_URL": backend[0],
        "LINKEDGE_EDGE_CNAME_TARGET": TARGET,
        "LINKEDGE_ACME_DIRECTORY": pebble.directory_url,
        "LINKEDGE_ACME_CA_BUNDLE": str(pebble.ca_bundle),
        "LINKEDGE_STORE_PATH": str(tmp_path / "store.db"),
        "LINKEDGE_STORE_KEY": generate_key_text(),
        "LINKEDGE_DNS_NAMESERVERS": dns_server.nameserver,
        "LINKEDGE_ADMIN_LISTEN": f"{IP}:{admin_port}",
        "LINKEDGE_ADMIN_TOKEN": ADMIN_TOKEN,
        "LINKEDGE_VERIFY_POLL_SECONDS": "0",
        "LINKEDGE_METRICS_MULTIPROC_DIR": str(multiproc),
    }
    serve = ServeProcess(env, tmp_path / "serve.log")
    admin = f"http://{IP}:{admin_port}"
    connections = 24
    try:
        serve.wait_ready(2)
        ready_at = time.monotonic()  # both workers were spawned before this
        before = await metrics(admin)
        hello = python_hello("nobody-registered-this.example")
        for _ in range(connections):  # SO_REUSEPORT spreads these over both workers
            reader, writer = await asyncio.open_connection(IP, https_port)
            writer.write(hello)
            await writer.drain()
            await read_to_close(reader, 5)  # the unrecognized_name alert, then close
            writer.close()
        deadline = time.monotonic() + 10
        while True:  # accepts are copied into the series every 2 s
            after = await metrics(admin)
            accepted = value(
                after, "linkedge_listener_accepted_connections_total", listener="https"
            ) - value(before, "linkedge_listener_accepted_connections_total", listener="https")
            if accepted >= connections or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        pids = {p.stem.rsplit("_", 1)[-1] for p in multiproc.glob("counter_*.db")}

        # worker 1 dies: the supervisor restarts it; its counters stay in the sums, its
        # live gauges leave them
        dead = int(re.findall(r"started worker 1 \(pid (\d+)\)", serve.log())[-1])
        # past the supervisor's fast-exit check, counted from the worker's spawn (which
        # may come seconds after the process started, on a loaded machine)
        fast_exit_over = ready_at + _FAST_EXIT_SECONDS + 1
        await asyncio.sleep(max(0.0, fast_exit_over - time.monotonic()))
        assert list(multiproc.glob(f"gauge_live*_{dead}.db"))
        os.kill(dead, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while serve.log().count("edge worker ready") < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert "worker 1 exited with -9; restarting it" in serve.log(), serve.log()
        after_restart = await metrics(admin)
        dead_gauges = list(multiproc.glob(f"gauge_live*_{dead}.db"))
        dead_counters = list(multiproc.glob(f"counter_{dead}.db"))
    finally:
        serve.stop()
    assert serve.proc.returncode == 0, serve.log()
    assert dead_gauges == [] and len(dead_counters) == 1
    for name, labels in (
        ("linkedge_tls_handshakes_total", {"outcome": "refused", "reason": "not_registered"}),
        ("linkedge_listener_accepted_connections_total", {"listener": "https"}),
    ):
        assert value(after_restart, name, **labels) == value(after, name, **labels), name
    assert value(after_restart, "linkedge_backend_up", backend=backend[0]) == 1
    refused = value(
        after, "linkedge_tls_handshakes_total", outcome="refused", reason="not_registered"
    ) - value(before, "linkedge_tls_handshakes_total", outcome="refused", reason="not_registered")
    assert refused == connections
    assert accepted == connections
    assert len(pids) == 2, pids  # both workers wrote values
    # live gauges are not doubled: each worker reports the backend up, max() is 1
    assert value(after, "linkedge_backend_up", backend=backend[0]) == 1
    assert value(after, "linkedge_hosts", state="active") == 0


def test_refusal_reasons_are_a_bounded_set() -> None:
    from proxy.app.metrics import refusal_reason
    from proxy.tls.refusals import Refused
    from proxy.wire.clienthello import HANDSHAKE_FAILURE, INTERNAL_ERROR

    cases = {
        Refused("not registered"): "not_registered",
        Refused("suspended by operator"): "suspended",
        Refused("moved, not renewed: cname gone"): "moved",
        Refused("pending: CNAME points to elsewhere.example"): "not_verified",
        Refused("failed: gave up after 7 days"): "failed",
        Refused("no SNI in ClientHello", HANDSHAKE_FAILURE): "no_sni",
        Refused("issuance failed: urn:ietf:params:acme:error:dns", INTERNAL_ERROR): (
            "issuance_failing"
        ),
        Refused("backing off after 2 failed order(s) until ...", INTERNAL_ERROR): (
            "issuance_failing"
        ),
        Refused("issuance deferred: 300 new orders within 3 h", INTERNAL_ERROR): "rate_limited",
        Refused("no TLS-ALPN-01 challenge pending for this name"): "no_challenge",
        Refused("label 'x' * 64 is too long: links.shop.test"): "other",
    }
    for exc, label in cases.items():
        assert refusal_reason(exc) == label, exc.reason


def test_click_tally_flushes_what_observe_would_have_recorded() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from proxy.app import metrics

    registry = CollectorRegistry()
    reference = Histogram(
        "ref_seconds", "", registry=registry, buckets=metrics.BACKEND_DURATION._upper_bounds[:-1]
    )
    tally = metrics._ClickTally(metrics.BACKEND_DURATION)
    durations = [0.001, 0.005, 0.0051, 0.3, 2.0, 45.0, 0.01]
    statuses = [302, 302, 200, 404, 502, 504, 302]
    before = parse(generate_latest().decode())
    for status, seconds in zip(statuses, durations, strict=True):
        tally.record(status, seconds)
        reference.observe(seconds)
    tally.flush()
    after = parse(generate_latest().decode())
    mine = {
        dict(labels)["le"]: after[(name, labels)] - before.get((name, labels), 0)
        for (name, labels) in after
        if name == "linkedge_backend_request_duration_seconds_bucket"
    }
    ref = parse(generate_latest(registry).decode())
    theirs = {
        dict(labels)["le"]: v for (name, labels), v in ref.items() if name == "ref_seconds_bucket"
    }
    assert mine == theirs
    delta = {
        cls: value(after, "linkedge_backend_requests_total", status_class=cls)
        - value(before, "linkedge_backend_requests_total", status_class=cls)
        for cls in ("2xx", "3xx", "4xx", "5xx")
    }
    assert delta == {"2xx": 1, "3xx": 3, "4xx": 1, "5xx": 2}
