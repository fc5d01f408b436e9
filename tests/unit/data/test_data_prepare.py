"""`lmtrain data prepare` end to end on small corpora written here: every source format, the
counts in the manifest against what was planted, bad input, atomic output, determinism, TFDS,
and the shards read back by the training input pipeline."""

from __future__ import annotations

import gzip
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from lmtrain.data.prepare import prepare
from lmtrain.data.shards import TokenStream
from lmtrain.data.tokenizer import load_tokenizer
from lmtrain.errors import DataError

WORDS = (
    "river stone light window garden music paper letter morning winter silver forest bridge "
    "market engine candle harbor meadow thunder pencil orange violet marble canyon lantern"
).split()
SPLITS = ("train", "validation", "test")


def prose(rng: random.Random, n_words: int = 80) -> str:
    stop = ["the", "of", "and", "to", "with", "that"]
    return (
        " ".join(
            rng.choice(WORDS) if i % 3 else rng.choice(stop) for i in range(n_words)
        ).capitalize()
        + "."
    )


def config(paths, **over) -> dict:
    cfg = {
        "sources": [{"name": "raw", "paths": [str(p) for p in paths], "licence": "CC0-1.0"}],
        "num_workers": 0,
        "tokenizer": {"vocab_size": 320},
        "split": {"train": 0.8, "validation": 0.1, "test": 0.1},
        "output": {"chunk_tokens": 256},
    }
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def stream_texts(out: Path, split: str) -> list[str]:
    """The documents of a written split, decoded from its token shards."""
    tok = load_tokenizer(out / "tokenizer")
    stream = TokenStream(out / split)
    ids = stream.read(0, stream.num_tokens) if stream.num_tokens else np.zeros(0, np.int32)
    ends = np.flatnonzero(ids == stream.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(ids[s:e].tolist()) for s, e in zip(starts, ends)]


