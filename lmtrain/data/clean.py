"""The local runner's worker side: the per-document stages (``stages.py``) on batches.

``Cleaner.process(index, docs)`` takes a batch of :class:`RawDoc`, runs decode → markup →
normalise → quality → PII on each, writes the surviving texts to ``spill/<index>.pkl`` (so the
corpus never sits in memory) and returns only compact per-document arrays: a 64-bit content hash
(exact dedup, split), the character count, a MinHash signature (near dedup), the time key
(time-based split) and any n-grams shared with the evaluation sets, plus counts by stage/reason.
"""

from __future__ import annotations

import os
import pickle
import time
from collections import Counter

import numpy as np

from lmtrain.data.sources import ErrorPolicy
from lmtrain.data.stages import STAGES, Stages


def _delta(now: Counter, before: Counter) -> dict:
    return {k: v - before.get(k, 0.0) for k, v in now.items()}


def spill_path(spill_dir: str, index: int) -> str:
    return os.path.join(spill_dir, f"{index:08d}.pkl")


def read_spill(spill_dir: str, index: int) -> list[tuple]:
    """(id, source, licence, text) tuples of one processed batch."""
    with open(spill_path(spill_dir, index), "rb") as f:
        return pickle.load(f)


class Cleaner:
    """Runs :class:`~lmtrain.data.stages.Stages` over a batch and spills the kept texts."""

    def __init__(
        self,
        cfg: dict,
        spill_dir: str,
        eval_ngrams: np.ndarray | None = None,
        eval_vocab=None,
    ):
        self.cfg, self.spill_dir = cfg, spill_dir
        self.stages = Stages(cfg, eval_ngrams, eval_vocab)
        self.num_perm = cfg["dedup"]["num_perm"]

    def _stage_cpu(self) -> dict:
        """CPU seconds per stage since the last call."""
        now = Counter(self.stages.cpu)
        out = _delta(now, getattr(self, "_last_cpu", Counter()))
        self._last_cpu = now
        return out

    def process(self, index: int, docs: list) -> dict:
        cpu0 = time.process_time()
        policy = ErrorPolicy(self.cfg["on_error"])
        counts = {s: Counter() for s in STAGES}
        removed: list[tuple[str, str, str]] = []
        kept, keys, chars, sigs, times, found = [], [], [], [], [], {}
        nbytes = sum(len(doc.data) for doc in docs)
        cleaned = [
            (doc, c)
            for doc, c in zip(docs, self.stages.clean_batch(docs, counts, removed, policy))
            if c is not None
        ]
        feats = self.stages.features_batch(
            [c[0] for _, c in cleaned], [c[1] for _, c in cleaned], keys=[c[3] for _, c in cleaned]
        )
        for (doc, (text, _, t, _)), f in zip(cleaned, feats):
            if f.sig is not None:
                sigs.append(f.sig)
            if f.matches.size:
                found[len(kept)] = f.matches
            kept.append((doc.id, doc.source, doc.licence, text))
            keys.append(f.key)
            chars.append(f.chars)
            times.append(t)
        with open(spill_path(self.spill_dir, index), "wb") as f:
            pickle.dump(kept, f, protocol=pickle.HIGHEST_PROTOCOL)
        n = len(kept)
        return {
            "index": index,
            "n": n,
            "keys": np.array(keys, dtype=np.uint64),
            "chars": np.array(chars, dtype=np.int64),
            "times": np.array(times, dtype=np.float64),
            "sigs": np.stack(sigs) if sigs else np.zeros((0, self.num_perm), np.uint32),
            "matches": found,
            "counts": {s: dict(c) for s, c in counts.items()},
            "errors": dict(policy.counts),
            "error_examples": policy.examples,
            "removed": removed,
            "docs_in": len(docs),
            "bytes_in": nbytes,
            "cpu_s": time.process_time() - cpu0,
            "stage_cpu_s": self._stage_cpu(),
        }


_CLEANER: Cleaner | None = None


def init_worker(cfg: dict, spill_dir: str, eval_ngrams, eval_vocab=None) -> None:
    global _CLEANER
    _CLEANER = Cleaner(cfg, spill_dir, eval_ngrams, eval_vocab)


def work(item) -> dict:
    index, docs = item
    return _CLEANER.process(index, docs)
