"""Check 1, `cname`: does the tracking host reach the edge? (DNS work lives in dnscheck.)"""

from __future__ import annotations

from ..dnscheck import CnameChecker, CnameResult, CnameStatus
from .model import CheckResult, CheckState

_STATES = {
    CnameStatus.OK: CheckState.PASS,
    CnameStatus.VIA_ADDRESS: CheckState.WARN,
    CnameStatus.ELSEWHERE: CheckState.FAIL,
    CnameStatus.PROXIED: CheckState.FAIL,
    CnameStatus.NXDOMAIN: CheckState.FAIL,
    CnameStatus.UNKNOWN: CheckState.UNKNOWN,
}


def cname_result(result: CnameResult, target: str) -> CheckResult:
    code = "dns_error" if result.status is CnameStatus.UNKNOWN else result.status.value
    return CheckResult(
        name="cname",
        state=_STATES[result.status],
        code=code,
        reason=result.reason,
        details={
            "expected": target,
            "chain": list(result.chain),
            "points_to": result.first_target,
            "addresses": list(result.addresses),
        },
    )


async def check_cname(checker: CnameChecker, hostname: str, target: str) -> CheckResult:
    return cname_result(await checker.check(hostname, target), target)
