"""The Beam runner (DirectRunner) against the local runner on the messy mixed corpus: the same
token shards, indexes, document lists, tokenizer and manifest counts byte for byte, the same set
of removed records; and output paths through the filesystem layer with a gs:// fake."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from lmtrain.data.prepare import prepare
from tests.unit.data.test_data_prepare import config, mixed_corpus, prepared  # noqa: F401  (fixtures)

pytest.importorskip("apache_beam")


def _comparable(m: dict) -> dict:
    m = json.loads(json.dumps(m))
    for k in ("created", "runner"):
        m.pop(k)
    m["config"].pop("num_workers")
    return m


def _removed_lines(out: Path) -> list[str]:
    lines = []
    for p in sorted(out.glob("removed*.jsonl")):
        lines += p.read_text().splitlines()
    return sorted(lines)


def test_beam_direct_runner_equals_local_runner(mixed_corpus, prepared, tmp_path):  # noqa: F811
    from lmtrain.data.beam_runner import REMOVED_SHARDS, prepare_beam

    raw, _ = mixed_corpus
    local_out, local_m = prepared
    out = tmp_path / "beam"
    m = prepare_beam(config([raw]), str(out))
    assert m["runner"]["name"] == "beam" and local_m["runner"]["name"] == "local"
    assert _comparable(m) == _comparable(local_m)
    assert _comparable(json.loads((out / "manifest.json").read_text())) == _comparable(local_m)
    local_files = sorted(
        p.relative_to(local_out)
        for p in local_out.rglob("*")
        if p.is_file() and "removed" not in p.name
    )
    beam_files = sorted(
        p.relative_to(out) for p in out.rglob("*") if p.is_file() and "removed" not in p.name
    )
    assert local_files == beam_files
    for rel in local_files:
        if rel.name != "manifest.json":
            assert (out / rel).read_bytes() == (local_out / rel).read_bytes(), rel
    shards = sorted(p.name for p in out.glob("removed-*.jsonl"))
    assert len(shards) == REMOVED_SHARDS and not (out / "removed.jsonl").exists()
    assert _removed_lines(out) == _removed_lines(local_out)
    assert len(_removed_lines(out)) >= 3  # too short, exact and near duplicate


def test_beam_refuses_position_split(mixed_corpus, tmp_path):  # noqa: F811
    from lmtrain.data.beam_runner import prepare_beam
    from lmtrain.errors import ConfigError

    raw, _ = mixed_corpus
    with pytest.raises(ConfigError, match="position"):
        prepare_beam(config([raw], split={"method": "position"}), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


@contextlib.contextmanager
def fake_gcs(bucket_root: Path, seen: list):
    """gs://NAME/... mapped onto bucket_root/NAME/... for every etils.epath operation used."""
    import builtins
    import os
    import shutil
    from types import SimpleNamespace

    from etils.epath.testing import mock_epath

    def local(p) -> str:
        p = os.fspath(p)
        assert p.startswith("gs://"), p
        seen.append(p)
        return str(bucket_root / p[len("gs://") :])

    def _open(_fn, p, mode="r", **kw):
        return builtins.open(local(p), mode, **{k: v for k, v in kw.items() if v is not None})

    def _walk(_fn, p, top_down=True, on_error=None):
        base = local(p)
        for root, dirs, files in os.walk(base, topdown=top_down):
            yield "gs://" + os.path.relpath(root, bucket_root), dirs, files

    def _glob(_fn, pattern):
        import glob

        return ["gs://" + os.path.relpath(h, bucket_root) for h in glob.glob(local(pattern))]

    with mock_epath(
        open=_open,
        exists=lambda _fn, p: os.path.exists(local(p)),
        isdir=lambda _fn, p: os.path.isdir(local(p)),
        listdir=lambda _fn, p: os.listdir(local(p)),
        makedirs=lambda _fn, p, exist_ok=False: os.makedirs(local(p), exist_ok=exist_ok),
        mkdir=lambda _fn, p, exist_ok=False: os.makedirs(local(p), exist_ok=exist_ok),
        rmtree=lambda _fn, p: shutil.rmtree(local(p)),
        walk=_walk,
        glob=_glob,
        stat=lambda _fn, p: SimpleNamespace(length=os.path.getsize(local(p))),
    ):
        yield


