"""Data-preparation stages one by one, each checked against an independent reference
(pure-Python sets and counts, hand-written expected text, the Luhn checksum by hand)."""

from __future__ import annotations

import random
import unicodedata
from collections import Counter

import numpy as np
import pytest

from lmtrain.data.batch_words import find_words, lower_words
from lmtrain.data.contamination import EvalSets, matches
from lmtrain.data.dedup import (
    SignatureFile,
    exact_duplicates,
    lsh_params,
    minhash_params,
    minhash_signature,
    near_duplicates,
    shingle_hashes,
)
from lmtrain.data.hashing import hash64, ngram_hashes, ngram_hashes_range, word_hashes
from lmtrain.data.markup import html_to_text, markdown_to_text
from lmtrain.data.normalize import decode_utf8, normalize_text
from lmtrain.data.pii import PiiScrubber, candidates_in, luhn_valid
from lmtrain.data.prepare_config import default_config, resolve
from lmtrain.data.quality import (
    duplicate_ngram_chars_fraction,
    quality_reason,
    top_ngram_chars_fraction,
)
from lmtrain.data.split import assign_splits

WORDS = (
    "river stone light window garden music paper letter morning winter silver forest bridge "
    "market engine candle harbor meadow thunder pencil orange violet marble canyon"
).split()


def prose(rng: random.Random, n_words: int) -> str:
    stop = ["the", "of", "and", "to", "with", "that"]
    return " ".join(rng.choice(WORDS) if i % 3 else rng.choice(stop) for i in range(n_words))


# ---- stage 1: decoding and normalisation -------------------------------------------------------


def _normalize_reference(text: str, max_blank_lines: int = 1) -> tuple[str, Counter]:
    """Every rule of ``normalize_text`` applied in turn with no shortcut for ASCII text."""
    import re

    counts: Counter = Counter()
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text, n = re.subn(r"[\ud800-\udfff]", "\ufffd", text)
    if n:
        counts["surrogates_replaced"] += n
    text, n = re.subn(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]", "", text)
    if n:
        counts["control_chars_removed"] += n
        counts["documents_with_control_chars"] += 1
    text = text.removeprefix("\ufeff")
    if unicodedata.normalize("NFC", text) != text:
        text = unicodedata.normalize("NFC", text)
        counts["nfc_changed"] += 1
    before = text
    text = re.sub(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]", " ", text)
    text = re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)
    text = re.sub("\n{" + str(max_blank_lines + 2) + ",}", "\n" * (max_blank_lines + 1), text)
    text = text.lstrip("\n").rstrip()
    if text != before:
        counts["whitespace_changed"] += 1
    return text, counts


def test_normalize_equals_the_rules_applied_in_turn():
    rng = random.Random(4)
    pieces = ["word", " ", "\t", "\n", "\r\n", "\r", "\x00", "\x07", "\x1b", "\x7f", "\x85",
              "\x9f", "\xa0", "\u3000", "\ufeff", "e\u0301", "é", "\ud800", "\n\n\n\n"]  # fmt: skip
    for _ in range(3000):
        k = rng.randint(0, 12)
        parts = [rng.choice(pieces[:11] if rng.random() < 0.6 else pieces) for _ in range(k)]
        text = "".join(parts)
        assert normalize_text(text) == _normalize_reference(text), repr(text)


def test_invalid_utf8_policies_locate_the_bad_byte():
    data = "línea uno\nzwei \xff drei".encode("latin-1")  # latin-1 bytes are invalid UTF-8
    rep = decode_utf8(data, "replace")
    assert rep.status == "repaired" and rep.text == data.decode("utf-8", "replace")
    assert "\ufffd" in rep.text
    drop = decode_utf8(data, "drop")
    assert drop.status == "dropped" and drop.text is None
    err = decode_utf8(data, "error", first_line=10)
    assert err.status == "invalid" and err.text is None
    assert (err.line, err.column, err.byte) == (10, 2, 0xED)  # "í" in latin-1 is 0xED, line 1 col 2
    ok = decode_utf8(b"\xef\xbb\xbfplain", "error")
    assert ok.status == "ok" and ok.text == "plain"  # BOM dropped


