"""Open a store from a URL: the one place that maps a URL to a backend.

Supported (see :data:`SCHEMES`):

- ``sqlite:///abs/path/linkedge.db`` (three slashes: an absolute path),
- ``sqlite:relative/path.db`` (relative to the working directory),
- ``sqlite::memory:`` (a private in-memory store, for tests),
- a bare file path (no ``scheme:`` prefix), which is SQLite;
- ``postgresql://user@host:port/db?sslmode=verify-full&sslrootcert=/path/ca.pem`` (also
  ``postgres://``): the PostgreSQL backend (:mod:`certstore.postgres`), shared by a
  fleet of nodes. The password comes from the URL, else from the `password` argument.

Anything else is a :class:`StoreError` naming the supported schemes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

from .errors import StoreError
from .ports import Store

SCHEMES = ("sqlite", "postgresql", "postgres")
_POSTGRES = ("postgresql", "postgres")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


def sqlite_path(url_or_path: str | Path) -> str:
    """The SQLite file a URL or path names (``:memory:`` for an in-memory store).
    Raises StoreError for a scheme no backend supports."""
    if isinstance(url_or_path, Path):
        return str(url_or_path)
    text = url_or_path.strip()
    if not text:
        raise StoreError("empty store URL (set store.url or store.path)")
    match = _SCHEME.match(text)
    if match is None:
        return text  # a bare path
    scheme = match.group(1).lower()
    if scheme in _POSTGRES:
        raise StoreError(f"store URL {_masked(text)} is not a SQLite store")
    if scheme != "sqlite":
        raise StoreError(
            f"unsupported store URL scheme {scheme!r} in {text!r}; supported: "
            + ", ".join(f"{s}:" for s in SCHEMES)
            + " (e.g. sqlite:///var/lib/linkedge/linkedge.db or"
            " postgresql://linkedge@db.internal/linkedge), or a bare file path"
        )
    rest = text[match.end() :]
    if rest.startswith("//"):
        authority, _, path = rest[2:].partition("/")
        if authority not in ("", "localhost"):
            raise StoreError(f"store URL {text!r}: a SQLite store is a local file (no host)")
        rest = "/" + path
        if rest == "/":
            raise StoreError(f"store URL {text!r} names no file")
    if not rest:
        raise StoreError(f"store URL {text!r} names no file")
    return unquote(rest)


def is_postgres_url(url_or_path: str | Path) -> bool:
    if isinstance(url_or_path, Path):
        return False
    match = _SCHEME.match(url_or_path.strip())
    return match is not None and match.group(1).lower() in _POSTGRES


def _masked(url: str) -> str:
    from .postgres.connect import mask_url

    return mask_url(url)


async def open_store(
    url_or_path: str | Path,
    key: bytes,
    *,
    clock: Callable[[], float] = time.time,
    password: str | None = None,
    pool_size: int | None = None,
    statement_timeout: float | None = None,
    connect_timeout: float | None = None,
) -> Store:
    """Open (creating and migrating when needed) the store `url_or_path` names.

    `key` is the 32-byte store key (:func:`certstore.load_key`); a key that does not open
    an existing store raises StoreKeyError. The store is shared: every worker process
    opens its own. `password` and `pool_size` concern a database server (PostgreSQL):
    the password when the URL has none, and the connections this store object may hold
    at most (SQLite ignores both); `statement_timeout` bounds each statement and pool acquire
    (expiry: StoreSlow), `connect_timeout` each new connection (expiry: StoreUnavailable).
    A server that cannot be reached raises
    :class:`certstore.errors.StoreUnavailable` within a few seconds.
    """
    if is_postgres_url(url_or_path):
        from .postgres import (
            DEFAULT_CONNECT_TIMEOUT,
            DEFAULT_POOL_SIZE,
            DEFAULT_TIMEOUT,
            PostgresStore,
        )

        return await PostgresStore.open(
            str(url_or_path).strip(),
            key,
            clock,
            password=password,
            pool_size=pool_size or DEFAULT_POOL_SIZE,
            bound=statement_timeout or DEFAULT_TIMEOUT,
            connect_timeout=connect_timeout or DEFAULT_CONNECT_TIMEOUT,
        )
    path = sqlite_path(url_or_path)
    from .sqlite import SQLiteStore

    return await SQLiteStore.open(path, key, clock=clock)