def test_gs_uris_go_through_the_filesystem_layer(mixed_corpus, prepared, tmp_path):  # noqa: F811
    """Input and output as gs:// URIs, the scheme faked onto a local directory (etils.epath's
    mock): the corpus is read from the fake bucket, every output file lands in it, and each
    equals the local-path run's."""
    import shutil

    raw, _ = mixed_corpus
    local_out, local_m = prepared
    bucket = tmp_path / "buckets"
    shutil.copytree(raw, bucket / "corpus" / "raw")
    seen: list[str] = []
    with fake_gcs(bucket, seen):
        m = prepare(config(["gs://corpus/raw"]), "gs://out/datasets/mixed")
    out = bucket / "out" / "datasets" / "mixed"
    assert any(p.startswith("gs://corpus/raw/") for p in seen)
    assert any(p.startswith("gs://out/datasets/mixed/") for p in seen)
    assert m["flow"] == local_m["flow"] and m["stages"] == local_m["stages"]
    assert json.loads((out / "manifest.json").read_text())["flow"] == m["flow"]
    assert m["sources"][0]["files"][0]["path"].startswith("gs://corpus/raw/")
    for p in local_out.rglob("*"):
        if p.is_file() and p.name not in ("manifest.json", "DATASHEET.md"):
            assert (out / p.relative_to(local_out)).read_bytes() == p.read_bytes(), p


def test_bad_input_same_counts_and_messages_on_both_runners(tmp_path):
    """on_error='skip': malformed JSON, a missing text field, a binary file and a missing path are
    counted and their first messages kept, in corpus order, the same on both runners; with
    on_error='stop' the Beam runner raises the same one-line DataError and writes nothing."""
    import random

    from lmtrain.data.beam_runner import prepare_beam
    from lmtrain.errors import DataError
    from tests.unit.data.test_data_prepare import prose

    rng = random.Random(7)
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = [json.dumps({"text": prose(rng)}) for _ in range(12)]
    lines[3] = "{bad json"
    lines[7] = json.dumps({"body": "no text field"})
    (raw / "a.jsonl").write_text("\n".join(lines) + "\n")
    (raw / "b.txt").write_bytes(b"binary\x00data")
    for i in range(4):
        (raw / f"c{i}.txt").write_text(prose(rng, 120))
    paths = [raw, tmp_path / "missing"]
    cfg = config(paths, on_error="skip")
    local = prepare(cfg, tmp_path / "local")
    beam = prepare_beam(cfg, str(tmp_path / "beam"))
    assert local["stages"]["errors"]["skipped"] == {
        "binary_file": 1, "malformed_jsonl": 1, "missing_path": 1, "missing_text_field": 1,
    }  # fmt: skip
    assert _comparable(beam) == _comparable(local)
    with pytest.raises(DataError, match=r"a\.jsonl:4: malformed JSON"):
        prepare_beam(config([raw]), str(tmp_path / "stop"))
    assert not (tmp_path / "stop").exists()


def test_beam_spill_references_through_gs_fake_and_removed(mixed_corpus, prepared, tmp_path):  # noqa: F811
    """Output as a gs:// URI (the scheme faked onto a local directory): the texts, signatures
    and token ids the Beam steps pass by reference are written to and read back from the
    bucket's ``_beam/`` (spill and token files), which is gone at the end; the dataset equals
    the local runner's. A failed run removes its temporary files too."""
    from lmtrain.data.beam_runner import prepare_beam
    from lmtrain.errors import DataError

    raw, _ = mixed_corpus
    local_out, local_m = prepared
    bucket = tmp_path / "buckets"
    seen: list[str] = []
    with fake_gcs(bucket, seen):
        m = prepare_beam(config([raw]), "gs://out/ds")
    out = bucket / "out" / "ds"
    spill = [p for p in seen if p.startswith("gs://out/ds/_beam/spill/")]
    assert {p.rsplit(".", 1)[1] for p in spill} == {"txt", "sig"}
    assert any(p.startswith("gs://out/ds/_beam/tokens/") for p in seen)
    assert not (out / "_beam").exists()
    assert _comparable(m) == _comparable(local_m)
    for p in local_out.rglob("*"):
        if p.is_file() and p.name not in ("manifest.json", "removed.jsonl"):
            assert (out / p.relative_to(local_out)).read_bytes() == p.read_bytes(), p
    assert _removed_lines(out) == _removed_lines(local_out)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jsonl").write_text('{"text": "fine text here"}\n{bad json\n')
    with fake_gcs(bucket, []), pytest.raises(DataError, match="malformed JSON"):
        prepare_beam(config([bad]), "gs://out/failed")
    assert not (bucket / "out" / "failed" / "_beam").exists()


