"""Storage of domains, ACME account, certificates, challenge tokens, leases and events."""

from .base import CertStore, DomainExists
from .crypto import SecretBox, StoreKeyError, generate_key_text, load_key
from .models import (
    AcmeAccount,
    CaBreakerState,
    Domain,
    DomainState,
    Event,
    HostBackoff,
    HostFile,
    PendingOrder,
    RenewalPlan,
    StoredCertificate,
)
from .sqlite import SQLiteStore, StoreError

__all__ = [
    "AcmeAccount",
    "CaBreakerState",
    "CertStore",
    "Domain",
    "DomainExists",
    "DomainState",
    "Event",
    "HostBackoff",
    "HostFile",
    "PendingOrder",
    "RenewalPlan",
    "SQLiteStore",
    "SecretBox",
    "StoreError",
    "StoreKeyError",
    "StoredCertificate",
    "generate_key_text",
    "load_key",
]
