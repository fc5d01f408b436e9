"""train.loggers: a run logs to JSONL, TensorBoard and Weights & Biases (offline) alike."""

from __future__ import annotations

import glob
import json
import subprocess
import sys

import pytest

from lmtrain.errors import ConfigError
from lmtrain.train.metrics_log import MetricsLogger
from tests.e2e.test_metrics_log import read_tensorboard_scalars


def wandb_records(run_dir: str) -> list[dict]:
    """The records of an offline run's .wandb log, read by wandb's own reader (``wandb leet
    inspect --json``, one JSON object per record)."""
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", run_dir],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))


@pytest.mark.slow  # end-to-end: a training run
def test_wandb_offline_run_holds_config_manifest_and_the_loss_curve(
    tiny_cfg, wandb_offline, tmp_path
):
    from lmtrain.train.loop import train

    workdir = tmp_path / "run"
    cfg = tiny_cfg
    cfg.train.update(steps=6, log_every=2, eval_every=3, loggers=("jsonl", "tensorboard", "wandb"))
    cfg.mesh.num_devices = 1
    train(cfg, str(workdir), print_fn=lambda *a: None)

    lines = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
    train_rows = [r for r in lines if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]

    (run_dir,) = glob.glob(str(workdir / "wandb" / "offline-run-*"))
    records = wandb_records(run_dir)
    config = next(r["run"]["config"]["update"] for r in records if r["type"] == "run")
    assert config["model"]["d_model"] == 32 and config["train"]["steps"] == 6
    manifest = json.loads((workdir / "run_manifest.json").read_text())
    assert config["manifest"]["seed"] == manifest["seed"] == cfg.seed
    assert config["manifest"].keys() == manifest.keys()

    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert len(history) == len(lines)  # every metrics.jsonl line is one W&B history row
    for row, item in zip(lines, history, strict=True):
        assert item["step"] == row["step"]
        for key, value in row.items():
            if key != "step" and value is not None:
                assert item[key] == pytest.approx(value, rel=1e-12, abs=0), key
    assert [h["train/loss"] for h in history if "train/loss" in h] == [
        r["train/loss"] for r in train_rows
    ]
    assert [h["step"] for h in history if "eval/loss" in h] == [3, 6]

    # Periodic evals read the same 2-batch subset each time; the final whole-split eval is its
    # own series (eval_full/*), and final_metrics.json reports the whole split.
    evals = [r for r in lines if "eval/loss" in r]
    assert [r["eval/tokens"] for r in evals] == [2 * 16 * 32] * 2
    assert [r["step"] for r in lines if "eval_full/loss" in r] == [6]
    assert evals[-1]["eval_full/tokens"] > 2 * 16 * 32
    assert evals[-1]["eval_full/loss"] != evals[-1]["eval/loss"]
    final = json.loads((workdir / "final_metrics.json").read_text())
    assert final["eval/loss"] == final["eval_full/loss"] == evals[-1]["eval_full/loss"]

    tb = read_tensorboard_scalars(str(workdir / "tensorboard"))
    tb_loss = [(s, v) for s, tag, v in tb if tag == "train/loss"]
    assert [s for s, _ in tb_loss] == [2, 4, 6]
    for (_, v), r in zip(tb_loss, train_rows):
        assert v == pytest.approx(r["train/loss"], rel=1e-6)


def test_loggers_are_chosen_by_name(tmp_path):
    log = MetricsLogger(str(tmp_path), loggers=("jsonl",))
    log.write(1, {"train/loss": 1.5})
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "train/loss": 1.5}
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "wandb").exists()
    with pytest.raises(ConfigError, match=r"train.loggers=\('jsonl', 'wandbb'\).*\"wandb\""):
        MetricsLogger(str(tmp_path / "x"), loggers=("jsonl", "wandbb"))
