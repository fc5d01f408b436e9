"""The per-document n-gram work of the cleaning stages, done for a whole batch of documents at
once: the word hashes of all documents are concatenated and every numpy operation runs over the
batch, instead of dozens of small numpy calls per document (whose fixed cost dominated).

Layout: ``wh`` holds the word hashes of documents ``0..D-1`` back to back, document ``d`` being
``wh[offsets[d]:offsets[d + 1]]``. Every function gives per document exactly what the per-document
function it names gives on that slice (``quality.top_ngram_chars_fraction``,
``dedup.minhash_signature`` of ``dedup.shingle_hashes``...).

Grouping equal n-grams of many documents in one sort uses a key that puts the document index in
the top bits and the n-gram hash in the rest: n-grams of one document are then compared on their
hash's top ``64 - bits(D)`` bits instead of 64 (a batch of 256 documents keeps 56). Like the 64-bit
hashes themselves, this only matters on a hash collision, which the whole pipeline already treats
as equality; a batch of one document uses the full 64 bits.
"""

from __future__ import annotations

import numpy as np

from lmtrain.data.dedup import densify, oph_cells
from lmtrain.data.hashing import LazyNgramHashes, ngram_hashes


def doc_index(offsets: np.ndarray) -> np.ndarray:
    """Document of each word."""
    sizes = np.diff(offsets)
    return np.repeat(np.arange(sizes.size), sizes)


