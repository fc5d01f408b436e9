"""Stage 4: PII and secret scrubbing with typed placeholders.

Each match is replaced by ``placeholder.format(kind=KIND)`` (default ``<EMAIL>``, ``<PHONE>`` ...)
and counted per kind. Kinds, applied in this order so a longer match wins:

* ``PRIVATE_KEY``: ``-----BEGIN ... PRIVATE KEY-----`` ... ``-----END ... PRIVATE KEY-----`` blocks.
* ``AWS_KEY``: access key ids (``AKIA``/``ASIA``... + 16 upper-case letters or digits) and the
  40-character value after ``aws_secret_access_key``.
* ``GITHUB_TOKEN``: ``ghp_``/``gho_``/``ghu_``/``ghs_``/``ghr_`` + 36 characters, ``github_pat_...``.
* ``SECRET``: the value in ``api_key = "..."``-style assignments (api key, secret key, access/auth
  token, client secret, password); the key name is kept. Values must be 8+ characters mixing
  letters and digits, so ``password = None`` or ``api_key=api_key`` in code are left alone.
* ``EMAIL``: ``local@domain.tld``.
* ``CREDIT_CARD``: 13-19 digits (spaces/dashes allowed between groups) that pass the Luhn
  checksum and start with a card network prefix (Visa, Mastercard, Amex, Discover, JCB, Diners).
  Luhn-invalid digit runs are left alone.
* ``IP_ADDRESS``: IPv4 (not inside a longer dotted number such as a version string) and IPv6
  (validated with ``ipaddress``; at least three groups so Python slices like ``a[1::2]`` survive).
  With ``keep_nonpublic_ips`` every address that is not globally routable (``ipaddress``'s
  ``is_global``: loopback, private, shared, link-local, reserved ... 127.0.0.1, 10.0.0.0/8, ::1) and
  multicast is kept: they identify no one and are common in code. A dotted quad right after
  "version", "section", "release", "RFC", "v" ... is a version or section number and is kept.
* ``PHONE``: international ``+CC`` numbers and North-American style ``(555) 123-4567`` /
  ``555-123-4567`` / ``555.123.4567`` (separators required, so plain digit runs are not phones).
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

import numpy as np

KINDS = (
    "PRIVATE_KEY",
    "AWS_KEY",
    "GITHUB_TOKEN",
    "SECRET",
    "EMAIL",
    "CREDIT_CARD",
    "IP_ADDRESS",
    "PHONE",
)

_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----",
    re.DOTALL,
)
_AWS_ID = re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}\b")
_AWS_SECRET = re.compile(
    r"(?i)(aws_?secret_?(?:access_?)?key\s*[=:]\s*[\"']?)([A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])"
)
_GITHUB = re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{50,255})\b")
_GENERIC = re.compile(
    r"(?i)\b((?:api[_-]?key|apikey|secret[_-]?key|access[_-]?token|auth[_-]?token|api[_-]?token"
    r"|client[_-]?secret|private[_-]?token|passw(?:or)?d)[\"']?\s*[:=]\s*[\"']?)"
    r"([A-Za-z0-9_\-+/=.~]{8,})"
)
_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}\b"
)
_CARD = re.compile(r"(?<![\d.-])\d(?:[ -]?\d){12,18}(?![\d])")
_IPV4 = re.compile(
    r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d]|\.\d)"
)
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){2,4}"
    r"|\(\d{3}\)\s?\d{3}[ .-]\d{4}|\d{3}-\d{3}-\d{4}|\d{3}\.\d{3}\.\d{4})(?![\w])"
)
# Gates: each is a necessary condition for a match of the pattern named (the pattern without its
# look-arounds, or a part every match contains) that Python's regex engine scans fast (its first
# character is a literal or a class, not a look-behind, so the engine skips ahead instead of trying
# the full pattern at every position). A pattern runs only when its gate finds something, so the
# result is the same as always running it.
_GATE_AWS_SECRET = re.compile(r"(?i)aws_?secret")
_GATE_GENERIC = re.compile(r"(?i)(?:key|token|secret|wd|rd)[\"']?\s*[:=]")
_GATE_GENERIC_LOWER = re.compile(r"(?:key|token|secret|wd|rd)[\"']?\s*[:=]")  # ASCII text, lowered
_GATE_EMAIL_DOMAIN = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}\b"
)
_EMAIL_LOCAL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-")
_GATE_CARD = re.compile(r"\d(?:[ -]?\d){12,18}")
_GATE_IPV4 = re.compile(r"\d\.\d{1,3}\.\d{1,3}\.\d")
_GATE_IPV6 = re.compile(r":[0-9A-Fa-f]{0,4}:")
_GATE_PHONE = (
    re.compile(r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){2,4}"),
    re.compile(r"\(\d{3}\)\s?\d{3}[ .-]\d{4}"),
    re.compile(r"\d\d\d[-.]\d\d\d[-.]\d\d\d\d"),  # covers both separator forms
)


def _may_have_secret(text: str, lower: str) -> bool:
    if text.isascii():  # ASCII: lower() is exactly what (?i) matches, and a plain scan is faster
        return _GATE_GENERIC_LOWER.search(lower) is not None
    return _GATE_GENERIC.search(text) is not None


def _may_have_email(text: str) -> bool:
    """True when some "@" has a local-part character before it and a domain after it."""
    at = text.find("@")
    while at >= 0:
        if at and text[at - 1] in _EMAIL_LOCAL and _GATE_EMAIL_DOMAIN.match(text, at + 1):
            return True
        at = text.find("@", at + 1)
    return False


_VERSION_WORDS = ("version", "section", "release", "sec.", "§", "rfc", "aix", "build")
_AWS_PREFIXES = ("AKIA", "ASIA", "ABIA", "ACCA", "AGPA", "AIDA", "AROA", "ANPA", "ANVA", "AIPA")
_GITHUB_PREFIXES = ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")
_SECRET_WORDS = ("key", "token", "secret", "passw", "pwd")
_CARD_PREFIX = re.compile(
    r"^(?:4|5[1-5]|2(?:2[2-9][1-9]|2[3-9]\d|[3-6]\d\d|7[01]\d|720)|3[47]|6011|64[4-9]|65|35(?:2[89]|[3-8]\d)|3(?:0[0-5]|[68]))"
)


# Every pattern needs one of these: a digit (SECRET values, cards, IPv4, phones), "@" (e-mail),
# ":" (IPv6), "_" (GitHub tokens), an AWS key id prefix, "PRIVATE KEY", or "secret" in the
# lower-cased text (AWS secret keys).
_TRIGGER_BYTES = bytes(1 if chr(i) in "0123456789@:_" else 0 for i in range(256))
_AWS_PREFIX_BYTES = frozenset(p.encode() for p in _AWS_PREFIXES)


def _docs_with(data: bytes, word: bytes, start: np.ndarray, out: np.ndarray) -> None:
    """Marks in ``out`` the documents (``start``: their offsets in ``data``) containing
    ``word``; one search per document found, at most."""
    at = data.find(word)
    while at >= 0:
        d = int(np.searchsorted(start, at, side="right")) - 1
        out[d] = True
        if d + 1 >= start.size:
            break
        at = data.find(word, int(start[d + 1]))


def candidates_in(
    data: bytes, start: np.ndarray, lower: bytes, lower_start: np.ndarray
) -> np.ndarray:
    """:meth:`PiiScrubber.candidates` of the texts whose UTF-8 bytes are in ``data`` (text d
    from ``start[d]``, in increasing order, separated by at least one byte; non-ASCII spaces
    may have been made ASCII) and whose lower-cased texts' bytes are in ``lower`` (from
    ``lower_start[d]``)."""
    out = np.zeros(start.size, dtype=bool)
    hits = np.flatnonzero(np.frombuffer(data.translate(_TRIGGER_BYTES), dtype=np.uint8))
    out[np.searchsorted(start, hits, side="right") - 1] = True
    buf = np.frombuffer(data, dtype=np.uint8)
    for at in np.flatnonzero(buf == ord("A")):
        if data[at : at + 4] in _AWS_PREFIX_BYTES:
            out[np.searchsorted(start, at, side="right") - 1] = True
    _docs_with(data, b"PRIVATE KEY", start, out)
    # bytes.lower() maps A-Z only; no non-ASCII character lower-cases to one of "secrt".
    _docs_with(lower, b"secret", lower_start, out)
    return out


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) checksum used by payment card numbers."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _mixed(value: str) -> bool:
    return any(c.isdigit() for c in value) and any(c.isalpha() for c in value)


class PiiScrubber:
    def __init__(self, placeholder: str = "<{kind}>", kinds=KINDS, keep_nonpublic_ips: bool = True):
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown PII kinds {sorted(unknown)}; choose from {KINDS}")
        self.kinds = tuple(k for k in KINDS if k in set(kinds))
        self.tag = {k: placeholder.format(kind=k) for k in KINDS}
        self.keep_nonpublic_ips = keep_nonpublic_ips

    def _ip_public(self, text: str) -> bool:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            return False
        if not self.keep_nonpublic_ips:
            return True
        return (
            ip.is_global and not ip.is_multicast
        )  # excludes private, shared (100.64/10), loopback ...

    def candidates(self, texts: list[str]) -> np.ndarray:
        """Per text: False when :meth:`scrub` certainly leaves it unchanged (it has none of the
        characters and substrings that every pattern needs), True when it may not. A few scans
        of the whole batch's UTF-8 bytes, instead of dozens of substring tests per text."""
        parts = [t.encode("utf-8", "surrogatepass") for t in texts]
        start = np.zeros(len(parts), dtype=np.int64)
        np.cumsum([len(p) + 1 for p in parts[:-1]], out=start[1:])
        data = b"\n".join(parts)
        return candidates_in(data, start, data.lower(), start)

    def scrub(self, text: str) -> tuple[str, Counter]:
        counts: Counter = Counter()
        tag = self.tag

        def simple(kind, pattern, text):
            new, n = pattern.subn(tag[kind], text)
            counts[kind] += n
            return new

        def keyed(kind, pattern, text, check=None):
            def repl(m):
                if check is not None and not check(m.group(2)):
                    return m.group(0)
                counts[kind] += 1
                return m.group(1) + tag[kind]

            return pattern.sub(repl, text)

        def card(m):
            digits = re.sub(r"[ -]", "", m.group(0))
            if 13 <= len(digits) <= 19 and luhn_valid(digits) and _CARD_PREFIX.match(digits):
                counts["CREDIT_CARD"] += 1
                return tag["CREDIT_CARD"]
            return m.group(0)

        def ipv4(m):
            before = m.string[max(m.start() - 12, 0) : m.start()].lower()
            if any(w in before for w in _VERSION_WORDS) or before.endswith("v"):
                return m.group(0)  # "version 2.7.2.2", "section 8.2.4.44", "v1.2.3.4"
            if self._ip_public(m.group(0)):
                counts["IP_ADDRESS"] += 1
                return tag["IP_ADDRESS"]
            return m.group(0)

        def ipv6(m):
            s = m.group(0)
            if sum(1 for g in s.split(":") if g) >= 3 and self._ip_public(s):
                counts["IP_ADDRESS"] += 1
                return tag["IP_ADDRESS"]
            return s

        # Cheap substring/digit-count tests and the gates above skip patterns that cannot match.
        k = self.kinds
        digits = sum(map(text.count, "0123456789"))
        if "PRIVATE_KEY" in k and "PRIVATE KEY" in text:
            text = simple("PRIVATE_KEY", _PRIVATE_KEY, text)
        if "AWS_KEY" in k:
            if any(p in text for p in _AWS_PREFIXES):
                text = simple("AWS_KEY", _AWS_ID, text)
            if "secret" in text.lower() and _GATE_AWS_SECRET.search(text):
                text = keyed("AWS_KEY", _AWS_SECRET, text)
        if "GITHUB_TOKEN" in k and any(p in text for p in _GITHUB_PREFIXES):
            text = simple("GITHUB_TOKEN", _GITHUB, text)
        lower = text.lower() if "SECRET" in k and digits else ""
        if (
            "SECRET" in k
            and digits
            and any(w in lower for w in _SECRET_WORDS)
            and _may_have_secret(text, lower)
        ):
            text = keyed(
                "SECRET", _GENERIC, text, check=lambda v: _mixed(v) and v not in tag.values()
            )
        if "EMAIL" in k and "@" in text and _may_have_email(text):
            text = simple("EMAIL", _EMAIL, text)
        if "CREDIT_CARD" in k and digits >= 13 and _GATE_CARD.search(text):
            text = _CARD.sub(card, text)
        if "IP_ADDRESS" in k:
            if digits >= 4 and "." in text and _GATE_IPV4.search(text):
                text = _IPV4.sub(ipv4, text)
            if ("::" in text or text.count(":") >= 2) and _GATE_IPV6.search(text):
                text = _IPV6.sub(ipv6, text)
        if "PHONE" in k and digits >= 6 and any(g.search(text) for g in _GATE_PHONE):
            text = simple("PHONE", _PHONE, text)
        return text, +counts
