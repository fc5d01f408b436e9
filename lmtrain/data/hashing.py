"""Stable, process-independent hashes for texts, words and word n-grams (numpy, uint64).

Python's ``hash()`` is salted per process, so everything that must agree across worker processes
and across runs (dedup keys, split assignment, MinHash shingles, contamination n-grams) uses these.
Words are hashed with CRC-32 (C speed through ``map``) and spread to 64 bits with the SplitMix64
finaliser; n-grams combine word hashes with a polynomial over uint64 (wrapping arithmetic).
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_PRIME = np.uint64(0x100000001B3)  # FNV-64 prime: odd, so multiplication is a bijection mod 2^64
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


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
    """One uint64 per word (CRC-32 of its UTF-8 bytes, mixed with its length, then SplitMix64)."""
    if not words:
        return np.zeros(0, dtype=np.uint64)
    try:
        enc = list(map(str.encode, words))  # C-level loop; UTF-8
    except UnicodeEncodeError:  # lone surrogates (normalised text has none)
        enc = [w.encode("utf-8", "surrogatepass") for w in words]
    crc = np.fromiter(map(zlib.crc32, enc), dtype=np.uint64, count=len(enc))
    lens = np.fromiter(map(len, enc), dtype=np.uint64, count=len(enc))
    return mix64(crc | (lens << np.uint64(32)))


def ngram_hashes(wh: np.ndarray, n: int) -> np.ndarray:
    """Hashes of all word n-grams (order-sensitive); empty when there are fewer than n words."""
    m = wh.size - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = wh[:m].copy()
    for k in range(1, n):
        h *= _PRIME
        h += wh[k : k + m]
    return mix64(h)


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
        out[n] = mix64(h)
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
            out = mix64(h)
        self.cache[n] = out
        return out
