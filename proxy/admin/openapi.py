"""The OpenAPI 3.1 document of the admin API, served at /v1/openapi.json.

Paths and operations come from api.ROUTES, the schemas are written here; a test
compares the document with the router and checks real responses against the schemas.
"""

from __future__ import annotations

from typing import Any

from certstore import DomainState
from proxy.admin.api import ROUTES
from proxy.hosts.association_files import KINDS
from proxy.hosts.checks import CHECK_NAMES, CheckState
from proxy.hosts.options import json_schema as options_schema

_ISO = {"type": ["string", "null"], "format": "date-time"}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "message"],
        "additionalProperties": False,
        "properties": {
            "error": {"type": "string"},
            "message": {"type": "string"},
            "path": {
                "type": "string",
                "description": "uploaded files: JSON path of the problem, e.g."
                " $.applinks.details[0].appIDs[0]",
            },
        },
    },
    "Check": {
        "type": "object",
        "required": ["name", "state", "code", "reason", "details"],
        "additionalProperties": False,
        "properties": {
            "name": {"enum": list(CHECK_NAMES)},
            "state": {"enum": [s.value for s in CheckState]},
            "code": {
                "type": "string",
                "description": "cname: ok, via_address, elsewhere, proxied, nxdomain, dns_error;"
                " caa: permitted, no_records, forbidden, dns_error; https: valid, expiring,"
                " expired, wrong_certificate, unreachable, skipped, dns_error, no_edge_address",
            },
            "reason": {"type": "string"},
            "details": {"type": "object"},
        },
    },
    "CertificateSummary": {
        "type": ["object", "null"],
        "required": ["not_before", "not_after", "issuer", "days_left", "expired", "expiring"],
        "additionalProperties": False,
        "properties": {
            "not_before": _ISO,
            "not_after": _ISO,
            "issuer": {"type": "string"},
            "days_left": {"type": "number"},
            "expired": {"type": "boolean"},
            "expiring": {
                "type": "boolean",
                "description": "less than a third of the lifetime left",
            },
        },
    },
    "Event": {
        "type": "object",
        "required": ["id", "at", "hostname", "kind", "detail", "from_state", "to_state"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "integer"},
            "at": _ISO,
            "hostname": {"type": ["string", "null"]},
            "kind": {"type": "string"},
            "detail": {"type": "string"},
            "from_state": {"type": ["string", "null"]},
            "to_state": {"type": ["string", "null"]},
        },
    },
    "Host": {
        "type": "object",
        "required": [
            "hostname",
            "hostname_unicode",
            "account",
            "state",
            "state_reason",
            "state_changed_at",
            "created_at",
            "verified_at",
            "last_check_at",
            "next_check_at",
            "checks",
            "certificate",
        ],
        "additionalProperties": False,
        "properties": {
            "hostname": {"type": "string", "description": "A-label (punycode) form"},
            "hostname_unicode": {"type": "string"},
            "account": {"type": "string"},
            "state": {"enum": [s.value for s in DomainState]},
            "state_reason": {"type": "string"},
            "state_changed_at": _ISO,
            "created_at": _ISO,
            "verified_at": _ISO,
            "last_check_at": _ISO,
            "next_check_at": _ISO,
            "checks": {"type": "array", "items": {"$ref": "#/components/schemas/Check"}},
            "certificate": {"$ref": "#/components/schemas/CertificateSummary"},
            "events": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/Event"},
                "description": "last 10 events (single-host responses only)",
            },
        },
    },
    "HostPage": {
        "type": "object",
        "required": ["hosts", "next"],
        "additionalProperties": False,
        "properties": {
            "hosts": {"type": "array", "items": {"$ref": "#/components/schemas/Host"}},
            "next": {
                "type": ["string", "null"],
                "description": "pass as `after` for the next page; null on the last page",
            },
        },
    },
    "NewHost": {
        "type": "object",
        "required": ["hostname", "account"],
        "additionalProperties": False,
        "properties": {"hostname": {"type": "string"}, "account": {"type": "string"}},
    },
    "Suspension": {
        "type": "object",
        "additionalProperties": False,
        "properties": {"reason": {"type": "string", "maxLength": 500}},
    },
    "Certificate": {
        "type": "object",
        "required": [
            "hostname",
            "names",
            "not_before",
            "not_after",
            "issuer",
            "days_left",
            "expired",
            "expiring",
            "serial",
            "sha256_fingerprint",
            "created_at",
            "chain_pem",
        ],
        "additionalProperties": False,
        "properties": {
            "hostname": {"type": "string"},
            "names": {"type": "array", "items": {"type": "string"}},
            "not_before": _ISO,
            "not_after": _ISO,
            "issuer": {"type": "string"},
            "days_left": {"type": "number"},
            "expired": {"type": "boolean"},
            "expiring": {"type": "boolean"},
            "serial": {"type": "string"},
            "sha256_fingerprint": {"type": "string"},
            "created_at": _ISO,
            "chain_pem": {"type": "string"},
        },
    },
    "Events": {
        "type": "object",
        "required": ["events"],
        "additionalProperties": False,
        "properties": {
            "events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}}
        },
    },
    "Options": options_schema(),
    "AssociationFile": {
        "type": ["object", "array"],
        "description": "apple-app-site-association: an object with applinks.details[] (appIDs"
        " + components, or the legacy appID + paths); assetlinks.json: an array of statements"
        " (Digital Asset Links: relations such as delegate_permission/common.handle_all_urls"
        " or .get_login_creds; target android_app with package_name and SHA-256 fingerprints,"
        " or web with site; or include). UTF-8, at most 128 KiB; served byte for byte.",
    },
    "HostFile": {
        "type": "object",
        "required": ["hostname", "kind", "size", "etag", "updated_at", "urls"],
        "additionalProperties": False,
        "properties": {
            "hostname": {"type": "string"},
            "kind": {"enum": list(KINDS)},
            "size": {"type": "integer"},
            "etag": {"type": "string"},
            "updated_at": _ISO,
            "urls": {"type": "array", "items": {"type": "string"}},
        },
    },
    "HostFiles": {
        "type": "object",
        "required": ["files"],
        "additionalProperties": False,
        "properties": {
            "files": {"type": "array", "items": {"$ref": "#/components/schemas/HostFile"}}
        },
    },
}

