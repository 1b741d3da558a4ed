"""The status page: every host with its checks (green/red), reasons, expiry and events.

Server-rendered HTML with no scripts, on the admin listener. Operators log in with
the admin token (see auth.py); the page is read-only. A live view on top (hosts by
state, the soonest expiries, recent failures with their reasons) refreshes itself
every `refresh` seconds (a meta refresh: still no script). Each host shows its app
association files (size, ETag, when updated) and its HSTS / HTTPS-upgrade options.
"""

from __future__ import annotations

import html
import time
from string import Template
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from certstore import DomainState, Event, HostFile
from proxy.admin.auth import (
    LOGIN_PATH,
    SESSION_COOKIE,
    SESSION_SECONDS,
    SESSIONS,
    THROTTLE,
    token_ok,
)
from proxy.admin.deps import DEPS
from proxy.admin.views import host_json
from proxy.hosts.events import FAILURES, EventKind
from proxy.hosts.options import defaults

PAGE_SIZE = 100
REFRESH_SECONDS = 15  # the live view's default; ?refresh=N (2..3600) changes it
EXPIRIES_SHOWN = 8
FAILURES_SHOWN = 10
_SHORT_KIND = {"apple-app-site-association": "AASA", "assetlinks.json": "assetlinks.json"}
_E = html.escape

_STATE_TONE = {
    "active": "ok",
    "verified": "ok",
    "pending": "wait",
    "moved": "warn",
    "failed": "bad",
    "suspended": "off",
}
_CHECK_TONE = {"pass": "ok", "warn": "warn", "fail": "bad", "unknown": "wait", "skipped": "off"}
_CHECK_MARK = {"pass": "✓", "warn": "!", "fail": "✗", "unknown": "?", "skipped": "–"}

_STYLE = """
:root { --ok:#15803d; --ok-bg:#dcfce7; --bad:#b91c1c; --bad-bg:#fee2e2; --warn:#a16207;
  --warn-bg:#fef3c7; --wait:#1d4ed8; --wait-bg:#dbeafe; --off:#4b5563; --off-bg:#e5e7eb; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "Liberation Sans",
  sans-serif; color: #111827; background: #f3f4f6; }
header { background: #111827; color: #f9fafb; padding: 14px 28px; display: flex;
  align-items: baseline; gap: 16px; }
header h1 { font-size: 18px; margin: 0; font-weight: 600; }
header .sub { color: #9ca3af; font-size: 13px; }
header form { margin-left: auto; }
header button { background: none; border: 1px solid #4b5563; color: #d1d5db; border-radius: 6px;
  padding: 3px 10px; cursor: pointer; }
main { padding: 20px 28px 40px; }
.summary { display: flex; gap: 8px; flex-wrap: wrap; margin-bottom: 16px; }
.summary a { text-decoration: none; }
.card { background: #fff; border-radius: 10px; box-shadow: 0 1px 2px rgba(0,0,0,.06),
  0 1px 8px rgba(0,0,0,.04); overflow: hidden; margin-bottom: 24px; }
table { border-collapse: collapse; width: 100%; }
th { text-align: left; font-size: 12px; text-transform: uppercase; letter-spacing: .04em;
  color: #6b7280; background: #f9fafb; padding: 9px 12px; border-bottom: 1px solid #e5e7eb; }
td { padding: 10px 12px; border-bottom: 1px solid #f1f5f9; vertical-align: top; }
tr:last-child td { border-bottom: none; }
.host { font-weight: 600; white-space: nowrap; }
.muted { color: #6b7280; font-size: 12px; }
.pill { display: inline-block; border-radius: 999px; padding: 1px 10px; font-size: 12px;
  font-weight: 600; white-space: nowrap; }
.check { display: flex; gap: 7px; align-items: flex-start; min-width: 200px; max-width: 340px; }
.dot { flex: none; width: 20px; height: 20px; border-radius: 50%; display: inline-flex;
  align-items: center; justify-content: center; font-size: 12px; font-weight: 700; color: #fff; }
.reason { font-size: 12px; color: #374151; word-break: break-word; }
.ok { color: var(--ok); background: var(--ok-bg); }
.dot.ok { background: var(--ok); color: #fff; }
.bad { color: var(--bad); background: var(--bad-bg); }
.dot.bad { background: var(--bad); color: #fff; }
.warn { color: var(--warn); background: var(--warn-bg); }
.dot.warn { background: #d97706; color: #fff; }
.wait { color: var(--wait); background: var(--wait-bg); }
.dot.wait { background: #2563eb; color: #fff; }
.off { color: var(--off); background: var(--off-bg); } .dot.off { background: #9ca3af; color:#fff; }
.nav { margin: 12px 0; } .nav a { color: #1d4ed8; }
h2 { font-size: 15px; margin: 0 0 10px; }
.empty { padding: 24px; color: #6b7280; }
.login { max-width: 380px; margin: 12vh auto; background: #fff; padding: 28px; border-radius: 12px;
  box-shadow: 0 1px 8px rgba(0,0,0,.08); }
.login input { width: 100%; padding: 8px 10px; font: inherit; border: 1px solid #d1d5db;
  border-radius: 6px; margin: 6px 0 14px; }
.login button { background: #111827; color: #fff; border: 0; border-radius: 6px; padding: 8px 16px;
  font: inherit; cursor: pointer; }
.error { color: var(--bad); margin-bottom: 10px; }
.live { display: grid; grid-template-columns: minmax(180px, 1fr) minmax(260px, 2fr)
  minmax(320px, 3fr); gap: 16px; margin-bottom: 8px; }
.live .card { margin-bottom: 16px; }
.live h2 { padding: 10px 12px 0; }
.live td { padding: 6px 12px; }
.file { font-size: 12px; min-width: 240px; word-break: break-all; }
.file code { font-size: 11px; color: #4b5563; }
.opts { margin-top: 4px; display: flex; gap: 4px; flex-wrap: wrap; }
"""

