"""Status-change webhooks: a signed JSON POST for every lifecycle transition.

The events table is the outbox: the sender follows `state` events by id from a cursor
kept in the store, so nothing is lost across restarts and, running in one process
(the primary worker), each transition is sent once. Each delivery is retried with
doubling delays up to `webhooks.max_attempts`, then dropped with a `webhook_failed`
event; the cursor then moves on, so one dead endpoint delays but never blocks forever.

Signature: `X-Linkedge-Signature: sha256=<hex HMAC-SHA256 of the raw body>` with the
shared secret. The body carries the event id (for de-duplication) and its time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from certstore import CertStore, Event, StoreUnavailable
from proxy.counters import Counters
from proxy.hosts.events import EventKind
from proxy.hosts.state_sync import follow_wait
from proxy.wire.hostnames import display_hostname

log = logging.getLogger(__name__)
CURSOR_KEY = "webhooks.cursor"
SIGNATURE_HEADER = "X-Linkedge-Signature"


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    url: str
    secret: str
    max_attempts: int = 6
    backoff_seconds: float = 2.0
    timeout: float = 10.0
    poll_seconds: float = 1.0


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass
class WebhookStats(Counters):
    delivered: int = 0
    dropped: int = 0  # given up after max_attempts (a `webhook_failed` event)


class WebhookSender:
    def __init__(
        self,
        store: CertStore,
        settings: WebhookSettings,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._store = store
        self._settings = settings
        self._sleep = sleep
        self._session: aiohttp.ClientSession | None = None
        self._cursor = 0  # the last event handled (mirrors the stored cursor)
        self.stats = WebhookStats()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._settings.timeout)
        )
        if await self._store.get_meta(CURSOR_KEY) is None:
            # first start: announce changes from now on, not the whole history
            await self._store.put_meta(CURSOR_KEY, str(await self._store.last_event_id()))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def run_forever(self) -> None:
        while True:
            try:
                await self.send_pending()
            except StoreUnavailable as exc:  # an outage: one line, retried next pass
                log.warning("webhook delivery pass skipped: %s", exc)
                await asyncio.sleep(self._settings.poll_seconds)
                continue
            except Exception:
                log.exception("webhook delivery pass failed")
                await asyncio.sleep(self._settings.poll_seconds)
                continue
            # woken by the next event (pushed on PostgreSQL), at most poll_seconds when
            # nothing pushes
            await self._store.wait_for_events(
                self._cursor, follow_wait(self._store, self._settings.poll_seconds)
            )

    async def send_pending(self) -> int:
        cursor = int(await self._store.get_meta(CURSOR_KEY) or 0)
        self._cursor = cursor
        sent = 0
        for event in await self._store.events_after(cursor, limit=100):
            if event.kind == EventKind.STATE and event.hostname:
                await self._deliver(event)
                sent += 1
            await self._store.put_meta(CURSOR_KEY, str(event.id))
            self._cursor = event.id
        return sent

    async def _payload(self, event: Event) -> bytes:
        assert event.hostname is not None
        domain = await self._store.get_domain(event.hostname)
        payload = {
            "type": "host.status_changed",
            "id": event.id,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(event.at)),
            "host": event.hostname,
            "host_unicode": display_hostname(event.hostname),
            "account": domain.account if domain else None,
            "from": event.from_state,
            "to": event.to_state,
            "reason": event.detail,
        }
        return json.dumps(payload, sort_keys=True).encode()

    async def _deliver(self, event: Event) -> bool:
        assert self._session is not None
        body = await self._payload(event)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "linkedge-webhooks",
            "X-Linkedge-Event": "host.status_changed",
            "X-Linkedge-Delivery": str(event.id),
            SIGNATURE_HEADER: sign(self._settings.secret, body),
        }
        problem = ""
        for attempt in range(1, self._settings.max_attempts + 1):
            try:
                async with self._session.post(
                    self._settings.url, data=body, headers=headers, allow_redirects=False
                ) as resp:
                    if 200 <= resp.status < 300:
                        self.stats.delivered += 1
                        return True
                    problem = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = str(exc) or type(exc).__name__
            if attempt < self._settings.max_attempts:
                delay = self._settings.backoff_seconds * 2 ** (attempt - 1)
                log.info("webhook for event %d: %s; retry in %.1f s", event.id, problem, delay)
                await self._sleep(delay)
        log.warning(
            "webhook for event %d dropped after %d attempts: %s", event.id, attempt, problem
        )
        self.stats.dropped += 1
        await self._store.record_event(
            event.hostname,
            EventKind.WEBHOOK_FAILED,
            f"status change {event.from_state} -> {event.to_state} not delivered after"
            f" {self._settings.max_attempts} attempts: {problem}",
        )
        return False
