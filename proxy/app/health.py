"""`/healthz`, `/readyz` and `/metrics` for load balancers, Kubernetes and Prometheus.

Served by worker slot 0 on the admin listener (before the admin API's token check:
probes carry no credentials) and on `metrics.listen` when set.

* `/healthz`: the process is alive and its event loop answers. Always 200.
* `/readyz`: this edge can take clicks: its HTTPS and HTTP listeners are bound, the
  store answers a read within a second, and at least one backend passes its health
  checks. 200 when all hold, else 503; both with a small JSON body naming each
  check, and on 503 the reasons.

  A remote store (PostgreSQL) that cannot be reached does **not** make the node unready:
  the node keeps serving every host it has cached or in its local copy
  (`certstore/readthrough.py`), and the database is usually shared by the whole fleet,
  so taking nodes out of the load balancer for it would turn a database outage into a
  click outage. The check then reads ``degraded: ...`` and the body lists it under
  ``degraded``. A local (SQLite) store that cannot be read is still "not ready".
* `/metrics`: see `proxy/app/metrics.py` (an optional bearer token, `metrics.token_*`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from certstore.errors import StoreUnavailable

if TYPE_CHECKING:
    from proxy.app.metrics import Exporter
    from proxy.app.wiring import EdgeWorker

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STORE_TIMEOUT = 1.0
OPS_PATHS = ("/healthz", "/readyz", "/metrics")
DEGRADED = "degraded: "  # a check that fails without making the node unready


async def readiness(worker: EdgeWorker) -> tuple[bool, dict[str, str]]:
    """(ready, {check: "ok" or the reason it is not})."""
    checks: dict[str, str] = {}
    socks = worker.listen_sockets
    listening = len(socks) == 2 and all(sock.fileno() != -1 for sock in socks)
    checks["listeners"] = "ok" if listening else "the HTTPS or HTTP listener is not bound"
    store = worker.store
    if store is None:
        checks["store"] = "the store is not open"
    else:
        try:
            async with asyncio.timeout(STORE_TIMEOUT):
                await store.last_event_id()
            checks["store"] = "ok"
        except StoreUnavailable as exc:  # a remote store: serving from cache and copy
            checks["store"] = f"{DEGRADED}the store is unreachable, serving from cache: {exc}"
        except TimeoutError:
            checks["store"] = f"the store did not answer within {STORE_TIMEOUT:g} s"
        except Exception as exc:  # any failure to read is "not ready", with its reason
            checks["store"] = f"the store cannot be read: {type(exc).__name__}: {exc}"
    pool = worker.backends
    if pool is None:
        checks["backends"] = "no backend pool"
    elif any(b.healthy for b in pool.backends):
        checks["backends"] = "ok"
    else:
        names = ", ".join(b.base for b in pool.backends)
        checks["backends"] = f"no healthy backend ({names} failing health checks)"
    return all(v == "ok" or v.startswith(DEGRADED) for v in checks.values()), checks


class OpsEndpoints:
    def __init__(self, worker: EdgeWorker, exporter: Exporter | None) -> None:
        self._worker = worker
        self._exporter = exporter
        self.routes: dict[str, Handler] = {"/healthz": self.healthz, "/readyz": self.readyz}
        if exporter is not None:
            self.routes["/metrics"] = exporter.handle

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n", headers={"Cache-Control": "no-store"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready, checks = await readiness(self._worker)
        body: dict[str, object] = {"ready": ready, "checks": checks}
        degraded = [f"{k}: {v}" for k, v in checks.items() if v.startswith(DEGRADED)]
        if degraded:
            body["degraded"] = degraded
        if not ready:
            body["reasons"] = [
                f"{k}: {v}" for k, v in checks.items() if v != "ok" and not v.startswith(DEGRADED)
            ]
        return web.json_response(
            body, status=200 if ready else 503, headers={"Cache-Control": "no-store"}
        )

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        """Put first on the admin app: these paths answer before the token check."""
        routes = self.routes

        @web.middleware
        async def ops(request: web.Request, handler: Handler) -> web.StreamResponse:
            own = routes.get(request.path)
            if own is not None and request.method in ("GET", "HEAD"):
                return await own(request)
            return await handler(request)

        return ops

    def install(self, admin_app: web.Application) -> None:
        admin_app.middlewares.insert(0, self.middleware())

    def app(self) -> web.Application:
        """The application of `metrics.listen`: these paths only."""
        app = web.Application()
        for path, handler in self.routes.items():
            app.router.add_get(path, handler)
        return app