class NgramBatch:
    """n-gram hashes of a batch (``self.grams(n)``: hash, start position, document of every
    n-gram that lies inside one document), shared by the filters that need the same n."""

    def __init__(self, wh: np.ndarray, offsets: np.ndarray):
        self.wh = wh
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.docs = self.offsets.size - 1
        self.word_doc = doc_index(self.offsets)
        self.word_end = self.offsets[1:][self.word_doc]  # end of each word's document
        self._grams: dict[int, tuple] = {}
        self._top_count: dict[int, np.ndarray] = {}  # n: per document, a bound on the top count
        self._lazy = LazyNgramHashes(wh)
        bits = (self.docs - 1).bit_length() if self.docs > 1 else 0
        self.bits = np.uint64(bits)
        self.shift = np.uint64(64 - bits)

    def grams(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        g = self._grams.get(n)
        if g is None:
            h = self._lazy[n]
            pos = np.flatnonzero(np.arange(n, h.size + n) <= self.word_end[: h.size])
            g = self._grams[n] = (h[pos], pos, self.word_doc[pos])
        return g

    def keys(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(key, start position, document) of every n-gram; key: document in the top bits."""
        h, pos, doc = self.grams(n)
        if self.docs <= 1:
            return h, pos, doc
        return (doc.astype(np.uint64) << self.shift) | (h >> self.bits), pos, doc

    def _groups(self, key: np.ndarray):
        s = np.sort(key)
        first = np.empty(s.size, dtype=bool)
        first[:1] = True
        np.not_equal(s[1:], s[:-1], out=first[1:])
        starts = np.flatnonzero(first)
        counts = np.diff(np.append(starts, s.size))
        gkey = s[starts]
        gdoc = (
            (gkey >> self.shift).astype(np.int64)
            if self.docs > 1
            else np.zeros(gkey.size, np.int64)
        )
        return gkey, counts, gdoc

    def repeats(self, n: int) -> np.ndarray:
        """Per document: whether some n-gram occurs twice in it."""
        key, _, _ = self.keys(n)
        out = np.zeros(self.docs, dtype=bool)
        if key.size < 2:
            return out
        s = np.sort(key)
        dup = s[1:] == s[:-1]
        if dup.any():
            if self.docs > 1:
                out[(s[1:][dup] >> self.shift).astype(np.int64)] = True
            else:
                out[0] = True
        return out

    def top_over(
        self, n: int, wl_cumsum: np.ndarray, limit: float, docs: np.ndarray | None = None
    ) -> np.ndarray:
        """Per document: whether ``quality.top_ngram_chars_fraction`` exceeds ``limit``;
        ``wl_cumsum``: the running sum of the word lengths, starting with 0 (``len(wh) + 1``
        entries); ``docs``: the documents to check (bool mask; default all)."""
        out = np.zeros(self.docs, dtype=bool)
        m = self.wh.size - n + 1
        if m <= 0:
            return out
        check = np.ones(self.docs, dtype=bool) if docs is None else docs.copy()
        total = wl_cumsum[self.offsets[1:]] - wl_cumsum[self.offsets[:-1]]
        total = np.maximum(total.astype(np.float64), 1.0)
        # Upper bounds first: the document's longest n-gram (in characters) times a bound on
        # its top count: the top count of a shorter n-gram when known (an n-gram occurs at most
        # as often as its prefix). Only the n-grams of the documents not cleared are hashed
        # and grouped.
        valid = self.word_end[:m] - n >= np.arange(m)  # the n-gram stays in its document
        window = np.where(valid, wl_cumsum[n : n + m] - wl_cumsum[:m], 0)
        longest = np.maximum.reduceat(window, np.minimum(self.offsets[:-1], m - 1))
        longest[np.diff(self.offsets) < n] = 0  # no n-gram (reduceat gave a neighbour's)
        known = [k for k in self._top_count if k < n]
        cap = self._top_count[max(known)] if known else np.full(self.docs, np.inf)
        with np.errstate(invalid="ignore"):  # 0 * inf: no n-gram, nothing to check
            check &= longest * cap / total > limit
        top_count = np.zeros(self.docs, dtype=np.int64)
        self._top_count[n] = cap
        if not check.any():
            return out
        pos = np.flatnonzero(valid & check[self.word_doc[:m]])
        doc, window = self.word_doc[pos], window[pos]
        key = self._lazy[n][pos]
        if self.docs > 1:
            key = (doc.astype(np.uint64) << self.shift) | (key >> self.bits)
        if pos.size:
            gkey, counts, gdoc = self._groups(key)
            gstart = np.flatnonzero(np.concatenate(([True], gdoc[1:] != gdoc[:-1])))
            top_count[gdoc[gstart]] = np.maximum.reduceat(counts, gstart)
        self._top_count[n] = np.where(check, top_count, cap)  # exact where grouped
        # A top n-gram seen once covers nothing.
        want = check & (top_count >= 2) & ((longest * top_count) / total > limit)
        if not want.any():
            return out
        # The most frequent n-gram, ties to the one that occurs first (as Counter.most_common):
        # the first position, per document, holding one of its groups with the top count.
        top_keys = gkey[(counts == top_count[gdoc]) & want[gdoc]]  # sorted, as the groups are
        sel = np.flatnonzero(want[doc])
        at = np.minimum(np.searchsorted(top_keys, key[sel]), top_keys.size - 1)
        hit = sel[top_keys[at] == key[sel]]  # in position order
        docs_ = np.flatnonzero(want)
        first = hit[np.searchsorted(doc[hit], docs_)]
        frac = (window[first] * top_count[docs_]).astype(np.float64) / total[docs_]
        out[docs_] = frac > limit
        return out


def minhash_batch(
    wh: np.ndarray, offsets: np.ndarray, k: int, num_perm: int, key: int
) -> np.ndarray:
    """``minhash_signature(shingle_hashes(wh_d, k), num_perm, key)`` of every document ``d``
    (uint32, shape (D, num_perm)). The minimum over a set does not depend on repeats or order, so
    shingles need no ``np.unique``; one ``np.minimum.at`` fills the (document, bin) cells."""
    offsets = np.asarray(offsets, dtype=np.int64)
    docs = offsets.size - 1
    sig = np.full((docs, num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    if docs == 0:
        return sig
    sizes = np.diff(offsets)
    batch = NgramBatch(wh, offsets)
    x, _, row_doc = batch.grams(k)
    short = np.flatnonzero((sizes > 0) & (sizes < k))  # one shingle: all their words
    if short.size:
        extra = [ngram_hashes(wh[offsets[d] : offsets[d + 1]], int(sizes[d])) for d in short]
        x = np.concatenate([x, *extra])
        row_doc = np.concatenate([row_doc, short])
    bins, vals = oph_cells(x, num_perm, key)
    cell = row_doc * num_perm + bins
    np.minimum.at(sig.reshape(-1), cell, vals)
    filled = np.zeros(docs * num_perm, dtype=bool)
    filled[cell] = True
    densify(sig, filled.reshape(docs, num_perm), num_perm, key)
    return sig