# (method, path) -> (request schema, {status: response schema or None})
_IO: dict[tuple[str, str], tuple[str | None, dict[int, str | None]]] = {
    ("GET", "/v1/hosts"): (None, {200: "HostPage", 422: "Error"}),
    ("POST", "/v1/hosts"): (
        "NewHost",
        {200: "Host", 201: "Host", 400: "Error", 409: "Error", 422: "Error"},
    ),
    ("GET", "/v1/hosts/{host}"): (None, {200: "Host", 404: "Error"}),
    ("DELETE", "/v1/hosts/{host}"): (
        None,
        {204: None, 404: "Error", 409: "Error", 422: "Error", 502: "Error"},
    ),
    ("POST", "/v1/hosts/{host}/checks"): (None, {200: "Host", 404: "Error"}),
    ("GET", "/v1/hosts/{host}/certificate"): (None, {200: "Certificate", 404: "Error"}),
    ("POST", "/v1/hosts/{host}/renew"): (
        None,
        {200: "Certificate", 404: "Error", 409: "Error", 502: "Error", 503: "Error"},
    ),
    ("POST", "/v1/hosts/{host}/suspend"): ("Suspension", {200: "Host", 404: "Error", 422: "Error"}),
    ("POST", "/v1/hosts/{host}/resume"): (None, {200: "Host", 404: "Error", 409: "Error"}),
    ("GET", "/v1/hosts/{host}/events"): (None, {200: "Events", 404: "Error", 422: "Error"}),
    ("GET", "/v1/hosts/{host}/options"): (None, {200: "Options", 404: "Error"}),
    ("PUT", "/v1/hosts/{host}/options"): (
        "Options",
        {200: "Options", 400: "Error", 404: "Error", 422: "Error"},
    ),
    ("GET", "/v1/hosts/{host}/files"): (None, {200: "HostFiles", 404: "Error"}),
    ("GET", "/v1/hosts/{host}/files/{kind}"): (None, {200: "AssociationFile", 404: "Error"}),
    ("PUT", "/v1/hosts/{host}/files/{kind}"): (
        "AssociationFile",
        {
            200: "HostFile",
            201: "HostFile",
            400: "Error",
            404: "Error",
            413: "Error",
            415: "Error",
            422: "Error",
        },
    ),
    ("DELETE", "/v1/hosts/{host}/files/{kind}"): (None, {204: None, 404: "Error"}),
}