def test_normalize_nfc_controls_and_whitespace_keep_structure():
    decomposed = "Cafe\u0301"
    text = (
        "\n\nTitle\u00a0here   \r\n"
        f"{decomposed} bell\x07 and\x1b esc\n\n\n\n\n"
        "- item one\n- item two\n\n"
        "    def f(x):\n        return x\t\n"
    )
    out, counts = normalize_text(text)
    expected = (
        "Title here\n"
        f"{unicodedata.normalize('NFC', decomposed)} bell and esc\n\n"
        "- item one\n- item two\n\n"
        "    def f(x):\n        return x"
    )
    assert out == expected
    assert unicodedata.is_normalized("NFC", out)
    assert counts["nfc_changed"] == 1 and counts["control_chars_removed"] == 2
    assert counts["whitespace_changed"] == 1
    two, _ = normalize_text("a\n\n\n\n\nb", max_blank_lines=2)
    assert two == "a\n\n\nb"


# ---- stage 2: markup ----------------------------------------------------------------------------


def test_html_keeps_title_headings_lists_and_code():
    html = """<!doctype html><html><head><title>The Guide</title><style>p{color:red}</style>
    <script>var secret = 1;</script></head><body>
    <nav><a href="/">Home</a></nav>
    <h2>Install &amp; run</h2>
    <p>First   paragraph with <b>bold</b> and a <a href="x">link</a>.</p>
    <ul><li>alpha</li><li>beta<ol><li>one</li><li>two</li></ol></li></ul>
    <pre>def main():
    print("hi  there")
</pre>
    <p>Line<br>break</p>
    </body></html>"""
    text = html_to_text(html)
    assert text == (
        "# The Guide\n\n"
        "Home\n\n"
        "## Install & run\n\n"
        "First paragraph with bold and a link.\n\n"
        "- alpha\n- beta\n  1. one\n  2. two\n\n"
        '```\ndef main():\n    print("hi  there")\n```\n\n'
        "Line\nbreak"
    )
    assert "secret" not in text and "color" not in text


def test_markdown_keeps_headings_lists_and_code():
    md = (
        "---\ntitle: front matter\n---\n"
        "Main Title\n==========\n\n"
        "Some *emphasis*, **strong** and a [link](http://x.org) and ![alt text](i.png).\n"
        "<!-- a comment -->\n"
        "* first\n* second\n  * nested\n\n"
        "```python\nx = [1, 2]  # *not* emphasis\n```\n\n"
        "    indented code\n\n"
        "[ref]: http://example.com\n"
    )
    assert markdown_to_text(md) == (
        "# Main Title\n\n"
        "Some emphasis, strong and a link and alt text.\n\n"
        "* first\n* second\n  * nested\n\n"
        "```python\nx = [1, 2]  # *not* emphasis\n```\n\n"
        "    indented code\n\n"
    )


# ---- stage 3: quality ---------------------------------------------------------------------------


def _ref_top_ngram(words: list[str], n: int) -> float:
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    counts = Counter(grams)
    gram, c = counts.most_common(1)[0]
    if c < 2:
        return 0.0
    return sum(map(len, gram)) * c / sum(map(len, words))


def _ref_dup_ngram(words: list[str], n: int) -> float:
    seen, covered = set(), [False] * len(words)
    for i in range(len(words) - n + 1):
        g = tuple(words[i : i + n])
        if g in seen:
            for j in range(i, i + n):
                covered[j] = True
        seen.add(g)
    return sum(len(w) for w, c in zip(words, covered) if c) / max(sum(map(len, words)), 1)


@pytest.mark.parametrize("seed", range(4))
def test_gopher_repetition_fractions_match_a_plain_python_reference(seed):
    rng = random.Random(seed)
    vocab = WORDS[: 3 + seed * 3]  # small vocabularies repeat n-grams often
    words = [rng.choice(vocab) for _ in range(rng.randint(5, 120))]
    wh = word_hashes(words)
    wl = np.array([len(w) for w in words])
    grams = ngram_hashes_range(wh, range(2, 11))
    for n in range(2, 11):
        assert np.array_equal(grams[n], ngram_hashes(wh, n))
        assert top_ngram_chars_fraction(wh, wl, n) == pytest.approx(_ref_top_ngram(words, n))
        assert duplicate_ngram_chars_fraction(wh, wl, n) == pytest.approx(_ref_dup_ngram(words, n))


