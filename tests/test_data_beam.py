"""The Beam runner (DirectRunner) against the local runner on the messy mixed corpus: the same
token shards, indexes, document lists, tokenizer and manifest counts byte for byte, the same set
of removed records; and output paths through the filesystem layer with a gs:// fake."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmtrain.data.prepare import prepare
from tests.test_data_prepare import config, mixed_corpus, prepared  # noqa: F401  (fixtures)

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


def test_gs_uri_output_goes_through_the_filesystem_layer(mixed_corpus, prepared, tmp_path):  # noqa: F811
    """A gs:// output with the scheme faked onto a local directory (etils.epath's mock): every
    file lands in the fake bucket and equals the local run's."""
    import builtins
    import os
    import shutil

    from etils.epath.testing import mock_epath

    raw, _ = mixed_corpus
    local_out, _ = prepared
    bucket = tmp_path / "bucket"
    seen: list[str] = []

    def local(p) -> str:
        p = os.fspath(p)
        assert p.startswith("gs://"), p
        seen.append(p)
        return str(bucket / p[len("gs://") :])

    def _open(_fn, p, mode="r", **kw):
        return builtins.open(local(p), mode, **{k: v for k, v in kw.items() if v is not None})

    with mock_epath(
        open=_open,
        exists=lambda _fn, p: os.path.exists(local(p)),
        isdir=lambda _fn, p: os.path.isdir(local(p)),
        listdir=lambda _fn, p: os.listdir(local(p)),
        makedirs=lambda _fn, p, exist_ok=False: os.makedirs(local(p), exist_ok=exist_ok),
        mkdir=lambda _fn, p, exist_ok=False: os.makedirs(local(p), exist_ok=exist_ok),
        rmtree=lambda _fn, p: shutil.rmtree(local(p)),
    ):
        m = prepare(config([raw]), "gs://bucket/datasets/mixed")
    out = bucket / "bucket" / "datasets" / "mixed"
    assert seen and (out / "manifest.json").exists()
    assert json.loads((out / "manifest.json").read_text())["flow"] == m["flow"]
    for p in local_out.rglob("*"):
        if p.is_file() and p.name != "manifest.json":
            assert (out / p.relative_to(local_out)).read_bytes() == p.read_bytes()
