"""Errors every backend raises the same way."""

from __future__ import annotations


class StoreError(Exception):
    """The store cannot be opened or used (clear message, no traceback needed)."""


class StoreUnavailable(StoreError):
    """The store's server cannot be reached right now (down, restarting, unreachable, or
    too slow to answer within the bound): the call did not happen, or its outcome is
    unknown. Raised within a bounded time instead of hanging; the same store object
    works again once the server is back (no reopen)."""
