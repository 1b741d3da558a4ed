"""The admin listener: JSON API (/v1), its OpenAPI document and the status page."""

from proxy.admin.app import make_admin_app
from proxy.admin.deps import AdminDeps

__all__ = ["AdminDeps", "make_admin_app"]
