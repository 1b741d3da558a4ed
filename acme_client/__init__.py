"""ACME orders, challenges, renewal timing, limits and revocation, on certbot's `acme`."""

from .breaker import BreakerSettings, CaBreaker
from .errors import (
    AcmeError,
    AcmeUnavailable,
    AuthorizationFailed,
    CaUnavailable,
    IssuanceTimeout,
    OrderLimitReached,
    RateLimited,
    is_ca_failure,
)
from .failover import FailoverIssuer
from .issuer import (
    CESSATION_OF_OPERATION,
    AcmeIssuer,
    AcmeSettings,
    AriAnswer,
    IssuedCertificate,
    OrderBudget,
)
from .limits import HostVerdict, LimitSettings, OrderLimits, registered_domain
from .solvers import (
    ACME_TLS_ALPN,
    CHALLENGE_TYPES,
    ChallengeSink,
    PublishedAnswers,
    tls_alpn01_certificate,
)

__all__ = [
    "ACME_TLS_ALPN",
    "CESSATION_OF_OPERATION",
    "CHALLENGE_TYPES",
    "AcmeError",
    "AcmeIssuer",
    "AcmeSettings",
    "AcmeUnavailable",
    "AriAnswer",
    "AuthorizationFailed",
    "BreakerSettings",
    "CaBreaker",
    "CaUnavailable",
    "ChallengeSink",
    "FailoverIssuer",
    "HostVerdict",
    "IssuanceTimeout",
    "IssuedCertificate",
    "LimitSettings",
    "OrderBudget",
    "OrderLimitReached",
    "OrderLimits",
    "PublishedAnswers",
    "RateLimited",
    "is_ca_failure",
    "registered_domain",
    "tls_alpn01_certificate",
]
