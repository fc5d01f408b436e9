"""Per-document stages 1-4 plus dedup keys, run on batches in worker processes.

``Cleaner.process(index, docs)`` takes a batch of :class:`RawDoc`, runs decode → markup →
normalise → quality → PII on each, writes the surviving texts to ``spill/<index>.pkl`` (so the
corpus never sits in memory) and returns only compact per-document arrays: a 64-bit content hash
(exact dedup, split), the character count, a MinHash signature (near dedup), the time key
(time-based split) and any n-grams shared with the evaluation sets, plus counts by stage/reason.
"""

from __future__ import annotations

import math
import os
import pickle
from collections import Counter

import numpy as np

from lmtrain.data.contamination import matches
from lmtrain.data.dedup import minhash_params, minhash_signature, shingle_hashes
from lmtrain.data.default_corpus import extract_docstrings
from lmtrain.data.hashing import hash64, word_hashes
from lmtrain.data.markup import html_to_text, markdown_to_text, sniff_format
from lmtrain.data.normalize import decode_utf8, normalize_text
from lmtrain.data.pii import PiiScrubber
from lmtrain.data.quality import load_blocklist, quality_reason
from lmtrain.data.sources import ErrorPolicy
from lmtrain.data.split import time_key

STAGES = ("decode", "markup", "normalize", "quality", "pii")


def spill_path(spill_dir: str, index: int) -> str:
    return os.path.join(spill_dir, f"{index:08d}.pkl")


def read_spill(spill_dir: str, index: int) -> list[tuple]:
    """(id, source, licence, text) tuples of one processed batch."""
    with open(spill_path(spill_dir, index), "rb") as f:
        return pickle.load(f)


class Cleaner:
    def __init__(self, cfg: dict, spill_dir: str, eval_ngrams: np.ndarray | None = None):
        self.cfg, self.spill_dir = cfg, spill_dir
        q, p = cfg["quality"], cfg["pii"]
        self.blocklist = (
            load_blocklist(q["blocklist"], q["blocklist_path"]) if q["enabled"] else frozenset()
        )
        self.pii = (
            PiiScrubber(p["placeholder"], p["kinds"], p["keep_nonpublic_ips"])
            if p["enabled"]
            else None
        )
        self.num_perm = cfg["dedup"]["num_perm"]
        self.minhash = minhash_params(self.num_perm, cfg["seed"]) if cfg["dedup"]["near"] else None
        self.eval_ngrams = eval_ngrams if eval_ngrams is not None else np.zeros(0, np.uint64)
        self.by_time = cfg["split"]["method"] == "time"

    def process(self, index: int, docs: list) -> dict:
        policy = ErrorPolicy(self.cfg["on_error"])
        counts = {s: Counter() for s in STAGES}
        removed: list[tuple[str, str, str]] = []
        kept, keys, chars, sigs, times, found = [], [], [], [], [], {}
        for doc in docs:
            out = self._clean(doc, counts, removed, policy)
            if out is None:
                continue
            text, wh, t = out
            if self.minhash is not None:
                sigs.append(
                    minhash_signature(
                        shingle_hashes(wh, self.cfg["dedup"]["shingle_words"]), *self.minhash
                    )
                )
            m = matches(text, self.cfg["contamination"]["ngram"], self.eval_ngrams)
            if m.size:
                found[len(kept)] = m
            kept.append((doc.id, doc.source, doc.licence, text))
            keys.append(hash64(" ".join(text.split())))
            chars.append(len(text))
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
        }

    def _clean(self, doc, counts, removed, policy):
        cfg = self.cfg
        data = doc.data
        if isinstance(data, bytes):
            res = decode_utf8(data, cfg["normalize"]["invalid_utf8"], first_line=max(doc.line, 1))
            if res.status == "repaired":
                counts["decode"]["invalid_utf8_repaired"] += 1
            elif res.status == "dropped":
                counts["decode"]["invalid_utf8_dropped"] += 1
                removed.append((doc.id, "decode", "invalid_utf8"))
                return None
            elif res.status == "invalid":
                policy(
                    "invalid_utf8",
                    f"{doc.path}:{res.line}: invalid UTF-8 (byte 0x{res.byte:02x} at column {res.column}); "
                    "re-encode the file as UTF-8 or set normalize.invalid_utf8='replace' (repair) or 'drop'",
                )
                removed.append((doc.id, "errors", "invalid_utf8"))
                return None
            text = res.text
        else:
            text = data
        fmt = doc.fmt
        if fmt == "pydoc":
            text = extract_docstrings(text)
            if text is None:
                counts["markup"]["docstrings_unparseable"] += 1
                removed.append((doc.id, "markup", "docstrings_unparseable"))
                return None
        elif fmt == "auto":
            fmt = sniff_format(text)
        if cfg["markup"]["enabled"] and fmt in ("html", "markdown"):
            text = html_to_text(text) if fmt == "html" else markdown_to_text(text)
            counts["markup"][f"{fmt}_converted"] += 1
        if cfg["normalize"]["enabled"]:
            text, c = normalize_text(
                text,
                nfc=cfg["normalize"]["nfc"],
                max_blank_lines=cfg["normalize"]["max_blank_lines"],
            )
            counts["normalize"].update(c)
        if not text.strip():
            counts["normalize"]["empty_dropped"] += 1
            removed.append((doc.id, "normalize", "empty"))
            return None
        wh = word_hashes(text.lower().split())
        if cfg["quality"]["enabled"]:
            reason = quality_reason(text, text.split(), wh, cfg["quality"], self.blocklist)
            if reason is not None:
                counts["quality"][reason] += 1
                removed.append((doc.id, "quality", reason))
                return None
        if self.pii is not None:
            new, c = self.pii.scrub(text)
            if c:
                counts["pii"].update(c)
                counts["pii"]["documents_changed"] += 1
                text = new
                wh = word_hashes(text.lower().split())
        t = math.nan
        if self.by_time:
            field = cfg["split"]["time_field"]
            try:
                t = time_key(doc.time)
            except (ValueError, TypeError):
                what = "missing" if doc.time is None else f"unreadable ({doc.time!r})"
                policy(
                    "bad_time_field",
                    f"{doc.path}:{doc.line}: time field {field!r} is {what}; give ISO 8601 or a number",
                )
                removed.append((doc.id, "errors", "bad_time_field"))
                return None
        return text, wh, t


_CLEANER: Cleaner | None = None


def init_worker(cfg: dict, spill_dir: str, eval_ngrams) -> None:
    global _CLEANER
    _CLEANER = Cleaner(cfg, spill_dir, eval_ngrams)


def work(item) -> dict:
    index, docs = item
    return _CLEANER.process(index, docs)
