"""Issue 13: JSON log lines for decisions, the access log, and secrets kept out of both."""

from __future__ import annotations

import io
import json
import logging
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.clicks import certify, edge_store, new_host
from support.edge import EdgeHandle, client_context, tls_handshake
from support.proxy_protocol import v1_header
from test_proxy_listeners import LBEdge, http_request, lb  # noqa: F401 (the fixture)

from proxy.app import logging_setup
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer


@pytest.fixture
def json_lines(caplog: pytest.LogCaptureFixture) -> Iterator[io.StringIO]:
    """Everything logged at INFO and above, through the JSON formatter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging_setup.JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    caplog.set_level(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)


def parsed(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]  # every line parses


async def test_json_lines_for_an_issuance_and_a_refusal(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, json_lines: io.StringIO
) -> None:
    host = await certify(edge, pebble, dns_server)

    refused = new_host(edge, "refused")
    async with edge_store(edge) as store:
        await store.add_domain(refused, "acct-test")  # registered, but no CNAME to the edge
    dns_server.set_cname(refused, "elsewhere.example.test")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await tls_handshake(edge.ip, edge.https_port, refused, client_context(pebble))

    lines = parsed(json_lines)
    for line in lines:
        assert {"ts", "level", "logger", "message"} <= set(line)
        assert line["ts"].endswith("Z") and line["level"] in ("info", "warning", "error")
    issued = [x for x in lines if x.get("event") == "issued"]
    assert len(issued) == 1
    assert issued[0]["host"] == host and issued[0]["level"] == "info"
    assert 0 < issued[0]["duration"] < 30
    assert issued[0]["logger"] == "proxy.tls.certificates"
    created = [x for x in lines if x.get("event") == "order_created" and x.get("host") == host]
    assert len(created) == 1 and created[0]["order_url"].startswith("https://")
    assert created[0]["order_url"] in created[0]["message"]
    refusals = [x for x in lines if x.get("event") == "refused"]
    assert len(refusals) == 1
    assert refusals[0]["host"] == refused
    assert "elsewhere.example.test" in refusals[0]["reason"]
    transitions = [x for x in lines if x.get("event") == "transition" and x.get("host") == host]
    assert transitions and all(x["reason"] for x in transitions)
    text = json_lines.getvalue()
    assert "PRIVATE KEY" not in text
    # one line per decision, none per click: a second click adds nothing at INFO
    before = len(lines)
    await certify_again(edge, pebble, host)
    assert len(parsed(json_lines)) == before


async def certify_again(edge: EdgeHandle, pebble: PebbleServer, host: str) -> None:
    from support.clicks import get_status

    assert await get_status(edge, pebble, host, "/c/again") == 302


def record(message: str, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("proxy.test", logging.WARNING, __file__, 1, message, None, None)
    rec.__dict__.update(extra)
    return rec


def test_secrets_never_reach_a_line() -> None:
    formatter = logging_setup.JsonFormatter()
    key = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIB...\n-----END EC PRIVATE KEY-----"
    line = json.loads(formatter.format(record(f"oops {key} after", reason=f"x {key}")))
    assert "MHcCAQEEIB" not in json.dumps(line) and line["message"].endswith(" after")
    line = json.loads(formatter.format(record("Authorization: Bearer abc.def-123")))
    assert "abc.def-123" not in line["message"]
    logging_setup.redact("hook-secret-for-redaction-test")
    line = json.loads(formatter.format(record("sent with hook-secret-for-redaction-test")))
    assert "hook-secret-for-redaction-test" not in line["message"]
    assert "redacted" in line["message"]
    text = logging_setup.TextFormatter().format(record(f"text {key}"))
    assert "MHcCAQEEIB" not in text


def test_json_line_fields_are_the_stable_names() -> None:
    rec = record(
        "issued",
        event="issued",
        host="links.shop.test",
        reason="because",
        order_url="https://ca/order/1",
        duration=0.0712345678,
    )
    line = json.loads(logging_setup.JsonFormatter().format(rec))
    assert line["event"] == "issued" and line["host"] == "links.shop.test"
    assert line["reason"] == "because" and line["order_url"] == "https://ca/order/1"
    assert line["duration"] == 0.071235 and line["level"] == "warning"
    assert line["logger"] == "proxy.test" and line["message"] == "issued"


async def test_access_log_shows_the_proxy_client_address(lb: LBEdge, tmp_path: Path) -> None:  # noqa: F811
    path = tmp_path / "access.log"
    logging_setup._configure_access_log(str(path), "combined")
    try:
        header = v1_header(("203.0.113.9", 5555), lb.http_target)
        data = await http_request(lb, header, '/c/access?x="1"')
        assert data.startswith(b"HTTP/1.1 302")
    finally:
        logging_setup._configure_access_log("", "combined")
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith("203.0.113.9 - - [")  # the client, not the balancer 127.0.0.5
    assert '"GET /c/access?x=\\x221\\x22 HTTP/1.1" 302 ' in line
    assert line.endswith(' "-" "-"')  # combined: Referer, User-Agent


def test_access_log_is_off_by_default() -> None:
    logging_setup._configure_access_log("", "combined")
    logger = logging_setup.AccessLogger(logging.getLogger(logging_setup.ACCESS_LOGGER), "")
    assert not logger.enabled
