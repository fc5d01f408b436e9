"""Metrics against hand-computed values, closed forms and the reference rouge_score package."""

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from lmtrain.errors import DataError
from lmtrain.eval import metrics as M
from lmtrain.sandbox.code_exec import pass_at_k


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The  Cat!", "cat"),
        ("An apple, a day.", "apple day"),
        ("  Theory of\tthe   WORLD ", "theory of world"),
        ("a-b", "ab"),  # punctuation is deleted, not replaced by a space (SQuAD script)
    ],
)
def test_normalize_answer(text, expected):
    assert M.normalize_answer(text) == expected


def test_exact_match():
    assert M.exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert M.exact_match("Eiffel", "eiffel tower") == 0.0
    assert M.exact_match("Paris", ["London", "paris!"]) == 1.0
    with pytest.raises(DataError):
        M.exact_match("x", [])


def test_token_f1_hand_computed():
    # pred tokens [cat, sat, on, mat], ref [cat, sat]: overlap 2, P = 1/2, R = 1 -> F1 = 2/3.
    assert M.token_f1("the cat sat on the mat", "a cat sat") == pytest.approx(2 / 3)
    # Repeated tokens count with multiplicity: [x, x, y] vs [x, y, y] overlap 2 -> 2/3.
    assert M.token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    # Max over references.
    assert M.token_f1("cat", ["dog", "the cat"]) == 1.0
    assert M.token_f1("", "") == 1.0
    assert M.token_f1("the", "cat") == 0.0  # "the" normalises to empty


def test_accuracy():
    assert M.accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(DataError, match="3 predictions but 2 labels"):
        M.accuracy([1, 2, 3], [1, 2])


ROUGE_CASES = [
    ("the cat sat on the mat", "the cat was on the mat"),
    ("police killed the gunman", "the gunman was shot down by police"),
    ("A quick brown fox!", "the quick brown dog jumps"),
    ("", "nothing here"),
    ("identical sentence here", "identical sentence here"),
    ("completely different", "no overlap at all"),
    ("It's 2024, and GPT-4 costs $20/month.", "in 2024 gpt 4 costs 20 dollars a month"),
    ("a a a b", "a b a b a"),
    ("Numbers 1 2 3 and words", "words and numbers 3 2 1"),
    ("the the the", "the"),
]


@pytest.mark.parametrize("pred, ref", ROUGE_CASES)
def test_rouge_l_matches_rouge_score(pred, ref):
    expected = rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure
    assert M.rouge_l(pred, ref) == pytest.approx(expected, abs=1e-12)


def test_rouge_l_hand_value_and_multi_ref():
    # LCS(the cat sat on the mat, the cat was on the mat) = "the cat on the mat" = 5 of 6.
    assert M.rouge_l("the cat sat on the mat", "the cat was on the mat") == pytest.approx(5 / 6)
    assert M.rouge_l("the cat", ["dog", "the cat"]) == 1.0
    assert M.rouge_l("café au lait", "café") == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from(["a", "b", "c", "dog", "Cat", "7"]), max_size=12),
    st.lists(st.sampled_from(["a", "b", "c", "dog", "cat", "7"]), max_size=12),
)
def test_rouge_l_property_matches_rouge_score(pred, ref):
    p, r = " ".join(pred), " ".join(ref)
    expected = rouge_scorer.RougeScorer(["rougeL"]).score(r, p)["rougeL"].fmeasure
    assert M.rouge_l(p, r) == pytest.approx(expected, abs=1e-12)


def test_bleu_hand_computed():
    # Precisions 5/6, 4/5, 3/4, 2/3 and equal lengths: BLEU = (1/3) ** (1/4).
    assert M.bleu(["a b c d e f"], ["a b c d e g"], tokenize="none") == pytest.approx(
        100 * (1 / 3) ** 0.25, abs=1e-6
    )
    # All precisions 1, hyp length 5 vs ref 7: brevity penalty exp(1 - 7/5).
    assert M.bleu(["a b c d e"], ["a b c d e f g"], tokenize="none") == pytest.approx(
        100 * math.exp(1 - 7 / 5), abs=1e-6
    )
    # Corpus statistics are pooled: 1-grams 9/10, 2-grams 7/8, 3-grams 5/6, 4-grams 3/4.
    corpus = M.bleu(["a b c d e", "v w x y z"], ["a b c d e", "v w x y q"], tokenize="none")
    assert corpus == pytest.approx(100 * (0.9 * 7 / 8 * 5 / 6 * 3 / 4) ** 0.25, abs=1e-6)


def test_bleu_variable_references_and_signature():
    score = M.bleu(
        ["the cat is here", "a dog runs fast"], [["the cat is here", "no"], "a dog runs fast"]
    )
    assert score == pytest.approx(100.0)
    preds, refs = ["a dog runs fast", "b"], [["a dog runs", "dog"], "c"]
    value, signature = M.bleu_with_signature(preds, refs)
    assert value == M.bleu(preds, refs)
    assert "tok:13a" in signature and "nrefs:var" in signature
    with pytest.raises(DataError):
        M.bleu(["a"], [])


def closed_form_pass_at_k(n, c, k):
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_matches_closed_form_grid():
    for n in range(1, 26):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(
                    float(closed_form_pass_at_k(n, c, k)), abs=1e-12
                )


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 2000).flatmap(
        lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))
    )
)
def test_pass_at_k_large_n(nck):
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(
        float(closed_form_pass_at_k(n, c, k)), rel=1e-9, abs=1e-12
    )


def test_pass_at_k_edges():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 10) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    for bad in [(5, 6, 1), (5, 1, 0), (5, 1, 6), (5, -1, 1)]:
        with pytest.raises(DataError):
            pass_at_k(*bad)


def test_perplexity_and_bits_per_byte():
    assert M.perplexity(10 * math.log(50), 10) == pytest.approx(50.0)
    assert M.perplexity(0.0, 3) == 1.0
    assert M.perplexity(1e6, 1) == math.inf
    assert M.bits_per_byte(8 * math.log(2), 8) == pytest.approx(1.0)
    assert M.bits_per_byte(3.0, 4) == pytest.approx(3.0 / (4 * 0.6931471805599453))
    with pytest.raises(DataError):
        M.perplexity(1.0, 0)
    with pytest.raises(DataError):
        M.bits_per_byte(1.0, 0)


def test_metric_by_slice_hand_computed():
    examples = [
        {"lang": "en", "len": 1, "em": 1.0},
        {"lang": "en", "len": 2, "em": 0.0},
        {"lang": "de", "len": 1, "em": 1.0},
        {"len": 2, "em": 1.0},
    ]
    out = M.metric_by_slice(examples, {"em": M.mean_of("em"), "count": len}, by=["lang", "len"])
    assert out["metrics"] == {"em": 0.75, "count": 4.0}
    assert out["n"] == 4
    assert out["slices"]["lang"] == {
        "<missing>": {"metrics": {"em": 1.0, "count": 1.0}, "n": 1},
        "de": {"metrics": {"em": 1.0, "count": 1.0}, "n": 1},
        "en": {"metrics": {"em": 0.5, "count": 2.0}, "n": 2},
    }
    assert out["slices"]["len"]["1"]["metrics"]["em"] == 1.0
    assert out["slices"]["len"]["2"]["metrics"]["em"] == 0.5
    assert "slices" not in M.metric_by_slice(examples, {"em": M.mean_of("em")})
    with pytest.raises(DataError):
        M.metric_by_slice([], {"em": M.mean_of("em")})
