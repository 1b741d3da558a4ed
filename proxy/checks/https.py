"""Check 3, `https`: a real TLS connection to the host, as a recipient's phone makes it.

The host is resolved with the configured DNS servers and reached on `checks.https_port`;
the chain is verified against `checks.ca_bundle` (the system store by default), with
the name and the dates. On a verification failure a second, non-verifying handshake
fetches the certificate that was served, so the reason can say what is wrong with it.
"Expiring" means less than a third of the certificate's lifetime is left: the point
where it should have been renewed, whatever the lifetime (45 days, 6 days, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.resolver
from cryptography import x509
from cryptography.x509.oid import NameOID

from .model import CheckResult, CheckState

# OpenSSL X509_V_ERR_* codes
_EXPIRED = 10
_NOT_YET_VALID = 9
_HOSTNAME_MISMATCH = 62
_DAY = 86400.0


class HttpsProber:
    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver,
        port: int,
        ca_bundle: str | None,
        timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._resolver = resolver
        self._port = port
        self._ca_bundle = ca_bundle
        self._timeout = timeout
        self._clock = clock
        self._verify_ctx: ssl.SSLContext | None = None

    async def _contexts(self) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        if self._verify_ctx is None:  # reading the trust store is file I/O: off the loop
            self._verify_ctx = await asyncio.to_thread(
                ssl.create_default_context, cafile=self._ca_bundle
            )
        raw = ssl.create_default_context()
        raw.check_hostname = False
        raw.verify_mode = ssl.CERT_NONE
        return self._verify_ctx, raw

    async def check(self, hostname: str) -> CheckResult:
        address = await self._address(hostname)
        if isinstance(address, CheckResult):
            return address
        where = f"{address}:{self._port}"
        details: dict[str, Any] = {"address": where}
        verify_ctx, raw_ctx = await self._contexts()
        try:
            der = await self._handshake(address, hostname, verify_ctx)
        except ssl.SSLCertVerificationError as exc:
            served = await self._served_certificate(address, hostname, raw_ctx)
            return self._verification_failure(hostname, exc, served, details)
        except ssl.SSLError as exc:
            return _unreachable(
                f"{where} refused the TLS handshake for {hostname} ({_ssl_reason(exc)})", details
            )
        except (OSError, TimeoutError) as exc:
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else "timed out"
            return _unreachable(f"cannot connect to {where}: {text}", details)
        cert = x509.load_der_x509_certificate(der)
        details.update(_describe(cert))
        now = self._clock()
        not_before = cert.not_valid_before_utc.timestamp()
        not_after = cert.not_valid_after_utc.timestamp()
        days_left = (not_after - now) / _DAY
        details["days_left"] = round(days_left, 2)
        if not_after - now < (not_after - not_before) / 3:
            return CheckResult(
                "https",
                CheckState.WARN,
                "expiring",
                f"valid certificate, but it expires in {days_left:.1f} days"
                " and has not been renewed",
                details,
            )
        return CheckResult(
            "https",
            CheckState.PASS,
            "valid",
            f"valid certificate from {details['issuer']}, expires in {days_left:.0f} days",
            details,
        )

    async def _address(self, hostname: str) -> str | CheckResult:
        try:
            answer = await self._resolver.resolve(hostname, "A", raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return _unreachable(f"{hostname} does not resolve", {})
        except dns.exception.DNSException as exc:
            return CheckResult(
                "https", CheckState.UNKNOWN, "dns_error", f"DNS lookup failed, will retry: {exc}"
            )
        if not answer.rrset:
            return _unreachable(f"{hostname} has no address record", {})
        return str(sorted(str(r) for r in answer.rrset)[0])

    async def _handshake(self, address: str, hostname: str, ctx: ssl.SSLContext) -> bytes:
        _reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                address, self._port, ssl=ctx, server_hostname=hostname, ssl_handshake_timeout=None
            ),
            self._timeout,
        )
        try:
            obj = writer.get_extra_info("ssl_object")
            der = obj.getpeercert(binary_form=True) if obj is not None else None
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
        if not der:
            raise ssl.SSLError("no certificate served")
        return bytes(der)

    async def _served_certificate(
        self, address: str, hostname: str, ctx: ssl.SSLContext
    ) -> x509.Certificate | None:
        try:
            return x509.load_der_x509_certificate(await self._handshake(address, hostname, ctx))
        except (OSError, TimeoutError, ValueError):
            return None

    def _verification_failure(
        self,
        hostname: str,
        exc: ssl.SSLCertVerificationError,
        served: x509.Certificate | None,
        details: dict[str, Any],
    ) -> CheckResult:
        if served is not None:
            details.update(_describe(served))
        code = exc.verify_code
        if code == _EXPIRED:
            when = details.get("not_after", "?")
            return CheckResult(
                "https", CheckState.FAIL, "expired", f"the certificate expired on {when}", details
            )
        if code == _HOSTNAME_MISMATCH:
            names = ", ".join(details.get("names", [])) or "other names"
            return CheckResult(
                "https",
                CheckState.FAIL,
                "wrong_certificate",
                f"the certificate served is for {names}, not {hostname}",
                details,
            )
        if code == _NOT_YET_VALID:
            reason = "the certificate is not valid yet (check the clocks)"
        else:
            issuer = details.get("issuer", "an unknown issuer")
            reason = f"the certificate is not trusted ({exc.verify_message}; issuer {issuer})"
        return CheckResult("https", CheckState.FAIL, "wrong_certificate", reason, details)


def _unreachable(reason: str, details: dict[str, Any]) -> CheckResult:
    return CheckResult("https", CheckState.FAIL, "unreachable", reason, details)


def _ssl_reason(exc: ssl.SSLError) -> str:
    reason = (exc.reason or str(exc)).lower().replace("_", " ")
    if "unrecognized name" in reason:
        return "TLS alert unrecognized_name: no certificate is served for this name"
    return reason


def _describe(cert: x509.Certificate) -> dict[str, Any]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = list(san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = []
    cn = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return {
        "names": names,
        "issuer": str(cn[0].value) if cn else cert.issuer.rfc4514_string(),
        "not_before": cert.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "not_after": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "serial": format(cert.serial_number, "x"),
    }
