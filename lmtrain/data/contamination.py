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
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lmtrain.data.hashing import mix64, ngram_hashes, word_hashes
from lmtrain.errors import DataError

_WORD = re.compile(r"\w+")


# For ASCII text, \\w+ runs are [A-Za-z0-9_] runs: one bytes.translate (lower-casing, every other
# byte to a space) and a split find the same words (as bytes) at C speed.
_ASCII_WORDS = bytes(
    (i + 32 if 65 <= i <= 90 else i) if chr(i).isalnum() or i == 95 else 32 for i in range(128)
) + bytes(32 for _ in range(128))


def words_of(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFC", text).lower())


_GATE_BITS = 20  # bitmap size 2^20: a few thousand entries give under 1% false positives
_MASK = np.uint64((1 << _GATE_BITS) - 1)


def _gate_hashes(buf: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(hash, start) of each word of ``buf`` (words: runs of bytes other than space). The hash
    reads a word's first and last 8 bytes and its length: equal words get equal hashes, which is
    all the gate needs (two long words differing only inside collide, a false positive)."""
    b = np.frombuffer(buf, dtype=np.uint8)
    edge = np.diff((b != 32).view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts, ends = np.flatnonzero(edge == 1), np.flatnonzero(edge == -1)
    if starts.size == 0:
        return np.zeros(0, np.uint64), starts
    pad = buf + bytes(8)
    at = np.ndarray((len(buf) + 1,), dtype="<u8", buffer=pad, strides=(1,))  # 8 bytes at each i
    size = ends - starts
    head = at[starts] & _LOW_BYTES[np.minimum(size, 8)]
    tail = at[np.maximum(ends - 8, starts)] & _LOW_BYTES[np.minimum(size, 8)]
    return mix64(head ^ mix64(tail + size.astype(np.uint64))), starts


_LOW_BYTES = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [2**64 - 1], dtype=np.uint64)


def _gate_bytes(text: str) -> bytes:
    """The text's ``words_of`` words, separated by spaces, as UTF-8."""
    if text.isascii():  # \w+ of ASCII: [A-Za-z0-9_] runs, lower-cased by the same table
        return text.encode().translate(_ASCII_WORDS)
    return " ".join(words_of(text)).encode("utf-8", "surrogatepass")


class EvalGate(NamedTuple):
    """Bitmaps of the gate hashes (low bits) of the evaluation sets' words and word pairs, for
    :func:`eval_candidates`: a lookup is one gather, and a false positive only costs time."""

    words: np.ndarray
    pairs: np.ndarray

    @classmethod
    def of(cls, vocab) -> EvalGate:
        w, _ = _gate_hashes(" ".join(sorted(vocab.words)).encode("utf-8", "surrogatepass"))
        pairs = sorted(vocab.bigrams)
        firsts, _ = _gate_hashes(" ".join(a for a, _ in pairs).encode("utf-8", "surrogatepass"))
        seconds, _ = _gate_hashes(" ".join(b for _, b in pairs).encode("utf-8", "surrogatepass"))
        return cls(_bitmap(w), _bitmap(_pair(firsts, seconds)))


def _pair(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return mix64(a * np.uint64(0x100000001B3) + b)


def _bitmap(h: np.ndarray) -> np.ndarray:
    out = np.zeros(1 << _GATE_BITS, dtype=bool)
    out[(h & _MASK).astype(np.int64)] = True
    return out


def _in(x: np.ndarray, bitmap: np.ndarray) -> np.ndarray:
    return bitmap[(x & _MASK).astype(np.int64)]


def eval_candidates(texts: list[str], n: int, gate: EvalGate) -> np.ndarray:
    """Per text: whether ``n`` consecutive words (``n - 1`` consecutive word pairs) are in the
    evaluation sets' vocabulary, by their gate hashes. Every document :func:`matches` finds
    something in passes this test (a hash collision only lets an extra one through to
    :func:`matches`), so the rest need no n-gram hashing; decided for the whole batch in a few
    numpy passes over its bytes, with no per-word Python objects."""
    out = np.zeros(len(texts), dtype=bool)
    parts = [_gate_bytes(t) for t in texts]
    h, starts = _gate_hashes(b" ".join(parts))
    if h.size < n:
        return out
    doc_start = np.zeros(len(parts), dtype=np.int64)
    np.cumsum([len(p) + 1 for p in parts[:-1]], out=doc_start[1:])
    # each word's document: the first word of each document found, then repeated
    first = np.searchsorted(starts, doc_start)
    doc = np.repeat(np.arange(len(parts)), np.diff(first, append=starts.size))
    runs = _in(h, gate.words)
    if n > 1:
        # n consecutive known words in one document first: only the documents with such a
        # run need their word pairs hashed and looked up.
        c = np.zeros(runs.size + 1, dtype=np.int64)
        np.cumsum(runs, out=c[1:])
        win = np.flatnonzero((c[n:] - c[:-n] == n) & (doc[n - 1 :] == doc[: doc.size - n + 1]))
        if win.size == 0:
            return out
        maybe = np.zeros(len(texts), dtype=bool)
        maybe[doc[win]] = True
        sel = np.flatnonzero(maybe[doc])
        h, doc, runs = h[sel], doc[sel], runs[sel]
    k = n
    if n > 1:
        same = doc[1:] == doc[:-1]  # both words of the pair in one document
        runs, k = same & runs[:-1] & runs[1:] & _in(_pair(h[:-1], h[1:]), gate.pairs), n - 1
    c = np.zeros(runs.size + 1, dtype=np.int64)
    np.cumsum(runs, out=c[1:])
    hit = np.flatnonzero(c[k:] - c[:-k] == k)  # windows of k Trues (a False ends each document)
    out[doc[hit]] = True
    return out


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
