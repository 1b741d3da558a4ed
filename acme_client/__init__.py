"""ACME orders, challenges and (later) renewal, on top of certbot's `acme` library."""

from .errors import AcmeError, AcmeUnavailable, AuthorizationFailed, IssuanceTimeout
from .issuer import AcmeIssuer, AcmeSettings, ChallengeSink, IssuedCertificate

__all__ = [
    "AcmeError",
    "AcmeIssuer",
    "AcmeSettings",
    "AcmeUnavailable",
    "AuthorizationFailed",
    "ChallengeSink",
    "IssuanceTimeout",
    "IssuedCertificate",
]
