"""Push for event followers: one LISTEN connection per store object, kept up.

Every insert into `events` NOTIFYs its id (a trigger; delivered at commit, in commit
order, see the schema). The listener remembers the highest id it has heard of, and
:meth:`EventListener.wait` returns as soon as that passes the caller's cursor. The
payload is only a hint: the caller re-reads by cursor (``events_after``), so a lost
notification costs at most one wait's timeout, never an event.

The connection is dedicated (not from the pool: LISTEN belongs to a session) and
opened on the first wait (a CLI process never opens it). When it drops it is re-opened
with a doubling delay; after every (re)connect the newest id is read *after* LISTEN is
in place, and every waiter is woken, so whatever committed while nobody listened is
found by the callers' next read. A wait never raises for a lost connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg

log = logging.getLogger(__name__)

PING_SECONDS = 10.0  # a silent connection is checked this often (a dead peer sends nothing)
MAX_RECONNECT_DELAY = 2.0


class EventListener:
    def __init__(
        self, connect_kwargs: dict[str, Any], channel: str, timeout: float, label: str
    ) -> None:
        self._connect_kwargs = connect_kwargs
        self._channel = channel
        self._timeout = timeout
        self._label = label  # the URL, password masked
        self.latest = 0  # the highest event id known to exist
        self.connects = 0  # successful (re)connects so far
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def wait(self, after_id: int, timeout: float) -> None:  # noqa: ASYNC109
        if self._closed:
            return
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="store-event-listener")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        connects = self.connects
        while self.latest <= after_id:
            if self.connects != connects and connects > 0:
                return  # reconnected: whatever happened meanwhile is re-read by cursor
            left = deadline - loop.time()
            if left <= 0:
                return
            wakeup = self._wakeup
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wakeup.wait(), left)
            if self.connects > 0 and connects == 0:
                connects = self.connects  # the first connect: `latest` is now known

    def _wake(self) -> None:
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            event_id = int(payload)
        except ValueError:
            event_id = self.latest + 1  # unknown payload: assume news
        if event_id > self.latest:
            self.latest = event_id
            self._wake()

    async def _run(self) -> None:
        delay = 0.1
        down_logged = False
        while not self._closed:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(**self._connect_kwargs)
                lost = asyncio.Event()  # this connection's (an old one's close is no news)
                conn.add_termination_listener(lambda _conn, event=lost: event.set())
                await conn.add_listener(self._channel, self._on_notify)
                newest = await conn.fetchval(
                    "SELECT COALESCE(max(id), 0) FROM events", timeout=self._timeout
                )
                self.latest = max(self.latest, int(newest))
                self.connects += 1
                self._wake()
                if down_logged:
                    log.info("store notifications from %s resumed", self._label)
                delay, down_logged = 0.1, False
                while not self._closed:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(lost.wait(), PING_SECONDS)
                    if lost.is_set():
                        break
                    await conn.fetchval("SELECT 1", timeout=self._timeout)
                if not self._closed:
                    raise ConnectionError("connection closed")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: reconnect (the followers poll meanwhile)
                if not down_logged:
                    log.warning(
                        "store notifications from %s lost (%s); followers poll until they are back",
                        self._label,
                        type(exc).__name__,
                    )
                    down_logged = True
            finally:
                if conn is not None:
                    conn.terminate()
            if self._closed:
                return
            self._wake()  # waiters return: they re-read by cursor
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RECONNECT_DELAY)

    async def close(self) -> None:
        self._closed = True
        self._wake()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
