"""The data-preparation config: every key with its default, and the checks run before any work.

A config file (``configs/data/*.py``) defines ``get_config()`` that starts from
:func:`default_config` and lists its inputs with :func:`source`. Unknown keys are errors that
name the key and the closest valid ones; a negative quality threshold switches that filter off.
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections

from lmtrain.config import did_you_mean
from lmtrain.data.pii import KINDS
from lmtrain.data.tokenizer import CHAT_SPECIALS
from lmtrain.errors import ConfigError

GOPHER_TOP_NGRAMS = ((2, 0.20), (3, 0.18), (4, 0.16))
GOPHER_DUP_NGRAMS = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
TEXT_EXTENSIONS = (".txt", ".md", ".markdown", ".html", ".htm", ".jsonl", ".jsonl.gz", ".parquet")


def source_defaults() -> dict:
    return {
        "name": "",  # default: kind + index
        "kind": "files",  # files | tfds | default_corpus
        "paths": (),  # files: files, directories and globs
        "extensions": TEXT_EXTENSIONS,  # files taken from directories
        "format": "auto",  # auto (by suffix; JSONL/parquet/TFDS sniff HTML) | text | markdown | html | code
        "text_field": "text",  # JSONL key / parquet column / TFDS feature
        "id_field": "",
        "time_field": "",  # default: split.time_field
        "licence": "unknown",  # recorded per document in the manifest and datasheet
        "segment": "file",  # file | paragraphs (groups of blank-line separated paragraphs)
        "segment_chars": 2000,
        "max_doc_bytes": 64 << 20,
        "parquet_batch_rows": 1024,
        "tfds_name": "",
        "data_dir": "",  # TFDS data_dir; for default_corpus: the stdlib root (default: this Python's)
        "split": "train",  # TFDS split
        "max_files": 0,  # default_corpus caps (0 = none)
        "max_bytes": 0,
        "include_tests": False,
        "mode": "source",  # default_corpus: source | docstrings | both
    }


def source(**kwargs) -> ml_collections.ConfigDict:
    """One entry of ``config.sources`` with defaults filled in; unknown keys are errors."""
    spec = source_defaults()
    for k, v in kwargs.items():
        if k not in spec:
            raise _unknown(k, spec, "sources[]")
        spec[k] = v
    return ml_collections.ConfigDict(spec)


def _quality_defaults() -> ml_collections.ConfigDict:
    """The quality filters' thresholds (config section ``quality``)."""
    q = ml_collections.ConfigDict()
    q.enabled = True  # Gopher (Rae et al. 2021) and C4 (Raffel et al. 2020) values; -1 = off
    q.min_words = 50
    q.max_words = 100_000
    q.min_mean_word_length = 3.0
    q.max_mean_word_length = 10.0
    q.max_symbol_word_ratio = 0.1
    q.max_bullet_lines_fraction = 0.9
    q.max_ellipsis_lines_fraction = 0.3
    q.min_alpha_words_fraction = 0.8
    q.min_stop_words = 2
    q.max_duplicate_lines_fraction = 0.3
    q.max_duplicate_line_chars_fraction = 0.2
    q.max_duplicate_paragraphs_fraction = 0.3
    q.max_duplicate_paragraph_chars_fraction = 0.2
    q.max_top_ngram_chars_fraction = GOPHER_TOP_NGRAMS
    q.max_duplicate_ngram_chars_fraction = GOPHER_DUP_NGRAMS
    q.blocklist = ()
    q.blocklist_path = ""
    q.max_blocklist_hits = 0
    return q


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_workers = -1  # -1: one per CPU core; 0: no worker processes
    c.batch_docs = 256  # documents per work item sent to a worker
    c.batch_bytes = 4 << 20
    c.on_error = "stop"  # stop | skip (bad input counted by reason in the manifest)
    c.sources = ()

    c.normalize = ml_collections.ConfigDict()
    c.normalize.enabled = True
    c.normalize.invalid_utf8 = "replace"  # replace | drop | error
    c.normalize.nfc = True
    c.normalize.max_blank_lines = 1

    c.markup = ml_collections.ConfigDict()
    c.markup.enabled = True  # HTML / Markdown → text

    c.quality = _quality_defaults()

    c.pii = ml_collections.ConfigDict()
    c.pii.enabled = True
    c.pii.kinds = KINDS
    c.pii.placeholder = "<{kind}>"
    c.pii.keep_nonpublic_ips = True

    c.dedup = ml_collections.ConfigDict()
    c.dedup.exact = True
    c.dedup.near = True
    c.dedup.threshold = 0.8  # Jaccard similarity of word shingles
    c.dedup.num_perm = 128
    c.dedup.shingle_words = 5
    c.dedup.bands = 0  # 0 = derived from threshold and num_perm
    c.dedup.rows = 0

    c.split = ml_collections.ConfigDict()
    c.split.method = "hash"  # hash | position | time
    c.split.train = 0.9
    c.split.validation = 0.05
    c.split.test = 0.05
    c.split.time_field = ""
    c.split.time_cutoffs = ()  # (validation_start, test_start) for method=time

    c.contamination = ml_collections.ConfigDict()
    c.contamination.eval_sets = ()  # ({'name':, 'path':, 'fields': ()}, ...) or paths
    c.contamination.ngram = 13
    c.contamination.drop = False  # drop train documents that overlap an eval set
    c.contamination.min_matches = 1  # n-grams shared before a train document counts as overlapping

    t = c.tokenizer = ml_collections.ConfigDict()
    t.kind = "sentencepiece"  # sentencepiece | char (lmtrain CharTokenizer)
    t.model_type = "bpe"  # bpe | unigram | char (SentencePiece)
    t.vocab_size = 4096
    t.byte_fallback = True
    t.user_specials = CHAT_SPECIALS
    t.path = ""  # load this tokenizer (directory or .model) instead of training one
    t.max_train_chars = 20_000_000  # sample of the train split used for training
    t.max_sentence_chars = 4096
    # SentencePiece's result depends on its thread count: fixed here (not taken from num_workers or
    # the machine) so the same config gives the same tokenizer everywhere.
    t.num_threads = 2

    c.output = ml_collections.ConfigDict()
    c.output.chunk_tokens = 4096
    c.output.shard_tokens = 16 * 1024 * 1024
    c.output.document_lists = True  # <split>/documents.jsonl and removed.jsonl
    return c


