"""Which tracking backend gets the next click: health checks and selection.

Each worker checks every backend actively (GET `health_path` every
`health_interval`; an answer below 500 passes, no answer or a 5xx fails) and
passively (a connect refused while forwarding takes the backend out at once).
`unhealthy_after` failed checks in a row take a backend out, `healthy_after`
passed ones bring it back. Requests go round robin over the
healthy backends; `candidates()` is the order to try them in when connecting
fails. With every backend out there are no candidates, and the forwarder answers
502 at once instead of letting the click wait on connect timeouts.

Backends start healthy, so a worker serves at once; the first check runs at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import aiohttp
from yarl import URL

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HealthSettings:
    path: str = "/"
    interval: float = 5.0
    timeout: float = 2.0
    healthy_after: int = 2
    unhealthy_after: int = 3


class Backend:
    __slots__ = ("base", "healthy", "passes", "failures")

    def __init__(self, url: str) -> None:
        self.base = url.rstrip("/")  # the request's raw path is appended to this
        self.healthy = True
        self.passes = 0  # consecutive passed checks, while unhealthy
        self.failures = 0  # consecutive failed checks, while healthy

    def __repr__(self) -> str:
        return f"Backend({self.base!r}, healthy={self.healthy})"


class BackendPool:
    def __init__(self, urls: list[str], settings: HealthSettings | None = None) -> None:
        if not urls:
            raise ValueError("at least one backend URL is needed")
        self.backends = tuple(Backend(url) for url in urls)
        self._settings = settings or HealthSettings()
        self._next = 0
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    def candidates(self) -> list[Backend]:
        """Healthy backends, the next one in the rotation first; the rotation moves on."""
        healthy = self.next_candidates()
        self.rotate()
        return healthy

    def next_candidates(self) -> list[Backend]:
        """What `candidates` would return, without moving the rotation on."""
        backends = self.backends
        if len(backends) == 1:
            return [backends[0]] if backends[0].healthy else []
        start = self._next
        return [b for b in backends[start:] + backends[:start] if b.healthy]

    def rotate(self) -> None:
        if len(self.backends) > 1:
            self._next = (self._next + 1) % len(self.backends)

    def connect_failed(self, backend: Backend, reason: object) -> None:
        """Passive check: a connect that failed while forwarding takes the backend out."""
        if backend.healthy:
            log.warning("backend %s is down: %s", backend.base, reason)
        backend.healthy = False
        backend.passes = 0

    def record_check(self, backend: Backend, passed: bool, detail: str = "") -> None:
        settings = self._settings
        if passed:
            backend.failures = 0
            if not backend.healthy:
                backend.passes += 1
                if backend.passes >= settings.healthy_after:
                    backend.healthy = True
                    log.warning("backend %s is back up", backend.base)
        else:
            backend.passes = 0
            if backend.healthy:
                backend.failures += 1
                if backend.failures >= settings.unhealthy_after:
                    backend.healthy = False
                    backend.failures = 0
                    log.warning("backend %s is down: health check: %s", backend.base, detail)

    async def start(self) -> None:
        """Start the active checks (a background task until `close`)."""
        connector = aiohttp.TCPConnector(force_close=True)  # every check is a real connect
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._settings.timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": "linkedge-health-check"},
        )
        self._task = asyncio.get_running_loop().create_task(self._check_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    async def check_all(self) -> None:
        """One round of active checks, all backends at once."""
        await asyncio.gather(*(self._check(b) for b in self.backends))

    async def _check_forever(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self._settings.interval)

    async def _check(self, backend: Backend) -> None:
        assert self._session is not None
        url = URL(backend.base + self._settings.path, encoded=True)
        try:
            async with self._session.get(url, allow_redirects=False) as resp:
                passed, detail = resp.status < 500, f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            passed, detail = False, f"{type(exc).__name__}: {exc}"
        self.record_check(backend, passed, detail)
