"""Stage 3: document quality filters (Gopher and C4 heuristics), thresholds from the config.

Every threshold is a config value; a negative value (or an empty tuple) switches that filter off.
A dropped document is counted under the first filter it fails, in the order below.

Sources of the heuristics (defaults in ``lmtrain/data/prepare_config.py`` are the published values,
the code corpus config relaxes the prose-only ones):

* Rae et al. 2021, *Scaling Language Models: Methods, Analysis & Insights from Training Gopher*,
  appendix A.1.1 "quality filters" (MassiveWeb): keep documents with 50..100,000 words, mean word
  length 3..10 characters, symbol-to-word ratio < 0.1 for "#" and ellipsis, < 90% of lines starting
  with a bullet, < 30% of lines ending with an ellipsis, >= 80% of words containing a letter, and at
  least two of the stop words *the, be, to, of, and, that, have, with*.
* Same paper, table A1 "repetition removal": drop when duplicate lines are > 30% of lines or > 20% of
  characters; duplicate paragraphs > 30% / > 20%; the most frequent 2-, 3-, 4-gram covers > 20%,
  18%, 16% of characters; duplicated 5..10-grams cover > 15, 14, 13, 12, 11, 10% of characters.
* Raffel et al. 2020, *Exploring the Limits of Transfer Learning with a Unified Text-to-Text
  Transformer* (C4): drop pages containing a word from a blocklist ("List of Dirty, Naughty,
  Obscene, and Otherwise Bad Words"); here the list is yours (``quality.blocklist`` /
  ``quality.blocklist_path``), none ships with lmtrain.

Words are whitespace-separated tokens; repetition is measured on lower-cased words; character
fractions are over the characters of words (whitespace excluded).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable

import numpy as np

from lmtrain.data.batch_ngrams import NgramBatch
from lmtrain.data.batch_words import Words, char_lengths
from lmtrain.data.hashing import LazyNgramHashes, ngram_hashes, word_hashes

STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
_STOP_HASHES = np.sort(word_hashes(sorted(STOP_WORDS)))  # 8: one bit each in a uint8
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)
BULLETS = ("-", "*", "•", "‣", "◦", "▪", "●", "○", "■", "–", "—")
ELLIPSES = ("...", "…")
_ASCII_BULLETS = tuple(b for b in BULLETS if b.isascii())
# A whitespace-delimited word with no letter (digits, punctuation, symbols only).
_NO_LETTER_WORD = re.compile(r"(?<!\S)(?:(?!\s)[\W\d_])+(?!\S)")
# Lines (as split on "\n") that start with a bullet after whitespace / end with an ellipsis
# before whitespace: one C-speed scan instead of a Python loop over the lines.
_BULLET_LINE = re.compile(
    r"^[^\S\n]*(?:" + "|".join(re.escape(b) for b in BULLETS) + ")", re.MULTILINE
)
_ELLIPSIS_LINE = re.compile(
    r"(?:" + "|".join(re.escape(e) for e in ELLIPSES) + r")[^\S\n]*$", re.MULTILINE
)
# ASCII text: letters -> "a", every whitespace byte str.split splits on (\x1c-\x1f included) ->
# a space, everything else deleted; the words left are exactly the words that contain a letter,
# the runs of "a", counted without building them.
_ASCII_LETTERS = bytes(range(65, 91)) + bytes(range(97, 123))
_ALPHA_DELETE = bytes(i for i in range(128) if i not in _ASCII_LETTERS and not chr(i).isspace())
_ALPHA_RUNS_TABLE = bytes(
    ord("a") if i in _ASCII_LETTERS else (32 if chr(i).isspace() else i) for i in range(256)
)


def _ascii_alpha_words(text: str) -> int:
    t = text.encode("ascii").translate(_ALPHA_RUNS_TABLE, _ALPHA_DELETE)
    return t.count(b" a") + t.startswith(b"a")


def _on(threshold) -> bool:
    return threshold is not None and threshold >= 0


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number, characters) of items that repeat an earlier item."""
    unique = set(items)
    return len(items) - len(unique), sum(map(len, items)) - sum(map(len, unique))


