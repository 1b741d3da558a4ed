"""Issue 9: the store, its -wal and -shm, and the key file are private (0600) from the
moment they exist, whatever the umask of the process that creates them."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from certstore import generate_key_text, open_store
from certstore.crypto import parse_key_text


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0o022)  # what a shell usually has: files would be 0644
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_fresh_store_wal_and_shm_are_0600(tmp_path: Path, loose_umask: None) -> None:
    path = tmp_path / "fresh" / "store.db"
    key = parse_key_text(generate_key_text(), "test")
    store = await open_store(path, key)
    try:
        await store.add_domain("links.modes.test", "acct")
        for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            assert mode(name) == 0o600, name
    finally:
        await store.close()
    # a store left with loose modes by an older version is tightened when opened
    os.chmod(path, 0o644)
    store = await open_store(path, key)
    await store.close()
    assert mode(path) == 0o600


def test_cli_creates_key_and_store_0600_under_a_loose_umask(tmp_path: Path) -> None:
    key = tmp_path / "store.key"
    env = {**os.environ, "LINKEDGE_STORE_PATH": str(tmp_path / "cli" / "store.db"),
           "LINKEDGE_STORE_KEY_FILE": str(key), "LINKEDGE_STORE_KEY_ENV": "",
           "LINKEDGE_EDGE_CNAME_TARGET": "edge.linkedge.test"}  # fmt: skip

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy.app.cli", *args],
            capture_output=True, text=True, timeout=60, env=env,
            preexec_fn=lambda: os.umask(0o022),
        )  # fmt: skip

    assert cli("keygen", str(key)).returncode == 0
    assert mode(key) == 0o600
    added = cli("domains", "add", "links.cli-modes.test", "--account", "a")
    assert added.returncode == 0, added.stderr
    assert mode(tmp_path / "cli" / "store.db") == 0o600
