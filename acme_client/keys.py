"""Key, CSR and certificate helpers: a fresh ECDSA P-256 key per certificate."""

from __future__ import annotations

from dataclasses import dataclass

from acme import crypto_util
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def new_private_key_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_csr_pem(key_pem: bytes, hostname: str) -> bytes:
    return crypto_util.make_csr(key_pem, [hostname])


@dataclass(frozen=True, slots=True)
class CertificateFacts:
    names: tuple[str, ...]
    not_before: float
    not_after: float
    issuer: str
    serial: str  # lower-case hex, no separators


def certificate_facts(chain_pem: bytes) -> CertificateFacts:
    """Names, validity and issuer of the leaf (first) certificate of a PEM chain."""
    leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    return CertificateFacts(
        names=names,
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
        issuer=leaf.issuer.rfc4514_string(),
        serial=format(leaf.serial_number, "x"),
    )