_PAGE = Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="$refresh">
<title>linkedge — tracking hosts</title><style>$style</style></head>
<body>
<header><h1>linkedge</h1><span class="sub">tracking hosts on edge target <b>$target</b>
 · $generated · <span id="live-note">live, refreshes every $refresh s</span></span>
<form method="post" action="/status/logout"><button type="submit">Log out</button></form></header>
<main>
<section class="live" id="live">
<div class="card"><h2>Hosts by state</h2><table id="by-state"><tbody>$by_state</tbody></table>
</div>
<div class="card"><h2>Soonest expiries</h2><table id="expiries"><tbody>$expiries</tbody></table>
</div>
<div class="card"><h2>Recent failures</h2><table id="failures"><tbody>$failures</tbody></table>
</div>
</section>
<div class="summary">$summary</div>
<div class="card"><table id="hosts">
<thead><tr><th>Host</th><th>State</th><th>CNAME</th><th>CAA</th><th>HTTPS</th>
<th>Certificate</th><th>App files &amp; options</th><th>Last event</th></tr></thead>
<tbody>$rows</tbody></table>$empty</div>
<div class="nav">$nav</div>
<h2>Recent events</h2>
<div class="card"><table id="events"><thead><tr><th>When (UTC)</th><th>Host</th><th>Event</th>
<th>Detail</th></tr></thead><tbody>$events</tbody></table></div>
</main></body></html>""")

_LOGIN = Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>linkedge — log in</title>
<style>$style</style></head><body>
<form class="login" method="post" action="/status/login">
<h1 style="font-size:18px;margin:0 0 14px">linkedge status</h1>
$error<label for="token">Admin token</label>
<input id="token" name="token" type="password" autocomplete="current-password" autofocus>
<button type="submit">Log in</button></form></body></html>""")


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "–"
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(timestamp))


def _check_cell(check: dict[str, Any] | None) -> str:
    if check is None:
        return '<td><span class="muted">not checked yet</span></td>'
    state = check["state"]
    tone = _CHECK_TONE.get(state, "off")
    return (
        f'<td data-check="{_E(check["name"])}" data-state="{_E(state)}"><div class="check">'
        f'<span class="dot {tone}" title="{_E(state)}">{_CHECK_MARK.get(state, "?")}</span>'
        f'<span class="reason">{_E(check["reason"])}</span></div></td>'
    )


def _cert_cell(cert: dict[str, Any] | None) -> str:
    if cert is None:
        return '<td><span class="muted">none</span></td>'
    days = cert["days_left"]
    tone = "bad" if cert["expired"] else ("warn" if cert["expiring"] else "ok")
    label = "expired" if cert["expired"] else f"{days:.0f} days left"
    return (
        f'<td><span class="pill {tone}">{_E(label)}</span>'
        f'<div class="muted">{_E(str(cert["not_after"]))}<br>{_E(cert["issuer"])}</div></td>'
    )


