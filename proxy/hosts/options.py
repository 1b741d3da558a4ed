"""Per-host options: a small JSON object per host, validated against a declared schema.

Each field declares its JSON type(s), default and a check; unknown fields are
rejected so a typo never silently does nothing. Extend by adding to FIELDS (the
OpenAPI document is generated from it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

MAX_HSTS_AGE = 2 * 365 * 86400  # two years, the preload list's ceiling


class OptionsError(ValueError):
    """The options object is not valid; the message names the field and the problem."""


@dataclass(frozen=True, slots=True)
class OptionField:
    json_types: tuple[str, ...]  # "integer", "boolean", "string", "null"
    default: Any
    description: str
    check: Callable[[Any], str | None] = lambda _v: None  # returns a problem or None


def _hsts_age(value: Any) -> str | None:
    if value is None:
        return None
    if not 0 <= value <= MAX_HSTS_AGE:
        return f"must be between 0 and {MAX_HSTS_AGE} seconds"
    return None


FIELDS: dict[str, OptionField] = {
    "hsts_max_age": OptionField(
        ("integer", "null"),
        None,
        "Send Strict-Transport-Security with this max-age on HTTPS (never includeSubDomains"
        " or preload); null: no HSTS header.",
        _hsts_age,
    ),
    "https_upgrade": OptionField(
        ("boolean",),
        False,
        "Redirect plain-HTTP requests to HTTPS (except ACME challenges).",
    ),
}


def defaults() -> dict[str, Any]:
    return {name: field.default for name, field in FIELDS.items()}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int in Python
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def validate(data: Any) -> dict[str, Any]:
    """The complete options object (defaults filled in) or OptionsError."""
    if not isinstance(data, Mapping):
        raise OptionsError("options must be a JSON object")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise OptionsError(f"unknown option {unknown[0]!r} (known: {', '.join(sorted(FIELDS))})")
    result = defaults()
    for name, value in data.items():
        field = FIELDS[name]
        kind = _json_type(value)
        if kind not in field.json_types:
            raise OptionsError(f"{name} must be {' or '.join(field.json_types)}, not {kind}")
        problem = field.check(value)
        if problem:
            raise OptionsError(f"{name} {problem}")
        result[name] = value
    return result


def json_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            name: {
                "type": list(field.json_types)
                if len(field.json_types) > 1
                else field.json_types[0],
                "default": field.default,
                "description": field.description,
            }
            for name, field in FIELDS.items()
        },
    }
