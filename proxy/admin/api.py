"""The admin JSON API (/v1): hosts, checks, certificates, lifecycle, options and files.

Every expected error is a 4xx JSON body `{"error": code, "message": reason}` and
changes nothing. Hostnames in paths and bodies go through the same normalisation as
everywhere else (IDNA, lower case, no trailing dot).
"""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from acme_client import AcmeError
from certstore import DomainExists, DomainState
from proxy.admin.deps import DEPS, AdminDeps
from proxy.admin.views import certificate_json, event_json, host_file_json, host_json
from proxy.hosts.association_files import MAX_BYTES
from proxy.hosts.lifecycle import InvalidTransition
from proxy.hosts.options import OptionsError, defaults, validate
from proxy.hosts.revocation import HostBusy, RevocationFailed, remove_host
from proxy.ops import files as host_files
from proxy.ops.files import FileError
from proxy.tls.certificates import RenewalBusy
from proxy.wire.hostnames import InvalidHostname, normalize_hostname

MAX_PAGE = 1000
DEFAULT_PAGE = 100
_ACCOUNT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")
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


def _changed(deps: AdminDeps, hostname: str) -> None:
    """This worker serves the change at once; the others follow the event feed."""
    if deps.host_views is not None:
        deps.host_views.forget(hostname)


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


def _hostname(text: Any, deps: AdminDeps) -> str:
    if not isinstance(text, str):
        raise ApiError(422, "invalid_hostname", "hostname must be a string")
    try:
        hostname = normalize_hostname(text)
    except InvalidHostname as exc:
        raise ApiError(422, "invalid_hostname", str(exc)) from None
    target = deps.edge_target
    if target and (hostname == target or hostname.endswith("." + target)):
        raise ApiError(422, "invalid_hostname", f"{hostname} is one of the edge's own names")
    return hostname


async def _domain(request: web.Request) -> tuple[AdminDeps, Any]:
    deps = _deps(request)
    try:
        hostname = normalize_hostname(request.match_info["host"])
    except InvalidHostname as exc:
        raise ApiError(422, "invalid_hostname", str(exc)) from None
    domain = await deps.store.get_domain(hostname)
    if domain is None:
        raise ApiError(404, "not_found", f"{hostname} is not registered")
    return deps, domain


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
    hostname = _hostname(data["hostname"], deps)
    account = data["account"]
    if not isinstance(account, str) or not _ACCOUNT.match(account):
        raise ApiError(
            422,
            "invalid_account",
            "account must be 1-128 characters: letters, digits and . _ @ + -",
        )
    try:
        await deps.store.add_domain(hostname, account)
    except DomainExists:
        existing = await deps.store.get_domain(hostname)
        if existing is not None and existing.account == account:
            return web.json_response(await _host_body(deps, hostname), status=200)
        raise ApiError(
            409, "owned_by_another_account", f"{hostname} is registered to another account"
        ) from None
    return web.json_response(await _host_body(deps, hostname), status=201)


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
        await remove_host(
            deps.store, deps.issuer, domain.hostname, force=force_text == "true", clock=deps.clock
        )
    except RevocationFailed as exc:
        raise ApiError(
            502,
            "revocation_failed",
            f"{exc}; nothing removed (retry, or DELETE with ?force=true to remove without"
            " revoking)",
        ) from None
    except HostBusy as exc:
        raise ApiError(409, "order_in_progress", f"{exc}; nothing removed") from None
    finally:  # this worker at once (also after a partial failure); the others by events
        if deps.manager is not None:
            deps.manager.forget(domain.hostname)
        _changed(deps, domain.hostname)
    return web.Response(status=204)


# -- checks, certificate, lifecycle -------------------------------------------------


async def run_checks(request: web.Request) -> web.Response:
    deps, domain = await _domain(request)
    outcome = await deps.verifier.verify(domain.hostname)
    if outcome is None:
        raise ApiError(404, "not_found", f"{domain.hostname} is not registered")
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
    if deps.manager is None:
        raise ApiError(503, "unavailable", "this process cannot order certificates")
    if domain.state is S.SUSPENDED:
        raise ApiError(409, "suspended", f"{domain.hostname} is suspended; resume it first")
    outcome = await deps.verifier.verify(domain.hostname, https=False, issue=False)
    assert outcome is not None
    if outcome.domain.state not in (S.VERIFIED, S.ACTIVE):
        raise ApiError(
            409,
            "not_verified",
            f"{domain.hostname} is {outcome.domain.state.value}: {outcome.report.summary}",
        )
    try:
        cert = await deps.manager.renew_now(domain.hostname)
    except RenewalBusy as exc:
        raise ApiError(409, "order_in_progress", str(exc)) from None
    except AcmeError as exc:
        raise ApiError(502, "acme_error", f"the CA did not issue: {exc}") from None
    return web.json_response(certificate_json(cert, deps.clock()))


