"""The checks a customer sees for each tracking host: cname, caa, https."""

from proxy.hosts.checks.model import CHECK_NAMES, CheckReport, CheckResult, CheckState
from proxy.hosts.checks.runner import CheckSettings, HostChecker

__all__ = [
    "CHECK_NAMES",
    "CheckReport",
    "CheckResult",
    "CheckSettings",
    "CheckState",
    "HostChecker",
]
