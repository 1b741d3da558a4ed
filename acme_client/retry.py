"""Retry of transient ACME failures, run inside the ACME worker threads.

The `acme` library retries badNonce exactly once; a CA that rejects many nonces
(Pebble's PEBBLE_WFE_NONCEREJECT, or a busy Let's Encrypt) needs more than that.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

import requests
from acme import errors as acme_errors
from acme import messages

from .errors import AcmeUnavailable

T = TypeVar("T")
log = logging.getLogger(__name__)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, messages.Error):
        if exc.code == "badNonce":
            return True
        typ = exc.typ or ""
        return typ.endswith(":serverInternal")
    if isinstance(exc, acme_errors.BadNonce | acme_errors.NonceError):
        return True
    if isinstance(exc, requests.exceptions.SSLError):
        return False  # a certificate problem does not fix itself
    if isinstance(exc, requests.ConnectionError | requests.Timeout):
        return True
    if isinstance(exc, acme_errors.ClientError) and exc.args:
        # a non-JSON error page: only a 5xx from a proxy in front of the CA is worth a retry
        response = exc.args[0][0] if isinstance(exc.args[0], tuple) else exc.args[0]
        return isinstance(response, requests.Response) and response.status_code >= 500
    return False


def with_retry(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int = 6,
    first_delay: float = 0.05,
    max_delay: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or attempt == attempts:
                if isinstance(exc, requests.RequestException):
                    raise AcmeUnavailable(f"{what}: {describe_network_error(exc)}") from exc
                raise
            log.info("%s: transient ACME error (%s), retry %d/%d", what, exc, attempt, attempts)
            sleep(delay * (0.5 + random.random()))
            delay = min(delay * 3, max_delay)
    raise AssertionError("unreachable")


def describe_network_error(exc: requests.RequestException) -> str:
    """The useful tail of a requests error, without urllib3's object reprs."""
    url = exc.request.url if exc.request is not None else None
    if isinstance(url, bytes):
        url = url.decode("ascii", "replace")
    reason: object = exc.args[0] if exc.args else exc
    reason = getattr(reason, "reason", reason)  # urllib3 MaxRetryError -> the cause
    text = str(reason)
    for marker in ("[Errno", "[SSL"):
        if marker in text:
            text = text[text.index(marker) :]
            break
    where = f" {url}" if url else ""
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS error talking to ACME server{where}: {text}"
    if isinstance(exc, requests.Timeout):
        return f"ACME server{where} timed out: {text}"
    return f"ACME server{where} unreachable: {text}"
