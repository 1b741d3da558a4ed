"""Check 3, `https`: a real TLS connection to the edge for the host, as a phone makes it.

It verifies the certificate *we* serve for the host, so it dials the edge's own
addresses, never what the customer's name resolves to: those are `checks.https_addresses`
when the operator lists them, else what `edge.cname_target` resolves to (A and AAAA).
The customer's host is only the SNI. Resolved addresses that are not public
(loopback, private, link-local, CGNAT 100.64/10, multicast, reserved, ...) are never
dialled: a customer cannot turn the check into a probe of internal networks, and
operator-listed addresses are the only way to check an edge on such addresses.

Every address is dialled (up to MAX_ADDRESSES, IPv6 and IPv4 alike); the worst
answer decides (a wrong certificate on one node is a wrong certificate for the
recipients it serves). Addresses that cannot be connected to from here (no IPv6
route, say) are listed in the details; only when none answers is the host unreachable.
The chain is verified against `checks.ca_bundle` (the system store by default), with
the name and the dates. On a verification failure a second, non-verifying handshake
fetches the certificate that was served, so the reason can say what is wrong with it.
"Expiring" means less than a third of the certificate's lifetime is left: the point
where it should have been renewed, whatever the lifetime (45 days, 6 days, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.resolver
from cryptography import x509
from cryptography.x509.oid import NameOID

from proxy.hosts.checks.model import CheckResult, CheckState

# OpenSSL X509_V_ERR_* codes
_EXPIRED = 10
_NOT_YET_VALID = 9
_HOSTNAME_MISMATCH = 62
_DAY = 86400.0
MAX_ADDRESSES = 8  # edge addresses dialled per check
_RANK = {CheckState.FAIL: 0, CheckState.UNKNOWN: 1, CheckState.WARN: 2, CheckState.PASS: 3}


def is_public(address: str) -> bool:
    """May the check dial this resolved address? Only globally routed unicast.

    Loopback, private (RFC 1918, ULA), link-local, CGNAT (100.64/10), multicast,
    reserved, unspecified and documentation ranges are not; neither is an IPv4-mapped
    IPv6 address of such an IPv4 address.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped
        if embedded is not None and not is_public(str(embedded)):
            return False
    return (
        ip.is_global
        and not ip.is_multicast
        and not ip.is_reserved
        and not ip.is_loopback
        and not ip.is_link_local
        and not ip.is_private
        and not ip.is_unspecified
    )


def _where(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class HttpsProber:
    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver,
        port: int,
        ca_bundle: str | None,
        timeout: float,
        clock: Callable[[], float] = time.time,
        *,
        edge_target: str,
        addresses: Sequence[str] = (),
    ) -> None:
        self._resolver = resolver
        self._port = port
        self._ca_bundle = ca_bundle
        self._timeout = timeout
        self._clock = clock
        self._edge_target = edge_target.rstrip(".").lower()
        self._listed = tuple(addresses)  # the operator's: dialled whatever their range
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
        """Handshakes with `hostname` as SNI to each of the edge's addresses."""
        addresses = await self.edge_addresses()
        if isinstance(addresses, CheckResult):
            return addresses
        probes = await asyncio.gather(*(self._probe(a, hostname) for a in addresses))
        answered = [result for result, connected in probes if connected]
        tried = [_where(a, self._port) for a in addresses]
        unreachable = [r.details["address"] for r, connected in probes if not connected]
        if not answered:
            reasons = "; ".join(r.reason for r, _ in probes)
            return _unreachable(reasons, {"address": tried[0], "addresses": tried})
        worst = min(answered, key=lambda r: _RANK.get(r.state, 0))
        details = {**worst.details, "addresses": tried, "unreachable": unreachable}
        return CheckResult(worst.name, worst.state, worst.code, worst.reason, details)

    async def edge_addresses(self) -> tuple[str, ...] | CheckResult:
        """What to dial: the listed addresses, or the edge target's public ones."""
        if self._listed:
            return self._listed[:MAX_ADDRESSES]
        found: list[str] = []
        for rdtype in ("AAAA", "A"):
            try:
                answer = await self._resolver.resolve(
                    self._edge_target, rdtype, raise_on_no_answer=False
                )
            except dns.resolver.NXDOMAIN:
                break
            except dns.exception.DNSException as exc:
                return CheckResult(
                    "https",
                    CheckState.UNKNOWN,
                    "dns_error",
                    f"cannot resolve the edge ({self._edge_target}), will retry: {exc}",
                )
            if answer.rrset:
                found.extend(sorted(str(r) for r in answer.rrset))
        public = [a for a in found if is_public(a)]
        if not public:
            shown = ", ".join(found) or "no address"
            return CheckResult(
                "https",
                CheckState.UNKNOWN,
                "no_edge_address",
                f"the edge {self._edge_target} has no public address to check ({shown});"
                " the operator can list the edge's addresses in checks.https_addresses",
                {"edge_addresses": found},
            )
        return tuple(public[:MAX_ADDRESSES])

    async def _probe(self, address: str, hostname: str) -> tuple[CheckResult, bool]:
        """One address: (result, whether a TLS server answered there)."""
        where = _where(address, self._port)
        details: dict[str, Any] = {"address": where}
        verify_ctx, raw_ctx = await self._contexts()
        try:
            der = await self._handshake(address, hostname, verify_ctx)
        except ssl.SSLCertVerificationError as exc:
            served = await self._served_certificate(address, hostname, raw_ctx)
            return self._verification_failure(hostname, exc, served, details), True
        except ssl.SSLError as exc:
            reason = f"{where} refused the TLS handshake for {hostname} ({_ssl_reason(exc)})"
            return _unreachable(reason, details), True
        except (OSError, TimeoutError) as exc:
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else "timed out"
            return _unreachable(f"cannot connect to {where}: {text}", details), False
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
            ), True
        return CheckResult(
            "https",
            CheckState.PASS,
            "valid",
            f"valid certificate from {details['issuer']}, expires in {days_left:.0f} days",
            details,
        ), True

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
