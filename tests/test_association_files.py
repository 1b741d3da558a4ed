"""Validation of app association files (pure): what Apple and Google accept, and clear
reasons with JSON paths for what they would silently ignore."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from proxy.hosts.association_files import (
    ANDROID,
    APPLE,
    MAX_BYTES,
    InvalidFile,
    NotJSON,
    etag,
    validate,
)

TEAM_APP = "ABCDE12345.com.shop.app"
FP = ":".join(f"{i:02X}" for i in range(32))

AASA: dict[str, Any] = {
    "applinks": {
        "defaults": {"caseSensitive": False},
        "details": [
            {
                "appIDs": [TEAM_APP, "0123456789.com.shop.app-beta"],
                "components": [
                    {"/": "/c/*", "?": {"src": "mail*"}, "comment": "clicks"},
                    {"/": "/unsubscribe/*", "exclude": True},
                    {"#": "no_universal_links", "exclude": True, "percentEncoded": False},
                ],
                "defaults": {"percentEncoded": True},
            }
        ],
        "substitutionVariables": {"lang": ["en", "de"]},
    },
    "webcredentials": {"apps": [TEAM_APP]},
    "appclips": {"apps": ["ABCDE12345.com.shop.app.Clip"]},
}
LEGACY: dict[str, Any] = {
    "applinks": {"apps": [], "details": [{"appID": TEAM_APP, "paths": ["/c/*", "NOT /u/*"]}]}
}
BOTH_IN_ONE: dict[str, Any] = {
    "applinks": {
        "details": [
            {"appIDs": [TEAM_APP], "components": [{"/": "/c/*"}], "appID": TEAM_APP, "paths": ["*"]}
        ]
    }
}
HANDLE = "delegate_permission/common.handle_all_urls"
# Shapes published by real sites: App Links plus credential sharing with the web site,
# a web-only statement, and an include of a shared statement list.
ASSETLINKS_WITH_WEB: list[Any] = [
    {
        "relation": [
            "delegate_permission/common.handle_all_urls",
            "delegate_permission/common.get_login_creds",
        ],
        "target": {
            "namespace": "android_app",
            "package_name": "com.shop.android",
            "sha256_cert_fingerprints": [FP],
        },
    },
    {
        "relation": ["delegate_permission/common.get_login_creds"],
        "target": {"namespace": "web", "site": "https://shop.example"},
    },
    {
        "relation": ["delegate_permission/common.get_login_creds"],
        "target": {"namespace": "web", "site": "https://accounts.shop.example:8443/"},
    },
]
LOGIN_ONLY: list[Any] = [
    {
        "relation": ["delegate_permission/common.get_login_creds"],
        "target": {
            "namespace": "android_app",
            "package_name": "com.shop.wallet",
            "sha256_cert_fingerprints": [FP],
        },
        "relation_extensions": {"delegate_permission/common.get_login_creds": {}},
    },
    {"include": "https://shop.example/.well-known/assetlinks.json"},
]
ASSETLINKS: list[Any] = [
    {
        "relation": [
            "delegate_permission/common.handle_all_urls",
            "delegate_permission/common.get_login_creds",
        ],
        "target": {
            "namespace": "android_app",
            "package_name": "com.shop.app",
            "sha256_cert_fingerprints": [FP, FP.replace("00", "FF")],
        },
    },
    {
        "relation": ["delegate_permission/common.handle_all_urls"],
        "target": {
            "namespace": "android_app",
            "package_name": "com.shop.app_beta2",
            "sha256_cert_fingerprints": [FP],
        },
    },
]


def encode(doc: Any) -> bytes:
    return json.dumps(doc, indent=2).encode()


@pytest.mark.parametrize(
    ("kind", "doc"),
    [
        (APPLE, AASA),
        (APPLE, LEGACY),
        (APPLE, BOTH_IN_ONE),
        (ANDROID, ASSETLINKS),
        (ANDROID, ASSETLINKS_WITH_WEB),
        (ANDROID, LOGIN_ONLY),
    ],
    ids=[
        "aasa-components",
        "aasa-legacy-paths",
        "aasa-both-formats",
        "assetlinks",
        "assetlinks-app-and-web-login",
        "assetlinks-login-only-and-include",
    ],
)
def test_valid_files_pass(kind: str, doc: Any) -> None:
    validate(kind, encode(doc))


def test_the_size_limit_is_exactly_128_kib() -> None:
    body = encode(LEGACY)
    at_limit = body + b" " * (MAX_BYTES - len(body))
    assert len(at_limit) == 128 * 1024
    validate(APPLE, at_limit)
    with pytest.raises(InvalidFile, match=r"131073 bytes; at most 131072"):
        validate(APPLE, at_limit + b" ")


def changed(doc: Any, path: list[Any], value: Any) -> Any:
    """A deep copy of doc with the item at path replaced (or removed for DELETE)."""
    new = copy.deepcopy(doc)
    parent = new
    for step in path[:-1]:
        parent = parent[step]
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return new


DELETE = object()
D0 = ["applinks", "details", 0]

BAD_AASA: list[tuple[Any, str, str]] = [
    ([AASA], "$", "must be an object, not an array"),
    ({"webcredentials": {"apps": [TEAM_APP]}}, "$", '"applinks" is missing'),
    ({**AASA, "applink": {}}, "$.applink", "unknown key (expected one of activitycontinuation"),
    (changed(AASA, ["applinks", "details"], DELETE), "$.applinks", '"details" is missing'),
    (changed(AASA, ["applinks", "details"], {}), "$.applinks.details", "must be an array"),
    (changed(AASA, D0, {"components": []}), "$.applinks.details[0]", 'needs "appIDs"'),
    (changed(AASA, [*D0, "appIDs"], []), "$.applinks.details[0].appIDs", "at least one app"),
    (
        changed(AASA, [*D0, "appIDs", 1], "abcde12345.com.shop.app"),
        "$.applinks.details[0].appIDs[1]",
        'team ID "abcde12345" must be 10 upper-case letters or digits',
    ),
    (
        changed(AASA, [*D0, "appIDs", 0], "ABCDE1234.com.shop.app"),
        "$.applinks.details[0].appIDs[0]",
        'team ID "ABCDE1234" must be 10',
    ),
    (
        changed(AASA, [*D0, "appIDs", 0], "com_shop_app"),
        "$.applinks.details[0].appIDs[0]",
        "no team ID prefix",
    ),
    (
        changed(AASA, [*D0, "appIDs", 0], "ABCDE12345.com.shop_app"),
        "$.applinks.details[0].appIDs[0]",
        "bundle ID may hold only letters, digits, hyphens",
    ),
    (
        changed(AASA, [*D0, "appIDs", 0], "ABCDE12345.com..app"),
        "$.applinks.details[0].appIDs[0]",
        "bundle ID",
    ),
    (
        changed(AASA, [*D0, "appIDs", 0], 12),
        "$.applinks.details[0].appIDs[0]",
        "must be a string, not a number",
    ),
    (changed(AASA, [*D0, "components"], DELETE), "$.applinks.details[0]", '"components"'),
    (
        changed(AASA, [*D0, "components", 1], {"path": "/c/*"}),
        "$.applinks.details[0].components[1].path",
        "unknown key",
    ),
    (
        changed(AASA, [*D0, "components", 0, "/"], ["/c/*"]),
        '$.applinks.details[0].components[0]["/"]',
        "must be a string, not an array",
    ),
    (
        changed(AASA, [*D0, "components", 0, "?"], {"src": 1}),
        '$.applinks.details[0].components[0]["?"].src',
        "must be a string",
    ),
    (
        changed(AASA, [*D0, "components", 1, "exclude"], "yes"),
        "$.applinks.details[0].components[1].exclude",
        "must be true or false, not a string",
    ),
    (
        changed(AASA, [*D0, "defaults"], {"casesensitive": False}),
        "$.applinks.details[0].defaults.casesensitive",
        "unknown key",
    ),
    (
        changed(LEGACY, [*D0, "paths"], DELETE),
        "$.applinks.details[0]",
        '"appID" goes with "paths"',
    ),
    (
        changed(LEGACY, [*D0, "paths", 1], None),
        "$.applinks.details[0].paths[1]",
        "must be a string, not null",
    ),
    (
        changed(LEGACY, ["applinks", "apps"], [TEAM_APP]),
        "$.applinks.apps",
        "must be an empty array",
    ),
    (
        changed(AASA, ["webcredentials", "apps", 0], "shop"),
        "$.webcredentials.apps[0]",
        "TEAMID.bundle.id",
    ),
    (
        changed(AASA, ["applinks", "substitutionVariables", "lang"], "en"),
        "$.applinks.substitutionVariables.lang",
        "must be an array",
    ),
]


@pytest.mark.parametrize(("doc", "path", "fragment"), BAD_AASA)
def test_bad_apple_files_name_the_path(doc: Any, path: str, fragment: str) -> None:
    with pytest.raises(InvalidFile) as caught:
        validate(APPLE, encode(doc))
    assert not isinstance(caught.value, NotJSON)
    assert caught.value.path == path, str(caught.value)
    assert fragment in caught.value.problem, str(caught.value)
    assert str(caught.value).startswith(path + ": ")


S0 = [0]
T0 = [0, "target"]
BAD_ASSETLINKS: list[tuple[Any, str, str]] = [
    ({"relation": []}, "$", "must be an array, not an object"),
    ([], "$", "at least one statement"),
    (changed(ASSETLINKS, [*S0, "relation"], DELETE), "$[0]", '"relation" is missing'),
    (changed(ASSETLINKS, [*S0, "relation"], []), "$[0].relation", "must not be empty"),
    (
        changed(ASSETLINKS, [1, "relation"], ["handle_all_urls"]),
        "$[1].relation[0]",
        "is not a relation: kind/detail",
    ),
    (
        changed(ASSETLINKS, [*S0, "relation", 1], "delegate_permission/common get_login_creds"),
        "$[0].relation[1]",
        "is not a relation",
    ),
    (changed(ASSETLINKS, [*S0, "relation", 0], 7), "$[0].relation[0]", "must be a string"),
    (changed(ASSETLINKS, [*S0, "target"], DELETE), "$[0]", '"target" is missing'),
    (
        changed(ASSETLINKS, [*T0, "namespace"], "ios_app"),
        "$[0].target.namespace",
        'must be "android_app" or "web"',
    ),
    (changed(ASSETLINKS, [*T0, "namespace"], DELETE), "$[0].target", '"namespace" is missing'),
    (
        changed(ASSETLINKS, [*T0, "namespace"], "web"),  # still has package_name, no site
        "$[0].target.package_name",
        "unknown key (expected one of namespace, site)",
    ),
    (
        [{"relation": [HANDLE], "target": {"namespace": "web"}}],
        "$[0].target",
        '"site" is missing',
    ),
    (
        [{"relation": [HANDLE], "target": {"namespace": "web", "site": "https://shop.test/app"}}],
        "$[0].target.site",
        "without a path",
    ),
    (
        [{"relation": [HANDLE], "target": {"namespace": "web", "site": "shop.test"}}],
        "$[0].target.site",
        "must be a site: scheme and host",
    ),
    (
        [{"relation": [HANDLE], "target": {"namespace": "web", "site": ["https://shop.test"]}}],
        "$[0].target.site",
        "must be a string",
    ),
    (
        [*ASSETLINKS, {"include": "http://shop.test/more.json"}],
        "$[2].include",
        "must be an https:// URL",
    ),
    (
        [{"include": "https://shop.test/more.json", "relation": [HANDLE]}],
        "$[0].relation",
        "unknown key (expected one of include)",
    ),
    (
        changed(ASSETLINKS, [*T0, "package_name"], "shop"),
        "$[0].target.package_name",
        "not an Android package name",
    ),
    (
        changed(ASSETLINKS, [*T0, "package_name"], "com.1shop.app"),
        "$[0].target.package_name",
        "not an Android package name",
    ),
    (
        changed(ASSETLINKS, [*T0, "sha256_cert_fingerprints"], []),
        "$[0].target.sha256_cert_fingerprints",
        "at least one signing certificate",
    ),
    (
        changed(ASSETLINKS, [*T0, "sha256_cert_fingerprints", 1], FP.lower()),
        "$[0].target.sha256_cert_fingerprints[1]",
        "must be upper-case hex",
    ),
    (
        changed(ASSETLINKS, [*T0, "sha256_cert_fingerprints", 0], FP[: 20 * 3 - 1]),
        "$[0].target.sha256_cert_fingerprints[0]",
        "is a SHA-1 fingerprint",
    ),
    (
        changed(ASSETLINKS, [*T0, "sha256_cert_fingerprints", 0], FP[:-3]),
        "$[0].target.sha256_cert_fingerprints[0]",
        "32 upper-case hex bytes separated by colons",
    ),
    (
        changed(ASSETLINKS, [*T0, "sha256_cert_fingerprints", 0], FP.replace(":", "")),
        "$[0].target.sha256_cert_fingerprints[0]",
        "separated by colons",
    ),
    (
        changed(ASSETLINKS, [*T0, "site"], "https://shop.test"),
        "$[0].target.site",
        "unknown key",
    ),
]


@pytest.mark.parametrize(("doc", "path", "fragment"), BAD_ASSETLINKS)
def test_bad_assetlinks_name_the_path(doc: Any, path: str, fragment: str) -> None:
    with pytest.raises(InvalidFile) as caught:
        validate(ANDROID, encode(doc))
    assert caught.value.path == path, str(caught.value)
    assert fragment in caught.value.problem, str(caught.value)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"", "the file is empty"),
        (b"  \n", "the file is empty"),
        (b'{"applinks": {"details": [}', "not valid JSON: Expecting value at line 1 column 27"),
        (b'{"applinks": NaN}', "NaN is not valid JSON"),
        (b'{"applinks": -Infinity}', "-Infinity is not valid JSON"),
        (b"\xef\xbb\xbf" + encode(LEGACY), "byte order mark"),
        (b'{"applinks": "\xff"}', "not UTF-8 (byte 14)"),
        (b"[" * 5000 + b"]" * 5000, "nested deeper than"),
    ],
    ids=["empty", "blank", "syntax", "nan", "infinity", "bom", "latin1", "deep"],
)
def test_not_json_at_all(raw: bytes, fragment: str) -> None:
    for kind in (APPLE, ANDROID):
        with pytest.raises(NotJSON) as caught:
            validate(kind, raw)
        assert caught.value.path == "$"
        assert fragment in caught.value.problem, str(caught.value)


def test_duplicate_keys_and_deep_nesting_are_refused_with_their_path() -> None:
    raw = b'{"applinks": {"details": [{"appID": "ABCDE12345.a.b", "appID": "X", "paths": []}]}}'
    with pytest.raises(InvalidFile) as caught:
        validate(APPLE, raw)
    assert caught.value.path == "$.applinks.details[0]"
    assert caught.value.problem == 'the key "appID" appears twice'
    deep = {"applinks": {"details": [{"appID": TEAM_APP, "paths": []}]}, "x": []}
    inner = deep["x"]
    for _ in range(40):
        inner.append([])
        inner = inner[0]
    with pytest.raises(InvalidFile, match="nested deeper than 32 levels"):
        validate(APPLE, encode(deep))


def test_etag_is_strong_and_follows_the_bytes() -> None:
    one, same, other = etag(b"{}"), etag(b"{}"), etag(b"{ }")
    assert one == same != other
    assert one.startswith('"sha256-') and one.endswith('"') and not one.startswith("W/")
    assert len(one) == len('"sha256-"') + 43  # base64url of 32 bytes, unpadded