async def suspend(request: web.Request) -> web.Response:
    deps, domain = await _domain(request)
    data = await _json_body(request, {"reason"}, set()) if request.can_read_body else {}
    note = data.get("reason", "")
    if not isinstance(note, str) or len(note) > 500:
        raise ApiError(422, "invalid_reason", "reason must be a string of at most 500 characters")
    if domain.state is not S.SUSPENDED:
        reason = "suspended by operator" + (f": {note}" if note else "")
        await _transition(deps, domain, S.SUSPENDED, reason)
    if deps.state_sync is not None:
        deps.state_sync.suspended.add(domain.hostname)
    if deps.manager is not None:
        deps.manager.forget(domain.hostname)
    _changed(deps, domain.hostname)
    return web.json_response(await _host_body(deps, domain.hostname))


async def resume(request: web.Request) -> web.Response:
    deps, domain = await _domain(request)
    if domain.state is not S.SUSPENDED:
        raise ApiError(409, "not_suspended", f"{domain.hostname} is {domain.state.value}")
    cert = await deps.store.get_certificate(domain.hostname)
    has_cert = cert is not None and cert.is_valid_at(deps.clock())
    target = S.ACTIVE if has_cert else S.PENDING
    # check again at once: the host may have moved while it was suspended
    await _transition(deps, domain, target, "resumed by operator", next_check_at=deps.clock())
    if deps.state_sync is not None:
        deps.state_sync.suspended.discard(domain.hostname)
    if deps.manager is not None:
        deps.manager.forget(domain.hostname)
    _changed(deps, domain.hostname)
    return web.json_response(await _host_body(deps, domain.hostname))


async def _transition(
    deps: AdminDeps, domain: Any, to: DomainState, reason: str, next_check_at: float | None = None
) -> None:
    try:
        changed = await deps.lifecycle.transition(domain, to, reason, next_check_at=next_check_at)
    except InvalidTransition as exc:
        raise ApiError(409, "invalid_transition", str(exc)) from None
    if not changed:
        raise ApiError(409, "conflict", f"{domain.hostname} changed meanwhile; try again")


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


def _file_error(exc: FileError) -> ApiError:
    extra = {"path": exc.path} if exc.path is not None else {}
    return ApiError(exc.status, exc.code, str(exc), **extra)


def _file_host(request: web.Request) -> tuple[AdminDeps, str]:
    try:
        return _deps(request), normalize_hostname(request.match_info["host"])
    except InvalidHostname as exc:
        raise ApiError(422, "invalid_hostname", str(exc)) from None


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
        raise _file_error(host_files.too_large())
    chunks, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > MAX_BYTES:
            raise _file_error(host_files.too_large())
        chunks.append(chunk)
    return b"".join(chunks)


# The rules live in proxy/ops/files.py, shared with `linkedge files`.


async def list_files(request: web.Request) -> web.Response:
    deps, hostname = _file_host(request)
    try:
        files = await host_files.list_files(deps.store, hostname)
    except FileError as exc:
        raise _file_error(exc) from None
    return web.json_response({"files": [host_file_json(f) for f in files]})


async def get_file(request: web.Request) -> web.Response:
    deps, hostname = _file_host(request)
    try:
        found = await host_files.get_file(deps.store, hostname, request.match_info["kind"])
    except FileError as exc:
        raise _file_error(exc) from None
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
    except FileError as exc:
        raise _file_error(exc) from None
    _changed(deps, hostname)  # logs file_updated
    return web.json_response(host_file_json(stored), status=200 if existed else 201)


async def delete_file(request: web.Request) -> web.Response:
    deps, hostname = _file_host(request)
    try:
        await host_files.delete_file(deps.store, hostname, request.match_info["kind"])
    except FileError as exc:  # logs file_deleted when it deletes
        raise _file_error(exc) from None
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
