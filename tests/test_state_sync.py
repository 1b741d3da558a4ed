"""Issue 8, part 4: every event that changes a host's handshake reaches every worker.

The event-kind sets are hand-kept; the first test reads the code for every kind that is
emitted (record_event calls and the schema's triggers) so a new kind, or a consumed kind
nobody emits (the old `certificate_deleted`), fails here instead of drifting silently.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from certstore import SQLiteStore, generate_key_text
from certstore.crypto import parse_key_text
from proxy.hosts.state_sync import HANDSHAKE_EVENTS, StateSync
from proxy.http.host_views import CHANGE_EVENTS

ROOT = Path(__file__).resolve().parent.parent

# Emitted kinds that do not change what a handshake gets, and why.
NOT_FOR_HANDSHAKES = {
    "acme_account_registered": "no host",
    "order_started": "the certificate arrives with `issued`",
    "renewal_started": "the certificate arrives with `renewed`",
    "order_deferred": "nothing changed; this worker's refusal cache only",
    "issuance_failed": "the state change to failed is a `state` event",
    "renewal_failed": "the current certificate stays in service",
    "renewal_skipped": "the current certificate stays in service",
    "refused": "a decision, not a change",
    "checks_stopped": "background checks only",
    "removed_unrevoked": "followed by `removed`",
    "webhook_failed": "delivery bookkeeping",
    "options_changed": "HTTP answers only (host_views)",
    "file_updated": "HTTP answers only (host_views)",
    "file_deleted": "HTTP answers only (host_views)",
}


def _string_constants(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
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
    schema = (ROOT / "certstore" / "schema.py").read_text()
    for insert in re.findall(r"INSERT INTO events.*?VALUES\s*\((.*?)\);", schema, flags=re.S):
        kinds |= set(re.findall(r"\b(?:new|old)\.hostname,\s*'([a-z_]+)'", insert))
    return kinds


def test_every_emitted_event_kind_is_classified_and_every_consumed_one_is_emitted() -> None:
    emitted = emitted_event_kinds()
    assert {"state", "revoked", "purged", "removed", "file_updated"} <= emitted  # the scan works
    assert HANDSHAKE_EVENTS <= emitted, HANDSHAKE_EVENTS - emitted
    assert CHANGE_EVENTS <= emitted, CHANGE_EVENTS - emitted
    unclassified = emitted - HANDSHAKE_EVENTS - set(NOT_FOR_HANDSHAKES)
    assert not unclassified, f"decide whether these change a handshake: {unclassified}"
    assert not HANDSHAKE_EVENTS & set(NOT_FOR_HANDSHAKES)
    assert HANDSHAKE_EVENTS <= CHANGE_EVENTS  # the HTTP side shows certificates and states too


async def test_state_sync_forgets_the_host_for_every_handshake_event(tmp_path: Path) -> None:
    store = await SQLiteStore.open(tmp_path / "s.db", parse_key_text(generate_key_text(), "t"))
    forgotten: list[str] = []
    sync = StateSync(store, forgotten.append, interval=0.1)
    try:
        await sync.start()
        for kind in sorted(HANDSHAKE_EVENTS | set(NOT_FOR_HANDSHAKES)):
            await store.record_event(f"{kind.replace('_', '-')}.shop.test", kind, "test")
        await sync.poll()
    finally:
        await store.close()
    expected = sorted(f"{k.replace('_', '-')}.shop.test" for k in HANDSHAKE_EVENTS)
    assert sorted(forgotten) == expected
