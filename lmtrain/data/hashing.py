"""Stable, process-independent hashes for texts, words and word n-grams (numpy, uint64).

Python's ``hash()`` is salted per process, so everything that must agree across worker processes
and across runs (dedup keys, split assignment, MinHash shingles, contamination n-grams) uses these.
A word's hash is computed for many words at once from one byte buffer (``word_hashes_of_bytes``),
so whole batches of text are hashed with no Python object per word (``batch_words.py``): a word of
up to 16 UTF-8 bytes is its first and last 8 bytes (which together hold all of it) and its length,
mixed with the SplitMix64 finaliser; a longer one, a polynomial over all its bytes in wrapping
uint64 arithmetic. n-grams combine word hashes with a polynomial over uint64 as well.
"""

from __future__ import annotations

import hashlib

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_PRIME = np.uint64(0x100000001B3)  # FNV-64 prime: odd, so multiplication is a bijection mod 2^64
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
# Long words' hashes: byte j weighs _BASE^(j mod 2^16) (a fixed table; the odd base makes every
# weight odd), and the length is added times another odd constant.
_BASE = 0x9E3779B97F4A7C15
_POW = np.full(2**16, _BASE, dtype=np.uint64)
_POW[0] = 1
_POW = np.cumprod(_POW, dtype=np.uint64)  # wraps mod 2^64
_POW_MASK = 2**16 - 1
_LEN = np.uint64(0xD6E8FEB86659FD93)
_LONG = np.uint64(0x3C6EF372FE94F82B)  # separates the long-word hashes from the short ones
# _LOW_BYTES[k]: the mask of the low k bytes of a uint64
_LOW_BYTES = np.array([(1 << (8 * k)) - 1 for k in range(9)], dtype=np.uint64)


def hash64(data: bytes | str, key: bytes = b"") -> int:
    """64-bit blake2b of ``data`` (str is UTF-8 encoded), as a Python int."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=key).digest(), "little")


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, vectorised: a bijection on uint64 that spreads every input bit."""
    x = np.asarray(x, dtype=np.uint64).copy()
    x ^= x >> _S30
    x *= _M1
    x ^= x >> _S27
    x *= _M2
    x ^= x >> _S31
    return x


def word_hashes(words: list[str]) -> np.ndarray:
    """One uint64 per word, from its UTF-8 bytes ``b`` (wrapping uint64 arithmetic):
    ``mix64(mix64(head + len(b) * LEN) ^ tail)`` when ``len(b) <= 16``, with ``head`` and ``tail``
    the little-endian integers of ``b[:8]`` and ``b[-8:]`` (all of ``b`` when shorter); otherwise
    ``mix64(mix64(sum_j b_j * BASE^(j mod 2^16) + len(b) * LEN) ^ LONG)``."""
    if not words:
        return np.zeros(0, dtype=np.uint64)
    try:
        enc = list(map(str.encode, words))  # C-level loop; UTF-8
    except UnicodeEncodeError:  # lone surrogates (normalised text has none)
        enc = [w.encode("utf-8", "surrogatepass") for w in words]
    lens = np.fromiter(map(len, enc), dtype=np.int64, count=len(enc))
    ends = np.cumsum(lens + 1) - 1  # words joined by one separator byte
    buf = np.frombuffer(b" ".join(enc), dtype=np.uint8)
    return word_hashes_of_bytes(buf, ends - lens, ends)


def word_hashes_of_bytes(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """``word_hashes`` of the words ``buf[starts[i]:ends[i]]`` (uint8 buffer; ranges in increasing
    order, not overlapping), all at once."""
    size = ends - starts
    # buf as 8 bytes read at every offset (little-endian), zero-padded at the end
    pad = np.zeros(buf.size + 8, dtype=np.uint8)
    pad[: buf.size] = buf
    at = np.ndarray((buf.size + 1,), dtype="<u8", buffer=pad.data, strides=(1,))
    keep = _LOW_BYTES[np.minimum(size, 8)]
    head = at[starts] & keep
    tail = at[np.maximum(ends - 8, starts)] & keep
    out = mix64(mix64(head + size.astype(np.uint64) * _LEN) ^ tail)
    long = np.flatnonzero(size > 16)
    if long.size:
        out[long] = mix64(_poly_hashes(buf, starts[long], ends[long]) ^ _LONG)
    return out


def _poly_hashes(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """``mix64(sum_j b_j * BASE^(j mod 2^16) + len(b) * LEN)`` of every non-empty word: the
    words' bytes are gathered back to back, each byte's position in its word indexes the power
    table, one ``np.add.reduceat`` sums the words."""
    size = ends - starts
    first = np.zeros(size.size, dtype=np.int64)
    np.cumsum(size[:-1], out=first[1:])
    pos = np.arange(int(size.sum()), dtype=np.int64) - np.repeat(first, size)
    w = _POW[pos & _POW_MASK]
    w *= buf[np.repeat(starts, size) + pos]
    return mix64(np.add.reduceat(w, first) + size.astype(np.uint64) * _LEN)


def ngram_hashes(wh: np.ndarray, n: int) -> np.ndarray:
    """Hashes of all word n-grams (order-sensitive): ``sum_k wh[i + k] * PRIME^(n - 1 - k)``
    (wrapping uint64), no final mixing since the word hashes are mixed already and every use
    (equality, sorting, the top bits, MinHash's keyed mix) needs none; empty when there are
    fewer than n words."""
    m = wh.size - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = wh[:m].copy()
    for k in range(1, n):
        h *= _PRIME
        h += wh[k : k + m]
    return h


def ngram_hashes_range(wh: np.ndarray, ns) -> dict[int, np.ndarray]:
    """``{n: ngram_hashes(wh, n)}`` for increasing ``ns``, sharing the polynomial prefix work
    (equal to calling :func:`ngram_hashes` for each n)."""
    out: dict[int, np.ndarray] = {}
    ns = sorted(set(int(n) for n in ns))
    if not ns:
        return out
    h, done = None, 0
    for n in ns:
        m = wh.size - n + 1
        if m <= 0:
            out[n] = np.zeros(0, dtype=np.uint64)
            continue
        if h is None:
            h, done = wh[:m].copy(), 1
        else:
            h = h[:m]
        for k in range(done, n):
            h *= _PRIME
            h += wh[k : k + m]
        done = n
        out[n] = h.copy()  # h is updated in place for the next n
    return out


class LazyNgramHashes:
    """``self[n] == ngram_hashes(wh, n)``, computed on first use; asking for increasing n shares
    the polynomial prefix work (as :func:`ngram_hashes_range`) and skips the n never asked for."""

    def __init__(self, wh: np.ndarray):
        self.wh, self.cache = wh, {}
        self.h, self.done = None, 0  # polynomial hashes of the ``done``-grams so far

    def __getitem__(self, n: int) -> np.ndarray:
        n = int(n)
        out = self.cache.get(n)
        if out is not None:
            return out
        m = self.wh.size - n + 1
        if m <= 0:
            out = np.zeros(0, dtype=np.uint64)
        elif self.h is not None and n < self.done:
            out = ngram_hashes(self.wh, n)
        else:
            if self.h is None:
                self.h, self.done = self.wh[:m].copy(), 1
            h = self.h[:m]
            for k in range(self.done, n):
                h *= _PRIME
                h += self.wh[k : k + m]
            self.h, self.done = h, n
            out = h.copy()  # self.h is updated in place for the next n
        self.cache[n] = out
        return out