def listed(out: Path, split: str) -> list[dict]:
    with open(out / split / "documents.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory):
    """A directory with every supported format and known plants; returns (dir, expectations)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    root = tmp_path_factory.mktemp("mixed")
    raw = root / "raw"
    (raw / "sub").mkdir(parents=True)
    base = prose(rng, 200)
    words = base.split()
    words[100] = "zebra"  # a near duplicate: one word in 200 changed
    docs = {
        "a.txt": base,
        "b.txt": "Contact me at jane.doe@example.com or +1 415 555 0199. " + prose(rng),
        "c.txt": base,  # exact duplicate of a.txt
        "sub/d.txt": " ".join(words),
        "e.txt": prose(rng) + " Card 4111 1111 1111 1111 but not 4111 1111 1111 1112.",
        "f.txt": "short",  # dropped by the quality filter (too few words)
    }
    for name, text in docs.items():
        (raw / name).write_text(text)
    (raw / "g.txt").write_bytes(("Broken byte \xff here. " + prose(rng)).encode("latin-1"))
    (raw / "page.html").write_text(
        f"<html><head><title>Page Title</title></head><body><ul><li>{prose(rng, 30)}</li>"
        f"<li>second item</li></ul><pre>code  block()</pre><p>{prose(rng)}</p></body></html>"
    )
    (raw / "notes.md").write_text(
        f"# Notes\n\n- {prose(rng, 40)}\n- two\n\n```\nx = 1\n```\n\n{prose(rng)}\n"
    )
    with open(raw / "rows.jsonl", "w") as f:
        for i in range(4):
            f.write(
                json.dumps({"text": prose(rng) + f" server 93.184.216.{i + 1} up", "meta": i})
                + "\n"
            )
    with gzip.open(raw / "more.jsonl.gz", "wt") as f:
        for _ in range(3):
            f.write(json.dumps({"text": prose(rng)}) + "\n")
    table = pa.table({"text": [prose(rng) for _ in range(5)], "n": list(range(5))})
    pq.write_table(table, raw / "table.parquet", row_group_size=2)
    (raw / "ignored.bin").write_bytes(b"\x00\x01")  # not a text extension: never read
    return raw, {"read": 6 + 1 + 1 + 1 + 4 + 3 + 5}


@pytest.fixture(scope="module")
def prepared(mixed_corpus, tmp_path_factory):
    raw, _ = mixed_corpus
    out = tmp_path_factory.mktemp("prep") / "out"
    manifest = prepare(config([raw]), out)
    return out, manifest


def test_mixed_sources_counts_and_layout(mixed_corpus, prepared):
    raw, expect = mixed_corpus
    out, m = prepared
    assert sorted(p.name for p in out.iterdir()) == [
        "DATASHEET.md", "manifest.json", "removed.jsonl", "test", "tokenizer", "train", "validation",
    ]  # fmt: skip
    assert json.loads((out / "manifest.json").read_text())["flow"] == m["flow"]
    st = m["stages"]
    assert st["read"]["documents"] == expect["read"]
    assert st["decode"]["invalid_utf8_repaired"] == 1
    assert st["markup"]["html_converted"] == 1 and st["markup"]["markdown_converted"] == 1
    assert st["quality"]["dropped"] == {"too_few_words": 1}
    assert st["pii"]["replacements"] == {"CREDIT_CARD": 1, "EMAIL": 1, "IP_ADDRESS": 4, "PHONE": 1}
    assert st["dedup"]["exact_duplicates"] == 1 and st["dedup"]["near_duplicates"] == 1
    assert m["flow"]["written"] == expect["read"] - 3
    removed = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    by_reason = {r["reason"]: r for r in removed}
    assert (
        by_reason["exact_duplicate"]["id"] == "raw:raw/c.txt"
        and by_reason["exact_duplicate"]["dup_of"] == "raw:raw/a.txt"
    )
    assert (
        by_reason["near_duplicate"]["id"] == "raw:raw/sub/d.txt"
        and by_reason["near_duplicate"]["dup_of"] == "raw:raw/a.txt"
    )
    assert by_reason["too_few_words"]["id"] == "raw:raw/f.txt"
    files = {Path(f["path"]).name: f for f in m["sources"][0]["files"]}
    import hashlib

    assert files["a.txt"]["sha256"] == hashlib.sha256((raw / "a.txt").read_bytes()).hexdigest()
    assert "ignored.bin" not in files and m["sources"][0]["licence"] == "CC0-1.0"
    assert m["tokenizer"]["pad_id"] != m["tokenizer"]["eos_id"]
    assert m["tokenizer"]["chars_per_token_validation"] == pytest.approx(
        m["splits"]["validation"]["chars"] / m["splits"]["validation"]["tokens"], abs=1e-4
    )
    sheet = (out / "DATASHEET.md").read_text()
    assert "1 exact and 1 near duplicates removed" in sheet and "CREDIT_CARD: 1" in sheet


def test_no_document_in_two_splits_and_shards_hold_the_cleaned_text(prepared):
    out, m = prepared
    ids = {s: [d["id"] for d in listed(out, s)] for s in SPLITS}
    all_ids = [i for s in SPLITS for i in ids[s]]
    assert len(all_ids) == len(set(all_ids)) == m["flow"]["written"]
    texts = {s: stream_texts(out, s) for s in SPLITS}
    assert sum(len(t) for t in texts.values()) == m["flow"]["written"]
    for s in SPLITS:
        assert [len(t) for t in texts[s]] == [d["chars"] for d in listed(out, s)]
    flat = "\n".join(t for s in SPLITS for t in texts[s])
    assert "jane.doe@example.com" not in flat and "<EMAIL>" in flat
    assert "4111 1111 1111 1112" in flat and "4111 1111 1111 1111" not in flat
    assert "# Page Title" in flat and "```\ncode  block()\n```" in flat and "- second item" in flat
    assert "Broken byte \ufffd here." in flat
    assert sum(t.count("93.184.216.") for t in texts.values() for t in t) == 0


def test_shards_feed_the_training_pipeline(prepared):
    from lmtrain.data.pipeline import train_dataset

    out, _ = prepared
    stream = TokenStream(out / "train")
    ds = train_dataset(str(out / "train"), seq_len=32, batch_size=4, seed=0)
    batch = next(iter(ds))
    assert batch["inputs"].shape == (4, 32) and batch["targets"].dtype == np.int32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    windows = {tuple(stream.read(i * 32, 33)) for i in range((stream.num_tokens - 1) // 32)}
    for row in range(4):
        assert (*batch["inputs"][row], batch["targets"][row, -1]) in windows


def test_two_runs_are_byte_identical_serial_and_parallel(mixed_corpus, prepared, tmp_path):
    raw, _ = mixed_corpus
    out1, m1 = prepared
    out2 = tmp_path / "again"
    m2 = prepare(config([raw], num_workers=2), out2)
    files1 = sorted(p.relative_to(out1) for p in out1.rglob("*") if p.is_file())
    files2 = sorted(p.relative_to(out2) for p in out2.rglob("*") if p.is_file())
    assert files1 == files2
    for rel in files1:
        if rel.name != "manifest.json":
            assert (out1 / rel).read_bytes() == (out2 / rel).read_bytes(), rel

    def comparable(m):
        m = json.loads(json.dumps(m))
        m.pop("created")
        m["config"].pop("num_workers")
        return m

    assert comparable(m1) == comparable(m2)
    assert (
        m1["splits"]["train"]["index"]["shards"][0]["sha256"]
        == m2["splits"]["train"]["index"]["shards"][0]["sha256"]
    )


def test_planted_eval_passage_is_found_and_dropped_when_asked(tmp_path):
    rng = random.Random(5)
    passage = prose(rng, 40)
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(30):
        text = prose(rng) + (" " + passage + " " + prose(rng, 20) if i % 6 == 0 else "")
        (raw / f"{i:02d}.txt").write_text(text)
    evals = tmp_path / "eval.jsonl"
    evals.write_text(
        json.dumps({"q": passage.upper()}) + "\n" + json.dumps({"q": prose(rng, 40)}) + "\n"
    )
    con = {"eval_sets": [{"name": "quiz", "path": str(evals)}]}
    m = prepare(config([raw], contamination=con, tokenizer={"kind": "char"}), tmp_path / "keep")
    planted_train = [d for d in listed(tmp_path / "keep", "train") if int(d["id"][-6:-4]) % 6 == 0]
    assert planted_train, "no planted document landed in train; change the seed"
    rep = m["stages"]["contamination"]["eval_sets"][0]
    assert rep["name"] == "quiz" and rep["examples_checked"] == 2
    assert rep["contaminated_examples"] == 1 and rep["contaminated_example_ids"] == ["eval.jsonl:1"]
    assert (
        rep["train_documents_overlapping"] == len(planted_train)
        and rep["train_documents_dropped"] == 0
    )

    m = prepare(
        config([raw], contamination={**con, "drop": True}, tokenizer={"kind": "char"}),
        tmp_path / "drop",
    )
    kept_ids = {d["id"] for d in listed(tmp_path / "drop", "train")}
    assert not kept_ids & {d["id"] for d in planted_train}
    assert m["stages"]["contamination"]["train_documents_dropped"] == len(planted_train)
    removed = (tmp_path / "drop" / "removed.jsonl").read_text()
    assert removed.count("overlaps_eval_set") == len(planted_train)
    assert all(passage not in t for t in stream_texts(tmp_path / "drop", "train"))


# ---- bad input ------------------------------------------------------------------------------------


def _good_files(d: Path, n: int = 6) -> None:
    rng = random.Random(7)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (d / f"good{i}.txt").write_text(prose(rng))


def _no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".")], (
        "temporary directory left behind"
    )


def test_malformed_jsonl_stops_with_file_and_line_or_is_skipped_and_counted(tmp_path):
    raw = tmp_path / "raw"
    _good_files(raw)
    rng = random.Random(8)
    lines = [
        json.dumps({"text": prose(rng)}),
        '{"text": "unterminated',
        json.dumps({"body": "x"}),
        json.dumps({"text": prose(rng)}),
    ]
    (raw / "rows.jsonl").write_text("\n".join(lines) + "\n")
    dest = tmp_path / "outs"
    dest.mkdir()
    with pytest.raises(DataError, match=r"rows\.jsonl:2: malformed JSON .*on_error='skip'"):
        prepare(config([raw], tokenizer={"kind": "char"}), dest / "stop")
    assert not (dest / "stop").exists()
    _no_leftovers(dest)
    m = prepare(config([raw], on_error="skip", tokenizer={"kind": "char"}), dest / "skip")
    assert m["stages"]["errors"]["skipped"] == {"malformed_jsonl": 1, "missing_text_field": 1}
    assert any(
        "rows.jsonl:3: no string field 'text' (found: body)" in e
        for e in m["stages"]["errors"]["examples"]
    )
    assert m["stages"]["read"]["documents"] == 6 + 2


def test_binary_unreadable_missing_and_empty_inputs(tmp_path):
    raw = tmp_path / "raw"
    _good_files(raw)
    (raw / "blob.txt").write_bytes(b"PK\x03\x04\x00\x00binary")
    dest = tmp_path / "outs"
    dest.mkdir()
    with pytest.raises(DataError, match=r"blob\.txt: looks binary \(NUL byte at offset 4\)"):
        prepare(config([raw], tokenizer={"kind": "char"}), dest / "x")
    (raw / "blob.txt").unlink()
    (raw / "broken.jsonl.gz").write_bytes(b"this is not gzip data")
    with pytest.raises(DataError, match=r"broken\.jsonl\.gz: cannot read \(BadGzipFile"):
        prepare(config([raw], tokenizer={"kind": "char"}), dest / "x")
    os.symlink(tmp_path / "nowhere.txt", raw / "dangling.txt")
    m = prepare(config([raw], on_error="skip", tokenizer={"kind": "char"}), dest / "skipped")
    assert m["stages"]["errors"]["skipped"] == {"unreadable_file": 2}
    assert m["flow"]["read"] == 6
    with pytest.raises(DataError, match=r"nothing\.txt does not exist; fix its paths"):
        prepare(config([tmp_path / "nothing.txt"], tokenizer={"kind": "char"}), dest / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty corpus: the sources \['raw'\] gave no documents"):
        prepare(config([tmp_path / "empty"], tokenizer={"kind": "char"}), dest / "x")
    assert not (dest / "x").exists()
    _no_leftovers(dest)


def test_invalid_utf8_error_policy_names_line_and_column(tmp_path):
    raw = tmp_path / "raw"
    _good_files(raw, 3)
    (raw / "bad.txt").write_bytes(b"fine line\nsecond \xc3\x28 line\n")
    with pytest.raises(DataError, match=r"bad\.txt:2: invalid UTF-8 \(byte 0xc3 at column 8\)"):
        prepare(
            config([raw], normalize={"invalid_utf8": "error"}, tokenizer={"kind": "char"}),
            tmp_path / "o1",
        )
    m = prepare(
        config([raw], normalize={"invalid_utf8": "drop"}, tokenizer={"kind": "char"}),
        tmp_path / "o2",
    )
    assert m["stages"]["decode"]["invalid_utf8_dropped"] == 1 and m["flow"]["read"] == 4


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    raw = tmp_path / "raw"
    _good_files(raw)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="already exists and is not empty"):
        prepare(config([raw], tokenizer={"kind": "char"}), out)
    assert (out / "precious.txt").read_text() == "keep me"
    prepare(config([raw], tokenizer={"kind": "char"}), out, overwrite=True)
    assert (out / "manifest.json").exists() and not (out / "precious.txt").exists()
    _no_leftovers(tmp_path)


# ---- other sources ----------------------------------------------------------------------------------

BUILDER = """
import tensorflow_datasets as tfds


class Builder(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "doc_id": tfds.features.Text()})
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        import json, os
        with open(os.environ["LMTRAIN_TEST_TFDS_DOCS"]) as f:
            for i, text in enumerate(json.load(f)):
                yield i, {"text": text, "doc_id": f"doc{i}"}
