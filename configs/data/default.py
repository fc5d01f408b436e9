"""Default data preparation: the Python standard library's sources, SentencePiece BPE (4096).

Works on any machine with no download: the corpus is the ``.py`` files of the running Python's
standard library (PSF-2.0; about 730 files / 12 MB without the test suites).

    lmtrain data prepare --config configs/data/default.py --out data_out/stdlib

Measured (CPython 3.11.7, 2 shared cores, 82 s wall, 340 MB peak RSS): 734 files read, 33 dropped
by quality filters, 3 empty, 21 near duplicates (generated codec tables) and 0 exact duplicates
removed, 184 PII replacements (170 e-mail addresses, 14 IP addresses); 620 / 32 / 25 documents in
train / validation / test, 3.41M train tokens, 3.17 characters per token on validation. Counts per
stage in ``data_out/stdlib/manifest.json`` and ``DATASHEET.md``.

Quality thresholds: the Gopher prose values are relaxed for code, from the distribution over the
stdlib itself (99th percentiles: mean word length 11.8, symbol ratio 0.16 since ``#`` starts every
comment, words with a letter 0.67 at the 1st percentile, duplicate lines 0.33, duplicated 5-gram
characters 0.29). The stop-word filter is off (code is not English prose).
"""

from lmtrain.data.prepare_config import default_config, source


def code_quality(q) -> None:
    """Quality thresholds that keep ordinary source code and drop generated tables and stubs."""
    q.min_words = 20
    q.max_words = -1
    q.min_mean_word_length = 2.5
    q.max_mean_word_length = 14.0
    q.max_symbol_word_ratio = 0.3
    q.min_alpha_words_fraction = 0.5
    q.min_stop_words = -1
    q.max_duplicate_lines_fraction = 0.4
    q.max_duplicate_line_chars_fraction = 0.3
    q.max_duplicate_ngram_chars_fraction = (
        (5, 0.35),
        (6, 0.33),
        (7, 0.31),
        (8, 0.29),
        (9, 0.27),
        (10, 0.25),
    )


def get_config():
    c = default_config()
    c.sources = (
        source(name="stdlib", kind="default_corpus", licence="PSF-2.0", max_files=0, max_bytes=0),
    )
    code_quality(c.quality)
    c.split.method = "hash"
    c.split.train, c.split.validation, c.split.test = 0.9, 0.05, 0.05
    c.tokenizer.kind = "sentencepiece"
    c.tokenizer.model_type = "bpe"
    c.tokenizer.vocab_size = 4096
    return c
