"""Stage 5: exact and near-duplicate removal.

* **Exact**: documents whose whitespace-collapsed text has the same 64-bit hash; the first one in
  corpus order is kept.
* **Near**: MinHash over word shingles (Broder 1997) with LSH banding (Indyk & Motwani 1998; see
  Leskovec, Rajaraman & Ullman, *Mining of Massive Datasets*, ch. 3). The ``num_perm`` signature
  values come from one hash per shingle, one-permutation hashing (Li, Owen & Zhang 2012): the
  shingle's keyed 64-bit hash picks one of ``num_perm`` bins with its top bits and competes for
  that bin's minimum with its low 32 bits; a bin that no shingle fell into copies the value of
  another bin chosen by a fixed per-(bin, attempt) sequence, the first non-empty one (optimal
  densification, Shrivastava 2017), so every value of two documents' signatures is equal with
  probability their Jaccard similarity, as with ``num_perm`` independent permutations, at the cost
  of one hash per shingle instead of ``num_perm``. Bands/rows come from the Jaccard threshold by
  minimising the false-positive plus false-negative area of the S-curve ``1 - (1 - s^r)^b``
  (the same criterion as the ``datasketch`` library) unless given.

  Documents sharing a band bucket are candidates; a candidate pair is confirmed when the
  fraction of equal signature values (an unbiased Jaccard estimate) reaches the threshold.
  Confirmed pairs are merged into clusters (connected components) and each cluster keeps its
  earliest document in corpus order; the others are removed as ``dup_of`` it. Only signatures
  (``num_perm * 4`` bytes per document, read from disk in chunks) and 64-bit keys are in memory.
"""

from __future__ import annotations

import os

import numpy as np

from lmtrain.data.hashing import mix64, ngram_hashes

_SHIFT32 = np.uint64(32)
_LOW32 = np.uint64(0xFFFFFFFF)
_U32_MAX = np.uint32(0xFFFFFFFF)
_BORROW = 0x5DEECE66D  # separates the borrow sequence's hash from the shingles'


def minhash_params(num_perm: int, seed: int = 0) -> tuple[int, int]:
    """``(num_perm, key)``: the signature length and the 64-bit key of the shingle hash."""
    rng = np.random.default_rng(np.random.SeedSequence([0x4D494E48, seed]))
    return int(num_perm), int(rng.integers(0, 2**64, dtype=np.uint64))


def shingle_hashes(wh: np.ndarray, k: int) -> np.ndarray:
    """Unique hashes of k-word shingles; a document shorter than k words is one shingle."""
    if wh.size == 0:
        return wh
    sh = ngram_hashes(wh, min(k, wh.size))
    return np.unique(sh)


def oph_cells(shingles: np.ndarray, num_perm: int, key: int) -> tuple[np.ndarray, np.ndarray]:
    """(bin, value) of each shingle: the keyed hash's top 32 bits scaled to ``[0, num_perm)``
    (multiply-shift range reduction, no modulo bias beyond 2^-32) and its low 32 bits."""
    v = mix64(np.asarray(shingles, dtype=np.uint64) ^ np.uint64(key))
    bins = ((v >> _SHIFT32) * np.uint64(num_perm)) >> _SHIFT32
    return bins.astype(np.int64), (v & _LOW32).astype(np.uint32)


def densify(sig: np.ndarray, filled: np.ndarray, num_perm: int, key: int) -> None:
    """Fills, in place, the empty bins of ``sig`` (rows: documents, ``filled``: which bins got a
    shingle): empty bin ``j`` takes the value of bin ``borrow_bin(j, t)`` for the first attempt
    ``t = 1, 2, ...`` that lands on a filled bin. Rows with no filled bin stay as they are."""
    rows = filled.any(axis=1)
    empty = np.flatnonzero((~filled & rows[:, None]).ravel())
    if empty.size == 0:
        return
    flat, filled_flat = sig.reshape(-1), filled.reshape(-1)
    doc, j = np.divmod(empty, num_perm)
    # Attempts in rounds of doubling length: a document with few filled bins needs hundreds of
    # attempts for its last empty bins, one with many needs one or two.
    t, step = 1, 4
    while empty.size:
        src = doc[:, None] * num_perm + borrow_bin(
            j[:, None], np.arange(t, t + step), num_perm, key
        )
        ok = filled_flat[src]
        done = np.flatnonzero(ok.any(axis=1))
        first = ok[done].argmax(axis=1)
        flat[empty[done]] = flat[src[done, first]]
        left = np.ones(empty.size, dtype=bool)
        left[done] = False
        empty, doc, j = empty[left], doc[left], j[left]
        t, step = t + step, min(step * 2, 1024)