def top_ngram_chars_fraction(
    wh: np.ndarray, wl: np.ndarray, n: int, h: np.ndarray | None = None
) -> float:
    """Fraction of word characters covered by the most frequent word n-gram (Gopher).

    ``h``: the n-gram hashes if already computed."""
    h = ngram_hashes(wh, n) if h is None else h
    if h.size == 0:
        return 0.0
    # A plain sort (SIMD) instead of np.unique's stable argsort; the top n-gram is the most
    # frequent, ties to the one that occurs first (as Counter.most_common).
    s = np.sort(h)
    starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
    counts = np.diff(np.append(starts, s.size))
    top = int(counts.max())
    if top < 2:
        return 0.0
    start = int(np.argmax(np.isin(h, s[starts[counts == top]])))
    return float(wl[start : start + n].sum() * top) / max(float(wl.sum()), 1.0)


def duplicate_ngram_chars_fraction(
    wh: np.ndarray, wl: np.ndarray, n: int, h: np.ndarray | None = None
) -> float:
    """Fraction of word characters inside n-grams that repeat an earlier n-gram (Gopher);
    overlapping n-grams count each word once. ``h``: the n-gram hashes if already computed."""
    return _duplicate_ngrams(wh, wl, n, h)[0]


def _duplicate_ngrams(wh, wl, n, h=None) -> tuple[float, bool]:
    """(fraction as above, whether any n-gram repeats)."""
    h = ngram_hashes(wh, n) if h is None else h
    if h.size == 0:
        return 0.0, False
    s = np.sort(h)
    if not (s[1:] == s[:-1]).any():  # no repeat: skip the stable argsort below
        return 0.0, False
    _, first = np.unique(h, return_index=True)
    if first.size == h.size:
        return 0.0, False
    dup = np.ones(h.size, dtype=bool)
    dup[first] = False
    starts = np.flatnonzero(dup)
    cover = np.zeros(wh.size + 1, dtype=np.int32)
    np.add.at(cover, starts, 1)
    np.add.at(cover, starts + n, -1)
    covered = np.cumsum(cover[:-1]) > 0
    return float(wl[covered].sum()) / max(float(wl.sum()), 1.0), True


def load_blocklist(words, path: str = "") -> frozenset:
    items = {w.strip().lower() for w in words if w.strip()}
    if path:
        with open(path, encoding="utf-8") as f:
            items |= {ln.strip().lower() for ln in f if ln.strip() and not ln.startswith("#")}
    return frozenset(items)


def quality_reason(
    text: str,
    words: list[str],
    wh: np.ndarray,
    q: dict,
    blocklist: frozenset = frozenset(),
    lower_words: list[str] | None = None,
) -> str | None:
    """Name of the first failed filter, or None to keep the document.

    ``words`` are ``text.split()``; ``wh`` the hashes of the lower-cased words;
    ``lower_words`` ``text.lower().split()`` if the caller has it.
    """
    reason = text_reason(text, words, q, lower_words)
    if reason is None and words:
        wl = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        reason = ngram_reason(wh, wl, q)
    if reason is None:
        reason = blocklist_reason(words, q, blocklist)
    return reason


