"""The admin listener's application: JSON API, OpenAPI document, status page."""

from __future__ import annotations

from aiohttp import web

from proxy.admin import status_page
from proxy.admin.api import ROUTES
from proxy.admin.auth import SESSIONS, THROTTLE, AuthThrottle, Sessions, auth_middleware
from proxy.admin.deps import DEPS, AdminDeps
from proxy.admin.openapi import document

MAX_BODY = 64 * 1024


async def _server_header(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("Server", "linkedge")  # no versions


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(document())


def make_admin_app(deps: AdminDeps) -> web.Application:
    app = web.Application(
        middlewares=[auth_middleware(lambda: deps.token)], client_max_size=MAX_BODY
    )
    app[DEPS] = deps
    app[SESSIONS] = Sessions(lambda: deps.token, deps.clock)
    app[THROTTLE] = AuthThrottle(deps.auth_delay, deps.auth_max_delay)
    app.on_response_prepare.append(_server_header)
    for method, path, handler, _summary in ROUTES:
        app.router.add_route(method, path, handler)
    app.router.add_get("/v1/openapi.json", openapi_json)
    app.router.add_get("/", status_page.root)
    app.router.add_get("/status", status_page.status_page)
    app.router.add_get("/status/login", status_page.login_form)
    app.router.add_post("/status/login", status_page.login)
    app.router.add_post("/status/logout", status_page.logout)
    return app
