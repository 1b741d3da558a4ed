"""Errors the rest of linkedge sees from ACME work, each with a plain message."""


class AcmeError(Exception):
    """An ACME operation failed; the message says what and why."""

    # authorizations this attempt left invalid at the CA (Let's Encrypt limits them per hour)
    failed_authorizations: int = 0


class AcmeUnavailable(AcmeError):
    """The ACME server cannot be reached or answers garbage (transient)."""


class CaUnavailable(AcmeUnavailable):
    """Not even tried: the CA's circuit breaker is open (see breaker.py).

    `retry_at` is when the breaker's next probe may go (None: unknown).
    """

    def __init__(self, message: str, retry_at: float | None = None) -> None:
        super().__init__(message)
        self.retry_at = retry_at


class AuthorizationFailed(AcmeError):
    """The CA could not validate control of the name (its problem detail included)."""


class IssuanceTimeout(AcmeError):
    """The order did not complete within its deadline."""


class RateLimited(AcmeError):
    """An order was not placed (our limiter) or refused by the CA (`rateLimited`).

    `retry_at` is when trying again may succeed (None: unknown).
    """

    def __init__(self, message: str, retry_at: float | None = None) -> None:
        super().__init__(message)
        self.retry_at = retry_at


class OrderLimitReached(RateLimited):
    """Our own limiter said no (limits.py): a decision, not a CA failure."""


def falls_back(exc: AcmeError) -> bool:
    """Is this the CA's trouble rather than the host's, so another CA may do better?

    A failed validation usually repeats at any CA (wrong DNS, port closed); a CAA
    record that names only the other CA is the exception.
    """
    if isinstance(exc, OrderLimitReached):
        return False
    if isinstance(exc, AuthorizationFailed):
        return "caa" in str(exc).lower()
    return True


def is_ca_failure(exc: AcmeError) -> bool:
    """The CA's trouble, not the host's: unreachable, timing out, 5xx, `serverInternal`,
    `rateLimited` answers. These open the CA's circuit breaker and never count against
    the host (no backoff step, no failed state); everything else is about the host."""
    if isinstance(exc, OrderLimitReached):
        return False  # our own limiter: a decision, not a failure
    return isinstance(exc, AcmeUnavailable | RateLimited)
