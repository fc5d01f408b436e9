"""Early stopping on validation loss and keep-best-checkpoint, alone and inside the train loop."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from lmtrain.errors import ConfigError
from lmtrain.infer.loader import load_run
from lmtrain.train.checkpoint import Checkpointer
from lmtrain.train.early_stop import BestCheckpointKeeper, EarlyStopper, resolve_mode
from lmtrain.train.loop import train
from tests.support.tiny import tiny_config


def test_resolve_mode():
    assert resolve_mode("eval/loss", "auto") == "min"
    assert resolve_mode("eval/perplexity", "auto") == "min"
    assert resolve_mode("eval/accuracy", "auto") == "max"
    assert resolve_mode("eval/accuracy", "min") == "min"
    with pytest.raises(ConfigError, match="'lowest'"):
        resolve_mode("eval/loss", "lowest")


def test_early_stopper_patience_min_delta_and_resume(tmp_path):
    s = EarlyStopper(str(tmp_path), patience=2, min_delta=0.05)
    assert not s.update(1, {"eval/loss": 2.0})  # first value is the best
    assert not s.update(2, {"eval/loss": 1.9})  # improved by 0.1 > 0.05: counter resets
    assert not s.update(3, {"eval/loss": 1.88})  # only 0.02 better: 1 bad eval
    # A fresh stopper (a resumed run) continues from the saved state: 2nd bad eval stops.
    resumed = EarlyStopper(str(tmp_path), patience=2, min_delta=0.05)
    assert (resumed.best, resumed.best_step, resumed.bad_evals) == (1.9, 2, 1)
    assert resumed.update(4, {"eval/loss": float("nan")})  # non-finite never improves
    saved = json.loads((tmp_path / "early_stop.json").read_text())
    assert saved == {
        "metric": "eval/loss",
        "mode": "min",
        "best": 1.9,
        "best_step": 2,
        "bad_evals": 2,
    }
    with pytest.raises(ConfigError, match="'eval/acc' is not among the eval results"):
        EarlyStopper(str(tmp_path), 1, metric="eval/acc").update(5, {"eval/loss": 1.0})
    with pytest.raises(ConfigError, match="patience must be >= 1"):
        EarlyStopper(str(tmp_path), patience=0)


def test_best_keeper_saves_only_improvements(tmp_path):
    keeper = BestCheckpointKeeper(str(tmp_path), "eval/accuracy")  # auto → max
    states = {s: {"w": np.full((3,), float(s), np.float32)} for s in (1, 2, 3)}
    assert keeper.update(1, {"eval/accuracy": 0.5}, states[1])
    assert keeper.update(2, {"eval/accuracy": 0.7}, states[2])
    assert not keeper.update(3, {"eval/accuracy": 0.6}, states[3])
    keeper.close()
    assert json.loads((tmp_path / "best.json").read_text())["step"] == 2
    ckpt = Checkpointer(str(tmp_path / "checkpoints_best"), async_save=False)
    assert ckpt.all_steps() == [2]
    target = {"w": jax.ShapeDtypeStruct((3,), np.float32)}
    restored, _ = ckpt.restore(2, target, {"w": SingleDeviceSharding(jax.devices()[0])})
    np.testing.assert_array_equal(np.asarray(restored["w"]), states[2]["w"])
    ckpt.close()


@pytest.mark.slow  # end-to-end: a training run
def test_train_loop_stops_early_and_keeps_best(tmp_path, tiny_text):
    cfg = tiny_config(tiny_text, steps=12, eval_every=2, eval_batches=2, checkpoint_every=100)
    cfg.train.early_stop_patience = 1
    cfg.train.early_stop_min_delta = 100.0  # nothing improves by 100 nats: stop at the 2nd eval
    cfg.train.keep_best_metric = "eval/loss"
    workdir = str(tmp_path / "run")
    final = train(cfg, workdir, print_fn=lambda *_: None)
    assert final["early_stopped_at"] == 4 and final["step"] == 4
    assert Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [4]
    evals = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = {r["step"]: r["eval/loss"] for r in evals if "eval/loss" in r}
    assert sorted(evals) == [2, 4]
    best_step = min(evals, key=evals.get)
    best = json.loads(open(os.path.join(workdir, "best.json")).read())
    assert best["step"] == best_step and math.isclose(best["value"], evals[best_step])
    run = load_run(workdir, "best")
    assert run.step == best_step and run.checkpoint_dir.endswith("checkpoints_best")
