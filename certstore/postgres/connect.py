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

from ..errors import StoreError, StoreSlow, StoreUnavailable

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
    """What asyncpg.connect / create_pool take for this URL (`timeout`: to connect)."""
    kwargs: dict[str, Any] = {"dsn": url, "timeout": timeout}
    if password is not None and not url_has_password(url):
        kwargs["password"] = password
    return kwargs


class ConnectTimeout(ConnectionError):
    """Opening a connection took longer than the connect timeout: the server (or the
    way to it) is not answering. Kept apart from a statement's or a pool acquire's
    timeout, which only says that one call was slow (a busy worker, a busy pool)."""


async def connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
    """asyncpg.connect, with its timeout told apart (the pool's `connect`)."""
    try:
        return await asyncpg.connect(*args, **kwargs)
    except TimeoutError as exc:
        raise ConnectTimeout(f"connect timed out after {kwargs.get('timeout')} s") from exc


# Errors that say "this one call was slow": a statement's timeout (the server is asked
# to cancel it), a pool acquire's (every connection busy), a server too busy for another
# connection. In a busy worker they fire while the database idles (the event loop did not
# get to read the answer), so they are no evidence of an outage: StoreSlow, which the
# read-through circuit does not take for one (it checks with a fresh connection first).
# Checked before UNAVAILABLE (TimeoutError is an OSError).
SLOW: tuple[type[BaseException], ...] = (
    asyncio.TimeoutError,  # acquire or command timeout (a connect's is ConnectTimeout)
    asyncpg.exceptions.QueryCanceledError,  # statement_timeout, a cancel
    asyncpg.exceptions.TooManyConnectionsError,  # it answered: busy, not gone
)
# Errors that say "the server cannot be reached or is going away" (retry later), as
# opposed to a refusal that needs an operator (wrong password, unknown database, bad
# certificate) or a bug.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable, DNS, ConnectTimeout (ssl.SSLError sorted out before)
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.exceptions.CannotConnectNowError,  # starting up / shutting down
    asyncpg.exceptions.OperatorInterventionError,  # admin/crash shutdown, cancelled
    asyncpg.exceptions.InterfaceError,  # "connection is closed", pool closing
    # a pooled connection the server is terminating (fast shutdown) when the next query
    # starts: "cannot switch to state 12; another operation (2) is in progress"
    asyncpg.exceptions.InternalClientError,
)
# Errors after which a pooled connection's state is unknown (the server went away
# mid-call, asyncpg's protocol was left mid-operation): it is terminated instead of
# returned, since the pool runs no reset query that would find out (PostgresStore.open).
# Not a timeout: asyncpg cancels the statement and waits for that on release.
BROKEN: tuple[type[BaseException], ...] = (
    ConnectionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InterfaceError,
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
    elif isinstance(exc, SLOW) and not isinstance(exc, ConnectTimeout):
        error = StoreSlow(f"PostgreSQL store {mask_url(url)} too slow: {describe(exc)}")
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