def _files_cell(files: list[HostFile], options: dict[str, Any]) -> str:
    parts = []
    for f in files:
        tag = f.etag if len(f.etag) <= 22 else f.etag[:20] + "…"
        parts.append(
            f'<div class="file" data-kind="{_E(f.kind)}" data-size="{len(f.content)}">'
            f"<b>{_E(_SHORT_KIND.get(f.kind, f.kind))}</b> {len(f.content):,} B · "
            f'<code title="{_E(f.etag)}">{_E(tag)}</code> · '
            f'<span class="muted">{_E(_when(f.updated_at))}</span></div>'
        )
    if not parts:
        parts.append('<span class="muted">no files</span>')
    hsts = options.get("hsts_max_age")
    upgrade = bool(options.get("https_upgrade"))
    parts.append(
        '<div class="opts" data-field="options">'
        + (
            f'<span class="pill ok" data-option="hsts">HSTS max-age={int(hsts)}</span>'
            if hsts is not None
            else '<span class="pill off" data-option="hsts">HSTS off</span>'
        )
        + (
            '<span class="pill ok" data-option="upgrade">HTTPS upgrade on</span>'
            if upgrade
            else '<span class="pill off" data-option="upgrade">HTTPS upgrade off</span>'
        )
        + "</div>"
    )
    return f'<td data-field="files">{"".join(parts)}</td>'


def _days_pill(not_after: float, now: float, not_before: float) -> str:
    days = (not_after - now) / 86400
    lifetime = max(not_after - not_before, 1.0)
    tone = "bad" if days <= 0 else ("warn" if (not_after - now) < lifetime / 3 else "ok")
    label = "expired" if days <= 0 else f"{days:.1f} days"
    return f'<span class="pill {tone}">{_E(label)}</span>'


def _failure_row(e: Event) -> str:
    what = e.kind if e.kind != EventKind.STATE else f"{e.from_state} → {e.to_state}"
    return (
        f'<tr data-event="{_E(e.kind)}"><td class=muted>{_E(_when(e.at))}</td>'
        f"<td>{_E(e.hostname or '–')}</td><td>{_E(what)}</td>"
        f'<td class="reason">{_E(e.detail[:240])}</td></tr>'
    )


def _is_failure(e: Event) -> bool:
    return e.kind in FAILURES or (e.kind == EventKind.STATE and e.to_state == "failed")


def _row(
    host: dict[str, Any],
    last: Event | None,
    files: list[HostFile] | None = None,
    options: dict[str, Any] | None = None,
) -> str:
    checks = {c["name"]: c for c in host["checks"]}
    name = host["hostname_unicode"]
    shown = _E(name)
    if name != host["hostname"]:
        shown += f'<div class="muted">{_E(host["hostname"])}</div>'
    state = host["state"]
    tone = _STATE_TONE.get(state, "off")
    last_html = (
        f'<span class="muted">{_E(_when(last.at))}</span><br>{_E(last.kind)}: '
        f'<span class="reason">{_E(last.detail[:160])}</span>'
        if last
        else '<span class="muted">–</span>'
    )
    return (
        f'<tr data-host="{_E(host["hostname"])}">'
        f'<td><div class="host">{shown}</div>'
        f'<div class="muted">account {_E(host["account"])}</div></td>'
        f'<td><span class="pill {tone}" data-field="state">{_E(state)}</span>'
        f'<div class="reason">{_E(host["state_reason"][:200])}</div></td>'
        + _check_cell(checks.get("cname"))
        + _check_cell(checks.get("caa"))
        + _check_cell(checks.get("https"))
        + _cert_cell(host["certificate"])
        + _files_cell(files or [], options or defaults())
        + f"<td>{last_html}</td></tr>"
    )


