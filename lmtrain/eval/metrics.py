"""Text and language-model metrics: EM/F1, accuracy, ROUGE-L, BLEU, pass@k, perplexity, slices.

Each metric is a small pure function over Python strings and numbers, so the same code scores a
unit test, a notebook and a full evaluation run. Scores are floats in [0, 1] except BLEU, which
keeps sacrebleu's conventional 0-100 scale so numbers match published tables.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lmtrain.errors import DataError

__all__ = [
    "MISSING_SLICE",
    "accuracy",
    "bits_per_byte",
    "bleu",
    "bleu_with_signature",
    "exact_match",
    "mean_of",
    "metric_by_slice",
    "normalize_answer",
    "perplexity",
    "rouge_l",
    "token_f1",
]

_ARTICLES_RE = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = frozenset(string.punctuation)
# Unicode letters and digits; on ASCII text this equals rouge_score's [a-z0-9]+ tokens.
_ROUGE_TOKEN_RE = re.compile(r"[^\W_]+", re.UNICODE)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace.

    The order (punctuation before articles) follows the official SQuAD v1.1 script so that
    EM/F1 numbers are comparable with published results.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def _as_refs(refs: str | Sequence[str]) -> list[str]:
    refs = [refs] if isinstance(refs, str) else list(refs)
    if not refs:
        raise DataError("no reference answers given; pass at least one reference string")
    return refs


def exact_match(pred: str, refs: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(r) for r in _as_refs(refs)))


def _f1_tokens(pred_toks: list[str], ref_toks: list[str]) -> float:
    if not pred_toks or not ref_toks:
        # SQuAD convention: two empty answers agree (1.0); one empty answer scores 0.0.
        return float(pred_toks == ref_toks)
    common = collections.Counter(pred_toks) & collections.Counter(ref_toks)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_toks)
    recall = overlap / len(ref_toks)
    return 2 * precision * recall / (precision + recall)


def token_f1(pred: str, refs: str | Sequence[str]) -> float:
    """Bag-of-tokens F1 after normalisation, maximised over references (SQuAD style)."""
    p = normalize_answer(pred).split()
    return max(_f1_tokens(p, normalize_answer(r).split()) for r in _as_refs(refs))


def accuracy(preds: Sequence[Any], labels: Sequence[Any]) -> float:
    """Fraction of positions where ``preds[i] == labels[i]`` (exact equality, no normalisation)."""
    if len(preds) != len(labels):
        raise DataError(
            f"accuracy: {len(preds)} predictions but {len(labels)} labels; "
            "pass one label per prediction"
        )
    if not preds:
        raise DataError("accuracy: no predictions given")
    return sum(p == t for p, t in zip(preds, labels)) / len(preds)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence length, O(len(a)*len(b)) time and O(len(b)) memory."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str | Sequence[str]) -> float:
    """ROUGE-L F-measure (LCS over lowercase alphanumeric tokens, no stemming).

    Matches ``rouge_score``'s ``rougeL`` with ``use_stemmer=False`` on ASCII text; unlike it,
    non-ASCII letters are kept as token characters so non-English text is not silently dropped.
    With several references the best F-measure is returned.
    """
    p = _ROUGE_TOKEN_RE.findall(pred.lower())
    best = 0.0
    for r in _as_refs(ref):
        t = _ROUGE_TOKEN_RE.findall(r.lower())
        if not p or not t:
            continue
        lcs = _lcs_length(p, t)
        if lcs == 0:
            continue
        precision, recall = lcs / len(p), lcs / len(t)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def bleu(
    preds: Sequence[str], refs: Sequence[str | Sequence[str]], *, tokenize: str = "13a"
) -> float:
    """Corpus BLEU (0-100) via sacrebleu; ``refs[i]`` is one reference or a list for ``preds[i]``.

    We use sacrebleu rather than our own n-gram code because BLEU numbers are only comparable
    when the tokenisation is identical: sacrebleu fixes it (``13a`` by default) and emits a
    signature recording every setting (see ``bleu_with_signature``), so scores are
    reproducible. Predictions may have different numbers of references.
    """
    return bleu_with_signature(preds, refs, tokenize=tokenize)[0]


def bleu_with_signature(
    preds: Sequence[str], refs: Sequence[str | Sequence[str]], *, tokenize: str = "13a"
) -> tuple[float, str]:
    """``bleu`` plus sacrebleu's signature string (e.g. ``nrefs:1|case:mixed|tok:13a|...``)."""
    from sacrebleu.metrics import BLEU  # imported lazily: only needed when BLEU is computed

    if len(preds) != len(refs):
        raise DataError(f"bleu: {len(preds)} predictions but {len(refs)} reference entries")
    if not preds:
        raise DataError("bleu: no predictions given")
    per_pred = [_as_refs(r) for r in refs]
    width = max(len(r) for r in per_pred)
    # sacrebleu wants reference *streams*; None pads predictions with fewer references.
    streams = [[r[i] if i < len(r) else None for r in per_pred] for i in range(width)]
    metric = BLEU(tokenize=tokenize)
    score = metric.corpus_score(list(preds), streams).score
    return float(score), str(metric.get_signature())


