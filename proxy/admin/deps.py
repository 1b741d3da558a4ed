"""What the admin handlers work with, handed over by the worker that runs the listener."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from certstore import CertStore
from proxy.hosts.lifecycle import Lifecycle
from proxy.hosts.revocation import Revoker
from proxy.hosts.state_sync import StateSync
from proxy.hosts.verifier import Verifier
from proxy.http.host_views import HostViews
from proxy.tls.certificates import CertificateManager


@dataclass
class AdminDeps:
    store: CertStore
    verifier: Verifier
    lifecycle: Lifecycle
    edge_target: str
    token: str = field(repr=False)
    manager: CertificateManager | None = None  # None: no forced renewal (no ACME here)
    state_sync: StateSync | None = None
    host_views: HostViews | None = None  # this worker's cache: dropped at once on changes
    clock: Callable[[], float] = time.time
    secure_cookies: bool = False  # the listener speaks TLS: the session cookie is Secure
    auth_delay: float = 0.5  # after a wrong token, per source; doubles per failure
    auth_max_delay: float = 30.0
    issuer: Revoker | None = None  # revokes on DELETE /v1/hosts/{host}


DEPS: web.AppKey[AdminDeps] = web.AppKey("linkedge_admin_deps", AdminDeps)