def _unknown(key: str, known, where: str) -> ConfigError:
    hint = did_you_mean(key, known)
    path = ".".join(part for part in f"{where}.{key}".split(".") if part)
    return ConfigError(f"unknown data config key {path}{hint}; see lmtrain/data/prepare_config.py")


def to_plain(value):
    """ConfigDict / mapping / tuple tree → plain dicts and lists (JSON-able)."""
    if isinstance(value, (ml_collections.ConfigDict, Mapping)):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def _merge(defaults: dict, given: dict, where: str) -> dict:
    out = dict(defaults)
    for k, v in given.items():
        if k not in defaults:
            raise _unknown(k, defaults, where)
        out[k] = (
            _merge(defaults[k], v, f"{where}.{k}")
            if isinstance(defaults[k], dict) and isinstance(v, dict)
            else v
        )
    return out


def resolve(config) -> dict:
    """Config (ConfigDict or dict) → complete plain dict with defaults, checked."""
    cfg = _merge(to_plain(default_config()), to_plain(config), "")
    sources = []
    for i, spec in enumerate(cfg["sources"]):
        if isinstance(spec, str):
            spec = {"paths": [spec]}
        if not isinstance(spec, dict):
            raise ConfigError(
                f"config.sources[{i}] must be a source(...) ConfigDict or a path, not {spec!r}"
            )
        s = _merge(to_plain(source_defaults()), spec, f"sources[{i}]")
        s["name"] = s["name"] or f"{s['kind']}{i}"
        if isinstance(s["paths"], str):
            s["paths"] = [s["paths"]]
        sources.append(s)
    cfg["sources"] = sources
    cfg["contamination"]["eval_sets"] = [
        {"name": "", "path": e, "fields": []}
        if isinstance(e, str)
        else {"name": "", "fields": [], **e}
        for e in cfg["contamination"]["eval_sets"]
    ]
    check(cfg)
    return cfg


