"""Words found and hashed in a batch's bytes (``batch_words``) against ``str.split`` and the
per-word definition of ``hashing.word_hashes`` written out in plain Python."""

from __future__ import annotations

import re

import numpy as np

from lmtrain.data.batch_words import (
    NON_ASCII_SPACE,
    char_lengths,
    collapsed,
    find_words,
    hash_words,
    lower_words,
)
from lmtrain.data.hashing import word_hashes

_M = 2**64


def _mix64(x: int) -> int:
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) % _M
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) % _M
    return x ^ (x >> 31)


def _word_hash(word: str) -> int:
    """The definition in ``hashing.word_hashes``, one word, Python integers."""
    b = word.encode("utf-8", "surrogatepass")
    if len(b) <= 16:
        head = int.from_bytes(b[:8], "little")
        tail = int.from_bytes(b[max(0, len(b) - 8) :], "little")
        return _mix64(_mix64((head + len(b) * 0xD6E8FEB86659FD93) % _M) ^ tail)
    poly = sum(x * pow(0x9E3779B97F4A7C15, j % 2**16, _M) for j, x in enumerate(b)) % _M
    return _mix64(_mix64((poly + len(b) * 0xD6E8FEB86659FD93) % _M) ^ 0x3C6EF372FE94F82B)


def _split_all(texts: list[str]) -> tuple[list[int], list[str]]:
    words = [t.split() for t in texts]
    return [len(w) for w in words], [x for w in words for x in w]


def test_word_hashes_follow_the_per_word_definition():
    words = ["", "a", "The", "the", "abcdefgh", "abcdefghi", "a" * 16, "b" * 17, "é" * 9, "ЖУК"]
    words += ["Straße", "\ud800x", "x" * 70_000, "", "日本語のテキスト" * 3]
    assert word_hashes(words).tolist() == [_word_hash(w) for w in words]
    assert word_hashes([]).size == 0
    assert len(set(word_hashes(["ab", "ba", "a", "b", "a b", "ab "]).tolist())) == 6


def test_non_ascii_space_list_is_every_unicode_space():
    listed = set(re.findall(f"[{NON_ASCII_SPACE}]", "".join(map(chr, range(128, 0x110000)))))
    assert listed == {chr(c) for c in range(128, 0x110000) if chr(c).isspace()}


def test_words_equal_str_split_around_every_code_point():
    """Each code point between two letters: splits there exactly when str.split does."""
    points = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    texts = [
        "".join(f"a{c}" for c in points[i : i + 50_000]) for i in range(0, len(points), 50_000)
    ]
    texts += ["", "   ", "\n\t x \u3000y\u2028", "İSTANBUL ẞ KELVIN \u212a ΣΑΣ", " lead", "trail "]
    words = find_words(texts)
    sizes, flat = _split_all(texts)
    assert np.diff(words.offsets).tolist() == sizes
    assert char_lengths(words).tolist() == [len(w) for w in flat]
    low = lower_words(words, texts)
    assert np.array_equal(hash_words(low), word_hashes(_split_all([t.lower() for t in texts])[1]))


def test_ascii_batch_and_empty_batch():
    texts = ["The cat  sat.\n\nOn THE mat", "", "x\x1cy\x1fz\x0bw", "a\x00b c"]
    words = find_words(texts)
    sizes, flat = _split_all(texts)
    assert words.ascii and np.diff(words.offsets).tolist() == sizes
    assert char_lengths(words).tolist() == [len(w) for w in flat]
    lowered = _split_all([t.lower() for t in texts])[1]
    assert hash_words(lower_words(words, texts)).tolist() == [_word_hash(w) for w in lowered]
    empty = find_words([])
    assert empty.offsets.tolist() == [0] and hash_words(empty).size == 0


def test_collapsed_texts_equal_split_and_join():
    texts = ["", "  \n ", "one", " a\u3000b  c\n", "x\t\ty\n\nz ", "\u2028é  ü\x1f", "end"]
    for batch in (texts, texts[:1], [t for t in texts if t.isascii()]):
        flat, bounds = collapsed(find_words(batch))
        got = [flat[bounds[d] : bounds[d + 1]] for d in range(len(batch))]
        assert got == [" ".join(t.split()).encode() for t in batch]