def borrow_bin(j: np.ndarray, t, num_perm: int, key: int) -> np.ndarray:
    """The bin that empty bin ``j`` looks at on attempt ``t`` (the same for every document;
    ``j`` and ``t`` broadcast)."""
    x = (np.asarray(j, dtype=np.uint64) << _SHIFT32) | np.asarray(t, dtype=np.uint64)
    v = mix64(x ^ np.uint64(key ^ _BORROW))
    return (((v >> _SHIFT32) * np.uint64(num_perm)) >> _SHIFT32).astype(np.int64)


def minhash_signature(shingles: np.ndarray, num_perm: int, key: int) -> np.ndarray:
    """MinHash signature (uint32, ``num_perm`` values) of a set of uint64 shingle hashes; all
    values 2^32 - 1 for the empty set."""
    sig = np.full((1, num_perm), _U32_MAX, dtype=np.uint32)
    filled = np.zeros((1, num_perm), dtype=bool)
    if shingles.size:
        bins, vals = oph_cells(shingles, num_perm, key)
        np.minimum.at(sig[0], bins, vals)
        filled[0, bins] = True
        densify(sig, filled, num_perm, key)
    return sig[0]


def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising weighted FP + FN probability mass."""
    s = np.linspace(0.0, 1.0, 1001)
    best, best_err = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            p = 1.0 - (1.0 - s**rows) ** bands
            fp = np.trapezoid(np.where(s < threshold, p, 0.0), s)
            fn = np.trapezoid(np.where(s >= threshold, 1.0 - p, 0.0), s)
            err = fp_weight * fp + (1.0 - fp_weight) * fn
            if err < best_err - 1e-12:
                best, best_err = (bands, rows), err
    return best


def exact_duplicates(keys: np.ndarray) -> np.ndarray:
    """``dup_of[i]``: index of the first document with the same key, or -1 for first occurrences."""
    keys = np.asarray(keys, dtype=np.uint64)
    dup_of = np.full(keys.size, -1, dtype=np.int64)
    if keys.size == 0:
        return dup_of
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    rep = first[inverse.reshape(-1)]
    idx = np.arange(keys.size)
    dup_of[rep != idx] = rep[rep != idx]
    return dup_of


class SignatureFile:
    """Append-only uint32 signature matrix on disk (``num_perm`` columns), read back in chunks."""

    def __init__(self, path: str | os.PathLike, num_perm: int):
        self.path, self.num_perm, self.rows = str(path), num_perm, 0
        self._f = open(self.path, "wb")  # noqa: SIM115

    def append(self, sigs: np.ndarray) -> None:
        sigs = np.ascontiguousarray(sigs, dtype=np.uint32).reshape(-1, self.num_perm)
        self._f.write(sigs.tobytes())
        self.rows += sigs.shape[0]

    def close(self) -> None:
        self._f.close()

    def chunks(self, rows_per_chunk: int = 65536):
        with open(self.path, "rb") as f:
            for start in range(0, self.rows, rows_per_chunk):
                n = min(rows_per_chunk, self.rows - start)
                yield (
                    start,
                    np.fromfile(f, dtype=np.uint32, count=n * self.num_perm).reshape(
                        n, self.num_perm
                    ),
                )

    def memmap(self) -> np.ndarray:
        return np.memmap(self.path, dtype=np.uint32, mode="r", shape=(self.rows, self.num_perm))


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64 bucket keys: each band's rows hashed together."""
    out = np.empty((sigs.shape[0], bands), dtype=np.uint64)
    for band in range(bands):
        part = sigs[:, band * rows : (band + 1) * rows].astype(np.uint64)
        h = np.full(sigs.shape[0], band, dtype=np.uint64)
        for j in range(rows):
            h = mix64(h * np.uint64(0x100000001B3) + part[:, j])
        out[:, band] = h
    return out