def test_quality_filters_name_their_reason():
    q = resolve({"sources": ["x"]})["quality"]
    rng = random.Random(0)
    good = prose(rng, 120)

    def reason(text, blocklist=frozenset()):
        return quality_reason(text, text.split(), word_hashes(text.lower().split()), q, blocklist)

    assert reason(good) is None
    assert reason("the cat and the dog") == "too_few_words"
    assert reason(" ".join(["a", "of", "to"] * 30)) == "mean_word_length_low"
    assert (
        reason(" ".join(["the", "and", "extraordinarilylongwordsxyz"] * 30))
        == "mean_word_length_high"
    )
    assert reason(good + " #" * 20) == "symbol_word_ratio"
    assert reason("\n".join("- " + prose(rng, 8) for _ in range(12))) == "bullet_lines"
    assert reason("\n".join(prose(rng, 20) + " ..." for _ in range(12))) == "ellipsis_lines"
    assert reason(good + " 12 34 56 78" * 10) == "alpha_words_fraction"
    assert reason(" ".join(rng.choice(WORDS) for _ in range(100))) == "stop_words"
    lines = [prose(rng, 10) for _ in range(6)]
    assert reason("\n".join(lines + lines[:4])) == "duplicate_lines"
    assert reason(good, frozenset({"garden"})) == "blocklist"
    q_off = dict(q, min_words=-1)
    assert (
        quality_reason("the cat", ["the", "cat"], word_hashes(["the", "cat"]), q_off)
        != "too_few_words"
    )


# ---- stage 4: PII ---------------------------------------------------------------------------------


def _luhn_by_hand(number: str) -> bool:
    digits = [int(c) for c in number][::-1]
    total = sum(digits[0::2]) + sum(sum(divmod(2 * d, 10)) for d in digits[1::2])
    return total % 10 == 0


@pytest.mark.parametrize(
    "kind, secret, sentence",
    [
        ("EMAIL", "jane.doe+news@mail.example.co.uk", "Write to {} today."),
        ("PHONE", "+44 20 7946 0958", "Call {} after six."),
        ("PHONE", "(555) 123-4567", "Or call {} instead."),
        ("IP_ADDRESS", "93.184.216.34", "The host {} answered."),
        ("IP_ADDRESS", "2606:2800:220:1:248:1893:25c8:1946", "Its IPv6 is {} now."),
        ("CREDIT_CARD", "4111 1111 1111 1111", "Card {} was charged."),
        ("CREDIT_CARD", "5500-0000-0000-0004", "Card {} was charged."),
        ("AWS_KEY", "AKIAIOSFODNN7EXAMPLE", "key id {} leaked"),
        ("GITHUB_TOKEN", "ghp_" + "a1B2" * 9, "token {} leaked"),
        (
            "PRIVATE_KEY",
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----",
            "key:\n{}\nend",
        ),
    ],
)
def test_each_pii_kind_is_replaced_by_its_placeholder(kind, secret, sentence):
    text = sentence.format(secret)
    out, counts = PiiScrubber().scrub(text)
    assert out == sentence.format(f"<{kind}>")
    assert counts == Counter({kind: 1})


def test_secret_assignment_keeps_key_name_and_code_is_left_alone():
    out, counts = PiiScrubber().scrub(
        'api_key = "sk9f8e7d6c5b4a3" and password = None and api_key=api_key'
    )
    assert out == 'api_key = "<SECRET>" and password = None and api_key=api_key'
    assert counts == Counter({"SECRET": 1})


def test_luhn_invalid_numbers_private_ips_and_versions_are_kept():
    for number in ("4111111111111111", "5500000000000004", "378282246310005", "4111111111111112"):
        assert luhn_valid(number) == _luhn_by_hand(number)
    assert not luhn_valid("4111111111111112")
    text = (
        "Order 4111 1111 1111 1112 from 10.0.0.1, 100.64.0.1 and 127.0.0.1 running 1.2.3.4.5 on ::1 "
        "with a[1::2], see section 8.2.4.44 and Python version 2.7.2.2."
    )
    out, counts = PiiScrubber().scrub(text)
    assert out == text and not counts
    out, counts = PiiScrubber(keep_nonpublic_ips=False).scrub("from 10.0.0.1 to 8.8.8.8")
    assert out == "from <IP_ADDRESS> to <IP_ADDRESS>" and counts == Counter({"IP_ADDRESS": 2})


def test_pii_kinds_can_be_switched_off_and_placeholder_changed():
    out, counts = PiiScrubber("[{kind}]", kinds=("EMAIL",)).scrub("a@b.org and 93.184.216.34")
    assert out == "[EMAIL] and 93.184.216.34" and counts == Counter({"EMAIL": 1})


