"""The whitespace words of a whole batch of texts, found and hashed in their UTF-8 bytes with
numpy: no Python object per word.

``find_words(texts)`` gives, for every word (exactly the words of ``text.split()``), its byte range
in one buffer holding all the texts, and per text the range of its words. From there
:func:`hash_words` gives ``hashing.word_hashes`` of the words, and :func:`char_lengths` /
:func:`alpha_words` the per-word numbers the quality filters need (``len(word)``, whether the word
has a letter), each from a per-byte lookup table and a running sum.

``str.split()`` splits on the ASCII whitespace bytes and on 19 non-ASCII code points; a text with
one of those gets them replaced by a space first (the words are unchanged: they never contain
whitespace).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

from lmtrain.data.hashing import word_hashes_of_bytes

# Every non-ASCII code point for which str.isspace() is true (tests check the list is complete).
NON_ASCII_SPACE = "\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_NON_ASCII_SPACE = re.compile(f"[{NON_ASCII_SPACE}]")
# Byte tables for bytes.translate (a C loop, faster than indexing a numpy table with the bytes).
_SPACE = bytes(1 if i in (9, 10, 11, 12, 13, 28, 29, 30, 31, 32) else 0 for i in range(256))
_TO_SPACE = bytes(32 if s else i for i, s in enumerate(_SPACE))
_CHAR_START = bytes(1 if (i & 0xC0) != 0x80 else 0 for i in range(256))  # not a continuation


class Words(NamedTuple):
    data: bytes  # the texts' UTF-8 bytes, each after one space, and a space at the end
    starts: np.ndarray  # int64 byte offset of each word in ``data``
    ends: np.ndarray  # int64 end (exclusive) of each word
    offsets: np.ndarray  # int64, texts + 1: the words of text d are offsets[d]:offsets[d + 1]
    ascii: bool  # every text is ASCII
    spans: np.ndarray  # int64, texts + 1: text d is data[spans[d]:spans[d + 1] - 1]


def _encode(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:  # lone surrogates (normalised text has none)
        return text.encode("utf-8", "surrogatepass")


def find_words(texts: list[str]) -> Words:
    """The words of every text (those of ``text.split()``), as byte ranges."""
    ascii_ = all(map(str.isascii, texts))
    if not ascii_:
        texts = [t if t.isascii() else _NON_ASCII_SPACE.sub(" ", t) for t in texts]
    parts = list(map(_encode, texts))
    text_start = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(p) + 1 for p in parts], out=text_start[1:])
    text_start += 1
    data = b" " + b" ".join(parts) + b" "
    return _words_in(data, text_start, ascii_)


def _words_in(data: bytes, text_start: np.ndarray, ascii_: bool) -> Words:
    space = np.frombuffer(data.translate(_SPACE), dtype=np.uint8)
    # ``data`` starts and ends with a space: the changes alternate word start, word end.
    edges = np.flatnonzero(space[1:] != space[:-1]) + 1
    starts, ends = edges[0::2].copy(), edges[1::2].copy()  # contiguous: gathered from often
    offsets = np.searchsorted(starts, text_start - 1)
    return Words(data, starts, ends, offsets, ascii_, text_start)


def lower_words(words: Words, texts: list[str]) -> Words:
    """The words of the lower-cased texts (``text.lower().split()``): for ASCII texts the same
    byte ranges in ``data.lower()``, otherwise found again in each ``text.lower()``."""
    if words.ascii:
        return words._replace(data=words.data.lower())
    low = find_words([t.lower() for t in texts])
    if not np.array_equal(low.offsets, words.offsets):  # lower() never makes or removes spaces
        raise AssertionError("lower-casing changed the number of words of a text")
    return low


def hash_words(words: Words) -> np.ndarray:
    """``hashing.word_hashes`` of every word."""
    buf = np.frombuffer(words.data, dtype=np.uint8)
    return word_hashes_of_bytes(buf, words.starts, words.ends)


def char_lengths(words: Words) -> np.ndarray:
    """``len(word)`` of every word (its UTF-8 bytes that start a character)."""
    if words.ascii:
        return words.ends - words.starts
    c = np.zeros(len(words.data) + 1, dtype=np.int64)
    np.cumsum(np.frombuffer(words.data.translate(_CHAR_START), dtype=np.uint8), out=c[1:])
    return c[words.ends] - c[words.starts]


def collapsed(words: Words) -> tuple[bytes, np.ndarray]:
    """Every text's words joined by single spaces (``" ".join(text.split())`` as UTF-8), back to
    back in one bytes object; text d is ``out[bounds[d]:bounds[d + 1]]``. Every whitespace byte
    becomes a space, then the bytes of the words and the one byte after each word but a text's
    last are kept."""
    flat = np.frombuffer(words.data.translate(_TO_SPACE), dtype=np.uint8)
    keep = flat != 32
    last = np.zeros(words.starts.size, dtype=bool)
    sizes = np.diff(words.offsets)
    last[(words.offsets[1:] - 1)[sizes > 0]] = True
    keep[words.ends[~last]] = True
    chars = np.zeros(words.starts.size + 1, dtype=np.int64)
    np.cumsum(words.ends - words.starts + ~last, out=chars[1:])
    return flat[keep].tobytes(), chars[words.offsets]
