"""The admin listener: JSON API (/v1), its OpenAPI document and the status page."""

from .app import make_admin_app
from .deps import AdminDeps

__all__ = ["AdminDeps", "make_admin_app"]
