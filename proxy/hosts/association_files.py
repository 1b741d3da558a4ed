"""App association files: what a tracking host serves so that its links open apps.

iOS (universal links) fetches `/.well-known/apple-app-site-association` (older
versions: `/apple-app-site-association`), Android (App Links)
`/.well-known/assetlinks.json`: from the exact host, over HTTPS, as
`application/json`, without redirects, at most 128 KB. A file Apple or Google
cannot use is ignored silently and the links open the browser instead, so uploads
are checked here and the first problem is named with its JSON path
(`$.applinks.details[0].appIDs[1]`). Pure functions: no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable, Collection
from typing import Any

APPLE = "apple-app-site-association"
ANDROID = "assetlinks.json"
KINDS = (APPLE, ANDROID)
SERVED_AT: dict[str, str] = {  # request path -> kind
    "/.well-known/apple-app-site-association": APPLE,
    "/apple-app-site-association": APPLE,
    "/.well-known/assetlinks.json": ANDROID,
}
MAX_BYTES = 128 * 1024  # Apple's limit (uncompressed); assetlinks files are far smaller
MAX_DEPTH = 32  # real files nest 6 levels; deeper is a mistake (or an attack on parsers)

HANDLE_ALL_URLS = "delegate_permission/common.handle_all_urls"
_APP_ID = re.compile(r"[A-Z0-9]{10}\.[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")
_TEAM_PREFIX = re.compile(r"([^.]*)\.")
_PACKAGE = re.compile(r"[A-Za-z][A-Za-z0-9_]*(?:\.[A-Za-z][A-Za-z0-9_]*)+")
_FINGERPRINT = re.compile(r"[0-9A-F]{2}(?::[0-9A-F]{2}){31}")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Digital Asset Links: a relation is kind/detail ("delegate_permission/common.get_login_creds")
_RELATION = re.compile(r"[a-z][a-z0-9_]*/[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST = rf"{_LABEL}(?:\.{_LABEL})*"
_SITE = re.compile(rf"https?://{_HOST}(?::[0-9]{{1,5}})?/?")
_INCLUDE = re.compile(rf"https://{_HOST}(?::[0-9]{{1,5}})?/[^\s]*")


class InvalidFile(ValueError):
    """The upload is not a file Apple or Google would accept; `path` locates the problem."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class NotJSON(InvalidFile):
    """The upload is not JSON text at all (syntax, encoding, empty)."""


