"""The fast paths of the per-document stages give exactly what the plain versions give: the
word-memoised SentencePiece encoder against ``sp.encode``, the PII gates against running every
pattern, and the C-speed quality counts against the line-by-line Python they replace."""

from __future__ import annotations

import random
import string

import numpy as np
import pytest

from lmtrain.data import pii, quality
from lmtrain.data.encode import WordMemoEncoder
from lmtrain.data.tokenizer import train_sentencepiece

CODE = '''def f(x, y=1):
    """Docstring   with  spaces."""
\tif x  >  10:   # comment
        return [i * 2 for i in range(x)]
    return {"a": 1, 'b': 2.5e-3}


class   K:\r\n    pass
'''


def _texts(rng: random.Random, n: int) -> list[str]:
    alphabet = (
        string.ascii_letters + string.digits + "  \n\t.,;:()[]{}#'\"-_=+*/\\" + "éüßжЖ中文😀\u00a0"
    )
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 40)):
            r = rng.random()
            if r < 0.3:
                parts.append(" " * rng.randint(1, 9))
            elif r < 0.4:
                parts.append("\n" * rng.randint(1, 3))
            else:
                parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))))
        out.append("".join(parts))
    return out + ["", " ", "\n", "  \n  ", "a", " a", "a ", "中 文", CODE, CODE * 3]


@pytest.mark.parametrize("byte_fallback", [True, False])
def test_word_memo_encoder_equals_sentencepiece(byte_fallback):
    rng = random.Random(0)
    train = [CODE * 5] + [" ".join(rng.choice(["the", "river", "stone", "   x", "4.5"]) for _ in range(300)) for _ in range(30)]  # fmt: skip
    tok = train_sentencepiece(train, vocab_size=400, byte_fallback=byte_fallback, num_threads=1)
    memo = WordMemoEncoder(tok.sp, max_words=50)  # small: the cache is cleared along the way
    memo.GROUP_BYTES = 300  # and batches are encoded in several groups
    texts = _texts(rng, 300)
    for start in range(0, len(texts), 37):
        batch = texts[start : start + 37]
        got = memo.encode(batch)
        want = tok.sp.encode(batch)
        for t, g, w in zip(batch, got, want):
            assert g.tolist() == w, repr(t)


def _gates_off(monkeypatch):
    class Always:
        def search(self, *a):
            return True

    for name in dir(pii):
        if name.startswith("_GATE_"):
            value = getattr(pii, name)
            monkeypatch.setattr(pii, name, tuple(Always() for _ in value) if isinstance(value, tuple) else Always())  # fmt: skip
    monkeypatch.setattr(pii, "_may_have_email", lambda text: True)
    monkeypatch.setattr(pii, "_may_have_secret", lambda text, lower: True)


def test_pii_gates_change_nothing(monkeypatch):
    rng = random.Random(1)
    snippets = [
        "mail bob.smith+x@mail.example.co.uk now", "@decorator", "a@b", "x @ y.com",
        "call +1 (415) 555-0199 or 555.123.4567 or 555-123-4567 or (555) 123-4567",
        "card 4111-1111-1111-1111, 4111 1111 1111 1112, 378282246310005", "12345678901234567890",
        "ip 93.184.216.34, 10.0.0.1, version 1.2.3.4, 2001:db8::1, fe80::1, a[1::2], x:1:2",
        "API_KEY = 'abc123def456'", "password: hunter2hunter2", "token=deadbeef99", "KEY:=1",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "AKIAIOSFODNN7EXAMPLE",
        "ghp_" + "a" * 36, "-----BEGIN RSA PRIVATE KEY-----\nabc\n-----END RSA PRIVATE KEY-----",
        "plain prose with the words of a river", "x = a[1:2:3]", "Kelvin ＫEY=ab12cd34ef",
    ]  # fmt: skip
    texts = [" ".join(rng.choice(snippets) for _ in range(rng.randint(1, 6))) for _ in range(400)]
    texts += [CODE, ""]
    fast = pii.PiiScrubber()
    got = [fast.scrub(t) for t in texts]
    _gates_off(monkeypatch)
    want = [pii.PiiScrubber().scrub(t) for t in texts]
    assert got == want
    assert sum(sum(c.values()) for _, c in got) > 400  # the corpus does exercise the patterns


def _bullets_reference(lines):
    return sum(ln.lstrip().startswith(quality.BULLETS) for ln in lines)


def _ellipsis_reference(lines):
    return sum(ln.rstrip().endswith(quality.ELLIPSES) for ln in lines)


def _duplicates_reference(items):
    seen, count, chars = set(), 0, 0
    for it in items:
        if it in seen:
            count, chars = count + 1, chars + len(it)
        else:
            seen.add(it)
    return count, chars


