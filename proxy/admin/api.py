"""The admin JSON API (/v1): hosts, checks, certificates, lifecycle, options and files.

Every expected error is a 4xx JSON body `{"error": code, "message": reason}` and
changes nothing. Hostnames in paths and bodies go through the same normalisation as
everywhere else (IDNA, lower case, no trailing dot).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from certstore import DomainState
from proxy.admin.deps import DEPS, AdminDeps
from proxy.admin.views import certificate_json, event_json, host_file_json, host_json
from proxy.hosts.association_files import MAX_BYTES
from proxy.hosts.options import OptionsError, defaults, validate
from proxy.ops import files as host_files
from proxy.ops import hosts as ops
from proxy.ops.errors import OpError

MAX_PAGE = 1000
DEFAULT_PAGE = 100
S = DomainState


class ApiError(web.HTTPException):
    def __init__(self, status: int, code: str, message: str, **extra: str) -> None:
        self.status_code = status
        super().__init__(
            text=json.dumps({"error": code, "message": message, **extra}),
            content_type="application/json",
        )


def _deps(request: web.Request) -> AdminDeps:
    return request.app[DEPS]


def _caches(deps: AdminDeps) -> ops.WorkerCaches:
    """This worker serves a change at once; the others follow the event feed."""
    return ops.WorkerCaches(deps.manager, deps.state_sync, deps.host_views)


def _changed(deps: AdminDeps, hostname: str) -> None:
    _caches(deps).changed(hostname, certificate=False)


def _refused(exc: OpError, hint: str = "") -> ApiError:
    extra = {"path": exc.path} if exc.path is not None else {}
    return ApiError(exc.status, exc.code, str(exc) + hint, **extra)


async def _parse_json(request: web.Request) -> Any:
    """The body as JSON, or a 400 that says what is wrong with it (never a 500)."""
    raw = await request.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        message = f"the body is not UTF-8 (byte {exc.start})"
    except json.JSONDecodeError as exc:
        message = f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    except RecursionError:
        message = "the body is not valid JSON: nested too deeply"
    except ValueError as exc:  # e.g. a number over Python's 4,300-digit limit
        message = f"the body is not valid JSON: {exc}"
    raise ApiError(400, "malformed_json", message)


async def _json_body(request: web.Request, allowed: set[str], required: set[str]) -> dict[str, Any]:
    data = await _parse_json(request)
    if not isinstance(data, dict):
        raise ApiError(422, "invalid", "the body must be a JSON object")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ApiError(422, "unknown_field", f"unknown field {unknown[0]!r}")
    missing = sorted(required - set(data))
    if missing:
        raise ApiError(422, "missing_field", f"missing field {missing[0]!r}")
    return data


async def _domain(request: web.Request) -> tuple[AdminDeps, Any]:
    deps = _deps(request)
    try:
        return deps, await ops.registered(deps.store, request.match_info["host"])
    except OpError as exc:
        raise _refused(exc) from None


async def _host_body(deps: AdminDeps, hostname: str) -> dict[str, Any]:
    domain = await deps.store.get_domain(hostname)
    if domain is None:
        raise ApiError(404, "not_found", f"{hostname} is not registered")
    validity = (await deps.store.certificate_validity([hostname])).get(hostname)
    body = host_json(domain, validity, deps.clock())
    body["events"] = [event_json(e) for e in await deps.store.list_events(hostname, limit=10)]
    return body


# -- hosts ---------------------------------------------------------------------------


async def list_hosts(request: web.Request) -> web.Response:
    deps = _deps(request)
    query = request.query
    unknown = sorted(set(query) - {"limit", "after", "account", "state"})
    if unknown:
        raise ApiError(422, "unknown_parameter", f"unknown query parameter {unknown[0]!r}")
    limit_text = query.get("limit", str(DEFAULT_PAGE))
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_PAGE:
        raise ApiError(422, "invalid_limit", f"limit must be an integer from 1 to {MAX_PAGE}")
    state = None
    if "state" in query:
        try:
            state = DomainState(query["state"])
        except ValueError:
            known = ", ".join(s.value for s in DomainState)
            raise ApiError(422, "invalid_state", f"state must be one of {known}") from None
    limit = int(limit_text)
    page = await deps.store.list_domains_page(  # one more row tells whether a next page exists
        after=query.get("after"), limit=limit + 1, account=query.get("account"), state=state
    )
    more = len(page) > limit
    page = page[:limit]
    validity = await deps.store.certificate_validity([d.hostname for d in page])
    now = deps.clock()
    return web.json_response(
        {
            "hosts": [host_json(d, validity.get(d.hostname), now) for d in page],
            "next": page[-1].hostname if more else None,
        }
    )


async def add_host(request: web.Request) -> web.Response:
    deps = _deps(request)
    data = await _json_body(request, {"hostname", "account"}, {"hostname", "account"})
    try:
        added = await ops.register(deps.store, data["hostname"], data["account"], deps.edge_target)
    except OpError as exc:
        raise _refused(exc) from None
    body = await _host_body(deps, added.domain.hostname)
    return web.json_response(body, status=201 if added.created else 200)


async def get_host(request: web.Request) -> web.Response:
    deps, domain = await _domain(request)
    return web.json_response(await _host_body(deps, domain.hostname))


async def delete_host(request: web.Request) -> web.Response:
    """Revoke the certificate, then unregister and purge (the same as `domains remove`)."""
    unknown = sorted(set(request.query) - {"force"})
    if unknown:
        raise ApiError(422, "unknown_parameter", f"unknown query parameter {unknown[0]!r}")
    force_text = request.query.get("force", "false")
    if force_text not in ("true", "false"):
        raise ApiError(422, "invalid_force", "force must be true or false")
    deps, domain = await _domain(request)
    try:
        await ops.remove(
            deps.store,
            deps.issuer,
            domain.hostname,
            force=force_text == "true",
            caches=_caches(deps),
            clock=deps.clock,
        )
    except OpError as exc:
        hint = " (retry, or DELETE with ?force=true to remove without revoking)"
        raise _refused(exc, hint if exc.code == "revocation_failed" else "") from None
    return web.Response(status=204)


# -- checks, certificate, lifecycle -------------------------------------------------


async def run_checks(request: web.Request) -> web.Response:
    deps, domain = await _domain(request)
    try:
        outcome = await ops.verify(deps.store, deps.verifier, domain.hostname)
    except OpError as exc:
        raise _refused(exc) from None
    body = await _host_body(deps, domain.hostname)
    body["checks"] = [r.to_json() for r in outcome.report.results]
    return web.json_response(body)


async def get_certificate(request: web.Request) -> web.Response:
    deps, domain = await _domain(request)
    cert = await deps.store.get_certificate(domain.hostname)
    if cert is None:
        raise ApiError(404, "no_certificate", f"{domain.hostname} has no certificate yet")
    return web.json_response(certificate_json(cert, deps.clock()))


async def renew(request: web.Request) -> web.Response:
    deps, domain = await _domain(request)
    try:
        cert = await ops.renew(deps.store, deps.verifier, deps.manager, domain.hostname)
    except OpError as exc:
        raise _refused(exc) from None
    return web.json_response(certificate_json(cert, deps.clock()))


async def suspend(request: web.Request) -> web.Response:
    deps, domain = await _domain(request)
    data = await _json_body(request, {"reason"}, set()) if request.can_read_body else {}
    try:
        note = data.get("reason", "")
        await ops.suspend(deps.store, deps.lifecycle, domain.hostname, note, caches=_caches(deps))
    except OpError as exc:
        raise _refused(exc) from None
    return web.json_response(await _host_body(deps, domain.hostname))


async def resume(request: web.Request) -> web.Response:
    deps, domain = await _domain(request)
    try:
        await ops.resume(
            deps.store, deps.lifecycle, domain.hostname, caches=_caches(deps), clock=deps.clock
        )
    except OpError as exc:
        raise _refused(exc) from None
    return web.json_response(await _host_body(deps, domain.hostname))


async def list_host_events(request: web.Request) -> web.Response:
    deps, domain = await _domain(request)
    limit_text = request.query.get("limit", "50")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= 500:
        raise ApiError(422, "invalid_limit", "limit must be an integer from 1 to 500")
    events = await deps.store.list_events(domain.hostname, limit=int(limit_text))
    return web.json_response({"events": [event_json(e) for e in events]})


# -- options -------------------------------------------------------------------------


async def get_options(request: web.Request) -> web.Response:
    deps, domain = await _domain(request)
    stored = await deps.store.get_options(domain.hostname)
    return web.json_response({**defaults(), **(stored or {})})


async def put_options(request: web.Request) -> web.Response:
    deps, domain = await _domain(request)
    data = await _parse_json(request)
    try:
        options = validate(data)
    except OptionsError as exc:
        raise ApiError(422, "invalid_options", str(exc)) from None
    await deps.store.put_options(domain.hostname, options)  # logs options_changed
    _changed(deps, domain.hostname)
    return web.json_response(options)


# -- app association files ---------------------------------------------------------


def _file_host(request: web.Request) -> tuple[AdminDeps, str]:
    try:
        return _deps(request), ops.hostname(request.match_info["host"])
    except OpError as exc:
        raise _refused(exc) from None


async def _file_body(request: web.Request) -> bytes:
    """The raw upload, read no further than the limit."""
    if request.content_type != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            "send the file itself as the request body with Content-Type: application/json"
            f" (got {request.content_type})",
        )
    if (request.content_length or 0) > MAX_BYTES:
        raise _refused(host_files.too_large())
    chunks, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > MAX_BYTES:
            raise _refused(host_files.too_large())
        chunks.append(chunk)
    return b"".join(chunks)


# The rules live in proxy/ops/files.py, shared with `linkedge files`.


async def list_files(request: web.Request) -> web.Response:
    deps, hostname = _file_host(request)
    try:
        files = await host_files.list_files(deps.store, hostname)
    except OpError as exc:
        raise _refused(exc) from None
    return web.json_response({"files": [host_file_json(f) for f in files]})


async def get_file(request: web.Request) -> web.Response:
    deps, hostname = _file_host(request)
    try:
        found = await host_files.get_file(deps.store, hostname, request.match_info["kind"])
    except OpError as exc:
        raise _refused(exc) from None
    return web.Response(
        body=found.content, content_type="application/json", headers={"ETag": found.etag}
    )


async def put_file(request: web.Request) -> web.Response:
    deps, hostname = _file_host(request)
    kind = request.match_info["kind"]
    try:
        await host_files.require_host(deps.store, hostname)
        host_files.check_kind(kind)
        content = await _file_body(request)
        stored, existed = await host_files.put_file(deps.store, hostname, kind, content)
    except OpError as exc:
        raise _refused(exc) from None
    _changed(deps, hostname)  # logs file_updated
    return web.json_response(host_file_json(stored), status=200 if existed else 201)


async def delete_file(request: web.Request) -> web.Response:
    deps, hostname = _file_host(request)
    try:
        await host_files.delete_file(deps.store, hostname, request.match_info["kind"])
    except OpError as exc:  # logs file_deleted when it deletes
        raise _refused(exc) from None
    _changed(deps, hostname)
    return web.Response(status=204)


ROUTES: list[tuple[str, str, Any, str]] = [
    # method, path, handler, OpenAPI summary
    ("GET", "/v1/hosts", list_hosts, "List hosts (keyset pagination)"),
    ("POST", "/v1/hosts", add_host, "Register a host for an account"),
    ("GET", "/v1/hosts/{host}", get_host, "One host: state, checks, certificate, events"),
    ("DELETE", "/v1/hosts/{host}", delete_host, "Revoke the certificate, then unregister the host"),
    ("POST", "/v1/hosts/{host}/checks", run_checks, "Run the checks now"),
    ("GET", "/v1/hosts/{host}/certificate", get_certificate, "The current certificate"),
    ("POST", "/v1/hosts/{host}/renew", renew, "Re-check, then order a new certificate now"),
    ("POST", "/v1/hosts/{host}/suspend", suspend, "Stop serving and issuing (kill switch)"),
    ("POST", "/v1/hosts/{host}/resume", resume, "Undo a suspension"),
    ("GET", "/v1/hosts/{host}/events", list_host_events, "Transitions and decisions, newest first"),
    ("GET", "/v1/hosts/{host}/options", get_options, "Per-host options"),
    ("PUT", "/v1/hosts/{host}/options", put_options, "Replace the per-host options"),
    ("GET", "/v1/hosts/{host}/files", list_files, "The host's app association files"),
    ("GET", "/v1/hosts/{host}/files/{kind}", get_file, "One association file, as uploaded"),
    ("PUT", "/v1/hosts/{host}/files/{kind}", put_file, "Upload (replace) an association file"),
    ("DELETE", "/v1/hosts/{host}/files/{kind}", delete_file, "Stop serving an association file"),
]
