"""Only for tests/test_store.py, which the parallel i10-store branch owns: once merged,
it imports `support.clicks` (and `support.edge.EdgeHandle`, not conftest) and this file goes."""

from support.clicks import certify, edge_store

__all__ = ["certify", "edge_store"]