def test_pii_batch_candidates_never_miss_a_change():
    """A text that ``candidates`` rules out is one ``scrub`` leaves unchanged; plain prose is
    ruled out, so the scrubber runs on few texts."""
    rng = random.Random(7)
    pii = [
        "mail jane.doe@example.com now",
        "call +44 20 7946 0958",
        "(555) 123-4567",
        "card 4111 1111 1111 1111",
        "at 93.184.216.34",
        "at 2001:db8:85a3::8a2e:370:7334",
        "AKIAIOSFODNN7EXAMPLE",
        "AKIAABCDEFGHIJKLMNOP ok",
        "aws_secret_access_key = " + "wJalrXUtnFEMIbKxK7MDENGbPxRfiCYEXAMPLEKEYa"[:40],
        "AWS_SECRET_KEY: " + "A" * 40,
        "token ghp_" + "a" * 36,
        "github_pat_" + "b" * 60,
        "api_key = 'sk1live9x8y7z6w5v'",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----",
        "SeCrEt",
        "café 10.0.0.1",
        "naïve ∑ @",
        "Ünïcödé 555.123.4567",
    ]
    texts = []
    for _ in range(300):
        parts = [prose(rng, rng.randint(3, 30))]
        if rng.random() < 0.4:
            parts.insert(rng.randint(0, 1), rng.choice(pii))
        texts.append(" ".join(parts))
    for scrubber in (PiiScrubber(), PiiScrubber(keep_nonpublic_ips=False)):
        for batch in (texts, texts[:1], [], [t for t in texts if t.isascii()][:50]):
            maybe = scrubber.candidates(batch)
            assert maybe.shape == (len(batch),)
            for t, m in zip(batch, maybe):
                if not m:
                    assert scrubber.scrub(t) == (t, Counter()), t
        changed = [scrubber.scrub(t)[1] != Counter() for t in texts]
        maybe = scrubber.candidates(texts)
        assert maybe[np.array(changed)].all() and sum(changed) > 50
        # the same from the bytes the word finder already holds (as the cleaning stage does)
        words = find_words(texts)
        low = lower_words(words, texts)
        spans = (words.spans[:-1], low.spans[:-1])
        assert np.array_equal(candidates_in(words.data, spans[0], low.data, spans[1]), maybe)
        assert (~maybe).sum() > 150  # the plain prose is ruled out


# ---- stage 5: dedup ---------------------------------------------------------------------------------


def _signature(text: str, params, k: int = 5) -> np.ndarray:
    return minhash_signature(shingle_hashes(word_hashes(text.lower().split()), k), *params)


def _jaccard(a: str, b: str, k: int = 5) -> float:
    def sh(t):
        w = t.lower().split()
        return {tuple(w[i : i + k]) for i in range(len(w) - k + 1)}

    x, y = sh(a), sh(b)
    return len(x & y) / len(x | y)


def test_minhash_estimates_jaccard():
    rng = random.Random(1)
    params = minhash_params(256, seed=0)
    words = [f"w{i}" for i in range(400)]
    a = " ".join(words[:300])
    b = " ".join(words[100:400])  # shingle Jaccard = 196 / 396
    est = float((_signature(a, params) == _signature(b, params)).mean())
    assert _jaccard(a, b) == pytest.approx(196 / 396)
    assert est == pytest.approx(196 / 396, abs=0.1)
    c = " ".join(rng.choice(words) for _ in range(300))
    assert float((_signature(a, params) == _signature(c, params)).mean()) < 0.1


