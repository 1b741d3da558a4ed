"""Errors every backend raises the same way."""

from __future__ import annotations


class StoreError(Exception):
    """The store cannot be opened or used (clear message, no traceback needed)."""


class StoreUnavailable(StoreError):
    """The store's server cannot be reached right now (down, restarting, unreachable, or
    too slow to answer within the bound): the call did not happen, or its outcome is
    unknown. Raised within a bounded time instead of hanging; the same store object
    works again once the server is back (no reopen)."""


class StoreSlow(StoreUnavailable):
    """One call took longer than its bound (a statement's or a pool acquire's timeout, a
    server with no connection to spare), while nothing says the server is unreachable: a
    transient failure of that call only. A StoreUnavailable, so every caller already
    treats it as "retry later"; the read-through circuit does not open for it alone."""