def quality_reasons_batch(
    texts: list[str],
    words: Words,
    wh: np.ndarray,
    q: dict,
    blocklist: frozenset = frozenset(),
) -> list[str | None]:
    """``quality_reason`` of every document of a batch. ``words``: ``batch_words.find_words(texts)``;
    ``wh`` the hashes of the lower-cased words of all documents back to back, document ``d`` at
    ``wh[words.offsets[d]:words.offsets[d + 1]]`` (``batch_ngrams``). The word counts, lengths and
    stop words come from the batch's bytes, and the n-gram filters run over the whole batch at
    once."""
    offsets = words.offsets
    wl = char_lengths(words)
    cs = np.zeros(wl.size + 1, dtype=np.int64)
    np.cumsum(wl, out=cs[1:])
    sizes, chars = np.diff(offsets), cs[offsets[1:]] - cs[offsets[:-1]]
    stops = _stop_words_found(wh, offsets)
    reasons = [
        _text_reason(t, int(n), int(c), q, int(k), _split_once(t))
        for t, n, c, k in zip(texts, sizes, chars, stops)
    ]
    alive = np.array([r is None for r in reasons], dtype=bool)
    top = [(int(k), lim) for k, lim in q["max_top_ngram_chars_fraction"] if _on(lim)]
    dup = [(int(k), lim) for k, lim in q["max_duplicate_ngram_chars_fraction"] if _on(lim)]
    if alive.any() and (top or dup):
        grams = NgramBatch(wh, offsets)
        for k, limit in top:
            failed = np.flatnonzero(grams.top_over(k, cs, limit, alive))
            for d in failed:
                reasons[d] = f"top_{k}gram_chars"
            alive[failed] = False
        if dup:
            # Without a repeated n-gram at the smallest n, no longer n-gram repeats either and
            # every fraction is 0: only the documents with a repeat need the per-document check.
            k0 = min(k for k, _ in dup)
            for d in np.flatnonzero(alive & grams.repeats(k0)):
                lo, hi = offsets[d], offsets[d + 1]
                reasons[d] = _dup_ngram_reason(
                    wh[lo:hi], wl[lo:hi], dup, LazyNgramHashes(wh[lo:hi])
                )
    for d, r in enumerate(reasons):
        if r is None and blocklist:
            reasons[d] = blocklist_reason(texts[d].split(), q, blocklist)
    return reasons


def _split_once(text: str) -> Callable[[], list[str]]:
    """``text.split()``, computed on the first call only."""
    done: list = []

    def words() -> list[str]:
        if not done:
            done.append(text.split())
        return done[0]

    return words