def check(cfg: dict) -> None:
    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    need(
        cfg["sources"],
        "config.sources is empty: add source(kind='default_corpus') or source(paths=(...,))",
    )
    names = [s["name"] for s in cfg["sources"]]
    need(len(set(names)) == len(names), f"config.sources names must be unique, got {names}")
    for i, s in enumerate(cfg["sources"]):
        where = f"config.sources[{i}]"
        need(
            s["kind"] in ("files", "tfds", "default_corpus"),
            f"{where}.kind={s['kind']!r}: files, tfds or default_corpus",
        )
        need(
            s["kind"] != "files" or s["paths"],
            f"{where}.paths is empty: list files, directories or globs",
        )
        need(
            s["kind"] != "tfds" or s["tfds_name"],
            f"{where}.tfds_name is empty: name the TFDS dataset",
        )
        need(
            s["segment"] in ("file", "paragraphs"),
            f"{where}.segment={s['segment']!r}: file or paragraphs",
        )
        need(
            s["format"] in ("auto", "text", "markdown", "html", "code"),
            f"{where}.format={s['format']!r}: auto, text, markdown, html or code",
        )
        need(
            s["mode"] in ("source", "docstrings", "both"),
            f"{where}.mode={s['mode']!r}: source, docstrings or both",
        )
    need(cfg["on_error"] in ("stop", "skip"), f"config.on_error={cfg['on_error']!r}: stop or skip")
    need(
        cfg["normalize"]["invalid_utf8"] in ("replace", "drop", "error"),
        "config.normalize.invalid_utf8: replace, drop or error",
    )
    d = cfg["dedup"]
    need(0.0 < d["threshold"] <= 1.0, f"config.dedup.threshold={d['threshold']} must be in (0, 1]")
    need(d["num_perm"] >= 8, "config.dedup.num_perm must be >= 8")
    need(d["bands"] * d["rows"] <= d["num_perm"], "config.dedup.bands * rows must be <= num_perm")
    sp = cfg["split"]
    fr = (sp["train"], sp["validation"], sp["test"])
    need(
        all(f >= 0 for f in fr) and abs(sum(fr) - 1.0) < 1e-6,
        f"config.split train+validation+test must be 1, got {fr}",
    )
    need(
        sp["method"] in ("hash", "position", "time"),
        f"config.split.method={sp['method']!r}: hash, position or time",
    )
    if sp["method"] == "time":
        need(
            len(sp["time_cutoffs"]) == 2,
            "config.split.time_cutoffs must be (validation_start, test_start) for method=time",
        )
        need(
            sp["time_field"] or all(s["time_field"] for s in cfg["sources"]),
            "config.split.time_field is empty",
        )
    t = cfg["tokenizer"]
    need(
        t["kind"] in ("sentencepiece", "char"),
        f"config.tokenizer.kind={t['kind']!r}: sentencepiece or char",
    )
    need(
        t["model_type"] in ("bpe", "unigram", "char"),
        f"config.tokenizer.model_type={t['model_type']!r}: bpe, unigram or char",
    )
    need(t["num_threads"] >= 1, "config.tokenizer.num_threads must be >= 1")
    unknown_pii = set(cfg["pii"]["kinds"]) - set(KINDS)
    need(not unknown_pii, f"config.pii.kinds: unknown {sorted(unknown_pii)}; choose from {KINDS}")
    for e in cfg["contamination"]["eval_sets"]:
        need(e.get("path"), "config.contamination.eval_sets entries need a path")
    need(cfg["contamination"]["ngram"] >= 1, "config.contamination.ngram must be >= 1")
