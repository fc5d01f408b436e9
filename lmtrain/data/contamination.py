"""Stage 7: evaluation-set contamination check (n-gram overlap with the train split).

The GPT-3 paper's method (Brown et al. 2020, appendix C): an evaluation example is *contaminated*
when any of its word 13-grams also occurs in the training data. Words here are lower-cased ``\\w+``
runs (punctuation and case ignored). Examples shorter than ``n`` words cannot be checked and are
reported as such. For every evaluation set the report gives the examples checked, contaminated
examples (and their ids), and the number of train documents that overlap; with
``contamination.drop`` those train documents are removed before tokenizer training and writing.

Evaluation sets are JSONL (one example per line: the configured ``fields``, or every string value
in the object) or text files (one example per blank-line separated paragraph).
"""

from __future__ import annotations

import gzip
import json
import re
import unicodedata
from itertools import chain
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lmtrain.data.batch_ngrams import runs_in
from lmtrain.data.hashing import ngram_hashes, word_hashes
from lmtrain.errors import DataError

_WORD = re.compile(r"\w+")


# For ASCII text, \\w+ runs are [A-Za-z0-9_] runs: one bytes.translate (lower-casing, every other
# byte to a space) and a split find the same words (as bytes) at C speed.
_ASCII_WORDS = bytes(
    (i + 32 if 65 <= i <= 90 else i) if chr(i).isalnum() or i == 95 else 32 for i in range(128)
) + bytes(32 for _ in range(128))


