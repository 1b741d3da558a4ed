"""Connecting to PostgreSQL: URL handling, password masking, which errors mean "down".

The URL is libpq's (``postgresql://user[:password]@host[:port]/db?sslmode=...``, also
``postgres://``); asyncpg reads it, including ``sslmode`` and ``sslrootcert`` for TLS to
the database. A password in the URL wins over the one given separately (from
``store.password_file`` / ``store.password_env``). No message ever shows a password:
:func:`mask_url` replaces it.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from ..errors import StoreError, StoreUnavailable

SCHEMES = ("postgresql", "postgres")


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for messages and logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "postgresql://***"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def url_has_password(url: str) -> bool:
    return _url_password(url) is not None


def connect_kwargs(url: str, password: str | None, timeout: float) -> dict[str, Any]:
    """What asyncpg.connect / create_pool take for this URL."""
    kwargs: dict[str, Any] = {"dsn": url, "timeout": timeout}
    if password is not None and not url_has_password(url):
        kwargs["password"] = password
    return kwargs


# Errors that say "the server cannot be reached or is going away" (retry later), as
# opposed to a refusal that needs an operator (wrong password, unknown database, bad
# certificate) or a bug.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable, DNS (ssl.SSLError is sorted out before)
    asyncio.TimeoutError,  # connect, acquire or command timeout
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.exceptions.CannotConnectNowError,  # starting up / shutting down
    asyncpg.exceptions.OperatorInterventionError,  # admin/crash shutdown, cancelled
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InterfaceError,  # "connection is closed", pool closing
    # a pooled connection the server is terminating (fast shutdown) when the next query
    # starts: "cannot switch to state 12; another operation (2) is in progress"
    asyncpg.exceptions.InternalClientError,
)
REFUSED: tuple[type[BaseException], ...] = (
    ssl.SSLError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,  # class 28: auth failed
    asyncpg.exceptions.InvalidCatalogNameError,  # no such database
    asyncpg.exceptions.ClientConfigurationError,
)


def describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def translate(exc: BaseException, url: str, password: str | None) -> StoreError | None:
    """The StoreError to raise instead of `exc` (None: not a connection problem)."""
    if isinstance(exc, REFUSED):
        error: StoreError = StoreError(
            f"PostgreSQL store {mask_url(url)} refused the connection: {describe(exc)}"
        )
    elif isinstance(exc, UNAVAILABLE):
        error = StoreUnavailable(f"PostgreSQL store {mask_url(url)} unavailable: {describe(exc)}")
    else:
        return None
    message = error.args[0]
    for secret in (password, _url_password(url)):
        if secret and secret in message:  # asyncpg never echoes one; be sure
            message = message.replace(secret, "***")
    return type(error)(message)


def _url_password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None
