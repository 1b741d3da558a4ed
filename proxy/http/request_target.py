"""What a request is for: its Host, checked once, and its target as path and query.

Every decision about a request (ACME challenge, suspension, association files, HTTPS
upgrade, HSTS, the Host the backend sees) uses the one value `checked_host` stores on
the request, so a Host that one check reads differently from another (trailing
bytes, a second Host header, an absolute-form target naming another host) cannot
slip past the suspension check and still reach the backend as the suspended host.

RFC 9112 §3.2: a request target is origin-form (`/path?query`), absolute-form
(`http://host/path?query`; then its authority is the Host, §3.2.2), authority-form
(CONNECT only) or asterisk-form (`OPTIONS *`). The edge forwards origin-form and
absolute-form requests as path and query; the other two get a 400.
"""

from __future__ import annotations

from aiohttp import web

from proxy.wire.hostnames import BadHostHeader, HostHeader, parse_host_header
from proxy.wire.peers import tls_host

__all__ = ["BadRequest", "checked_host", "origin_form"]

_HOST_KEY: web.RequestKey[HostHeader | None] = web.RequestKey("linkedge_host", HostHeader)


class BadRequest(ValueError):
    """The request cannot be served as it is; the message says why (a 400)."""


def origin_form(target: str) -> str:
    """Path and query of a request target, byte for byte (no fragment).

    Raises BadRequest for authority-form, asterisk-form and anything else that is
    neither origin-form nor an absolute http(s) URL.
    """
    if target.startswith("/"):
        path_qs = target
    else:
        _authority, path_qs = _split_absolute(target)
    return path_qs.partition("#")[0]


def _split_absolute(target: str) -> tuple[str, str]:
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise BadRequest("the request target must be a path (or an absolute http URL)")
    end = len(rest)
    for delimiter in "/?#":
        found = rest.find(delimiter)
        if 0 <= found < end:
            end = found
    authority, path_qs = rest[:end], rest[end:]
    if not path_qs.startswith("/"):
        path_qs = "/" + path_qs
    return authority, path_qs


def checked_host(request: web.Request) -> HostHeader | None:
    """The request's host, parsed and normalised once (cached on the request).

    None only for an HTTP/1.0 request without Host. Raises BadRequest for a Host
    that is not `host[:port]`, several Host headers, a missing Host in HTTP/1.1, or
    an absolute-form target whose authority is not `host[:port]`.
    """
    if _HOST_KEY in request:
        return request[_HOST_KEY]
    target = request.raw_path
    values = request.headers.getall("Host", [])
    if len(values) > 1:
        raise BadRequest("more than one Host header")
    try:
        if not target.startswith("/"):
            authority, _path = _split_absolute(target)
            if "@" in authority:
                raise BadRequest("userinfo is not allowed in the request target")
            host = parse_host_header(authority)  # RFC 9112 §3.2.2: it wins over Host
        elif values:
            host = parse_host_header(values[0])
        elif request.version >= (1, 1):
            raise BadRequest("HTTP/1.1 requests need a Host header")
        else:
            host = None
    except BadHostHeader as exc:
        raise BadRequest(str(exc)) from None
    request[_HOST_KEY] = host
    return host


def misdirected(host: HostHeader | None) -> str | None:
    """The host this TLS connection's certificate is for, when the request names another
    one (RFC 9110 §15.5.20: nothing of host B, its files or its HSTS, is answered under
    host A's certificate); None over plain HTTP or when they agree."""
    certified = tls_host()
    if certified is not None and (host is None or host.lookup != certified):
        return certified
    return None
