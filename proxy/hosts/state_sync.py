"""Keeps one worker's in-memory view in step with changes made by other processes.

The events table is the change feed: every state transition, removal and new
certificate is an event, so each worker follows it by id (an index range scan) and
drops its cached TLS context and refusal for the host; the next handshake reads the
store. The set of suspended hosts is kept here too, for the plain-HTTP answer. Other
per-worker caches (`proxy/http/host_views.py`) subscribe to the event kinds that invalidate
them (`proxy/hosts/events.py`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection

from certstore import CertStore, DomainState, Event, EventLog, StoreUnavailable
from proxy.hosts.events import HANDSHAKE_EVENTS, EventKind

log = logging.getLogger(__name__)

# Between two reads, while the store wakes the wait itself (PostgreSQL's LISTEN is up,
# SQLite looks every 100 ms): waiting long costs no latency and saves a read per second
# per worker of an idle fleet. Otherwise (no push: the listener is down, the circuit
# open) the follower reads every `interval`.
PUSHED_WAIT_SECONDS = 30.0


def follow_wait(store: EventLog, interval: float) -> float:
    """How long a follower of the event feed may wait for the next event."""
    return max(interval, PUSHED_WAIT_SECONDS) if store.events_pushed() else interval


class StateSync:
    def __init__(
        self,
        store: CertStore,
        forget: Callable[[str], None],
        interval: float = 1.0,
        *,
        applied: Callable[[Event], bool] | None = None,
    ) -> None:
        """`applied(event)`: True for an event whose effect on the handshake cache this
        worker made itself (its own issuance): `forget` is not called for it."""
        self._store = store
        self._forget = forget
        self._applied = applied
        self._interval = interval
        self._cursor = 0
        self._followers: list[tuple[frozenset[str], Callable[[str], None]]] = []
        self.suspended: set[str] = set()

    def follow(self, kinds: Collection[str], forget: Callable[[str], None]) -> None:
        """Also call forget(hostname) for every event of these kinds."""
        self._followers.append((frozenset(kinds), forget))

    @property
    def cursor(self) -> int:
        """The id of the last event this worker applied."""
        return self._cursor

    def is_suspended(self, hostname: str) -> bool:
        return hostname in self.suspended

    async def start(self) -> None:
        self._cursor = await self._store.last_event_id()
        after: str | None = None
        while True:
            page = await self._store.list_domains_page(
                after=after, limit=1000, state=DomainState.SUSPENDED
            )
            self.suspended.update(d.hostname for d in page)
            if len(page) < 1000:
                break
            after = page[-1].hostname

    async def run_forever(self) -> None:
        """Read, then wait for the store to say there is more (PostgreSQL pushes it
        within milliseconds; SQLite is polled), at most `interval` when nothing pushes
        (see :func:`follow_wait`): the cursor, not the push, decides what is applied,
        so a lost notification only delays."""
        unavailable = False
        while True:
            try:
                await self.poll()
            except StoreUnavailable as exc:  # one line per outage, no traceback
                if not unavailable:
                    log.warning("following store changes paused: %s", exc)
                unavailable = True
                await asyncio.sleep(self._interval)
                continue
            except Exception:
                log.exception("following store changes failed")
                await asyncio.sleep(self._interval)  # not a tight loop on a bad event
                continue
            if unavailable:
                log.info("following store changes again")
                unavailable = False
            await self._store.wait_for_events(
                self._cursor, follow_wait(self._store, self._interval)
            )

    async def poll(self) -> int:
        events = await self._store.events_after(self._cursor)
        for event in events:
            self._apply(event)
            self._cursor = event.id
        return len(events)

    def _apply(self, event: Event) -> None:
        if event.hostname is None:
            return
        for kinds, forget in self._followers:
            if event.kind in kinds:
                forget(event.hostname)
        if event.kind not in HANDSHAKE_EVENTS:
            return
        if self._applied is None or not self._applied(event):
            self._forget(event.hostname)
        if event.kind == EventKind.REMOVED or (
            event.kind == EventKind.STATE and event.to_state != DomainState.SUSPENDED
        ):
            self.suspended.discard(event.hostname)
        elif event.kind == EventKind.STATE:
            self.suspended.add(event.hostname)