async def status_page(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    state_text = request.query.get("state")
    state = DomainState(state_text) if state_text in {s.value for s in DomainState} else None
    after = request.query.get("after")
    page = await deps.store.list_domains_page(after=after, limit=PAGE_SIZE + 1, state=state)
    more = len(page) > PAGE_SIZE
    page = page[:PAGE_SIZE]
    validity = await deps.store.certificate_validity([d.hostname for d in page])
    now = deps.clock()
    rows = []
    for domain in page:
        last = await deps.store.list_events(domain.hostname, limit=1)
        files = await deps.store.list_host_files(domain.hostname)
        options = {**defaults(), **(await deps.store.get_options(domain.hostname) or {})}
        rows.append(
            _row(
                host_json(domain, validity.get(domain.hostname), now),
                last[0] if last else None,
                files,
                options,
            )
        )
    counts = await deps.store.count_domains_by_state()
    total = sum(counts.values())
    chips = [f'<a href="/status"><span class="pill off">all {total}</span></a>']
    for s in DomainState:
        if counts.get(s):
            link = "/status?" + urlencode({"state": s.value})
            chips.append(
                f'<a href="{_E(link)}"><span class="pill {_STATE_TONE[s.value]}">'
                f"{_E(s.value)} {counts[s]}</span></a>"
            )
    nav = ""
    if more:
        params = {"after": page[-1].hostname, **({"state": state.value} if state else {})}
        nav = f'<a href="/status?{_E(urlencode(params))}">Next page →</a>'
    by_state = (
        "".join(
            f'<tr data-state="{_E(s.value)}"><td><span class="pill {_STATE_TONE[s.value]}">'
            f'{_E(s.value)}</span></td><td data-field="count">{counts.get(s, 0)}</td></tr>'
            for s in DomainState
        )
        + f'<tr><td class="muted">all</td><td data-field="total">{total}</td></tr>'
    )
    soonest = await deps.store.soonest_expiries(EXPIRIES_SHOWN)
    expiries = (
        "".join(
            f'<tr data-expiry-host="{_E(host)}"><td>{_E(host)}</td>'
            f"<td class=muted>{_E(_when(not_after))}</td>"
            f"<td>{_days_pill(not_after, now, not_before)}</td></tr>"
            for host, not_before, not_after, _issuer in soonest
        )
        or '<tr><td class="muted">no certificates yet</td></tr>'
    )
    recent = [e for e in await deps.store.list_events(None, limit=500) if _is_failure(e)]
    failures = "".join(_failure_row(e) for e in recent[:FAILURES_SHOWN]) or (
        '<tr><td class="muted">no recent failures</td></tr>'
    )
    refresh = _refresh_seconds(request.query.get("refresh"))
    events = await deps.store.list_events(None, limit=20)
    event_rows = "".join(
        f"<tr><td class=muted>{_E(_when(e.at))}</td><td>{_E(e.hostname or '–')}</td>"
        f"<td>{_E(e.kind)}"
        f"{_E(f' {e.from_state} → {e.to_state}' if e.kind == EventKind.STATE else '')}"
        f'</td><td class="reason">{_E(e.detail[:200])}</td></tr>'
        for e in events
    )
    body = _PAGE.substitute(
        style=_STYLE,
        target=_E(deps.edge_target),
        generated=_E(_when(now)) + " UTC",
        summary="".join(chips),
        refresh=str(refresh),
        by_state=by_state,
        expiries=expiries,
        failures=failures,
        rows="".join(rows),
        empty="" if rows else '<div class="empty">No hosts registered.</div>',
        nav=nav,
        events=event_rows,
    )
    return web.Response(text=body, content_type="text/html", headers={"Cache-Control": "no-store"})


def _refresh_seconds(text: str | None) -> int:
    if text is not None and text.isdigit():
        return min(max(int(text), 2), 3600)
    return REFRESH_SECONDS


async def login_form(request: web.Request) -> web.Response:
    return _login_response("", 200)


def _login_response(error: str, status: int) -> web.Response:
    error_html = f'<div class="error">{_E(error)}</div>' if error else ""
    return web.Response(
        text=_LOGIN.substitute(style=_STYLE, error=error_html),
        status=status,
        content_type="text/html",
        headers={"Cache-Control": "no-store"},
    )


async def login(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    throttle = request.app[THROTTLE]
    try:
        form = await request.post()
    except ValueError:  # a body aiohttp cannot read as a form
        return _login_response("Send the token from the form.", 400)
    presented = form.get("token")
    accepted = await throttle.check(
        request, lambda: isinstance(presented, str) and token_ok(presented, deps.token)
    )
    if accepted is None:
        response = _login_response("Too many failed attempts; try again later.", 429)
        response.headers["Retry-After"] = str(max(1, int(throttle.max_delay)))
        return response
    if not accepted:
        return _login_response("Wrong token.", 401)
    response = web.HTTPSeeOther("/status")
    response.set_cookie(
        SESSION_COOKIE,
        request.app[SESSIONS].new(),
        max_age=SESSION_SECONDS,
        path="/status",
        httponly=True,
        samesite="Strict",
        secure=deps.secure_cookies,
    )
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    request.app[SESSIONS].end(request.cookies.get(SESSION_COOKIE))  # over for good
    response = web.HTTPSeeOther(LOGIN_PATH)
    response.del_cookie(SESSION_COOKIE, path="/status")
    raise response


async def root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther("/status")
