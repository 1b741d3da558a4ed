"""Issue 8, part 4: every event that changes a host's handshake reaches every worker.

Event kinds are one enum (proxy/hosts/events.py) that says, per kind, which caches it
invalidates. The first test reads the code for every kind that is emitted (record_event
calls, literal or `EventKind.X`, and the schema's triggers) so a new kind, or a member
nobody emits (the old `certificate_deleted`), fails here instead of drifting silently.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from certstore import generate_key_text, open_store
from certstore.crypto import parse_key_text
from proxy.hosts.events import HANDSHAKE_EVENTS, HOST_VIEW_EVENTS, Cache, EventKind, why
from proxy.hosts.state_sync import StateSync
from proxy.http.host_views import CHANGE_EVENTS

ROOT = Path(__file__).resolve().parent.parent


def _string_constants(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "EventKind"
    ):
        return {EventKind[node.attr].value}
    if isinstance(node, ast.IfExp):
        return _string_constants(node.body) | _string_constants(node.orelse)
    return set()


def emitted_event_kinds() -> set[str]:
    kinds: set[str] = set()
    for package in ("proxy", "acme_client", "certstore"):
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "record_event"
                    and len(node.args) >= 2
                ):
                    found = _string_constants(node.args[1])
                    assert found, f"{path}:{node.lineno}: event kind is not a literal"
                    kinds |= found
                if (  # put_certificate(cert, event=(kind, detail)): stored with its event
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "put_certificate"
                ):
                    for keyword in node.keywords:
                        if keyword.arg == "event" and isinstance(keyword.value, ast.Tuple):
                            found = _string_constants(keyword.value.elts[0])
                            assert found, f"{path}:{node.lineno}: event kind is not a literal"
                            kinds |= found
    schema = (ROOT / "certstore" / "schema.py").read_text()
    for insert in re.findall(r"INSERT INTO events.*?VALUES\s*\((.*?)\);", schema, flags=re.S):
        kinds |= set(re.findall(r"\b(?:new|old)\.hostname,\s*'([a-z_]+)'", insert))
    return kinds


def test_every_emitted_event_kind_is_classified_and_every_consumed_one_is_emitted() -> None:
    emitted = emitted_event_kinds()
    assert {"state", "revoked", "purged", "removed", "file_updated"} <= emitted  # the scan works
    stored_strings = emitted - {k.value for k in EventKind}
    assert not stored_strings, f"emitted kinds missing from EventKind: {stored_strings}"
    never_emitted = {k.value for k in EventKind} - emitted
    assert not never_emitted, f"EventKind members nobody emits: {never_emitted}"
    assert all(why(k) for k in EventKind)  # each says why it invalidates what it does
    assert HANDSHAKE_EVENTS <= HOST_VIEW_EVENTS  # the HTTP side shows certificates and states
    assert CHANGE_EVENTS == HOST_VIEW_EVENTS
    assert {k for k in EventKind if Cache.HANDSHAKE in k.invalidates} == HANDSHAKE_EVENTS


async def test_state_sync_forgets_the_host_for_every_handshake_event(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db", parse_key_text(generate_key_text(), "t"))
    forgotten: list[str] = []
    sync = StateSync(store, forgotten.append, interval=0.1)
    try:
        await sync.start()
        for kind in sorted(EventKind):
            await store.record_event(f"{kind.replace('_', '-')}.shop.test", kind, "test")
        await sync.poll()
    finally:
        await store.close()
    expected = sorted(f"{k.replace('_', '-')}.shop.test" for k in HANDSHAKE_EVENTS)
    assert sorted(forgotten) == expected


async def test_events_the_worker_applied_itself_are_not_forgotten(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db", parse_key_text(generate_key_text(), "t"))
    forgotten: list[str] = []
    sync = StateSync(
        store, forgotten.append, interval=0.1, applied=lambda e: e.hostname == "own.shop.test"
    )
    try:
        await sync.start()
        for host in ("own.shop.test", "other.shop.test"):
            await store.record_event(host, EventKind.ISSUED, "test")
        await sync.poll()
    finally:
        await store.close()
    assert forgotten == ["other.shop.test"]
