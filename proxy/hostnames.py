"""Normalisation and validation of customer hostnames.

One canonical form everywhere (store keys, SNI lookups, ACME identifiers): IDNA
A-labels (UTS #46 mapping, so `LINKS.Bücher.test.` and `links.xn--bcher-kva.test`
are the same host), lower case, no trailing dot.
"""

from __future__ import annotations

import ipaddress
import re

import idna

MAX_NAME = 253
MAX_LABEL = 63
_LDH = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


class InvalidHostname(ValueError):
    """The text is not a hostname we can get a certificate for; the message says why."""


def normalize_hostname(text: str) -> str:
    name = text.strip()
    if not name:
        raise InvalidHostname("hostname is empty")
    if name.endswith("."):
        name = name[:-1]
    if _is_ip_literal(name):
        raise InvalidHostname(f"{text!r} is an IP address; only DNS names can be tracking hosts")
    if "*" in name:
        raise InvalidHostname(f"{text!r}: wildcards are not supported, register each host")
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise InvalidHostname(
                f"{text!r} is not a valid internationalised name: {exc}"
            ) from None
    name = name.lower()
    if len(name) > MAX_NAME:
        raise InvalidHostname(f"{text!r} is longer than {MAX_NAME} characters")
    labels = name.split(".")
    if len(labels) < 2:
        raise InvalidHostname(f"{text!r} needs at least two labels (e.g. links.example.com)")
    for label in labels:
        if not label:
            raise InvalidHostname(f"{text!r} has an empty label")
        if len(label) > MAX_LABEL:
            raise InvalidHostname(f"{text!r} has a label longer than {MAX_LABEL} characters")
        if not _LDH.match(label):
            raise InvalidHostname(
                f"{text!r}: label {label!r} may hold only letters, digits and inner hyphens"
            )
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except idna.IDNAError:
                raise InvalidHostname(f"{text!r}: {label!r} is not valid punycode") from None
    if labels[-1].isdigit():
        raise InvalidHostname(f"{text!r}: the top-level label cannot be numeric")
    return name


_HOST_HEADER = re.compile(r"^[a-z0-9.-]{1,253}$")


def host_header_name(value: str) -> str:
    """The name in a Host header in canonical form (lower case, no port, no trailing dot).

    The cheap part of normalize_hostname, for every request: "" for anything that
    cannot be a registered host (IP literals with brackets, non-ASCII, over-long
    names), so nothing odd is looked up or cached.
    """
    if value.count(":") > 1:  # [v6]:port or garbage
        return ""
    name = value.rsplit(":", 1)[0].rstrip(".").lower()
    return name if _HOST_HEADER.match(name) else ""


def display_hostname(name: str) -> str:
    """The Unicode form, for people; falls back to the A-label form."""
    try:
        return idna.decode(name)
    except idna.IDNAError:
        return name


def _is_ip_literal(name: str) -> bool:
    candidate = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True
