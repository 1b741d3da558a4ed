"""Check 1, `cname`: does the tracking host reach the edge? (DNS work lives in dnscheck.)"""

from __future__ import annotations

from proxy.hosts.checks.model import CheckResult, CheckState
from proxy.hosts.dnscheck import CnameChecker, CnameResult, CnameStatus

_STATES = {
    CnameStatus.OK: CheckState.PASS,
    CnameStatus.VIA_ADDRESS: CheckState.WARN,
    CnameStatus.ELSEWHERE: CheckState.FAIL,
    CnameStatus.PROXIED: CheckState.FAIL,
    CnameStatus.NXDOMAIN: CheckState.FAIL,
    CnameStatus.UNKNOWN: CheckState.UNKNOWN,
}


def cname_result(result: CnameResult, target: str, issue_via_address: bool = True) -> CheckResult:
    """`issue_via_address` False: A/AAAA records at the edge without a CNAME fail
    (`checks.issue_via_address`), so such a host is never verified nor issued."""
    code = "dns_error" if result.status is CnameStatus.UNKNOWN else result.status.value
    state, reason = _STATES[result.status], result.reason
    if result.status is CnameStatus.VIA_ADDRESS and not issue_via_address:
        state = CheckState.FAIL
        reason = (
            f"resolves to the edge's addresses ({', '.join(result.addresses)}) without a CNAME;"
            f" this edge issues certificates only to hosts with a CNAME to {target}: add one"
        )
    return CheckResult(
        name="cname",
        state=state,
        code=code,
        reason=reason,
        details={
            "expected": target,
            "chain": list(result.chain),
            "points_to": result.first_target,
            "addresses": list(result.addresses),
        },
    )


async def check_cname(
    checker: CnameChecker, hostname: str, target: str, issue_via_address: bool = True
) -> CheckResult:
    return cname_result(await checker.check(hostname, target), target, issue_via_address)