def etag(content: bytes) -> str:
    """A strong entity tag: the content's SHA-256 (same bytes, same tag, in every worker)."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=")
    return f'"sha256-{digest.decode()}"'


def validate(kind: str, content: bytes) -> None:
    """Raise InvalidFile for the first problem; return quietly for a usable file."""
    if len(content) > MAX_BYTES:
        raise InvalidFile("$", f"the file is {len(content)} bytes; at most {MAX_BYTES} are served")
    _VALIDATORS[kind](_parse(content))


# -- JSON ----------------------------------------------------------------------------


class _Object(dict[str, Any]):
    """A JSON object that remembers a key it saw twice (parsers disagree on which wins)."""

    duplicate: str | None = None


def _object_pairs(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object()
    for key, value in pairs:
        if key in obj and obj.duplicate is None:
            obj.duplicate = key
        obj[key] = value
    return obj


def _no_constants(name: str) -> Any:
    raise NotJSON("$", f"{name} is not valid JSON")


def _parse(content: bytes) -> Any:
    if content.startswith(b"\xef\xbb\xbf"):
        raise NotJSON("$", "starts with a byte order mark; save the file as UTF-8 without one")
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotJSON("$", f"not UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise NotJSON("$", "the file is empty")
    try:
        doc = json.loads(
            text,
            object_pairs_hook=_object_pairs,
            parse_constant=_no_constants,
            parse_int=_integer,
        )
    except json.JSONDecodeError as exc:
        raise NotJSON(
            "$", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise NotJSON("$", f"nested deeper than {MAX_DEPTH} levels") from None
    except InvalidFile:
        raise
    except ValueError as exc:  # anything else the parser or a hook raises: say what
        raise NotJSON("$", f"not valid JSON: {exc}") from None
    _find_duplicate(doc, "$", 0)
    return doc


MAX_DIGITS = 4300  # Python's int-string conversion limit (sys.get_int_max_str_digits)


def _integer(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_DIGITS:
        raise NotJSON("$", f"a number has {digits} digits; at most {MAX_DIGITS} are accepted")
    return int(text)


def _find_duplicate(value: Any, path: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise InvalidFile(path, f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, _Object):
        if value.duplicate is not None:
            raise InvalidFile(path, f"the key {json.dumps(value.duplicate)} appears twice")
        for key, item in value.items():
            _find_duplicate(item, _at(path, key), depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _find_duplicate(item, f"{path}[{i}]", depth + 1)


def _at(path: str, key: str) -> str:
    return f"{path}.{key}" if _IDENTIFIER.fullmatch(key) else f"{path}[{json.dumps(key)}]"


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


_JSON_TYPE = {dict: "an object", list: "an array", str: "a string", bool: "true or false"}


def _kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return _JSON_TYPE.get(type(value), "an object" if isinstance(value, dict) else "a value")


def _expect(value: Any, typ: type, path: str) -> Any:
    if not isinstance(value, typ):
        raise InvalidFile(path, f"must be {_JSON_TYPE[typ]}, not {_kind_of(value)}")
    return value


def _keys(
    obj: dict[str, Any], path: str, known: Collection[str], required: Collection[str] = ()
) -> None:
    # An unknown key is most often a typo ("component", "appId") that the platform
    # would silently ignore, taking the links with it.
    for key in obj:
        if key not in known:
            raise InvalidFile(
                _at(path, key), f"unknown key (expected one of {', '.join(sorted(known))})"
            )
    for key in sorted(required):
        if key not in obj:
            raise InvalidFile(path, f"{json.dumps(key)} is missing")


def _strings(value: Any, path: str, *, non_empty: bool = False) -> list[str]:
    items = _expect(value, list, path)
    if non_empty and not items:
        raise InvalidFile(path, "must not be empty")
    for i, item in enumerate(items):
        _expect(item, str, f"{path}[{i}]")
    return items


def _booleans(obj: dict[str, Any], path: str, names: tuple[str, ...]) -> None:
    for name in names:
        if name in obj:
            _expect(obj[name], bool, _at(path, name))


# -- apple-app-site-association --------------------------------------------------------


def _app_id(value: Any, path: str) -> None:
    _expect(value, str, path)
    if _APP_ID.fullmatch(value):
        return
    team = _TEAM_PREFIX.match(value)
    if team is None:
        problem = "is not TEAMID.bundle.id (no team ID prefix)"
    elif not re.fullmatch(r"[A-Z0-9]{10}", team.group(1)):
        problem = (
            f"team ID {_show(team.group(1))} must be 10 upper-case letters or digits"
            " (TEAMID.bundle.id)"
        )
    else:
        problem = "the bundle ID may hold only letters, digits, hyphens and inner dots"
    raise InvalidFile(path, f"{_show(value)}: {problem}")


def _app_ids(value: Any, path: str) -> None:
    for i, item in enumerate(_expect(value, list, path)):
        _app_id(item, f"{path}[{i}]")
    if not value:
        raise InvalidFile(path, "must name at least one app (TEAMID.bundle.id)")


def _defaults(value: Any, path: str) -> None:
    obj = _expect(value, dict, path)
    _keys(obj, path, {"caseSensitive", "percentEncoded"})
    _booleans(obj, path, ("caseSensitive", "percentEncoded"))


def _component(value: Any, path: str) -> None:
    obj = _expect(value, dict, path)
    _keys(obj, path, {"/", "?", "#", "exclude", "comment", "caseSensitive", "percentEncoded"})
    for name in ("/", "#", "comment"):
        if name in obj:
            _expect(obj[name], str, _at(path, name))
    if "?" in obj and not isinstance(obj["?"], str):
        query = _expect(obj["?"], dict, _at(path, "?"))
        for key, item in query.items():
            _expect(item, str, _at(_at(path, "?"), key))
    _booleans(obj, path, ("exclude", "caseSensitive", "percentEncoded"))


def _detail(value: Any, path: str) -> None:
    obj = _expect(value, dict, path)
    _keys(obj, path, {"appIDs", "components", "appID", "paths", "defaults"})
    if "appIDs" not in obj and "appID" not in obj:
        raise InvalidFile(
            path, 'needs "appIDs" with "components" (or the legacy "appID" with "paths")'
        )
    if "appIDs" in obj:  # the current format (iOS 13 and later)
        _app_ids(obj["appIDs"], _at(path, "appIDs"))
        if "components" not in obj:
            raise InvalidFile(path, '"appIDs" goes with "components", which is missing')
    if "components" in obj:
        for i, item in enumerate(_expect(obj["components"], list, _at(path, "components"))):
            _component(item, f"{_at(path, 'components')}[{i}]")
    if "appID" in obj:  # the legacy format (iOS 12 and earlier), alone or alongside
        _app_id(obj["appID"], _at(path, "appID"))
        if "paths" not in obj:
            raise InvalidFile(path, '"appID" goes with "paths", which is missing')
    if "paths" in obj:
        _strings(obj["paths"], _at(path, "paths"))
    if "defaults" in obj:
        _defaults(obj["defaults"], _at(path, "defaults"))


def _applinks(value: Any, path: str) -> None:
    obj = _expect(value, dict, path)
    _keys(obj, path, {"apps", "details", "defaults", "substitutionVariables"}, {"details"})
    if "apps" in obj and _expect(obj["apps"], list, _at(path, "apps")):
        raise InvalidFile(_at(path, "apps"), "must be an empty array (apps are named in details)")
    for i, item in enumerate(_expect(obj["details"], list, _at(path, "details"))):
        _detail(item, f"{_at(path, 'details')}[{i}]")
    if "defaults" in obj:
        _defaults(obj["defaults"], _at(path, "defaults"))
    if "substitutionVariables" in obj:
        where = _at(path, "substitutionVariables")
        for name, values in _expect(obj["substitutionVariables"], dict, where).items():
            _strings(values, _at(where, name))


def _apps_section(value: Any, path: str) -> None:
    obj = _expect(value, dict, path)
    _keys(obj, path, {"apps"}, {"apps"})
    _app_ids(obj["apps"], _at(path, "apps"))


def _apple(doc: Any) -> None:
    obj = _expect(doc, dict, "$")
    sections = {
        "applinks": _applinks,
        "webcredentials": _apps_section,
        "appclips": _apps_section,
        "activitycontinuation": _apps_section,
    }
    _keys(obj, "$", set(sections))
    if "applinks" not in obj:
        raise InvalidFile("$", '"applinks" is missing: without it no link opens the app')
    for name, check in sections.items():
        if name in obj:
            check(obj[name], _at("$", name))


# -- assetlinks.json ---------------------------------------------------------------------


def _fingerprint(value: Any, path: str) -> None:
    _expect(value, str, path)
    if _FINGERPRINT.fullmatch(value):
        return
    if _FINGERPRINT.fullmatch(value.upper()):
        problem = "must be upper-case hex"
    elif re.fullmatch(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){19}", value):
        problem = "is a SHA-1 fingerprint; App Links need the SHA-256 one"
    else:
        problem = "must be a SHA-256 fingerprint: 32 upper-case hex bytes separated by colons"
    raise InvalidFile(path, f"{_show(value)} {problem}")


def _target(value: Any, path: str) -> None:
    obj = _expect(value, dict, path)
    if "namespace" not in obj:
        raise InvalidFile(path, '"namespace" is missing')
    namespace = obj["namespace"]
    if namespace == "web":
        _web_target(obj, path)
        return
    if namespace != "android_app":
        raise InvalidFile(
            _at(path, "namespace"), f'{_show(namespace)}: must be "android_app" or "web"'
        )
    _keys(
        obj,
        path,
        {"namespace", "package_name", "sha256_cert_fingerprints"},
        {"namespace", "package_name", "sha256_cert_fingerprints"},
    )
    package = _expect(obj["package_name"], str, _at(path, "package_name"))
    if not _PACKAGE.fullmatch(package):
        raise InvalidFile(
            _at(path, "package_name"),
            f"{_show(package)} is not an Android package name (e.g. com.shop.app)",
        )
    where = _at(path, "sha256_cert_fingerprints")
    prints = _expect(obj["sha256_cert_fingerprints"], list, where)
    if not prints:
        raise InvalidFile(where, "must name at least one signing certificate")
    for i, item in enumerate(prints):
        _fingerprint(item, f"{where}[{i}]")


def _web_target(obj: dict[str, Any], path: str) -> None:
    """A web site: `{"namespace": "web", "site": "https://example.com"}` (scheme, host, port)."""
    _keys(obj, path, {"namespace", "site"}, {"namespace", "site"})
    where = _at(path, "site")
    _site(_expect(obj["site"], str, where), where)


def _site(site: str, where: str) -> None:
    if not _SITE.fullmatch(site):
        raise InvalidFile(
            where,
            f"{_show(site)} must be a site: scheme and host, optionally a port "
            "(e.g. https://shop.example), without a path, query or fragment",
        )


def _relation(value: Any, path: str) -> None:
    _expect(value, str, path)
    if not _RELATION.fullmatch(value):
        raise InvalidFile(
            path,
            f"{_show(value)} is not a relation: kind/detail, e.g. "
            f'"{HANDLE_ALL_URLS}" or "delegate_permission/common.get_login_creds"',
        )


def _statement(value: Any, path: str) -> None:
    obj = _expect(value, dict, path)
    if "include" in obj:  # a pointer to more statements, fetched by the verifier
        _keys(obj, path, {"include"}, {"include"})
        where = _at(path, "include")
        include = _expect(obj["include"], str, where)
        if not _INCLUDE.fullmatch(include):
            raise InvalidFile(
                where, f"{_show(include)} must be an https:// URL of a statement list"
            )
        return
    _keys(obj, path, {"relation", "target", "relation_extensions"}, {"relation", "target"})
    where = _at(path, "relation")
    for i, relation in enumerate(_strings(obj["relation"], where, non_empty=True)):
        _relation(relation, f"{where}[{i}]")
    _target(obj["target"], _at(path, "target"))
    if "relation_extensions" in obj:
        _expect(obj["relation_extensions"], dict, _at(path, "relation_extensions"))


def _android(doc: Any) -> None:
    statements = _expect(doc, list, "$")
    if not statements:
        raise InvalidFile("$", "must hold at least one statement")
    for i, item in enumerate(statements):
        _statement(item, f"$[{i}]")


_VALIDATORS: dict[str, Callable[[Any], None]] = {APPLE: _apple, ANDROID: _android}