def test_quality_counts_match_the_line_by_line_python():
    rng = random.Random(2)
    pieces = ["- item", "* star", "• dot", "  — dash", "text...", "end…  ", "1. num", "#!", "...", "x", "   ", "\t-\t", "a_b", "42", "--", "é"]  # fmt: skip
    for _ in range(500):
        text = "\n".join(" ".join(rng.choice(pieces) for _ in range(rng.randint(0, 4))) for _ in range(rng.randint(1, 12)))  # fmt: skip
        lines = [ln for ln in text.split("\n") if ln.strip()]
        assert len(quality._BULLET_LINE.findall(text)) == _bullets_reference(lines), repr(text)
        assert len(quality._ELLIPSIS_LINE.findall(text)) == _ellipsis_reference(lines), repr(text)
        assert quality._duplicates(lines) == _duplicates_reference(lines)
        words = text.split()
        if text.isascii():
            alpha = sum(any(c.isalpha() for c in w) for w in words)
            assert quality._ascii_alpha_words(text) == alpha, repr(text)


def test_skipping_longer_ngrams_without_repeats_keeps_the_reason():
    """No repeated 5-gram means no repeated 6..10-gram, so those checks are skipped; the reason
    equals checking every n in order."""
    from lmtrain.data.hashing import word_hashes
    from lmtrain.data.prepare_config import default_config, to_plain

    q = to_plain(default_config())["quality"]
    for key, value in q.items():  # every filter off but the duplicated n-gram ones
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            q[key] = -1
    q["max_top_ngram_chars_fraction"] = ()
    rng = random.Random(3)
    reasons = set()
    for _ in range(300):
        vocab = ["a", "b", "c", "river", "stone", "light", "window", "music"][: rng.randint(2, 8)]
        words = [rng.choice(vocab) for _ in range(rng.randint(5, 80))]
        text = " ".join(words)
        wh = word_hashes(text.lower().split())
        wl = np.fromiter(map(len, words), dtype=np.int64)
        want = None
        for k, limit in q["max_duplicate_ngram_chars_fraction"]:
            if quality.duplicate_ngram_chars_fraction(wh, wl, k) > limit:
                want = f"duplicate_{k}gram_chars"
                break
        got = quality.quality_reason(text, words, wh, q)
        assert got == want, text
        reasons.add(got)
    assert None in reasons and len(reasons) > 1


def test_contamination_vocabulary_filter_changes_no_match(tmp_path):
    """With the examples' words and word pairs as a pre-filter, each document gets the same
    matching n-grams as hashing every n-gram."""
    from lmtrain.data.contamination import EvalSets, matches

    rng = random.Random(4)
    vocab = ["the", "of", "river", "stone", "light", "window", "music", "paper", "Garden", "x"]
    examples = [" ".join(rng.choice(vocab) for _ in range(rng.randint(5, 30))) for _ in range(8)]
    path = tmp_path / "eval.txt"
    path.write_text("\n\n".join(examples))
    for n in (1, 3, 5, 13):
        ev = EvalSets([{"name": "e", "path": str(path), "fields": []}], n)
        found = 0
        for _ in range(300):
            other = ["zebra", "Light,", "STONE.", "a", "b", "c", "d", "e", "f"]
            doc = " ".join(rng.choice(vocab + other) for _ in range(60))
            if rng.random() < 0.2:
                doc += " " + rng.choice(examples)
            want = matches(doc, n, ev.all_ngrams)
            got = matches(doc, n, ev.all_ngrams, ev.vocab)
            assert np.array_equal(got, want), (n, doc)
            found += bool(want.size)
        assert found > 0 and (n == 1 or found < 300)  # some match, some do not


def test_lazy_ngram_hashes_equal_ngram_hashes_in_any_order():
    from lmtrain.data.hashing import LazyNgramHashes, ngram_hashes, word_hashes

    rng = random.Random(5)
    for size in (0, 1, 3, 12, 40):
        wh = word_hashes([rng.choice("abcdefg") for _ in range(size)])
        for order in ([2, 3, 4, 5, 9, 10], [5, 2, 7, 3, 1, 11], [10, 10, 1]):
            lazy = LazyNgramHashes(wh)
            for n in order:
                assert np.array_equal(lazy[n], ngram_hashes(wh, n)), (size, order, n)


def test_progress_lines_give_rates_and_eta():
    import io

    from lmtrain.data.progress import Progress

    out = io.StringIO()
    p = Progress(total_bytes=4_000_000, every=0.0, stream=out)
    p.t0 -= 2.0  # two seconds in
    p.update(100, 1_000_000)
    line = out.getvalue().strip()
    assert line.startswith("[data] read: 100 documents, 1.0 MB,")
    rate = float(line.split(" MB/s")[0].rsplit(", ", 1)[1])
    assert 0.4 < rate <= 0.5  # 1 MB in a bit over 2 s
    eta = float(line.split("ETA ")[1].split(" s")[0])
    assert 5.5 <= eta <= 6.5 and "25%" in line  # 3 MB left at ~0.5 MB/s
