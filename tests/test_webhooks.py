"""Status-change webhooks: signed, retried with backoff, bounded, sent once per transition."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from certstore import DomainState, Store, open_store
from proxy.hosts.webhooks import SIGNATURE_HEADER, WebhookSender, WebhookSettings

SECRET = "webhook-secret-0123456789"
S = DomainState


class Receiver:
    """A customer's endpoint on loopback that fails the first `failures` deliveries."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.received: list[tuple[int, bytes, dict[str, str]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = 500 if len(self.received) < self.failures else 204
        self.received.append((status, body, dict(request.headers)))
        return web.Response(status=status)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    st = await open_store(tmp_path / "s.db", os.urandom(32))
    yield st
    await st.close()


async def serve(receiver: Receiver) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/hook"


async def sender_for(store: Store, url: str, attempts: int) -> tuple[WebhookSender, list[float]]:
    delays: list[float] = []

    async def record_sleep(seconds: float) -> None:  # the backoff, without waiting for it
        delays.append(seconds)

    sender = WebhookSender(
        store,
        WebhookSettings(url=url, secret=SECRET, max_attempts=attempts, backoff_seconds=0.5),
        sleep=record_sleep,
    )
    await sender.start()
    return sender, delays


async def test_signed_delivery_retried_until_accepted(store: Store) -> None:
    await store.add_domain("links.before.test", "shop")
    await store.transition_domain("links.before.test", [S.PENDING], S.VERIFIED, "old news")
    receiver = Receiver(failures=2)
    runner, url = await serve(receiver)
    sender, delays = await sender_for(store, url, attempts=5)
    try:
        await store.add_domain("links.hook.test", "shop")
        await store.transition_domain(
            "links.hook.test", [S.PENDING], S.VERIFIED, "CNAME reaches edge"
        )
        assert await sender.send_pending() == 1
        assert await sender.send_pending() == 0  # the cursor moved: sent once
    finally:
        await sender.close()
        await runner.cleanup()
    assert [status for status, _b, _h in receiver.received] == [500, 500, 204]
    assert delays == [0.5, 1.0]  # doubling backoff
    _status, body, headers = receiver.received[-1]
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE_HEADER] == expected
    assert len({b for _s, b, _h in receiver.received}) == 1  # retries resend the same bytes
    payload = json.loads(body)
    assert payload["host"] == "links.hook.test" and payload["account"] == "shop"
    assert (payload["from"], payload["to"], payload["reason"]) == (
        "pending",
        "verified",
        "CNAME reaches edge",
    )
    assert headers["X-Linkedge-Delivery"] == str(payload["id"])


async def test_delivery_gives_up_after_max_attempts(store: Store) -> None:
    receiver = Receiver(failures=100)
    runner, url = await serve(receiver)
    sender, delays = await sender_for(store, url, attempts=3)
    try:
        await store.add_domain("links.dead.test", "shop")
        await store.transition_domain("links.dead.test", [S.PENDING], S.SUSPENDED, "operator")
        await store.transition_domain("links.dead.test", [S.SUSPENDED], S.PENDING, "resumed")
        assert await sender.send_pending() == 2
    finally:
        await sender.close()
        await runner.cleanup()
    assert len(receiver.received) == 6 and delays == [0.5, 1.0, 0.5, 1.0]  # bounded: 3 each
    failed = [e for e in await store.list_events("links.dead.test") if e.kind == "webhook_failed"]
    assert len(failed) == 2 and "HTTP 500" in failed[0].detail


async def test_unreachable_endpoint_is_bounded_too(store: Store) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/hook"  # nothing listens
    sender, delays = await sender_for(store, url, attempts=2)
    try:
        await store.add_domain("links.nobody.test", "shop")
        await store.transition_domain("links.nobody.test", [S.PENDING], S.VERIFIED, "ok")
        assert await sender.send_pending() == 1
    finally:
        await sender.close()
    assert delays == [0.5]
    failed = [e for e in await store.list_events("links.nobody.test") if e.kind == "webhook_failed"]
    assert len(failed) == 1
