"""Stage 1: bytes → clean Unicode text.

* **Decoding**: UTF-8 (a leading BOM is dropped). Invalid byte sequences are, per
  ``normalize.invalid_utf8``: ``replace`` (each bad sequence becomes U+FFFD; the document is counted
  as repaired), ``drop`` (the document is dropped and counted) or ``error`` (bad input: stop with the
  file and line, or skip and count, per ``on_error``).
* **Unicode NFC** (canonical composition), so "é" written as e + combining accent equals "é".
* **Control characters** (C0/C1 except tab and newline) are removed; CR LF and lone CR become LF;
  unpaired surrogates (possible from JSON ``\\ud800`` escapes) become U+FFFD.
* **Whitespace**: exotic spaces (NBSP, en/em spaces, ideographic space) become a plain space, trailing
  spaces on each line are removed and runs of blank lines are cut to ``max_blank_lines``. Leading
  indentation and single newlines are kept, so paragraphs, lists and code blocks survive.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_EXOTIC_SPACE = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)
_ASCII_NOT_CONTROL = bytes(i for i in range(128) if not _CONTROL.match(chr(i)))  # to delete


class DecodeResult:
    """Outcome of decoding: ``text`` (None when dropped/invalid), ``status`` and where it failed."""

    __slots__ = ("text", "status", "line", "column", "byte")

    def __init__(self, text, status, line=0, column=0, byte=0):
        self.text, self.status, self.line, self.column, self.byte = text, status, line, column, byte


def decode_utf8(data: bytes, policy: str = "replace", first_line: int = 1) -> DecodeResult:
    """Decodes UTF-8 per ``policy``; ``status`` is ok, repaired, dropped or invalid.

    On failure ``line``/``column`` locate the first bad byte (1-based, counting from
    ``first_line``) so error messages can name it.
    """
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return DecodeResult(data.decode("utf-8"), "ok")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        bad = data[e.start]
        if policy == "replace":
            return DecodeResult(data.decode("utf-8", "replace"), "repaired", line, column, bad)
        status = "dropped" if policy == "drop" else "invalid"
        return DecodeResult(None, status, line, column, bad)


def normalize_text(text: str, *, nfc: bool = True, max_blank_lines: int = 1) -> tuple[str, Counter]:
    """Returns the normalised text and what changed (``nfc_changed``, ``control_chars_removed``...)."""
    counts: Counter = Counter()
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    # ASCII text (most of it) has no surrogates, exotic spaces or decompositions, and its
    # control characters are found by one bytes.translate: the regex scans are skipped.
    ascii_ = text.isascii()
    if not ascii_ and _SURROGATE.search(text):
        text, n = _SURROGATE.subn("\ufffd", text)
        counts["surrogates_replaced"] += n
    if ascii_ and not text.encode("ascii").translate(None, _ASCII_NOT_CONTROL):
        n = 0
    else:
        text, n = _CONTROL.subn("", text)
    if n:
        counts["control_chars_removed"] += n
        counts["documents_with_control_chars"] += 1
    if text.startswith("\ufeff"):
        text = text[1:]
    if nfc and not ascii_ and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
        counts["nfc_changed"] += 1
    before = text
    if not ascii_:
        text = _EXOTIC_SPACE.sub(" ", text)
    if " \n" in text or "\t\n" in text or text.endswith((" ", "\t")):  # else nothing to strip
        text = _TRAILING.sub("", text)
    limit = "\n" * (max_blank_lines + 1)
    if limit + "\n" in text:
        text = re.sub("\n{" + str(max_blank_lines + 2) + ",}", limit, text)
    text = text.lstrip("\n").rstrip()
    if text != before:
        counts["whitespace_changed"] += 1
    return text, counts