def test_minhash_estimates_jaccard_over_many_pairs_and_lengths():
    """Unbiased against the exact shingle Jaccard at every similarity and length, short
    documents (most bins filled by densification) included."""
    rng = random.Random(3)
    params = minhash_params(128, seed=1)
    errors = []
    for trial in range(60):
        n = rng.choice([8, 20, 60, 200, 800])
        words = [f"w{rng.randrange(10**6)}" for _ in range(n)]
        other = list(words)
        for i in rng.sample(range(n), rng.randint(0, n // 3)):
            other[i] = f"x{trial}_{i}"
        a, b = " ".join(words), " ".join(other)
        est = float((_signature(a, params) == _signature(b, params)).mean())
        errors.append(est - _jaccard(a, b))
    assert abs(float(np.mean(errors))) < 0.03  # no bias
    assert float(np.sqrt(np.mean(np.square(errors)))) < 0.08  # about sqrt(J(1-J)/128) or less


def test_near_duplicate_one_word_in_200_removed_unrelated_kept(tmp_path):
    rng = random.Random(2)
    base = prose(rng, 200).split()
    near = list(base)
    near[117] = "zebra"
    docs = [" ".join(base), prose(rng, 200), " ".join(near), prose(rng, 150)]
    assert _jaccard(docs[0], docs[2]) > 0.9 and _jaccard(docs[0], docs[1]) < 0.2
    params = minhash_params(128, 0)
    sf = SignatureFile(tmp_path / "sig", 128)
    sf.append(np.stack([_signature(d, params) for d in docs]))
    sf.close()
    bands, rows = lsh_params(0.8, 128)
    assert bands * rows <= 128
    dup_of, stats = near_duplicates(sf, np.ones(4, bool), threshold=0.8, bands=bands, rows=rows)
    assert dup_of.tolist() == [-1, -1, 0, -1]
    assert stats["confirmed_pairs"] == 1 and stats["clusters"] == 1


def test_exact_duplicates_keep_first():
    keys = np.array([hash64(t) for t in ["a", "b", "a", "c", "b", "a"]], dtype=np.uint64)
    assert exact_duplicates(keys).tolist() == [-1, -1, 0, -1, 1, 0]


# ---- stage 6: split -------------------------------------------------------------------------------


def test_hash_split_is_disjoint_stable_and_near_the_fractions():
    keys = np.array([hash64(f"doc {i}") for i in range(4000)], dtype=np.uint64)
    kept = np.ones(keys.size, bool)
    kept[::10] = False
    ids = assign_splits("hash", (0.8, 0.1, 0.1), content_hashes=keys, kept=kept, seed=0)
    assert set(ids[~kept].tolist()) == {-1} and set(ids[kept].tolist()) == {0, 1, 2}
    frac = np.bincount(ids[kept], minlength=3) / kept.sum()
    assert np.allclose(frac, [0.8, 0.1, 0.1], atol=0.03)
    # Stable: a document's split depends only on its own hash (not on the others or the order).
    perm = np.random.default_rng(0).permutation(keys.size)
    again = assign_splits(
        "hash", (0.8, 0.1, 0.1), content_hashes=keys[perm], kept=kept[perm], seed=0
    )
    assert np.array_equal(again, ids[perm])
    other = assign_splits("hash", (0.8, 0.1, 0.1), content_hashes=keys, kept=kept, seed=1)
    assert not np.array_equal(other, ids)


def test_time_and_position_splits():
    n = 10
    keys = np.arange(n, dtype=np.uint64)
    kept = np.ones(n, bool)
    pos = assign_splits("position", (0.8, 0.1, 0.1), content_hashes=keys, kept=kept)
    assert pos.tolist() == [0] * 8 + [1, 2]
    times = np.array([float(1000 * i) for i in range(n)])
    t = assign_splits(
        "time", (0, 0, 0), content_hashes=keys, kept=kept, times=times, cutoffs=(5000, "8000")
    )
    assert t.tolist() == [0] * 5 + [1] * 3 + [2] * 2


# ---- stage 7: contamination --------------------------------------------------------------------------


def test_contamination_ngrams_ignore_case_and_punctuation(tmp_path):
    rng = random.Random(3)
    passage = prose(rng, 30)
    path = tmp_path / "eval.jsonl"
    path.write_text(f'{{"question": "{passage}", "id": 1}}\n{{"question": "too short"}}\n')
    sets = EvalSets([{"name": "qa", "path": str(path), "fields": ["question"]}], 13)
    doc = "Intro words here. " + passage.upper().replace(" the ", ", the ") + " trailing."
    found = matches(doc, 13, sets.all_ngrams)
    assert found.size > 0
    assert matches(prose(rng, 200), 13, sets.all_ngrams).size == 0
    report = sets.report({0: found}, dropped={0})[0]
    assert (
        report["examples"] == 2
        and report["examples_checked"] == 1
        and report["examples_too_short"] == 1
    )
    assert report["contaminated_examples"] == 1 and report["train_documents_dropped"] == 1


def test_default_config_resolves_and_unknown_keys_are_named():
    from lmtrain.errors import ConfigError

    cfg = default_config()
    cfg.sources = ("some/dir",)
    assert resolve(cfg)["sources"][0]["paths"] == ["some/dir"]
    with pytest.raises(
        ConfigError, match="unknown data config key dedup.treshold; did you mean threshold"
    ):
        resolve({"sources": ["x"], "dedup": {"treshold": 0.5}})
    with pytest.raises(ConfigError, match="config.sources is empty"):
        resolve({})