def _check_count(name: str, value: float) -> None:
    if not value > 0:
        raise DataError(f"{name} must be > 0, got {value}")


def perplexity(total_nll: float, num_tokens: int) -> float:
    """``exp(total_nll / num_tokens)`` from a summed natural-log NLL; ``inf`` on overflow."""
    _check_count("num_tokens", num_tokens)
    mean = total_nll / num_tokens
    return math.exp(mean) if mean < 709.0 else math.inf


def bits_per_byte(total_nll_nats: float, num_bytes: int) -> float:
    """Summed NLL (nats) divided by ``num_bytes * ln 2``: tokenizer-independent compression."""
    _check_count("num_bytes", num_bytes)
    return total_nll_nats / (num_bytes * math.log(2))


MISSING_SLICE = "<missing>"

Example = Mapping[str, Any]
GroupMetric = Callable[[Sequence[Example]], float]


def mean_of(key: str) -> GroupMetric:
    """A group metric averaging ``example[key]``; use with per-example scores like EM."""

    def metric(examples: Sequence[Example]) -> float:
        return sum(float(e[key]) for e in examples) / len(examples)

    metric.__name__ = f"mean_of_{key}"
    return metric


def metric_by_slice(
    examples: Sequence[Example],
    metrics: Mapping[str, GroupMetric],
    by: str | Sequence[str] = (),
) -> dict[str, Any]:
    """Compute each group metric overall and on every slice of each field in ``by``.

    A group metric takes a list of examples, so both averages (``mean_of("em")``) and corpus
    metrics (BLEU over the slice) fit. Examples without the field go to the ``<missing>``
    slice. Slice keys are ``str(value)`` so the result is JSON-ready and is the per-task
    format ``report.write_report`` expects::

        {"metrics": {name: v}, "n": N,
         "slices": {field: {value: {"metrics": {name: v}, "n": n}}}}
    """
    if not examples:
        raise DataError("metric_by_slice: no examples given")
    fields = [by] if isinstance(by, str) else list(by)

    def score(group: Sequence[Example]) -> dict[str, Any]:
        return {
            "metrics": {name: float(fn(group)) for name, fn in metrics.items()},
            "n": len(group),
        }

    result = score(examples)
    slices: dict[str, dict[str, Any]] = {}
    for field in fields:
        groups: dict[str, list[Example]] = {}
        for ex in examples:
            groups.setdefault(str(ex[field]) if field in ex else MISSING_SLICE, []).append(ex)
        slices[field] = {value: score(groups[value]) for value in sorted(groups)}
    if slices:
        result["slices"] = slices
    return result
