"""ACME orders, challenges, renewal timing, limits and revocation, on certbot's `acme`."""

from .errors import (
    AcmeError,
    AcmeUnavailable,
    AuthorizationFailed,
    IssuanceTimeout,
    OrderLimitReached,
    RateLimited,
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
from .solvers import ACME_TLS_ALPN, CHALLENGE_TYPES, ChallengeSink, tls_alpn01_certificate

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
    "ChallengeSink",
    "FailoverIssuer",
    "HostVerdict",
    "IssuanceTimeout",
    "IssuedCertificate",
    "LimitSettings",
    "OrderBudget",
    "OrderLimitReached",
    "OrderLimits",
    "RateLimited",
    "registered_domain",
    "tls_alpn01_certificate",
]
