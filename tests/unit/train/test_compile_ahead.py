"""The first train call and the eval step compile in background threads, once, and are reused."""

import logging

import jax
import numpy as np
import pytest

from lmtrain.config import ConfigError, apply_overrides
from lmtrain.train.config_check import validate
from lmtrain.train.loop import train

pytestmark = pytest.mark.slow  # end-to-end: trains, resumes or runs processes


def run(cfg, workdir, **overrides):
    cfg = cfg.copy_and_resolve_references()
    apply_overrides(cfg, [f"{k}={v}" for k, v in overrides.items()])
    return train(cfg, str(workdir), print_fn=lambda *a: None)


@pytest.fixture
def compile_log(caplog):
    """(thread name, program) of every XLA compile while the test runs."""
    previous = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    caplog.set_level(logging.WARNING, logger="jax._src.interpreters.pxla")

    def compiles():
        out = []
        for r in caplog.records:
            msg = r.getMessage()
            if msg.startswith("Compiling jit("):
                out.append((r.threadName, msg.split("(")[1].split(")")[0]))
        return out

    yield compiles
    jax.config.update("jax_log_compiles", previous)


def test_train_and_eval_steps_compile_once_ahead_and_are_reused(
    tiny_cfg, tmp_path, compile_log, caplog
):
    common = {"train.steps": 8, "train.steps_per_dispatch": 2, "train.eval_every": 4}
    ahead = run(tiny_cfg, tmp_path / "ahead", **common)
    seen = compile_log()
    # the grouped train call and the eval step: compiled once each, in their own threads
    assert [t for t, f in seen if f == "steps"] == ["compile-train_step"]
    assert [t for t, f in seen if f == "evaluate"] == ["compile-eval_step"]
    assert not [t for t, f in seen if f == "step"]  # no single-step call in this run

    caplog.clear()
    inline = run(tiny_cfg, tmp_path / "inline", **common, **{"train.compile_ahead": False})
    seen = compile_log()
    assert [t for t, f in seen if f in ("steps", "evaluate")] == ["MainThread", "MainThread"]
    # the same programs: the same run, bitwise
    assert ahead["train/loss"] == inline["train/loss"]
    assert ahead["eval/loss"] == inline["eval/loss"]
    a, b = (jax.tree.leaves(jax.device_get(r["state"].params)) for r in (ahead, inline))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_samples_after_the_last_step_are_compiled_ahead(tiny_cfg, tmp_path, compile_log):
    """The end-of-run sample (past the context: the sliding window) compiles during start-up;
    the real sampling finds both programs. (d_ff=72: shapes no other test compiles. With several
    samples, rounds after a row ends early run a smaller batch, compiled when met.)"""
    lines = []
    cfg = tiny_cfg.copy_and_resolve_references()
    apply_overrides(
        cfg, ["model.d_ff=72", "train.steps=2", "train.samples=1", "train.sample_tokens=40"]
    )
    train(cfg, str(tmp_path), print_fn=lines.append)
    seen = compile_log()
    assert [t for t, f in seen if f in ("_prefill", "_decode_impl")] == ["compile-sampling"] * 2
    samples = [x for x in lines if x.startswith("--- sample")]
    assert len(samples) == 1 and len(samples[0].split("\n", 1)[1]) > 16  # prompt + new text


def test_resumed_run_compiles_the_call_it_resumes_with(tiny_cfg, tmp_path, compile_log, caplog):
    """Resuming at step 4 of 8 with 3 steps per call: the first call is a single step (a log
    step falls inside the group), and that is the one compiled ahead."""
    common = {"train.steps_per_dispatch": 3, "train.log_every": 6}
    run(tiny_cfg, tmp_path / "w", **common, **{"train.steps": 4})
    caplog.clear()
    out = run(tiny_cfg, tmp_path / "w", **common, **{"train.steps": 8})
    assert int(out["state"].step) == 8
    seen = compile_log()
    assert ("compile-train_step", "step") in seen  # step 5 runs alone (6 is a log step)
    assert [t for t, f in seen if f == "step"] == ["compile-train_step"]


def test_cpu_opt_level_runs_the_same_model_and_is_validated(tiny_cfg, tmp_path):
    base = run(tiny_cfg, tmp_path / "o2", **{"train.steps": 3})
    o1 = run(tiny_cfg, tmp_path / "o1", **{"train.steps": 3, "train.cpu_opt_level": 1})
    np.testing.assert_allclose(o1["train/loss"], base["train/loss"], rtol=1e-5)
    cfg = tiny_cfg.copy_and_resolve_references()
    apply_overrides(cfg, ["train.cpu_opt_level=4"])
    with pytest.raises(ConfigError, match="cpu_opt_level=4"):
        validate(cfg, jax.device_count())
