"""The batched per-document stages give, document by document, exactly what the per-document
functions give: quality reasons, MinHash signatures, contamination matches, the removed records
and counts in order, and shard bytes from ``ShardWriter.add_many`` against ``add``."""

from __future__ import annotations

import random
from collections import Counter
from itertools import chain

import numpy as np

from lmtrain.data import quality
from lmtrain.data.batch_ngrams import minhash_batch
from lmtrain.data.batch_words import find_words
from lmtrain.data.dedup import minhash_params, minhash_signature, shingle_hashes
from lmtrain.data.hashing import word_hashes
from lmtrain.data.prepare_config import default_config, resolve, source, to_plain

VOCAB = ["the", "of", "and", "to", "river", "stone", "light", "window", "music", "paper"]
ODD = ["#", "...", "…", "- item", "* x", "café", "ЖУК", "12", "a1", "Stone,", "\n", "\n\n", "  "]


def _doc(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.05:
        return ""
    if kind < 0.15:  # repeated lines / n-grams
        line = " ".join(rng.choice(VOCAB) for _ in range(rng.randint(1, 8)))
        return "\n".join([line] * rng.randint(2, 30))
    vocab = VOCAB[: rng.randint(2, len(VOCAB))] + ODD[: rng.randint(0, len(ODD))]
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 400)))


def _config(**split):
    c = default_config()
    c.sources = (source(name="s", paths=("unused",)),)
    for k, v in split.items():
        setattr(c.split, k, v)
    return c


def _quality_config() -> dict:
    q = to_plain(default_config())["quality"]
    q["min_words"] = 3  # let short documents and word soup reach the n-gram filters
    for key in ("min_mean_word_length", "max_symbol_word_ratio", "min_stop_words", "min_alpha_words_fraction"):  # fmt: skip
        q[key] = -1
    return q


def _check_batch_against_per_document(texts: list[str], q: dict) -> Counter:
    low = [t.lower().split() for t in texts]
    wh = word_hashes(list(chain.from_iterable(low)))
    want = None
    for block in ([q, frozenset()], [q, frozenset({"stone"})]):
        got = quality.quality_reasons_batch(texts, find_words(texts), wh, *block)
        want = [
            quality.quality_reason(t, t.split(), word_hashes(lw), block[0], block[1], lw)
            for t, lw in zip(texts, low)
        ]
        assert got == want
    return Counter(want)


def test_batched_quality_reasons_equal_per_document_reasons():
    rng = random.Random(0)
    reasons = _check_batch_against_per_document([_doc(rng) for _ in range(400)], _quality_config())
    # the batch really exercised the n-gram filters, each way
    assert None in reasons and reasons["blocklist"], reasons
    assert any(r and r.startswith("top_") for r in reasons), reasons
    assert any(r and r.startswith("duplicate_") and "gram" in r for r in reasons), reasons


def test_batched_word_filters_equal_per_document_reasons():
    """The filters whose word counts, lengths, letters and stop words come from the batch's
    bytes, on texts with non-ASCII letters and spaces, punctuation and symbols."""
    rng = random.Random(5)
    q = to_plain(default_config())["quality"]
    q["min_words"], q["min_stop_words"] = 3, 3
    odd = ["ЖУК", "Straße", "naïve", "12", "…", "#", "--", "The,", "to.", "AND", "\u2003", "\xa0"]
    vocab = VOCAB + ["have", "with", "be", "that", "x", "longerwordsthanmost"] + odd
    texts = []
    for _ in range(400):
        words = [rng.choice(vocab[: rng.randint(3, len(vocab))]) for _ in range(rng.randint(1, 80))]
        texts.append(" ".join(words).replace(" \u2003 ", "\u2003").replace(" \xa0 ", "\xa0"))
    reasons = _check_batch_against_per_document(texts, q)
    for r in (
        "too_few_words",
        "mean_word_length_low",
        "symbol_word_ratio",
        "alpha_words_fraction",
        "stop_words",
        None,
    ):
        assert reasons[r], (r, reasons)


def _mix64(x: int) -> int:
    """SplitMix64's finaliser on a Python int (the reference for ``hashing.mix64``)."""
    m = 2**64 - 1
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & m
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def _oph_reference(shingles, num_perm: int, key: int) -> list[int]:
    """One-permutation MinHash with optimal densification, one shingle and one bin at a time in
    plain Python: the definition ``dedup.minhash_signature`` and ``minhash_batch`` implement."""
    best: dict[int, int] = {}
    for x in map(int, shingles):
        v = _mix64(x ^ key)
        j = ((v >> 32) * num_perm) >> 32
        best[j] = min(best.get(j, 2**32), v & 0xFFFFFFFF)
    if not best:
        return [2**32 - 1] * num_perm
    out = []
    for j in range(num_perm):
        src, t = j, 0
        while src not in best:  # an empty bin borrows from the first filled bin of its sequence
            t += 1
            v = _mix64(((j << 32) | t) ^ key ^ 0x5DEECE66D)
            src = ((v >> 32) * num_perm) >> 32
        out.append(best[src])
    return out


