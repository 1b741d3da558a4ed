"""Errors the rest of linkedge sees from ACME work, each with a plain message."""


class AcmeError(Exception):
    """An ACME operation failed; the message says what and why."""


class AcmeUnavailable(AcmeError):
    """The ACME server cannot be reached or answers garbage (transient)."""


class AuthorizationFailed(AcmeError):
    """The CA could not validate control of the name (its problem detail included)."""


class IssuanceTimeout(AcmeError):
    """The order did not complete within its deadline."""