"""


def test_tfds_source_by_name_and_data_dir(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    rng = random.Random(9)
    docs = [prose(rng) for _ in range(8)] + ["Reach me at someone@example.org. " + prose(rng)]
    (tmp_path / "docs.json").write_text(json.dumps(docs))
    monkeypatch.setenv("LMTRAIN_TEST_TFDS_DOCS", str(tmp_path / "docs.json"))
    pkg = tmp_path / "mods" / "lmtrain_test_text"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "lmtrain_test_text_dataset_builder.py").write_text(BUILDER)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    from lmtrain_test_text import lmtrain_test_text_dataset_builder as mod

    data_dir = tmp_path / "tfds_data"
    mod.Builder(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    assert list((data_dir / "lmtrain_test_text" / "1.0.0").glob("*.array_record*"))
    src = {"name": "tiny", "kind": "tfds", "tfds_name": "lmtrain_test_text", "data_dir": str(data_dir),
           "id_field": "doc_id", "licence": "CC0-1.0"}  # fmt: skip
    m = prepare(config([], sources=[src]), tmp_path / "out")  # byte-fallback BPE: exact round trip
    assert m["flow"]["read"] == 9 and m["stages"]["pii"]["replacements"] == {"EMAIL": 1}
    assert m["sources"][0]["tfds"]["name"] == "lmtrain_test_text" and m["sources"][0]["files"]
    got = sorted(t for s in SPLITS for t in stream_texts(tmp_path / "out", s))
    assert got == sorted(d.replace("someone@example.org", "<EMAIL>") for d in docs)
    ids = sorted(d["id"] for s in SPLITS for d in listed(tmp_path / "out", s))
    assert ids == sorted(f"tiny:doc{i}" for i in range(9))
    with pytest.raises(DataError, match="TFDS dataset 'no_such_set' .* cannot be opened"):
        prepare(config([], sources=[{**src, "tfds_name": "no_such_set"}]), tmp_path / "bad")
    del sys.modules["lmtrain_test_text"], tfds


def test_default_corpus_capped_and_paragraph_segments(tmp_path):
    import hashlib

    from lmtrain.data.default_corpus import stdlib_files, stdlib_root

    src = {"name": "stdlib", "kind": "default_corpus", "licence": "PSF-2.0", "max_files": 12}
    cfg = config([], sources=[src], tokenizer={"kind": "char"},
                 quality={"min_words": 20, "min_stop_words": -1, "max_symbol_word_ratio": 0.3,
                          "min_alpha_words_fraction": 0.5})  # fmt: skip
    m = prepare(cfg, tmp_path / "std")
    files = m["sources"][0]["files"]
    assert [f["path"] for f in files] == stdlib_files(stdlib_root())[:12]
    f0 = files[0]
    assert f0["sha256"] == hashlib.sha256(Path(stdlib_root(), f0["path"]).read_bytes()).hexdigest()
    assert m["flow"]["read"] == 12 and m["licences"] == {"PSF-2.0": m["flow"]["written"]}

    rng = random.Random(11)
    big = tmp_path / "big.txt"
    paras = [prose(rng, 60) for _ in range(40)]
    big.write_text("\n\n".join(paras) + "\n")
    seg = {"name": "book", "paths": [str(big)], "segment": "paragraphs", "segment_chars": 2000}
    m = prepare(
        config(
            [],
            sources=[seg],
            tokenizer={"kind": "char"},
            split={"method": "position", "train": 0.8, "validation": 0.2, "test": 0.0},
        ),
        tmp_path / "seg",
    )
    docs = [t for s in SPLITS for t in stream_texts(tmp_path / "seg", s)]
    assert len(docs) == m["flow"]["read"] > 1
    assert "\n\n".join(docs) == "\n\n".join(paras)  # nothing lost or reordered at the cuts
    assert [d["id"] for d in listed(tmp_path / "seg", "train")][0] == "book:big.txt#L1"


def test_time_field_split_and_docstring_corpus(tmp_path):
    rng = random.Random(12)
    raw = tmp_path / "raw"
    raw.mkdir()
    dates = [
        "2020-01-05",
        "2021-06-01T12:00:00",
        "2022-03-03",
        "2023-01-01",
        "2023-07-09",
        "2024-02-02",
    ]
    with open(raw / "news.jsonl", "w") as f:
        for i, d in enumerate(dates):
            f.write(json.dumps({"text": prose(rng), "date": d, "id": f"n{i}"}) + "\n")
        f.write(json.dumps({"text": prose(rng), "id": "undated"}) + "\n")
    src = {"name": "news", "paths": [str(raw)], "id_field": "id"}
    split = {"method": "time", "time_field": "date", "time_cutoffs": ["2022-01-01", "2023-06-01"]}
    cfg = config([], sources=[src], split=split, tokenizer={"kind": "char"})
    with pytest.raises(DataError, match=r"news\.jsonl:7: time field 'date' is missing"):
        prepare(cfg, tmp_path / "o1")
    m = prepare({**cfg, "on_error": "skip"}, tmp_path / "o2")
    assert m["stages"]["errors"]["skipped"] == {"bad_time_field": 1}
    got = {s: [d["id"] for d in listed(tmp_path / "o2", s)] for s in SPLITS}
    assert got == {
        "train": ["news:n0", "news:n1"],
        "validation": ["news:n2", "news:n3"],
        "test": ["news:n4", "news:n5"],
    }

    std = {"name": "doc", "kind": "default_corpus", "mode": "docstrings", "max_files": 40}
    m = prepare(
        config([], sources=[std], tokenizer={"kind": "char"}, quality={"min_words": 5}),
        tmp_path / "o3",
    )
    import ast

    from lmtrain.data.default_corpus import stdlib_root
    from lmtrain.data.normalize import normalize_text

    train = listed(tmp_path / "o3", "train")
    assert m["flow"]["written"] > 0 and train
    for doc, text in zip(train, stream_texts(tmp_path / "o3", "train")):
        rel = doc["id"].removeprefix("doc:").removesuffix("#docstrings")
        tree = ast.parse(Path(stdlib_root(), rel).read_text(encoding="utf-8"))
        module_doc = ast.get_docstring(tree, clean=True)
        if module_doc:  # the document opens with the module docstring, then class/def docstrings
            assert text.startswith(normalize_text(module_doc)[0])
        assert "import " not in text.split("\n", 1)[0]


def test_token_stream_cache_holds_a_small_split_and_is_bounded(tmp_path):
    """Random windows re-read decoded records from memory, within the byte budget."""
    from lmtrain.data.shards import write_split

    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 500, size=int(n)).tolist() for n in rng.integers(50, 400, size=60)]
    write_split(tmp_path / "s", docs, vocab_size=512, eos_id=0, chunk_tokens=256)
    want = np.concatenate([np.append(np.asarray(d), 0) for d in docs])  # EOS after each document

    def reads(stream):
        calls = []
        source = stream._source
        stream._source = type(
            "Counting", (), {"__getitem__": lambda _, i: calls.append(i) or source[i]}
        )()
        return calls

    whole = TokenStream(tmp_path / "s")  # default budget: the whole split fits
    calls = reads(whole)
    starts = rng.integers(0, len(whole) - 65, size=300)
    for s in list(starts) * 2:
        np.testing.assert_array_equal(whole.read(int(s), 65), want[s : s + 65])
    assert len(calls) == len(set(calls))  # each record decoded once

    small = TokenStream(tmp_path / "s", cache_bytes=2 * 256 * whole.dtype.itemsize)
    calls = reads(small)
    for s in starts:
        np.testing.assert_array_equal(small.read(int(s), 65), want[s : s + 65])
    assert len(small._cache) <= 2 and len(calls) > len(set(calls))  # bounded: records re-read