def test_batched_minhash_equals_per_document_signatures_and_the_reference():
    rng = random.Random(1)
    params = minhash_params(64, seed=3)
    docs = [[rng.choice(VOCAB) for _ in range(rng.choice([0, 1, 3, 4, 5, 6, 50, 300]))] for _ in range(60)]  # fmt: skip
    whs = [word_hashes(d) for d in docs]
    offsets = np.zeros(len(docs) + 1, np.int64)
    np.cumsum([w.size for w in whs], out=offsets[1:])
    got = minhash_batch(np.concatenate(whs), offsets, 5, *params)
    for d, wh in enumerate(whs):
        want = minhash_signature(shingle_hashes(wh, 5), *params)
        assert np.array_equal(got[d], want), (d, len(docs[d]))
        assert want.tolist() == _oph_reference(shingle_hashes(wh, 5).tolist(), *params)
    assert minhash_batch(np.zeros(0, np.uint64), np.zeros(1, np.int64), 5, *params).shape == (0, 64)


def _eval_stages(tmp_path, n: int):
    from lmtrain.data.contamination import EvalSets
    from lmtrain.data.stages import Stages

    rng = random.Random(2)
    examples = [" ".join(rng.choice(VOCAB + ["Café", "naïve"]) for _ in range(rng.randint(5, 30))) for _ in range(6)]  # fmt: skip
    path = tmp_path / "eval.txt"
    path.write_text("\n\n".join(examples))
    ev = EvalSets([{"name": "e", "path": str(path), "fields": []}], n)
    c = _config()
    c.contamination.ngram = n
    return Stages(resolve(c), ev.all_ngrams, ev.vocab), ev, examples, rng


def test_batched_contamination_matches_equal_per_document_matches(tmp_path):
    from lmtrain.data.contamination import matches

    for n in (1, 4, 13):
        stages, ev, examples, rng = _eval_stages(tmp_path, n)
        texts = []
        for _ in range(200):
            doc = " ".join(
                rng.choice(VOCAB + ["x", "CAFÉ,", "ünïcode", "river."]) for _ in range(60)
            )
            if rng.random() < 0.2:
                doc += " " + rng.choice(examples).upper()
            texts.append(doc)
        feats = stages.features_batch(texts, [word_hashes(t.lower().split()) for t in texts])
        found = 0
        for t, f in zip(texts, feats):
            want = matches(t, n, ev.all_ngrams)  # hashing every n-gram, no pre-filter
            assert np.array_equal(f.matches, want), (n, t)
            found += bool(want.size)
        assert found > 0 and (n == 1 or found < len(texts))  # some match, some do not


def test_batch_cleaning_keeps_the_per_document_order_of_records_and_counts():
    from lmtrain.data.sources import ErrorPolicy, RawDoc
    from lmtrain.data.stages import STAGES, Stages

    c = _config(method="time", time_field="t", time_cutoffs=(30.0, 60.0))
    for key, value in _quality_config().items():
        setattr(c.quality, key, value)
    c.normalize.invalid_utf8 = "error"
    stages = Stages(resolve(c))
    rng = random.Random(4)
    docs = []
    for i in range(120):
        text = _doc(rng)
        data = text.encode() if i % 3 else text
        if i % 17 == 0:
            data = b"bad \xff byte " + text.encode()
        docs.append(
            RawDoc(f"d{i}", "s", "f.jsonl", i + 1, "x", "text", data, None if i % 4 == 0 else i)
        )

    def run(batches):
        counts = {s: Counter() for s in STAGES}
        removed, policy, out = [], ErrorPolicy("skip"), []
        for batch in batches:
            out += stages.clean_batch(batch, counts, removed, policy)
        return out, counts, removed, policy.counts, policy.examples

    batched = run([docs[:50], docs[50:]])
    single = run([[d] for d in docs])
    assert [o and (o[0], o[1].tolist(), o[2]) for o in batched[0]] == [o and (o[0], o[1].tolist(), o[2]) for o in single[0]]  # fmt: skip
    assert batched[1:] == single[1:]
    assert {r[1] for r in single[2]} >= {"quality", "errors"}
    assert set(single[3]) == {"invalid_utf8", "bad_time_field"}


def test_shard_writer_add_many_writes_the_same_bytes_as_add(tmp_path):
    from lmtrain.data.shards import ShardWriter

    rng = np.random.default_rng(5)
    docs = [rng.integers(0, 500, size=int(rng.integers(0, 40))) for _ in range(200)]
    a = ShardWriter(tmp_path / "a", vocab_size=500, eos_id=1, chunk_tokens=64, shard_tokens=256)
    b = ShardWriter(tmp_path / "b", vocab_size=500, eos_id=1, chunk_tokens=64, shard_tokens=256)
    for d in docs:
        a.add(d)
    for start in range(0, len(docs), 23):
        b.add_many(docs[start : start + 23])
    ia, ib = a.close(), b.close()
    assert ia == ib and len(ia["shards"]) > 2
    for s in ia["shards"]:
        assert (tmp_path / "a" / s["file"]).read_bytes() == (
            tmp_path / "b" / s["file"]
        ).read_bytes()