def _bucket_pairs(keys: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Candidate (i, j) pairs, i < j, for documents sharing a key: each member with its bucket's
    first member (star) and with the previous member (chain). ``members`` are global indices."""
    order = np.argsort(keys, kind="stable")
    k, m = keys[order], members[order]
    same = k[1:] == k[:-1]
    if not same.any():
        return np.zeros((0, 2), dtype=np.int64)
    start_flag = np.concatenate([[True], ~same])
    starts = np.maximum.accumulate(np.where(start_flag, np.arange(k.size), 0))
    idx = np.flatnonzero(~start_flag)
    star = np.stack([m[starts[idx]], m[idx]], axis=1)
    chain = np.stack([m[idx - 1], m[idx]], axis=1)
    pairs = np.concatenate([star, chain])
    return np.sort(pairs, axis=1)


def _components(pairs: np.ndarray, n: int) -> np.ndarray:
    """Label of each node = smallest index in its connected component (vectorised propagation)."""
    labels = np.arange(n, dtype=np.int64)
    if pairs.size == 0:
        return labels
    i, j = pairs[:, 0], pairs[:, 1]
    while True:
        m = np.minimum(labels[i], labels[j])
        new = labels.copy()
        np.minimum.at(new, i, m)
        np.minimum.at(new, j, m)
        new = new[new]  # pointer jumping
        while True:
            nxt = new[new]
            if np.array_equal(nxt, new):
                break
            new = nxt
        if np.array_equal(new, labels):
            return labels
        labels = new


def near_duplicates(
    sigfile: SignatureFile,
    eligible: np.ndarray,
    *,
    threshold: float,
    bands: int,
    rows: int,
    chunk_rows: int = 65536,
) -> tuple[np.ndarray, dict]:
    """``dup_of`` (-1 = keep) over the documents in ``sigfile``; only ``eligible`` ones take part."""
    n = sigfile.rows
    dup_of = np.full(n, -1, dtype=np.int64)
    stats = {
        "bands": bands,
        "rows": rows,
        "candidate_pairs": 0,
        "confirmed_pairs": 0,
        "clusters": 0,
    }
    members = np.flatnonzero(eligible)
    if members.size < 2:
        return dup_of, stats
    keys = np.empty((members.size, bands), dtype=np.uint64)
    pos = 0
    for start, sigs in sigfile.chunks(chunk_rows):
        sel = eligible[start : start + sigs.shape[0]]
        kk = band_keys(sigs[sel], bands, rows)
        keys[pos : pos + kk.shape[0]] = kk
        pos += kk.shape[0]
    pairs = [_bucket_pairs(keys[:, band], members) for band in range(bands)]
    del keys
    pairs = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    pairs = np.unique(pairs, axis=0) if pairs.size else pairs
    stats["candidate_pairs"] = int(pairs.shape[0])
    if pairs.size == 0:
        return dup_of, stats
    sig = sigfile.memmap()
    ok = np.zeros(pairs.shape[0], dtype=bool)
    for s in range(0, pairs.shape[0], 16384):
        p = pairs[s : s + 16384]
        ok[s : s + 16384] = (sig[p[:, 0]] == sig[p[:, 1]]).mean(axis=1) >= threshold
    del sig
    pairs = pairs[ok]
    stats["confirmed_pairs"] = int(pairs.shape[0])
    if pairs.size == 0:
        return dup_of, stats
    nodes, inv = np.unique(pairs, return_inverse=True)
    labels = _components(inv.reshape(pairs.shape), nodes.size)
    rep = nodes[labels]
    moved = rep != nodes
    dup_of[nodes[moved]] = rep[moved]
    stats["clusters"] = int(np.unique(rep).size)
    return dup_of, stats