def _stop_words_found(wh: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per document: how many distinct stop words occur as bare lower-case words (by hash):
    one bit per stop word, or-ed per document, then counted."""
    docs = offsets.size - 1
    at = np.flatnonzero(np.isin(wh, _STOP_HASHES))
    bits = np.zeros(docs, dtype=np.uint8)
    if at.size:
        doc = np.repeat(np.arange(docs), np.diff(offsets))[at]
        which = np.searchsorted(_STOP_HASHES, wh[at]).astype(np.uint8)
        np.bitwise_or.at(bits, doc, np.left_shift(np.uint8(1), which))
    return _POPCOUNT[bits]


def text_reason(
    text: str, words: list[str], q: dict, lower_words: list[str] | None = None
) -> str | None:
    """The filters on words, lines and paragraphs (all but the n-gram and blocklist ones)."""
    stops = 0
    if _on(q["min_stop_words"]) and q["min_stop_words"] > 0:
        low = lower_words if lower_words is not None else text.lower().split()
        stops = len(STOP_WORDS.intersection(low))
    return _text_reason(text, len(words), sum(map(len, words)), q, stops, lambda: words)


def _text_reason(
    text: str, n: int, chars: int, q: dict, stops: int, words: Callable[[], list[str]]
) -> str | None:
    """:func:`text_reason` from the document's word count ``n``, the characters of its words
    ``chars``, the distinct bare lower-case stop words ``stops``; ``words()`` gives
    ``text.split()`` for the rare checks that need the words themselves."""
    if _on(q["min_words"]) and n < q["min_words"]:
        return "too_few_words"
    if _on(q["max_words"]) and q["max_words"] > 0 and n > q["max_words"]:
        return "too_many_words"
    if n == 0:
        return "too_few_words"
    mean_len = chars / n  # == float(np.mean(lengths)): an exact sum, one division
    if _on(q["min_mean_word_length"]) and mean_len < q["min_mean_word_length"]:
        return "mean_word_length_low"
    if _on(q["max_mean_word_length"]) and mean_len > q["max_mean_word_length"]:
        return "mean_word_length_high"
    ascii_ = text.isascii()  # then no "…" and no non-ASCII bullet: fewer scans
    dots, ellipses = text.count("..."), 0 if ascii_ else text.count("…")
    if _on(q["max_symbol_word_ratio"]):
        symbols = text.count("#") + dots + ellipses
        if symbols / n > q["max_symbol_word_ratio"]:
            return "symbol_word_ratio"
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if lines and _on(q["max_bullet_lines_fraction"]):
        # The line scan only when some bullet character occurs at all (a few fast substring
        # searches): most documents have none.
        marks = _ASCII_BULLETS if ascii_ else BULLETS
        bullets = len(_BULLET_LINE.findall(text)) if any(map(text.__contains__, marks)) else 0
        if bullets / len(lines) > q["max_bullet_lines_fraction"]:
            return "bullet_lines"
    if lines and _on(q["max_ellipsis_lines_fraction"]):
        ell = len(_ELLIPSIS_LINE.findall(text)) if dots or ellipses else 0
        if ell / len(lines) > q["max_ellipsis_lines_fraction"]:
            return "ellipsis_lines"
    if _on(q["min_alpha_words_fraction"]):
        if ascii_:  # exact for ASCII, and a C-speed scan
            alpha = _ascii_alpha_words(text)
        else:
            alpha = sum(any(c.isalpha() for c in w) for w in words())
        if alpha / n < q["min_alpha_words_fraction"]:
            return "alpha_words_fraction"
    if _on(q["min_stop_words"]) and q["min_stop_words"] > 0:
        if stops < q["min_stop_words"]:  # bare stop words first, then with punctuation stripped
            found = STOP_WORDS.intersection(w.lower().strip(string.punctuation) for w in words())
            if len(found) < q["min_stop_words"]:
                return "stop_words"
    if lines and (
        _on(q["max_duplicate_lines_fraction"]) or _on(q["max_duplicate_line_chars_fraction"])
    ):
        count, chars = _duplicates(lines)
        if (
            _on(q["max_duplicate_lines_fraction"])
            and count / len(lines) > q["max_duplicate_lines_fraction"]
        ):
            return "duplicate_lines"
        if (
            _on(q["max_duplicate_line_chars_fraction"])
            and chars / len(text) > q["max_duplicate_line_chars_fraction"]
        ):
            return "duplicate_line_chars"
    if _on(q["max_duplicate_paragraphs_fraction"]) or _on(
        q["max_duplicate_paragraph_chars_fraction"]
    ):
        paras = [p.strip() for p in text.split("\n\n") if p.strip()]
        count, chars = _duplicates(paras)
        if (
            _on(q["max_duplicate_paragraphs_fraction"])
            and count / len(paras) > q["max_duplicate_paragraphs_fraction"]
        ):
            return "duplicate_paragraphs"
        if (
            _on(q["max_duplicate_paragraph_chars_fraction"])
            and chars / len(text) > q["max_duplicate_paragraph_chars_fraction"]
        ):
            return "duplicate_paragraph_chars"
    return None


def ngram_reason(wh: np.ndarray, wl: np.ndarray, q: dict) -> str | None:
    """The Gopher top and duplicated n-gram filters of one document."""
    top = [(int(k), lim) for k, lim in q["max_top_ngram_chars_fraction"] if _on(lim)]
    dup = [(int(k), lim) for k, lim in q["max_duplicate_ngram_chars_fraction"] if _on(lim)]
    grams = LazyNgramHashes(wh)  # the longer n are often never needed (see no_dup_from)
    for k, limit in top:
        if top_ngram_chars_fraction(wh, wl, k, grams[k]) > limit:
            return f"top_{k}gram_chars"
    return _dup_ngram_reason(wh, wl, dup, grams)


def _dup_ngram_reason(wh, wl, dup, grams) -> str | None:
    no_dup_from = None  # an n with no repeated n-gram: no longer n-gram repeats either
    for k, limit in dup:
        if no_dup_from is not None and k >= no_dup_from:
            continue
        frac, repeats = _duplicate_ngrams(wh, wl, k, grams[k])
        if not repeats and grams[k].size:
            no_dup_from = k
        if frac > limit:
            return f"duplicate_{k}gram_chars"
    return None


def blocklist_reason(words: list[str], q: dict, blocklist: frozenset) -> str | None:
    if blocklist:
        hits = sum(w.lower().strip(string.punctuation) in blocklist for w in words)
        if hits > q["max_blocklist_hits"]:
            return "blocklist"
    return None