_PATH_PARAMETERS: dict[str, dict[str, Any]] = {
    "host": {
        "schema": {"type": "string"},
        "description": "hostname; Unicode, upper case and a trailing dot are accepted",
    },
    "kind": {"schema": {"enum": list(KINDS)}, "description": "which association file"},
}

_QUERY: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = {
    ("GET", "/v1/hosts"): [
        ("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}),
        ("after", {"type": "string", "description": "the `next` value of the previous page"}),
        ("account", {"type": "string"}),
        ("state", {"enum": [s.value for s in DomainState]}),
    ],
    ("GET", "/v1/hosts/{host}/events"): [
        ("limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}),
    ],
    ("DELETE", "/v1/hosts/{host}"): [
        (
            "force",
            {
                "type": "boolean",
                "default": False,
                "description": "remove even when the CA cannot revoke the certificate",
            },
        ),
    ],
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for method, path, _handler, summary in ROUTES:
        request_schema, responses = _IO[(method, path)]
        operation: dict[str, Any] = {"summary": summary, "responses": {}}
        parameters = []
        for name, spec in _PATH_PARAMETERS.items():
            if "{" + name + "}" in path:
                parameters.append({"name": name, "in": "path", "required": True, **spec})
        for name, schema in _QUERY.get((method, path), []):
            parameters.append({"name": name, "in": "query", "required": False, "schema": schema})
        if parameters:
            operation["parameters"] = parameters
        if request_schema is not None:
            operation["requestBody"] = {
                "required": method != "POST" or request_schema != "Suspension",
                "content": {"application/json": {"schema": _ref(request_schema)}},
            }
        for status, schema_name in {**responses, 401: "Error", 429: "Error"}.items():
            response: dict[str, Any] = {"description": _STATUS_TEXT[status]}
            if schema_name is not None:
                response["content"] = {"application/json": {"schema": _ref(schema_name)}}
            operation["responses"][str(status)] = response
        paths.setdefault(path, {})[method.lower()] = operation
    paths["/v1/openapi.json"] = {
        "get": {
            "summary": "This document",
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {}}},
                "401": {
                    "description": _STATUS_TEXT[401],
                    "content": {"application/json": {"schema": _ref("Error")}},
                },
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "linkedge admin API",
            "version": "1",
            "description": "Manage tracking hosts. Every request needs `Authorization: Bearer"
            " <admin token>`; without it the answer is 401 and nothing else. Wrong tokens"
            " are slowed down per source; too many in a row get 429.",
        },
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }


_STATUS_TEXT = {
    200: "OK",
    201: "Created",
    204: "No Content",
    400: "Malformed JSON",
    401: "Missing or wrong token",
    404: "Host not registered, or no such file",
    409: "Conflict with the host's current state or owner",
    413: "File larger than 128 KiB",
    415: "Not sent as application/json",
    422: "Invalid input (the message says which field and why; for files, `path` where)",
    429: "Too many wrong tokens from this source: wait (Retry-After) and try again",
    502: "The CA failed",
    503: "Not available in this process",
}
