"""Errors every backend raises the same way."""

from __future__ import annotations


class StoreError(Exception):
    """The store cannot be opened or used (clear message, no traceback needed)."""


class StoreUnavailable(StoreError):
    """The store's database cannot be reached now; retry later."""
