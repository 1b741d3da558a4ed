"""Who may use the admin listener: holders of the admin token, and nobody else.

API clients send `Authorization: Bearer <token>`. People use the status page through
a login form: the token is posted once and exchanged for a session cookie that holds
an expiry, a session id and an HMAC of both under the token (so the cookie never
contains the token, dies with a token change, and is useless after its expiry or
logout: the server keeps the live session ids). The cookie is HttpOnly,
SameSite=Strict, Secure when the listener speaks TLS, and scoped to /status; it opens
only the read-only page, never the API. A cookie that is not a live session (expired,
logged out, malformed) is a 401. Wrong tokens, presented as a bearer token or at
the login form, are slowed down per source (AuthThrottle). Tokens are never logged;
comparisons are constant-time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.wire.peers import source_key

log = logging.getLogger(__name__)

SESSION_COOKIE = "linkedge_status"
SESSION_SECONDS = 12 * 3600
STATUS_PREFIX = "/status"
LOGIN_PATH = "/status/login"


def _current(token: str | Callable[[], str]) -> Callable[[], str]:
    return token if callable(token) else lambda: token


def bearer_ok(request: web.Request, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return False
    return hmac.compare_digest(presented.strip().encode(), token.encode())


def token_ok(presented: str, token: str) -> bool:
    return hmac.compare_digest(presented.strip().encode(), token.encode())


_SESSION = re.compile(r"^([0-9]{1,12})\.([0-9a-f]{32})\.([0-9a-f]{64})$")
MAX_SESSIONS = 1000


def _mac(token: str, expires: int, sid: str) -> str:
    return hmac.new(
        token.encode(), f"status-session:{expires}:{sid}".encode(), hashlib.sha256
    ).hexdigest()


class Sessions:
    """Status-page sessions that this listener handed out and has not seen end.

    The cookie is `expires.sid.HMAC(token, expires, sid)`: it dies with its expiry and
    with a token change. The server also remembers each live session id, so logging
    out ends the session for good (a copied cookie stops working) and a restart logs
    everyone out. Only logins with the token create sessions; at most MAX_SESSIONS are
    kept (the oldest go first).
    """

    def __init__(
        self, token: str | Callable[[], str], clock: Callable[[], float] = time.time
    ) -> None:
        self._token = _current(token)  # read at each use: a reloaded token ends old sessions
        self._clock = clock
        self._live: OrderedDict[str, int] = OrderedDict()  # sid -> expires

    def __len__(self) -> int:
        return len(self._live)

    def new(self) -> str:
        now = self._clock()
        for sid, expires in list(self._live.items()):
            if expires < now:
                del self._live[sid]
        expires = int(now + SESSION_SECONDS)
        sid = secrets.token_hex(16)
        self._live[sid] = expires
        while len(self._live) > MAX_SESSIONS:
            self._live.popitem(last=False)
        return f"{expires}.{sid}.{_mac(self._token(), expires, sid)}"

    def _sid(self, value: str | None) -> str | None:
        """The session id of a valid, live cookie value; None for anything else."""
        match = _SESSION.match(value or "")
        if match is None:
            return None
        expires_text, sid, mac = match.groups()
        expires = int(expires_text)
        if expires < self._clock() or self._live.get(sid) != expires:
            return None
        if not hmac.compare_digest(mac, _mac(self._token(), expires, sid)):
            return None
        return sid

    def ok(self, value: str | None) -> bool:
        return self._sid(value) is not None

    def end(self, value: str | None) -> None:
        sid = self._sid(value)
        if sid is not None:
            del self._live[sid]


@dataclass
class _Source:
    failures: int = 0
    next_slot: float = 0.0  # when this source's next attempt may be checked
    last_failure: float = 0.0


class AuthThrottle:
    """Slows down guessing: failed logins and bearer tokens, per source.

    A source (an IPv4 address, an IPv6 /64, or the Unix socket) that presented a wrong
    token waits before each further attempt is checked: `delay` after the first
    failure, doubling per failure up to `max_delay`. Attempts take turns (each reserves
    the next slot), so parallel connections do not multiply the guessing rate; an
    attempt whose turn is more than `max_delay` away is refused at once with 429,
    without being checked. A success clears the source. The table keeps at most
    `max_sources` sources (least recently failing dropped first), each forgotten
    `forget_after` seconds after its last failure.
    """

    def __init__(
        self,
        delay: float = 0.5,
        max_delay: float = 30.0,
        *,
        max_sources: int = 10_000,
        forget_after: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.delay = delay
        self.max_delay = max(delay, max_delay)
        self._max_sources = max_sources
        self._forget_after = forget_after
        self._clock = clock
        self._sources: OrderedDict[str, _Source] = OrderedDict()
        self.failures = 0  # failed attempts, all sources (counted for the operator)
        self.refused = 0  # attempts answered 429 without being checked

    def __len__(self) -> int:
        return len(self._sources)

    def _entry(self, source: str, now: float) -> _Source | None:
        entry = self._sources.get(source)
        if entry is not None and now - entry.last_failure > self._forget_after:
            del self._sources[source]
            return None
        return entry

    def turn(self, source: str) -> float | None:
        """Seconds to wait before checking this source's attempt; None: refuse it (429)."""
        now = self._clock()
        entry = self._entry(source, now)
        if entry is None or entry.failures == 0 or self.delay <= 0:
            return 0.0
        slot = max(now, entry.next_slot)
        if slot - now > self.max_delay:
            self.refused += 1
            return None
        entry.next_slot = slot + self._step(entry.failures)
        return slot - now

    def failed(self, source: str) -> None:
        now = self._clock()
        self.failures += 1
        entry = self._entry(source, now)
        if entry is None:
            entry = self._sources[source] = _Source(next_slot=now)
            log.info("failed admin authentication from %s (later ones are slowed down)", source)
        entry.failures += 1
        entry.last_failure = now
        entry.next_slot = max(entry.next_slot, now + self._step(entry.failures))
        self._sources.move_to_end(source)
        while len(self._sources) > self._max_sources:
            self._sources.popitem(last=False)

    def succeeded(self, source: str) -> None:
        self._sources.pop(source, None)

    def _step(self, failures: int) -> float:
        return min(self.max_delay, self.delay * 2 ** min(failures - 1, 32))

    async def check(self, request: web.Request, attempt: Callable[[], bool]) -> bool | None:
        """Wait for this source's turn, then run the check: its result, None for 429."""
        source = request_source(request)
        wait = self.turn(source)
        if wait is None:
            return None
        if wait > 0:
            await asyncio.sleep(wait)
        if attempt():
            self.succeeded(source)
            return True
        self.failed(source)
        return False


