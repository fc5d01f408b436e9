"""The per-document stages as pure functions, shared by the local runner (``clean.py``) and the
Beam runner (``beam_runner.py``): decode → markup → normalise → quality → PII, then the document's
features for the global steps (content hash for exact dedup and the hash split, MinHash signature
for near dedup, time key, n-grams shared with the evaluation sets).

``Stages(cfg, eval_ngrams)`` holds what is built once per worker (blocklist, PII scrubber, MinHash
parameters); its methods depend on nothing else, so either runner may call them on any document
in any order and get the same answer.
"""

from __future__ import annotations

import math
from collections import Counter
from time import process_time
from typing import NamedTuple

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


class Features(NamedTuple):
    key: int  # 64-bit content hash of the whitespace-collapsed text
    chars: int
    sig: np.ndarray | None  # MinHash signature (uint32, num_perm) or None when near dedup is off
    matches: np.ndarray  # the document's n-grams found in the evaluation sets (sorted unique)


class Stages:
    def __init__(self, cfg: dict, eval_ngrams: np.ndarray | None = None, eval_vocab=None):
        self.cfg = cfg
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
        self.eval_vocab = eval_vocab
        self.by_time = cfg["split"]["method"] == "time"
        # CPU seconds per stage in this process (for tools/bench_data.py; not in the manifest).
        self.cpu: Counter = Counter()

    def features(self, text: str, wh: np.ndarray) -> Features:
        cpu, t0 = self.cpu, process_time()
        sig = None
        if self.minhash is not None:
            sig = minhash_signature(
                shingle_hashes(wh, self.cfg["dedup"]["shingle_words"]), *self.minhash
            )
        t1 = process_time()
        m = matches(text, self.cfg["contamination"]["ngram"], self.eval_ngrams, self.eval_vocab)
        t2 = process_time()
        key = hash64(" ".join(text.split()))
        cpu["minhash"] += t1 - t0
        cpu["contamination_ngrams"] += t2 - t1
        cpu["content_hash"] += process_time() - t2
        return Features(key, len(text), sig, m)

    def clean(self, doc, counts: dict[str, Counter], removed: list, policy: ErrorPolicy):
        """``(text, word hashes, time key)`` of a kept document, or None (the reason appended to
        ``removed`` as ``(id, stage, reason)``, counted in ``counts``, bad input to ``policy``)."""
        cfg, cpu = self.cfg, self.cpu
        t0 = process_time()
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
        t1 = process_time()
        cpu["decode"] += t1 - t0
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
        t2 = process_time()
        cpu["markup"] += t2 - t1
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
        t3 = process_time()
        cpu["normalize"] += t3 - t2
        low = text.lower().split()
        wh = word_hashes(low)
        if cfg["quality"]["enabled"]:
            q = cfg["quality"]
            reason = quality_reason(text, text.split(), wh, q, self.blocklist, low)
            t4 = process_time()
            cpu["quality_and_word_hashes"] += t4 - t3
            if reason is not None:
                counts["quality"][reason] += 1
                removed.append((doc.id, "quality", reason))
                return None
        else:
            t4 = process_time()
            cpu["quality_and_word_hashes"] += t4 - t3
        if self.pii is not None:
            new, c = self.pii.scrub(text)
            if c:
                counts["pii"].update(c)
                counts["pii"]["documents_changed"] += 1
                text = new
                wh = word_hashes(text.lower().split())
            cpu["pii"] += process_time() - t4
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
