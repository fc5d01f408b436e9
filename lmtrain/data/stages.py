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
from time import thread_time
from typing import NamedTuple

import numpy as np

from lmtrain.data.batch_ngrams import minhash_batch
from lmtrain.data.batch_words import collapsed, find_words, hash_words, lower_words
from lmtrain.data.contamination import EvalGate, eval_candidates, matches
from lmtrain.data.dedup import minhash_params
from lmtrain.data.default_corpus import extract_docstrings
from lmtrain.data.hashing import hash64, word_hashes
from lmtrain.data.markup import html_to_text, markdown_to_text, sniff_format
from lmtrain.data.normalize import decode_utf8, normalize_text
from lmtrain.data.pii import PiiScrubber, candidates_in
from lmtrain.data.quality import load_blocklist, quality_reasons_batch
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
        self.eval_gate = EvalGate.of(eval_vocab) if eval_vocab is not None else None
        self.by_time = cfg["split"]["method"] == "time"
        # CPU seconds per stage in this thread (for tools/bench_data.py; not in the manifest);
        # thread_time, since process_time is a slow system call on some virtual machines.
        self.cpu: Counter = Counter()

    def features(self, text: str, wh: np.ndarray) -> Features:
        """The features of one cleaned document (the same as :meth:`features_batch`)."""
        return self.features_batch([text], [wh])[0]

    def features_batch(
        self,
        texts: list[str],
        whs: list[np.ndarray],
        words: list[list[str]] | None = None,
        keys: list[int] | None = None,
    ) -> list[Features]:
        """Features of cleaned documents (``whs``: their word hashes; ``words``: their
        ``text.split()``, ``keys``: their content hashes, if the caller has them). MinHash and
        the contamination pre-filter run over the whole batch at once."""
        cpu, t0 = self.cpu, thread_time()
        sigs = None
        if self.minhash is not None:
            offsets = _offsets([w.size for w in whs])
            wh = np.concatenate(whs) if whs else np.zeros(0, np.uint64)
            sigs = minhash_batch(wh, offsets, self.cfg["dedup"]["shingle_words"], *self.minhash)
        t1 = thread_time()
        n = self.cfg["contamination"]["ngram"]
        if self.eval_ngrams.size == 0:
            found = [np.zeros(0, np.uint64) for _ in texts]
        else:
            # Only documents with n consecutive evaluation-set words (and n - 1 word pairs) can
            # share an n-gram; the rest are decided for the whole batch in a few passes.
            maybe = (
                eval_candidates(texts, n, self.eval_gate)
                if self.eval_gate is not None
                else [True] * len(texts)
            )
            found = [
                matches(t, n, self.eval_ngrams, self.eval_vocab) if m else np.zeros(0, np.uint64)
                for t, m in zip(texts, maybe)
            ]
        t2 = thread_time()
        if keys is None:
            keys = (
                [content_key(t) for t in texts]
                if words is None
                else [hash64(" ".join(w)) for w in words]
            )
        cpu["minhash"] += t1 - t0
        cpu["contamination_ngrams"] += t2 - t1
        cpu["content_hash"] += thread_time() - t2
        return [
            Features(k, len(t), None if sigs is None else sigs[i], m)
            for i, (k, t, m) in enumerate(zip(keys, texts, found))
        ]

    def clean(self, doc, counts: dict[str, Counter], removed: list, policy: ErrorPolicy):
        """``(text, word hashes, time key)`` of a kept document, or None (the reason appended to
        ``removed`` as ``(id, stage, reason)``, counted in ``counts``, bad input to ``policy``)."""
        out = self.clean_batch([doc], counts, removed, policy)[0]
        return None if out is None else out[:3]

    def clean_batch(
        self, docs: list, counts: dict[str, Counter], removed: list, policy: ErrorPolicy
    ) -> list:
        """:meth:`clean` of each document, plus its content hash (:func:`content_key`):
        ``(text, word hashes, time key, content hash)`` or None. ``removed`` and ``policy`` see
        the documents in order, as if each went through :meth:`clean` in turn; the words, their
        hashes, the quality filters' statistics and the content hashes come from the whole
        batch at once."""
        cfg, cpu = self.cfg, self.cpu
        # What happens to a removed document's record and error message, replayed in order.
        events: list = [None] * len(docs)
        texts = self._texts(docs, counts, events)
        t3 = thread_time()
        idx = [i for i, t in enumerate(texts) if t is not None]
        kept = [texts[i] for i in idx]
        # The words of the whole batch from its bytes (batch_words): no Python object per word.
        words = find_words(kept)
        low = lower_words(words, kept)
        wh = hash_words(low)
        offsets = words.offsets
        if cfg["quality"]["enabled"]:
            reasons = quality_reasons_batch(kept, words, wh, cfg["quality"], self.blocklist)
        else:
            reasons = [None] * len(kept)
        t4 = thread_time()
        cpu["quality_and_word_hashes"] += t4 - t3
        out: list = [None] * len(docs)
        if self.pii is not None:  # the texts that may have PII, from the batch's bytes
            maybe_pii = candidates_in(words.data, words.spans[:-1], low.data, low.spans[:-1])
        for j, i in enumerate(idx):
            reason = reasons[j]
            if reason is not None:
                counts["quality"][reason] += 1
                events[i] = ((docs[i].id, "quality", reason), None)
                continue
            text, h = kept[j], wh[offsets[j] : offsets[j + 1]]
            if self.pii is not None and maybe_pii[j]:
                new, c = self.pii.scrub(text)
                if c:
                    counts["pii"].update(c)
                    counts["pii"]["documents_changed"] += 1
                    text = new
                    h = word_hashes(text.lower().split())
            out[i] = (text, h, math.nan)
        t5 = thread_time()
        if self.pii is not None:
            cpu["pii"] += t5 - t4
        if any(o is not None for o in out):
            # Whitespace-collapsed texts from the batch's bytes; a text PII changed is redone.
            flat, bounds = collapsed(words)
            b = bounds.tolist()
            for j, i in enumerate(idx):
                if out[i] is not None:
                    text = out[i][0]
                    key = hash64(flat[b[j] : b[j + 1]]) if text is kept[j] else content_key(text)
                    out[i] = (*out[i], key)
        cpu["content_hash"] += thread_time() - t5
        for i, doc in enumerate(docs):
            if events[i] is not None:
                record, call = events[i]
                if call is not None:
                    policy(*call)
                removed.append(record)
            elif out[i] is not None and self.by_time:
                field = cfg["split"]["time_field"]
                try:
                    out[i] = (out[i][0], out[i][1], time_key(doc.time), out[i][3])
                except (ValueError, TypeError):
                    what = "missing" if doc.time is None else f"unreadable ({doc.time!r})"
                    policy(
                        "bad_time_field",
                        f"{doc.path}:{doc.line}: time field {field!r} is {what}; give ISO 8601 or a number",
                    )
                    removed.append((doc.id, "errors", "bad_time_field"))
                    out[i] = None
        return out

    def _texts(self, docs: list, counts: dict[str, Counter], events: list) -> list:
        """Decode, markup and normalise each document; None for a removed one (its record and
        error message go to ``events[i]``). Stage by stage over the batch, so the CPU clock is
        read a few times per batch rather than per document."""
        cfg, cpu = self.cfg, self.cpu
        t0 = thread_time()
        texts = [self._decode(doc, counts, events, i) for i, doc in enumerate(docs)]
        t1 = thread_time()
        cpu["decode"] += t1 - t0
        texts = [
            None if t is None else self._markup(doc, t, counts, events, i)
            for i, (doc, t) in enumerate(zip(docs, texts))
        ]
        t2 = thread_time()
        cpu["markup"] += t2 - t1
        n = cfg["normalize"]
        for i, text in enumerate(texts):
            if text is None:
                continue
            if n["enabled"]:
                text, c = normalize_text(text, nfc=n["nfc"], max_blank_lines=n["max_blank_lines"])
                counts["normalize"].update(c)
            if not text.strip():
                counts["normalize"]["empty_dropped"] += 1
                events[i] = ((docs[i].id, "normalize", "empty"), None)
                text = None
            texts[i] = text
        cpu["normalize"] += thread_time() - t2
        return texts

    def _decode(self, doc, counts: dict[str, Counter], events: list, i: int) -> str | None:
        data = doc.data
        if not isinstance(data, bytes):
            return data
        res = decode_utf8(data, self.cfg["normalize"]["invalid_utf8"], first_line=max(doc.line, 1))
        if res.status == "repaired":
            counts["decode"]["invalid_utf8_repaired"] += 1
        elif res.status == "dropped":
            counts["decode"]["invalid_utf8_dropped"] += 1
            events[i] = ((doc.id, "decode", "invalid_utf8"), None)
            return None
        elif res.status == "invalid":
            events[i] = (
                (doc.id, "errors", "invalid_utf8"),
                (
                    "invalid_utf8",
                    f"{doc.path}:{res.line}: invalid UTF-8 (byte 0x{res.byte:02x} at column {res.column}); "
                    "re-encode the file as UTF-8 or set normalize.invalid_utf8='replace' (repair) or 'drop'",
                ),
            )
            return None
        return res.text

    def _markup(self, doc, text: str, counts: dict[str, Counter], events: list, i: int):
        fmt = doc.fmt
        if fmt == "pydoc":
            text = extract_docstrings(text)
            if text is None:
                counts["markup"]["docstrings_unparseable"] += 1
                events[i] = ((doc.id, "markup", "docstrings_unparseable"), None)
                return None
        elif fmt == "auto":
            fmt = sniff_format(text)
        if self.cfg["markup"]["enabled"] and fmt in ("html", "markdown"):
            text = html_to_text(text) if fmt == "html" else markdown_to_text(text)
            counts["markup"][f"{fmt}_converted"] += 1
        return text


def content_key(text: str) -> int:
    """The exact-dedup and split key: 64-bit hash of the whitespace-collapsed text."""
    return hash64(" ".join(text.split()))


def _offsets(sizes) -> np.ndarray:
    out = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=out[1:])
    return out
