"""proxy.wire.hostnames: one canonical form for every customer hostname, and what is refused."""

from __future__ import annotations

import pytest

from proxy.wire.hostnames import InvalidHostname, display_hostname, normalize_hostname


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("links.example.com", "links.example.com"),
        ("LINKS.Example.COM", "links.example.com"),
        ("links.example.com.", "links.example.com"),
        ("  links.example.com  ", "links.example.com"),
        ("Bücher.Example.", "xn--bcher-kva.example"),
        ("LINKS.Bücher.test.", "links.xn--bcher-kva.test"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("XN--BCHER-KVA.EXAMPLE", "xn--bcher-kva.example"),
        ("links。bücher。test", "links.xn--bcher-kva.test"),  # ideographic full stops
        ("a--b.example.com", "a--b.example.com"),
        ("123.example.com", "123.example.com"),  # numeric labels are fine below the TLD
        ("a" * 63 + ".example", "a" * 63 + ".example"),
        ("x1.y2.z3", "x1.y2.z3"),
    ],
)
def test_accepted_names(text: str, expected: str) -> None:
    assert normalize_hostname(text) == expected
    # canonical form is a fixed point
    assert normalize_hostname(expected) == expected


def test_idn_round_trip() -> None:
    a_label = normalize_hostname("Bücher.Example.")
    assert a_label == "xn--bcher-kva.example"
    assert display_hostname(a_label) == "bücher.example"
    assert normalize_hostname(display_hostname(a_label)) == a_label
    # not decodable: shown as is
    assert display_hostname("xn--zz.example") == "xn--zz.example"


def test_longest_names() -> None:
    label = "a" * 63
    name_253 = ".".join([label, label, label, "b" * 61])
    assert len(name_253) == 253
    assert normalize_hostname(name_253) == name_253
    assert normalize_hostname(name_253 + ".") == name_253  # the root dot does not count
    with pytest.raises(InvalidHostname, match="longer than 253"):
        normalize_hostname(name_253 + "b")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("   ", "empty"),
        (".", "two labels"),
        ("localhost", "two labels"),
        ("links", "two labels"),
        ("127.0.0.1", "IP address"),
        ("127.0.0.1.", "IP address"),
        ("::1", "IP address"),
        ("[::1]", "IP address"),
        ("[2001:db8::1]", "IP address"),
        ("2001:db8::1", "IP address"),
        ("127.1", "numeric"),
        ("0x7f.1", "numeric"),
        ("*.example.com", "wildcard"),
        ("links.*.example.com", "wildcard"),
        ("a" * 64 + ".example", "longer than 63"),
        ("_dmarc.example.com", "letters, digits"),
        ("under_score.example.com", "letters, digits"),
        ("-links.example.com", "letters, digits"),
        ("links-.example.com", "letters, digits"),
        ("links .example.com", "letters, digits"),
        ("links.example.com:443", "letters, digits"),
        ("links..example.com", "empty label"),
        ("links.example.com..", "empty label"),
        ("xn--zz.example", "punycode"),
        ("xn--a.example", "punycode"),
        ("xn--ls8h.example", "punycode"),  # decodes to an emoji IDNA 2008 disallows
        ("💩.example", "internationalised"),
    ],
)
def test_refused_names(text: str, why: str) -> None:
    with pytest.raises(InvalidHostname, match=why):
        normalize_hostname(text)


def cjk(n: int) -> str:
    """n distinct CJK characters: each costs about two bytes as punycode."""
    return "".join(chr(0x4E00 + 7 * i) for i in range(n))


def test_lengths_count_after_idna_encoding() -> None:
    fits = normalize_hostname(cjk(30) + ".example")
    assert len(fits.split(".")[0]) == 63
    assert display_hostname(fits) == cjk(30) + ".example"
    with pytest.raises(InvalidHostname, match="Label too long"):
        normalize_hostname(cjk(31) + ".example")  # 31 characters, 65 bytes encoded
    name = ".".join([cjk(12)] * 9) + ".test"
    assert len(name) < 253  # short as text, 293 bytes as A-labels
    with pytest.raises(InvalidHostname, match="too long"):
        normalize_hostname(name)


def test_invalid_hostname_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        normalize_hostname("*.example.com")


def test_host_header_is_host_and_optional_port() -> None:
    from proxy.wire.hostnames import BadHostHeader, HostHeader, parse_host_header

    assert parse_host_header("Links.Shop.COM.:8443") == HostHeader("links.shop.com", 8443)
    assert parse_host_header("links.shop.com").lookup == "links.shop.com"
    assert parse_host_header("[::0001]:80") == HostHeader("[::1]", 80, True)
    assert parse_host_header("127.0.0.1").lookup == ""  # never a registered host
    assert str(parse_host_header("A.test:0")) == "a.test:0"
    for bad in ("", "a b", "a\xff.test", "a.test:", "a.test:65536", "a.test:+1", "a.test:1:2",
                "u@a.test", "a..test", ".a.test", "a.test..", "[::1", "[::1]x", "[x]:1",
                "1.2.3.999", "a/b", "a" * 64 + ".test", "*.a.test"):  # fmt: skip
        with pytest.raises(BadHostHeader):
            parse_host_header(bad)
