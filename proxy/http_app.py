"""The HTTP application shared by both listeners.

Plain HTTP stays useful forever: links in mail already sent are `http://`, and the
CA's HTTP-01 validation arrives here. Challenge answers come from the store, so
whichever worker process the CA reaches can answer for an order another placed.
What the edge answers itself for a host (app association files, HTTPS upgrade,
HSTS) is decided in `proxy/host_policy.py`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Protocol

from aiohttp import web

from certstore import CertStore

from .forward import Forwarder
from .host_policy import HostPolicy
from .hostnames import host_header_name

log = logging.getLogger(__name__)
CHALLENGE_PREFIX = "/.well-known/acme-challenge/"


class ClickForwarder(Protocol):
    async def handle(self, request: web.Request) -> web.StreamResponse: ...


def make_http_app(
    store: CertStore,
    forwarder: Forwarder | ClickForwarder,
    is_suspended: Callable[[str], bool] = lambda _host: False,
    policy: HostPolicy | None = None,
) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith(CHALLENGE_PREFIX) and request.method in ("GET", "HEAD"):
            return await _challenge(store, path[len(CHALLENGE_PREFIX) :])
        host = host_header_name(request.headers.get("Host", ""))
        if host and is_suspended(host):
            # the operator's kill switch; also reaches keep-alive HTTPS connections
            return web.Response(
                status=503,
                text=f"{host} is suspended on this edge.\n",
                headers={"Cache-Control": "no-store"},
            )
        if policy is not None:  # association files, HTTPS upgrade
            own = await policy.answer(request, host)
            if own is not None:
                return own
        return await forwarder.handle(request)

    app = web.Application(client_max_size=0)
    app.router.add_route("*", "/{tail:.*}", handle)
    if policy is not None:
        policy.install(app)  # HSTS
    return app


async def _challenge(store: CertStore, token: str) -> web.Response:
    answer = await store.get_challenge(token) if _is_token(token) else None
    if answer is None:
        log.info("unknown ACME challenge token %r (worker %d)", token[:64], os.getpid())
        return web.Response(status=404, text="no such challenge\n")
    log.info("served ACME challenge token %s (worker %d)", token, os.getpid())
    return web.Response(text=answer, content_type="application/octet-stream")


def _is_token(token: str) -> bool:
    # RFC 8555 §8.3: base64url, at least 128 bits of entropy
    return 0 < len(token) <= 256 and all(c.isalnum() or c in "-_" for c in token)
