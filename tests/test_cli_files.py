"""`linkedge files put|get|delete|list`: the admin API's file rules, from the command line.

In-process calls of `proxy.app.cli.main` against a real store: what a subprocess would
add (an interpreter start) proves nothing here. The rules themselves are shared
with the API (proxy/ops/files.py), so the refusals below are the API's.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from certstore import generate_key_text, open_store
from certstore.crypto import parse_key_text
from proxy.app.cli import main
from proxy.hosts.association_files import ANDROID, APPLE, MAX_BYTES, etag

HOST = "links.shop.test"
FP = ":".join(f"{i:02X}" for i in range(32))
DETAIL = {"appIDs": ["ABCDE12345.com.shop.app"], "components": [{"/": "/c/*"}]}
AASA = json.dumps({"applinks": {"details": [DETAIL]}}).encode()
ASSETLINKS = json.dumps(
    [
        {
            "relation": ["delegate_permission/common.handle_all_urls"],
            "target": {
                "namespace": "android_app",
                "package_name": "com.shop.app",
                "sha256_cert_fingerprints": [FP],
            },
        }
    ],
    indent=2,
).encode()


@pytest.fixture
def store_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    key = generate_key_text()
    monkeypatch.setenv("LINKEDGE_STORE_PATH", str(tmp_path / "store.db"))
    monkeypatch.setenv("LINKEDGE_STORE_KEY", key)
    monkeypatch.setenv("LINKEDGE_STORE_KEY_ENV", "LINKEDGE_STORE_KEY")
    monkeypatch.setenv("LINKEDGE_EDGE_CNAME_TARGET", "edge.linkedge.test")
    assert main(["domains", "add", HOST, "--account", "shop"]) == 0
    return key


def run(capsys: pytest.CaptureFixture[bytes], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out.decode(), err.decode()


def one_error_line(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("linkedge: error:"), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def stored_events(tmp_path: Path, key: str) -> list[Any]:
    async def read() -> list[Any]:
        store = await open_store(str(tmp_path / "store.db"), parse_key_text(key, "test"))
        try:
            return await store.list_events(HOST, limit=100)
        finally:
            await store.close()

    return asyncio.run(read())


def test_put_get_list_delete(
    tmp_path: Path, store_env: str, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    path = tmp_path / "aasa.json"
    path.write_bytes(AASA)
    code, out, _ = run(capsysbinary, "files", "put", "Links.Shop.Test.", APPLE, str(path))
    assert code == 0 and out.startswith(f"stored {APPLE} of {HOST}: {len(AASA)} bytes")
    assert f"https://{HOST}/.well-known/apple-app-site-association" in out

    capsysbinary.readouterr()
    assert main(["files", "get", HOST, APPLE]) == 0
    assert capsysbinary.readouterr().out == AASA  # byte for byte, on standard output

    code, out, _ = run(capsysbinary, "files", "put", HOST, APPLE, str(path))
    assert code == 0 and out.startswith("replaced ")

    target = tmp_path / "downloaded"
    assert run(capsysbinary, "files", "get", HOST, APPLE, str(target))[0] == 0
    assert target.read_bytes() == AASA

    code, out, _ = run(capsysbinary, "files", "list", HOST, "--json")
    rows = json.loads(out)
    assert [(r["kind"], r["size"], r["etag"]) for r in rows] == [(APPLE, len(AASA), etag(AASA))]
    code, out, _ = run(capsysbinary, "files", "list", HOST)
    assert code == 0 and APPLE in out and etag(AASA) in out

    code, out, _ = run(capsysbinary, "files", "delete", HOST, APPLE)
    assert code == 0 and "deleted" in out
    code, _, err = run(capsysbinary, "files", "get", HOST, APPLE)
    assert code == 1
    one_error_line(err, f"{HOST} has no {APPLE}")
    code, out, _ = run(capsysbinary, "files", "list", HOST)
    assert "(none)" in out
    # the same events as through the API: every worker follows them
    kinds = [e.kind for e in stored_events(tmp_path, store_env)]
    assert kinds.count("file_updated") == 2 and kinds.count("file_deleted") == 1


def test_put_from_standard_input(
    store_env: str, capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(ASSETLINKS)))
    code, out, _ = run(capsysbinary, "files", "put", HOST, ANDROID)
    assert code == 0 and f"https://{HOST}/.well-known/assetlinks.json" in out


def test_refusals_are_the_apis_and_change_nothing(
    tmp_path: Path, store_env: str, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    good = tmp_path / "assetlinks.json"
    good.write_bytes(ASSETLINKS)
    assert run(capsysbinary, "files", "put", HOST, ANDROID, str(good))[0] == 0
    events_before = len(stored_events(tmp_path, store_env))

    bad = tmp_path / "bad.json"
    cases: list[tuple[str, str, bytes, tuple[str, ...]]] = [
        (
            HOST,
            ANDROID,
            ASSETLINKS.replace(b'"android_app"', b'"ios_app"'),
            ("$[0].target.namespace", 'must be "android_app" or "web"'),
        ),
        (HOST, ANDROID, ASSETLINKS.replace(FP.encode(), FP.lower().encode()), ("upper-case",)),
        (HOST, ANDROID, b"[{", ("not valid JSON",)),
        (HOST, ANDROID, b"\xef\xbb\xbf" + ASSETLINKS, ("byte order mark",)),
        (HOST, APPLE, b" " * (MAX_BYTES + 1), ("larger than 131072 bytes",)),
        (HOST, "assetlinks", ASSETLINKS, ("known: apple-app-site-association, assetlinks.json",)),
        ("links.nobody.test", ANDROID, ASSETLINKS, ("links.nobody.test is not registered",)),
    ]
    for host, kind, content, fragments in cases:
        bad.write_bytes(content)
        code, out, err = run(capsysbinary, "files", "put", host, kind, str(bad))
        assert code == 1 and out == "", (kind, fragments)
        one_error_line(err, *fragments)

    code, _, err = run(capsysbinary, "files", "put", "not a host", ANDROID, str(good))
    assert code == 2
    one_error_line(err)
    code, _, err = run(capsysbinary, "files", "put", HOST, ANDROID, str(tmp_path / "missing.json"))
    assert code == 1
    one_error_line(err, "missing.json")
    code, _, err = run(capsysbinary, "files", "delete", HOST, APPLE)
    assert code == 1
    one_error_line(err, f"{HOST} has no {APPLE}")

    target = tmp_path / "still"
    assert run(capsysbinary, "files", "get", HOST, ANDROID, str(target))[0] == 0
    assert target.read_bytes() == ASSETLINKS  # the previous file stays
    assert len(stored_events(tmp_path, store_env)) == events_before  # nothing written