@pytest.mark.parametrize(
    "over",
    [
        {"batch_docs": 2, "tokenizer": {"max_train_chars": 4000}},
        {"dedup": {"exact": False, "near": False}, "tokenizer": {"kind": "char"},
         "output": {"chunk_tokens": 64, "shard_tokens": 128, "document_lists": False}},
    ],
    ids=["batches-sampled-tokenizer", "no-dedup-char-tokenizer"],
)  # fmt: skip
def test_beam_many_batches_and_shards_equal_local(mixed_corpus, tmp_path, over):  # noqa: F811
    """Several cleaning batches per file (signature rows and text offsets past the first batch),
    a tokenizer sample smaller than the train split, several token shards per split (documents
    cut across shard boundaries); and with dedup off and a character tokenizer (its alphabet
    read back from the spill): still the local runner's bytes."""
    from lmtrain.data.beam_runner import prepare_beam

    raw, _ = mixed_corpus
    cfg = config([raw], **{"output": {"chunk_tokens": 64, "shard_tokens": 128}, **over})
    local_m = prepare(cfg, tmp_path / "local")
    m = prepare_beam(cfg, str(tmp_path / "beam"))
    assert _comparable(m) == _comparable(local_m)
    if "max_train_chars" in over.get("tokenizer", {}):  # the sample is a strict subset
        assert 0 < m["tokenizer"]["trained_on_chars"] < m["splits"]["train"]["chars"]
    files = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*")
                   if p.is_file() and p.name not in ("manifest.json", "removed.jsonl"))  # fmt: skip
    assert sum(1 for f in files if f.name.startswith("shard-")) > 3
    for rel in files:
        assert (tmp_path / "beam" / rel).read_bytes() == (tmp_path / "local" / rel).read_bytes(), (
            rel
        )
    assert _removed_lines(tmp_path / "beam") == _removed_lines(tmp_path / "local")


def test_order_packing_sorts_like_the_tuple_and_refuses_overflow():
    import random

    from lmtrain.data.beam_spill import pack_order, unpack_order
    from lmtrain.errors import DataError

    rng = random.Random(0)
    orders = [(rng.randrange(1 << 15), rng.randrange(1 << 20), rng.randrange(1 << 28)) for _ in range(500)]  # fmt: skip
    assert sorted(orders) == sorted(orders, key=lambda o: pack_order(*o))
    assert all(unpack_order(pack_order(*o)) == o for o in orders)
    with pytest.raises(DataError, match="documents per file"):
        pack_order(0, 0, 1 << 28)


def test_spill_reader_reads_ranges_and_names_a_truncated_file(tmp_path):
    from lmtrain.data.beam_spill import SpillReader, SpillWriter
    from lmtrain.errors import DataError

    path = str(tmp_path / "d" / "x.bin")
    with SpillWriter(path) as w:
        offs = [w.write(b) for b in (b"abc", "żółw".encode(), b"", b"xyz")]
    assert offs == [0, 3, 10, 10]
    with SpillReader(keep=1) as r:
        assert r.read(path, 3, 7).decode() == "żółw"
        assert r.read(path, 10, 3) == b"xyz"
        with pytest.raises(DataError, match=r"x\.bin: temporary file is shorter"):
            r.read(path, 11, 5)
