"""Normalisation and validation of customer hostnames.

One canonical form everywhere (store keys, SNI lookups, ACME identifiers): IDNA
A-labels (UTS #46 mapping, so `LINKS.Bücher.test.` and `links.xn--bcher-kva.test`
are the same host), lower case, no trailing dot.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

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


_REG_NAME = re.compile(r"^[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*\.?$")
_PORT = re.compile(r"^[0-9]{1,5}$")


class BadHostHeader(ValueError):
    """A Host header (or request-target authority) that is not `host[:port]`."""


@dataclass(frozen=True, slots=True)
class HostHeader:
    """A request's Host, parsed and normalised: the one value every decision uses.

    `name` is lower case without a trailing dot; an IPv6 literal keeps its brackets.
    `lookup` is what per-host policy is keyed by: "" for IP literals, which can never
    be registered hosts.
    """

    name: str
    port: int | None = None
    is_ip: bool = False

    @property
    def lookup(self) -> str:
        return "" if self.is_ip else self.name

    def __str__(self) -> str:
        return self.name if self.port is None else f"{self.name}:{self.port}"


# Every click parses its Host, and clicks come from few hosts: the parsed (immutable)
# values of the most recent ones are kept. Refusals raise, so they are never cached.
@functools.lru_cache(maxsize=1024)
def parse_host_header(value: str) -> HostHeader:
    """RFC 9110 §7.2 / RFC 3986 §3.2.2: `host [ ":" port ]`, strictly.

    host is a DNS-style name (letters, digits, `-`, `_`, dots; labels of 1-63,
    at most 253 in all; one trailing dot allowed), a dotted IPv4 address or a
    bracketed IPv6 address. Anything else (other bytes, spaces, userinfo, empty
    labels, a port that is not 0-65535) raises BadHostHeader.
    """
    if not value or not value.isascii() or len(value) > MAX_NAME + 8:
        raise BadHostHeader("Host must be host[:port] in ASCII")
    port: int | None = None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise BadHostHeader("unterminated IPv6 literal in Host")
        literal, rest = value[1:end], value[end + 1 :]
        try:
            address = ipaddress.IPv6Address(literal)
        except ValueError:
            raise BadHostHeader("bad IPv6 literal in Host") from None
        if rest:
            if not rest.startswith(":"):
                raise BadHostHeader("Host must be host[:port]")
            port = _port(rest[1:])
        return HostHeader(f"[{address.compressed}]", port, True)
    name, colon, port_text = value.partition(":")
    if colon:
        port = _port(port_text)
    if not _REG_NAME.match(name) or len(name.rstrip(".")) > MAX_NAME:
        raise BadHostHeader("Host must be host[:port]")
    name = name.rstrip(".").lower()
    if not name.replace(".", "").isdigit():  # a name (an IPv4 address is digits and dots)
        return HostHeader(name, port, False)
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        raise BadHostHeader("Host is neither a name nor an IPv4 address") from None
    return HostHeader(name, port, True)


def _port(text: str) -> int:
    if not _PORT.match(text) or int(text) > 65535:
        raise BadHostHeader("the port in Host must be a number from 0 to 65535")
    return int(text)


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
