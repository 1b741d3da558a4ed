"""Check 2, `caa`: do the host's CAA records let our CA issue for it? (RFC 8659, RFC 8657)

The relevant record set is found by climbing from the host towards the root, stopping
at the first name that has CAA records; the lookup at each name follows CNAMEs like
any other query (RFC 8659 §3), so a CNAME'd host uses its target's CAA records if
it has some, and otherwise its own parents'. SERVFAIL and timeouts are "unknown".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.resolver

from proxy.hosts.checks.model import CheckResult, CheckState

# Property tags this check understands; any other tag flagged critical forbids issuance.
_KNOWN_TAGS = {"issue", "issuewild", "iodef", "contactemail", "contactphone", "issuemail"}
_CRITICAL = 0x80
CHALLENGE = "http-01"


@dataclass(frozen=True, slots=True)
class CaaRecord:
    flags: int
    tag: str
    value: str

    @property
    def text(self) -> str:
        return f'{self.flags} {self.tag} "{self.value}"'


@dataclass(frozen=True, slots=True)
class CaaVerdict:
    permitted: bool
    reason: str


def evaluate(
    records: Sequence[CaaRecord], owner: str, issuer: str, account_uri: str | None = None
) -> CaaVerdict:
    """RFC 8659 §4 for a non-wildcard name, plus RFC 8657's accounturi/validationmethods."""
    issuer = issuer.lower()
    for record in records:
        if record.flags & _CRITICAL and record.tag.lower() not in _KNOWN_TAGS:
            return CaaVerdict(
                False, f"CAA at {owner} has a critical property {record.tag!r} no CA may ignore"
            )
    issue = [r for r in records if r.tag.lower() == "issue"]
    if not issue:
        return CaaVerdict(True, f"CAA at {owner} does not restrict issuance (no issue property)")
    allowed: list[str] = []
    for record in issue:
        domain, _, params_text = record.value.partition(";")
        domain = domain.strip().lower()
        if domain:
            allowed.append(domain)
        if domain != issuer:
            continue
        params = _parameters(params_text)
        methods = params.get("validationmethods")
        if methods is not None and CHALLENGE not in [m.strip() for m in methods.split(",")]:
            return CaaVerdict(
                False,
                f"CAA at {owner} allows {issuer} only with validationmethods={methods};"
                f" this edge validates with {CHALLENGE}",
            )
        bound = params.get("accounturi")
        if bound is not None and account_uri is not None and bound != account_uri:
            return CaaVerdict(
                False, f"CAA at {owner} binds {issuer} to another ACME account ({bound})"
            )
        return CaaVerdict(True, f"CAA at {owner} permits {issuer}")
    who = ", ".join(sorted(set(allowed))) or "no CA at all"
    return CaaVerdict(
        False,
        f'CAA at {owner} allows only {who}; add the record `{owner}. CAA 0 issue "{issuer}"`',
    )


def _parameters(text: str) -> dict[str, str]:
    params = {}
    for part in text.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep:
            params[key.strip().lower()] = value.strip()
    return params


def _candidates(hostname: str) -> list[str]:
    labels = hostname.rstrip(".").split(".")
    return [".".join(labels[i:]) for i in range(len(labels))]


async def check_caa(
    resolver: dns.asyncresolver.Resolver,
    hostname: str,
    issuer: str,
    account_uri: str | None = None,
) -> CheckResult:
    details: dict[str, object] = {"issuer": issuer}
    for name in _candidates(hostname):
        try:
            answer = await resolver.resolve(name, "CAA", raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            continue
        except dns.exception.DNSException as exc:
            return CheckResult(
                "caa",
                CheckState.UNKNOWN,
                "dns_error",
                f"CAA lookup for {name} failed, will retry: {exc}",
                details,
            )
        if not answer.rrset:
            continue
        owner = str(answer.rrset.name).rstrip(".").lower()
        records = [
            CaaRecord(
                int(r.flags), r.tag.decode("ascii", "replace"), r.value.decode("utf-8", "replace")
            )
            for r in answer.rrset
        ]
        verdict = evaluate(records, owner, issuer, account_uri)
        details.update(owner=owner, queried=name, records=[r.text for r in records])
        if verdict.permitted:
            return CheckResult("caa", CheckState.PASS, "permitted", verdict.reason, details)
        return CheckResult("caa", CheckState.FAIL, "forbidden", verdict.reason, details)
    return CheckResult(
        "caa",
        CheckState.PASS,
        "no_records",
        f"no CAA records for {hostname} or its parents: any CA may issue",
        details,
    )
