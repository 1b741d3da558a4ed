"""Storage of hosts, ACME accounts, certificates, challenges, coordination state and events.

The contract is :mod:`certstore.ports` (one protocol per role, composed as :class:`Store`);
a store is opened from a URL with :func:`open_store`. Backends live in this package and
are never named outside it.
"""

from .crypto import Sealer, StoreKeyError, generate_key_text, load_key
from .errors import StoreError, StoreSlow, StoreUnavailable
from .factory import SCHEMES, open_store
from .models import (
    AcmeAccount,
    CaBreakerState,
    Domain,
    DomainState,
    Event,
    HostBackoff,
    HostFile,
    HostImport,
    HostRecord,
    PendingOrder,
    RenewalPlan,
    StoredCertificate,
)
from .nodes import process_alive
from .ports import (
    KEEP,
    BackoffStore,
    BreakerStore,
    CertificateStore,
    ChallengeStore,
    Coordination,
    DomainExists,
    EventLog,
    HostContentStore,
    HostStore,
    HostTransfer,
    Keep,
    LeaseStore,
    PendingOrderStore,
    RateLog,
    RenewalStore,
    Store,
    StoreSummaries,
)

# The composite's earlier name, kept so call sites typed against it read the same.
CertStore = Store

__all__ = [
    "KEEP",
    "SCHEMES",
    "AcmeAccount",
    "BackoffStore",
    "BreakerStore",
    "CaBreakerState",
    "CertStore",
    "CertificateStore",
    "ChallengeStore",
    "Coordination",
    "Domain",
    "DomainExists",
    "DomainState",
    "Event",
    "EventLog",
    "HostBackoff",
    "HostContentStore",
    "HostFile",
    "HostImport",
    "HostRecord",
    "HostStore",
    "HostTransfer",
    "Keep",
    "LeaseStore",
    "PendingOrder",
    "PendingOrderStore",
    "RateLog",
    "RenewalPlan",
    "RenewalStore",
    "Sealer",
    "Store",
    "StoreError",
    "StoreKeyError",
    "StoreSummaries",
    "StoreSlow",
    "StoreUnavailable",
    "StoredCertificate",
    "generate_key_text",
    "load_key",
    "open_store",
    "process_alive",
]
