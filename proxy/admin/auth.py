"""Who may use the admin listener: holders of the admin token, and nobody else.

API clients send `Authorization: Bearer <token>`. People use the status page through
a login form: the token is posted once and exchanged for a session cookie that holds
an expiry and an HMAC of it under the token (so the cookie never contains the token,
dies with a token change, and is useless after its expiry). The cookie is HttpOnly,
SameSite=Strict and scoped to /status; it opens only the read-only page, never the API.
Tokens are never logged; comparisons are constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

SESSION_COOKIE = "linkedge_status"
SESSION_SECONDS = 12 * 3600
STATUS_PREFIX = "/status"
LOGIN_PATH = "/status/login"


def bearer_ok(request: web.Request, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return False
    return hmac.compare_digest(presented.strip().encode(), token.encode())


def token_ok(presented: str, token: str) -> bool:
    return hmac.compare_digest(presented.strip().encode(), token.encode())


def _mac(token: str, expires: int) -> str:
    return hmac.new(
        token.encode(), f"status-session:{expires}".encode(), hashlib.sha256
    ).hexdigest()


def new_session(token: str, now: float) -> str:
    expires = int(now + SESSION_SECONDS)
    return f"{expires}.{_mac(token, expires)}"


def session_ok(value: str | None, token: str, now: float) -> bool:
    if not value or "." not in value:
        return False
    expires_text, _, mac = value.partition(".")
    if not expires_text.isdigit() or int(expires_text) < now:
        return False
    return hmac.compare_digest(mac.encode(), _mac(token, int(expires_text)).encode())


def unauthorized() -> web.Response:
    return web.json_response(
        {"error": "unauthorized", "message": "missing or wrong bearer token"},
        status=401,
        headers={"WWW-Authenticate": 'Bearer realm="linkedge-admin"'},
    )


def auth_middleware(
    token: str | Callable[[], str], clock: Callable[[], float] = time.time
) -> Middleware:
    """`token` may be a callable: the current token, re-read on SIGHUP (proxy/reload.py)."""
    current = token if callable(token) else lambda: token

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        token = current()
        if path == LOGIN_PATH:
            return await handler(request)
        if bearer_ok(request, token):
            return await handler(request)
        if path == STATUS_PREFIX or path.startswith(STATUS_PREFIX + "/") or path == "/":
            if session_ok(request.cookies.get(SESSION_COOKIE), token, clock()):
                return await handler(request)
            if request.method in ("GET", "HEAD"):
                raise web.HTTPSeeOther(LOGIN_PATH)
        return unauthorized()

    return middleware