def words_of(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFC", text).lower())


def _gate_words(text: str) -> list:
    """``words_of(text)``, as bytes for ASCII text."""
    if text.isascii():
        return text.encode().translate(_ASCII_WORDS).split()
    return words_of(text)


def eval_candidates(texts: list[str], n: int, vocab) -> np.ndarray:
    """Per text: whether ``n`` consecutive words (``n - 1`` consecutive word pairs) are all in
    ``vocab`` (:attr:`EvalSets.vocab`, with ASCII entries also as bytes), the condition under
    which :func:`matches` hashes a document; decided for the whole batch in a few passes."""
    words = [_gate_words(t) for t in texts]
    starts = np.zeros(len(words) + 1, dtype=np.int64)
    np.cumsum([len(w) + 1 for w in words], out=starts[1:])
    seq = chain.from_iterable(chain(w, (None,)) for w in words)  # None: a separator, never known
    flags = np.fromiter(map(vocab.words.__contains__, seq), dtype=bool, count=int(starts[-1]))
    maybe = runs_in(flags, n, starts)
    if n > 1 and maybe.any():
        cand = np.flatnonzero(maybe)
        pairs = [list(zip(words[d], words[d][1:])) for d in cand]
        starts = np.zeros(len(pairs) + 1, dtype=np.int64)
        np.cumsum([len(p) + 1 for p in pairs], out=starts[1:])
        seq = chain.from_iterable(chain(p, (None,)) for p in pairs)
        flags = np.fromiter(map(vocab.bigrams.__contains__, seq), dtype=bool, count=int(starts[-1]))
        maybe[cand] = runs_in(flags, n - 1, starts)
    return maybe


def ngrams_of(text: str, n: int) -> np.ndarray:
    return ngram_hashes(word_hashes(words_of(text)), n)


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def read_eval_examples(path: str, fields=()) -> list[tuple[str, str]]:
    """(example id, text) pairs from a JSONL(.gz) or text file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"evaluation set {path} not found: fix contamination.eval_sets")
    out = []
    if p.name.endswith((".jsonl", ".jsonl.gz", ".json")):
        opener = gzip.open if p.name.endswith(".gz") else open
        with opener(p, "rt", encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}:{line_no}: malformed JSON in evaluation set ({e.msg} at column {e.colno}); fix the line"
                    ) from None
                parts = (
                    [s for fld in fields for s in _strings(obj.get(fld, ""))]
                    if fields
                    else _strings(obj)
                )
                out.append((f"{p.name}:{line_no}", "\n".join(parts)))
    else:
        text = p.read_text(encoding="utf-8", errors="replace")
        for i, para in enumerate(re.split(r"\n\s*\n", text)):
            if para.strip():
                out.append((f"{p.name}#{i}", para))
    return out


class EvalVocab(NamedTuple):
    words: frozenset
    bigrams: frozenset


class EvalSets:
    """n-gram hashes of every evaluation set; ``all_ngrams`` (sorted, unique) is sent to workers."""

    def __init__(self, specs, n: int):
        self.n = n
        self.sets = []
        words: set[str] = set()
        bigrams: set[tuple[str, str]] = set()
        for spec in specs:
            name, path, fields = spec["name"], spec["path"], tuple(spec.get("fields", ()))
            examples = read_eval_examples(path, fields)
            for _, text in examples:
                ws = words_of(text)
                words.update(ws)
                bigrams.update(zip(ws, ws[1:]))
            grams = [np.unique(ngrams_of(text, n)) for _, text in examples]
            self.sets.append(
                {
                    "name": name or Path(path).name,
                    "path": str(path),
                    "ids": [e[0] for e in examples],
                    "grams": grams,
                }
            )
        allg = [g for s in self.sets for g in s["grams"]]
        self.all_ngrams = np.unique(np.concatenate(allg)) if allg else np.zeros(0, np.uint64)
        # Every word and word pair of every example: a document n-gram can only match when all
        # its words and pairs are in here, which set lookups check far faster than hashing the
        # document's n-grams.
        self.vocab = EvalVocab(frozenset(words), frozenset(bigrams))

    def report(self, train_matches: dict[int, np.ndarray], dropped: set[int]) -> list[dict]:
        """Per eval set: ``train_matches`` maps train document index → its matching n-grams."""
        matched = (
            np.unique(np.concatenate(list(train_matches.values())))
            if train_matches
            else np.zeros(0, np.uint64)
        )
        reports = []
        for s in self.sets:
            set_grams = (
                np.unique(np.concatenate(s["grams"])) if s["grams"] else np.zeros(0, np.uint64)
            )
            contaminated = [
                i for i, g in zip(s["ids"], s["grams"]) if g.size and np.isin(g, matched).any()
            ]
            overlapping = [d for d, g in train_matches.items() if np.isin(g, set_grams).any()]
            checked = sum(1 for g in s["grams"] if g.size)
            reports.append({
                "name": s["name"],
                "path": s["path"],
                "examples": len(s["ids"]),
                "examples_checked": checked,
                "examples_too_short": len(s["ids"]) - checked,
                "contaminated_examples": len(contaminated),
                "contaminated_fraction": round(len(contaminated) / checked, 6) if checked else 0.0,
                "contaminated_example_ids": contaminated[:50],
                "train_documents_overlapping": len(overlapping),
                "train_documents_dropped": sum(1 for d in overlapping if d in dropped),
            })  # fmt: skip
        return reports


def _has_run(flags: np.ndarray, n: int) -> bool:
    """True when ``flags`` holds ``n`` consecutive Trues."""
    if flags.size < n:
        return False
    c = np.concatenate(([0], np.cumsum(flags)))
    return bool((c[n:] - c[:-n] == n).any())


def matches(text: str, n: int, eval_ngrams: np.ndarray, evals=None) -> np.ndarray:
    """The document's n-grams that appear in ``eval_ngrams`` (sorted unique uint64).

    ``evals`` (:attr:`EvalSets.vocab`, the words and word pairs of the examples): skip the
    hashing when no ``n`` consecutive words (``n - 1`` consecutive word pairs) of the document
    are all evaluation-set words (pairs); then no n-gram can match."""
    if eval_ngrams.size == 0:
        return np.zeros(0, np.uint64)
    words = words_of(text)
    if evals is not None:
        known = np.fromiter(map(evals.words.__contains__, words), dtype=bool, count=len(words))
        if not _has_run(known, n):
            return np.zeros(0, np.uint64)
        if n > 1:
            pairs = zip(words, words[1:])
            known = np.fromiter(map(evals.bigrams.__contains__, pairs), bool, len(words) - 1)
            if not _has_run(known, n - 1):
                return np.zeros(0, np.uint64)
    g = ngram_hashes(word_hashes(words), n)
    if g.size == 0:
        return g
    pos = np.searchsorted(eval_ngrams, g).clip(max=eval_ngrams.size - 1)
    return np.unique(g[eval_ngrams[pos] == g])
