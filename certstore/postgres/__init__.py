"""PostgreSQL backend of the storage contract (fleet mode: many nodes, one database).

Opened through :func:`certstore.open_store` with a ``postgresql://`` (or ``postgres://``)
URL; nothing outside `certstore` names :class:`PostgresStore`.
"""

from .connect import SCHEMES, mask_url
from .store import DEFAULT_CONNECT_TIMEOUT, DEFAULT_POOL_SIZE, DEFAULT_TIMEOUT, PostgresStore

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_POOL_SIZE",
    "DEFAULT_TIMEOUT",
    "SCHEMES",
    "PostgresStore",
    "mask_url",
]