def request_source(request: web.Request) -> str:
    """Who is asking, for the throttle: the peer's address (/64 for IPv6), or "unix"."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if isinstance(peer, tuple) and peer:
        return source_key(str(peer[0]))
    return "unix"


def session_ok(value: str | None, sessions: Sessions) -> bool:
    return sessions.ok(value)


def unauthorized() -> web.Response:
    return web.json_response(
        {"error": "unauthorized", "message": "missing or wrong bearer token"},
        status=401,
        headers={"WWW-Authenticate": 'Bearer realm="linkedge-admin"'},
    )


def too_many(throttle: AuthThrottle) -> web.Response:
    return web.json_response(
        {"error": "too_many_attempts", "message": "too many failed attempts; try again later"},
        status=429,
        headers={"Retry-After": str(max(1, int(throttle.max_delay)))},
    )


SESSIONS: web.AppKey[Sessions] = web.AppKey("linkedge_admin_sessions", Sessions)
THROTTLE: web.AppKey[AuthThrottle] = web.AppKey("linkedge_admin_throttle", AuthThrottle)


def auth_middleware(token: str | Callable[[], str]) -> Middleware:
    """`token` may be a callable: the current token, re-read on SIGHUP (proxy/app/reload.py)."""
    current = _current(token)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        token = current()
        if path == LOGIN_PATH:
            return await handler(request)
        page = path == STATUS_PREFIX or path.startswith(STATUS_PREFIX + "/") or path == "/"
        if "Authorization" in request.headers:  # a token was presented: check it, slowly
            throttle = request.app[THROTTLE]
            accepted = await throttle.check(request, lambda: bearer_ok(request, token))
            if accepted is None:
                return too_many(throttle)
            if accepted:
                return await handler(request)
            if not page:
                return unauthorized()
        if page:  # people: a session cookie from the login form
            cookie = request.cookies.get(SESSION_COOKIE)
            if session_ok(cookie, request.app[SESSIONS]):
                return await handler(request)
            if cookie is not None:  # expired, logged out, forged or malformed
                return session_rejected()
            if request.method in ("GET", "HEAD"):
                raise web.HTTPSeeOther(LOGIN_PATH)
        return unauthorized()

    return middleware


def session_rejected() -> web.Response:
    response = web.Response(
        status=401,
        text="Your session has ended: log in again at /status/login\n",
        headers={"Cache-Control": "no-store", "Refresh": f"0; url={LOGIN_PATH}"},
    )
    response.del_cookie(SESSION_COOKIE, path=STATUS_PREFIX)
    return response
