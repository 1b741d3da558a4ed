"""When to renew (acme_client.renewal): pure functions, no network."""

from __future__ import annotations

import datetime as dt
import random
from collections import Counter

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from acme_client.renewal import (
    ARI_DEFAULT_POLL,
    RenewalWindow,
    ari_certificate_id,
    ari_window,
    next_ari_poll,
    ratio_window,
)

DAY = 86400.0


@pytest.mark.parametrize(
    ("lifetime_days", "share_left"),
    [(90, 1 / 3), (45, 1 / 3), (10, 1 / 3), (9.99, 1 / 2), (6, 1 / 2), (160 / 24, 1 / 2)],
)
def test_ratio_window_ends_at_the_share_left_and_spreads_before_it(
    lifetime_days: float, share_left: float
) -> None:
    issued = 1_800_000_000.0
    lifetime = lifetime_days * DAY
    window = ratio_window(issued, issued + lifetime)
    assert window.end == pytest.approx(issued + lifetime - lifetime * share_left)
    assert window.end - window.start == pytest.approx(lifetime * share_left / 4)
    for u in (0.0, 0.5, 0.999999):
        assert window.start <= window.pick(lambda u=u: u) <= window.end


def test_six_day_certificate_keeps_three_days_for_retries() -> None:
    window = ratio_window(0.0, 6 * DAY)
    assert 6 * DAY - window.end == pytest.approx(3 * DAY)
    assert window.start > 0  # never "renew immediately after issuance"


@pytest.mark.parametrize(("lifetime_days", "min_spread_hours"), [(90, 179), (45, 89), (6, 17.9)])
def test_a_batch_issued_in_the_same_second_spreads_out(
    lifetime_days: float, min_spread_hours: float
) -> None:
    rng = random.Random(5)
    issued = 1_800_000_000.0
    window = ratio_window(issued, issued + lifetime_days * DAY)
    times = [window.pick(rng.random) for _ in range(10_000)]
    spread_hours = (max(times) - min(times)) / 3600
    per_minute = Counter(int(t // 60) for t in times)
    assert spread_hours >= min_spread_hours
    # uniform over the window: 10k renewals never pile up in one minute
    expected_per_minute = 10_000 / (window.end - window.start) * 60
    assert max(per_minute.values()) <= expected_per_minute * 4 + 10  # vs 10,000 unjittered


def test_ari_window_parsing_and_invalid_windows() -> None:
    start = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    window = ari_window(start, start + dt.timedelta(hours=2))
    assert window == RenewalWindow(start.timestamp(), start.timestamp() + 7200)
    assert ari_window(start, start) is None  # RFC 9773: end must be after start
    assert ari_window(start, start - dt.timedelta(seconds=1)) is None


def test_ari_poll_interval_follows_retry_after_within_bounds() -> None:
    assert next_ari_poll(1000.0, None) == 1000.0 + ARI_DEFAULT_POLL
    assert next_ari_poll(1000.0, 3600) == 4600.0
    assert next_ari_poll(1000.0, 0) == 1060.0  # at least a minute
    assert next_ari_poll(1000.0, 30 * DAY) == 1000.0 + DAY  # at most a day


def _cert(serial: int, key_id: bytes) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ari.test")])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.AuthorityKeyIdentifier(key_id, None, None), critical=False)
        .sign(key, hashes.SHA256())
    )


def test_ari_certificate_id_matches_rfc_9773_example() -> None:
    # RFC 9773 §4.1: keyIdentifier 69:88:5B:6B:87:46:40:41:E1:B3:7B:84:7B:A0:AE:2C:DE:01:C8:D4,
    # serial 00:87:65:43:21 (the leading zero keeps the INTEGER positive)
    key_id = bytes.fromhex("69885B6B87464041E1B37B847BA0AE2CDE01C8D4")
    cert = _cert(0x87654321, key_id)
    assert ari_certificate_id(cert) == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"
    assert ari_certificate_id(_cert(0x1234, key_id)).endswith(".EjQ")  # no padding byte
