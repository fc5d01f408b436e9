"""Preflight catches each misconfiguration before compiling, with a message that names the fix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lmtrain.config import load_config
from lmtrain.data.text_file import prepare_text_file
from lmtrain.train import loop
from lmtrain.train.preflight import PreflightError, checkpoint_bytes, run_preflight

REPO = str(Path(__file__).resolve().parents[3])
CONFIG = os.path.join(REPO, "configs", "shakespeare_char.py")
TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared data dir (train/validation shards with SHA-256s, tokenizer, manifest)."""
    root = tmp_path_factory.mktemp("prep")
    src = root / "text.txt"
    src.write_text(TEXT)
    prepare_text_file(str(src), str(root / "data"))
    return str(root / "data")


def make_config(data_dir: str = "", data_path: str = "", **extra):
    o = {
        "data.dir": data_dir, "data.path": data_path, "data.seq_len": 32, "model.max_seq_len": 32,
        "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.n_kv_heads": 2,
        "model.d_ff": 64, "train.global_batch_size": 8, "train.steps": 10, "optim.warmup_steps": 2,
    }  # fmt: skip
    o.update(extra)
    return load_config(CONFIG, [f"{k}={v}" for k, v in o.items()])


def problems(cfg, workdir, num_devices=8) -> list:
    with pytest.raises(PreflightError) as e:
        run_preflight(cfg, str(workdir), num_devices=num_devices)
    assert str(e.value).startswith(f"preflight found {len(e.value.problems)} problem(s)")
    return e.value.problems


def only(cfg, workdir, check: str, *fragments: str, num_devices: int = 8) -> str:
    (p,) = problems(cfg, workdir, num_devices)
    assert p.check == check, p
    for f in fragments:
        assert f in p.message, (f, p.message)
    return p.message


def test_good_config_passes_and_estimates_checkpoint_size(prepared, tmp_path):
    cfg = make_config(prepared)
    printed = []
    out = run_preflight(cfg, str(tmp_path / "w"), num_devices=8, print_fn=printed.append)
    assert out["vocab_size"] > 0 and printed[0].startswith("preflight ok")
    # params + AdamW mu and nu (float32) + the few scalars: 3 x params x 4 bytes, to within 64 B
    from lmtrain.model.config import ModelConfig

    with cfg.unlocked():
        cfg.model.vocab_size = out["vocab_size"]
    n = ModelConfig.from_config(cfg.model).param_count()
    assert 0 <= out["checkpoint_bytes"] - 3 * 4 * n < 64


def test_workdir_not_writable(prepared, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    only(make_config(prepared), blocker / "run", "workdir", "not writable", "--workdir")


def test_not_enough_disk_for_two_checkpoints(prepared, tmp_path):
    big = {"model.d_model": 16384, "model.d_ff": 65536, "model.n_heads": 128, "model.n_kv_heads": 128,
           "model.n_layers": 64}  # fmt: skip
    cfg = make_config(prepared, **big)
    assert checkpoint_bytes(cfg, 64) > 1e12  # ~3 TB of params + Adam state, never allocated
    only(cfg, tmp_path / "w", "disk", "free but 2 checkpoints", "bigger disk")


def test_data_dir_missing(tmp_path):
    only(
        make_config(str(tmp_path / "nope")),
        tmp_path / "w",
        "data",
        "does not exist",
        "lmtrain data prepare",
    )


def test_data_shard_hash_mismatch_then_cached_hashes(prepared, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    index = json.loads((data / "train" / "index.json").read_text())
    shard = data / "train" / index["shards"][0]["file"]
    run_preflight(make_config(str(data)), str(tmp_path / "w"), num_devices=8)  # fills the cache
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))  # same size, new mtime: the cache must not hide it
    only(
        make_config(str(data)),
        tmp_path / "w",
        "data",
        str(shard),
        "SHA-256",
        "lmtrain data prepare",
    )


def test_data_manifest_disagrees_with_index(prepared, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["validation"]["shards"][0]["sha256"] = "0" * 64
    (data / "manifest.json").write_text(json.dumps(manifest))
    only(make_config(str(data)), tmp_path / "w", "data", "disagree", "'validation'")


def test_data_split_missing(prepared, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    shutil.rmtree(data / "validation")
    only(make_config(str(data)), tmp_path / "w", "data", "split 'validation' is missing")


def test_data_path_missing(tmp_path):
    only(
        make_config(data_path=str(tmp_path / "none.txt")),
        tmp_path / "w",
        "data",
        "config.data.path",
    )


def test_tokenizer_vocab_larger_than_model(prepared, tmp_path):
    only(make_config(prepared, **{"model.vocab_size": 5}), tmp_path / "w", "tokenizer",
         "config.model.vocab_size=5 is smaller", "set it to 0")  # fmt: skip


def test_data_tokenized_with_another_vocab(prepared, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["vocab_size"] += 7
    (data / "manifest.json").write_text(json.dumps(manifest))
    only(make_config(str(data)), tmp_path / "w", "tokenizer", "tokenized with a vocab", "re-run")


def test_mesh_does_not_fit_devices(prepared, tmp_path):
    only(make_config(prepared, **{"mesh.shape": "(3, 1, 1)"}), tmp_path / "w", "mesh",
         "needs 3 devices but 8 are available")  # fmt: skip
    only(make_config(prepared, **{"mesh.num_devices": 16}), tmp_path / "w", "mesh",
         "only 8 devices", "at most 8")  # fmt: skip


def test_global_batch_does_not_divide_data_shards(prepared, tmp_path):
    msg = only(make_config(prepared, **{"train.global_batch_size": 6}), tmp_path / "w", "batch",
               "global_batch_size=6", "8 data shards")  # fmt: skip
    assert "multiple of 8" in msg


def test_config_does_not_resolve(prepared, tmp_path):
    only(make_config(prepared, **{"model.n_kv_heads": 3}), tmp_path / "w", "config", "n_kv_heads=3")


def test_all_problems_reported_together(tmp_path):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    cfg = make_config(str(tmp_path / "nope"), **{"train.global_batch_size": 6})
    checks = sorted(p.check for p in problems(cfg, blocker / "w"))
    assert checks == ["batch", "data", "workdir"]


@pytest.mark.slow  # end-to-end: a training run
def test_train_runs_preflight_before_compiling(tmp_path, monkeypatch):
    def no_build(*a, **k):
        raise AssertionError("build() reached: preflight did not stop the run")

    monkeypatch.setattr(loop, "build", no_build)
    with pytest.raises(PreflightError, match="does not exist"):
        loop.train(make_config(str(tmp_path / "missing")), str(tmp_path / "w"))
