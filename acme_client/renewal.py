"""When to renew a certificate: pure functions, no I/O.

Two sources, as Let's Encrypt recommends:
- ARI (RFC 9773): the CA suggests a window; we pick a uniformly random moment in it.
- Otherwise a share of the lifetime: renew with 1/3 of it left (1/2 for certificates
  shorter than 10 days, so a 6-day certificate still has 3 days of retries).

The ratio rule is jittered: each certificate renews at a uniformly random moment in
the quarter of that remaining share *before* the nominal point, never after it. A
batch issued in the same second spreads over 1/12 of the lifetime (7.5 days for
90-day certificates, 18 hours for 6-day ones), so a fleet does not hit the CA at once.
"""

from __future__ import annotations

import base64
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

SHORT_LIVED_SECONDS = 10 * 86400
JITTER_SHARE = 0.25  # of the remaining-lifetime share, spent on spreading renewals
ARI_DEFAULT_POLL = 6 * 3600.0  # RFC 9773 §4.3.3: without Retry-After, poll about 4 times a day
ARI_MIN_POLL = 60.0
ARI_MAX_POLL = 86400.0


@dataclass(frozen=True, slots=True)
class RenewalWindow:
    start: float
    end: float

    def pick(self, uniform: Callable[[], float] = random.random) -> float:
        """A uniformly random moment in the window (RFC 9773 §4.2 asks for exactly this)."""
        return self.start + uniform() * max(self.end - self.start, 0.0)


def share_left_at_renewal(lifetime: float) -> float:
    return 1 / 2 if lifetime < SHORT_LIVED_SECONDS else 1 / 3


def ratio_window(not_before: float, not_after: float) -> RenewalWindow:
    """The window the lifetime rule allows: ends when 1/3 (or 1/2) of the lifetime is left."""
    lifetime = max(not_after - not_before, 0.0)
    share = share_left_at_renewal(lifetime)
    latest = not_after - lifetime * share
    return RenewalWindow(start=latest - lifetime * share * JITTER_SHARE, end=latest)


def ari_window(suggested_start: datetime, suggested_end: datetime) -> RenewalWindow | None:
    """The CA's window, or None when it is unusable (RFC 9773 §4.2: end must follow start)."""
    start, end = suggested_start.timestamp(), suggested_end.timestamp()
    if not (math.isfinite(start) and math.isfinite(end)) or end <= start:
        return None
    return RenewalWindow(start=start, end=end)


def next_ari_poll(now: float, retry_after: float | None) -> float:
    """When to ask the CA again: its Retry-After, clamped to one minute .. one day."""
    wait = ARI_DEFAULT_POLL if retry_after is None else retry_after
    return now + min(max(wait, ARI_MIN_POLL), ARI_MAX_POLL)


def ari_certificate_id(leaf: x509.Certificate) -> str:
    """RFC 9773 §4.1: base64url(AKI keyIdentifier) "." base64url(DER serial content octets)."""
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    if aki.key_identifier is None:
        raise ValueError("certificate has no authority key identifier")
    serial = leaf.serial_number
    # DER INTEGER content: big-endian two's complement, with a leading 0 when the top bit is set
    serial_bytes = serial.to_bytes((serial.bit_length() + 8) // 8, "big", signed=True)
    return f"{_b64url(aki.key_identifier)}.{_b64url(serial_bytes)}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")
