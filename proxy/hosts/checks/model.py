"""What a check says: a machine-readable state and code, and one sentence for a person."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class CheckState(enum.StrEnum):
    PASS = "pass"  # noqa: S105 (not a password)
    WARN = "warn"  # works, but needs attention (expiring soon, A records instead of a CNAME)
    FAIL = "fail"
    UNKNOWN = "unknown"  # could not tell (SERVFAIL, timeout): retried, never counted as failure
    SKIPPED = "skipped"  # not run because another check has to pass first


CHECK_NAMES = ("cname", "caa", "https")


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str  # one of CHECK_NAMES
    state: CheckState
    code: str  # stable machine-readable detail, e.g. "proxied", "forbidden", "expiring"
    reason: str  # one sentence a customer can act on
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.state in (CheckState.PASS, CheckState.WARN)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state.value,
            "code": self.code,
            "reason": self.reason,
            "details": dict(self.details),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CheckResult:
        return cls(
            name=str(data["name"]),
            state=CheckState(data["state"]),
            code=str(data["code"]),
            reason=str(data["reason"]),
            details=dict(data.get("details") or {}),
        )


@dataclass(frozen=True, slots=True)
class CheckReport:
    hostname: str
    checked_at: float
    results: tuple[CheckResult, ...]

    def get(self, name: str) -> CheckResult | None:
        return next((r for r in self.results if r.name == name), None)

    @property
    def reaches_edge(self) -> bool:
        cname = self.get("cname")
        return cname is not None and cname.passed

    @property
    def may_issue(self) -> bool:
        """CNAME reaches us and CAA does not forbid our CA (unknown CAA does not block)."""
        caa = self.get("caa")
        return self.reaches_edge and (caa is None or caa.state is not CheckState.FAIL)

    @property
    def first_problem(self) -> CheckResult | None:
        return next((r for r in self.results if r.state is CheckState.FAIL), None) or next(
            (r for r in self.results if r.state in (CheckState.UNKNOWN, CheckState.WARN)), None
        )

    @property
    def summary(self) -> str:
        problem = self.first_problem
        if problem is None:
            return "all checks pass"
        return f"{problem.name}: {problem.reason}"

    def with_result(self, result: CheckResult) -> CheckReport:
        kept = tuple(r for r in self.results if r.name != result.name)
        ordered = sorted((*kept, result), key=lambda r: CHECK_NAMES.index(r.name))
        return CheckReport(self.hostname, self.checked_at, tuple(ordered))

    def to_json(self) -> dict[str, Any]:
        return {
            "hostname": self.hostname,
            "checked_at": self.checked_at,
            "checks": [r.to_json() for r in self.results],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CheckReport:
        return cls(
            hostname=str(data["hostname"]),
            checked_at=float(data["checked_at"]),
            results=tuple(CheckResult.from_json(r) for r in data.get("checks", [])),
        )
