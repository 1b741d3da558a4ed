"""Names of the store's lease rows that guard a host (shared by issuance, renewal, removal)."""

from __future__ import annotations


def lease_name(hostname: str) -> str:
    """One lease per name for first issuance and renewal alike."""
    return f"issue:{hostname}"
