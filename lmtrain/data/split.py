"""Stage 6: document-level train/validation/test split (a document never spans two splits).

Methods (``split.method``):

* ``hash`` (default): a document's split is a pure function of its content hash and the seed, so
  it is stable when the corpus grows or is re-ordered, and exact duplicates would land together.
  ``u = mix64(content_hash ^ seed) / 2^64``; ``u < train`` → train, ``< train + validation`` →
  validation, else test.
* ``position``: the first ``train`` fraction of kept documents (corpus order) is train, the next
  ``validation`` fraction validation, the rest test (nanoGPT's 90/10 cut for one long text, made
  document-level by segmenting the text into paragraph groups first).
* ``time``: by a per-document time field (``split.time_field``: ISO 8601 or a number): before
  ``time_cutoffs[0]`` → train, before ``time_cutoffs[1]`` → validation, else test.
"""

from __future__ import annotations

import datetime as dt

import numpy as np

from lmtrain.data.hashing import hash64, mix64

SPLITS = ("train", "validation", "test")


def time_key(value) -> float:
    """A sortable float for a time value: a number, a numeric string, or ISO 8601 (UTC if naive)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a time")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
        t = dt.datetime.fromisoformat(value.strip())
        if t.tzinfo is None:
            t = t.replace(tzinfo=dt.UTC)
        return t.timestamp()
    raise ValueError(f"{value!r} is not a time")


def assign_splits(
    method: str,
    fractions: tuple[float, float, float],
    *,
    content_hashes: np.ndarray,
    kept: np.ndarray,
    seed: int = 0,
    times: np.ndarray | None = None,
    cutoffs: tuple = (),
) -> np.ndarray:
    """int8 split id per document (0 train, 1 validation, 2 test; -1 for documents not kept)."""
    n = content_hashes.size
    out = np.full(n, -1, dtype=np.int8)
    train, val = fractions[0], fractions[1]
    if method == "hash":
        salt = np.uint64(hash64(f"split-seed-{seed}"))
        u = (mix64(content_hashes ^ salt) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    elif method == "position":
        rank = np.cumsum(kept) - 1
        u = (rank + 0.5) / max(int(kept.sum()), 1)
    elif method == "time":
        c = [time_key(x) for x in cutoffs]
        ids = np.where(times < c[0], 0, np.where(times < c[1], 1, 2)).astype(np.int8)
        out[kept] = ids[kept]
        return out
    else:
        raise ValueError(f"split.method={method!r}: use hash, position or time")
    ids = np.where(u < train, 0, np.where(u < train + val, 1, 2)).astype(np.int8)
    out[kept] = ids[kept]
    return out
