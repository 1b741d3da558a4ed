"""What the edge answers itself for a tracking host, before and after the backend.

In order, for each request that is not an ACME challenge and not for a suspended host:
1. app association files (`proxy/hosts/association_files.py`): answered from memory, never
   forwarded, never redirected; 404 from the edge when the host has none or is
   not registered;
2. HTTPS upgrade (the host's `https_upgrade` option): a plain-HTTP request gets a 308
   to the same path and query, byte for byte, on https — only while the host has a
   valid certificate, so nobody is sent into a handshake that fails;
3. everything else goes to the backend.
HSTS (the host's `hsts_max_age` option) is added to every HTTPS response for the host
while it has a valid certificate, relayed or the edge's own. The edge owns that header:
a backend's copy is dropped, so only the operator's per-host opt-in (never
includeSubDomains or preload) ever reaches a recipient's browser.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from aiohttp import web

from certstore.errors import StoreUnavailable
from proxy.hosts.association_files import SERVED_AT
from proxy.http.host_views import HostView, HostViews
from proxy.http.request_target import BadRequest, checked_host, misdirected, origin_form
from proxy.wire.peers import TrustedNetworks, client_address

log = logging.getLogger(__name__)
HSTS = "Strict-Transport-Security"


def arrived_over_https(forwarded_trusted: TrustedNetworks, request: web.Request) -> bool:
    """Over TLS here, or a trusted TLS-terminating proxy in front says the client used HTTPS
    (else an upgraded host would redirect forever); nobody else may say so."""
    if request.secure:
        return True
    proto = request.headers.get("X-Forwarded-Proto", "").strip().lower()
    return proto == "https" and client_address(request) in forwarded_trusted


class HostPolicy:
    def __init__(
        self,
        views: HostViews,
        *,
        https_public_port: int = 443,
        clock: Callable[[], float] = time.time,
        is_https: Callable[[web.Request], bool] = lambda request: request.secure,
    ) -> None:
        self._views = views
        self._port_suffix = "" if https_public_port == 443 else f":{https_public_port}"
        self._clock = clock
        # how the recipient reached us: TLS terminated here by default; a TLS-terminating
        # proxy in front would have to be trusted for its X-Forwarded-Proto instead
        self._is_https = is_https

    def install(self, app: web.Application) -> None:
        app.on_response_prepare.append(self._add_headers)

    async def answer(self, request: web.Request, host: str) -> web.StreamResponse | None:
        """The edge's own response, or None to forward the request to the backend."""
        kind = SERVED_AT.get(origin_form(request.raw_path).partition("?")[0])
        read, view = await self._view(host)
        if not read:
            if kind is None:
                return None
            return _text(503, "Temporarily unavailable, try again.", {"Retry-After": "10"})
        if kind is not None:
            return await self._association_file(request, view, kind)
        if self._upgrades(request, view):
            assert view is not None
            return self._upgrade(request, view.hostname)
        return None

    def forwards(self, request: web.Request, host: str) -> bool | None:
        """Whether `answer` would be None (forward it), known without waiting: False when
        the edge answers itself, None when the host's view is not in memory
        (`forwards_after_reading` reads it). The lean click protocol asks this; what it
        says False for goes to aiohttp."""
        if origin_form(request.raw_path).partition("?")[0] in SERVED_AT:
            return False
        known, view = self._views.known(host) if host else (True, None)
        if not known:
            return None
        return not self._upgrades(request, view)

    async def forwards_after_reading(self, request: web.Request, host: str) -> bool:
        """`forwards` once the host's view was read (as `answer` reads it)."""
        read, view = await self._view(host)
        return not read or not self._upgrades(request, view)  # a store failing: forward

    async def _view(self, host: str) -> tuple[bool, HostView | None]:
        """(True, the host's view or None: not registered), (False, None): unreadable."""
        try:
            return True, (await self._views.get(host) if host else None)
        except Exception as exc:  # the store failing must not take clicks down with it
            if isinstance(exc, StoreUnavailable):  # logged once by the store
                log.debug("reading host %s: %s", host, exc)
            else:
                log.exception("reading host %s from the store failed", host)
            return False, None

    def _upgrades(self, request: web.Request, view: HostView | None) -> bool:
        return (
            view is not None
            and view.https_upgrade
            and not self._is_https(request)
            and view.serves_https(self._clock())
        )

    async def _association_file(
        self, request: web.Request, view: HostView | None, kind: str
    ) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return _text(405, "Method Not Allowed", {"Allow": "GET, HEAD"})
        found = await self._views.file(view.hostname, kind) if view is not None else None
        if found is None:
            # the same answer whether or not the host is registered: nobody can probe
            # which names are customers' by asking for their files
            return _text(404, f"No {kind} here.")
        headers = {"ETag": found.etag, "Cache-Control": "no-cache"}
        if _matches(request.headers.getall("If-None-Match", ()), found.etag):
            return web.Response(status=304, headers=headers)
        return web.Response(body=found.content, content_type="application/json", headers=headers)

    def _upgrade(self, request: web.Request, hostname: str) -> web.Response:
        location = f"https://{hostname}{self._port_suffix}{origin_form(request.raw_path)}"
        return web.Response(
            status=308,
            text=f"Moved to {location}\n",
            headers={"Location": location, "Cache-Control": "no-store"},
        )

    async def _add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers.popall(HSTS, None)
        value = await self.hsts(request)
        if value is not None:
            response.headers[HSTS] = value

    async def hsts(self, request: web.Request) -> str | None:
        """The Strict-Transport-Security value every response to `request` gets (the
        edge replaces a backend's own), or None for none."""
        known, value = self.hsts_now(request)
        if known:
            return value
        # answer() has just loaded the view, so this is memory, unless the event feed
        # dropped the entry while the request was at the backend: then it is read again
        # (peeking would send this response without HSTS)
        host = checked_host(request)
        assert host is not None  # hsts_now knows every other case
        return self._hsts_of(await self._views.get(host.lookup))

    def hsts_now(self, request: web.Request) -> tuple[bool, str | None]:
        """(True, `hsts`'s value) when known without a store read, else (False, None)."""
        if not self._is_https(request):  # RFC 6797 §7.2: meaningless over plain HTTP
            return True, None
        try:
            host = checked_host(request)
        except BadRequest:
            return True, None
        if host is None or misdirected(host) is not None:  # the 421: no HSTS of another host
            return True, None
        known, view = self._views.recall(host.lookup)
        return known, self._hsts_of(view)

    def _hsts_of(self, view: HostView | None) -> str | None:
        if view is not None and view.hsts_max_age is not None and view.serves_https(self._clock()):
            return f"max-age={view.hsts_max_age}"
        return None


def _matches(if_none_match: tuple[str, ...] | list[str], etag: str) -> bool:
    """RFC 9110 §13.1.2: `*`, or any listed tag equal under weak comparison."""
    opaque = etag.removeprefix("W/")
    for header in if_none_match:
        for candidate in header.split(","):
            candidate = candidate.strip()
            if candidate == "*" or candidate.removeprefix("W/") == opaque:
                return True
    return False


def _text(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    # never cached: a file uploaded a minute later must be seen at once
    return web.Response(
        status=status, text=text + "\n", headers={"Cache-Control": "no-store", **(headers or {})}
    )
