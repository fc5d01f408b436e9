"""What ``lmtrain train`` does by default on a CPU host: one device per core unless the user's
XLA_FLAGS say otherwise, a warmup longer than the run clipped (said once), and no absl warning
about Orbax's type handlers."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from lmtrain import host_devices
from lmtrain.config import load_config
from lmtrain.errors import ConfigError
from lmtrain.train.config_check import validate
from lmtrain.train.optim import lr_schedule, warmup_note
from tests.support.public_data import REPO, SHAKESPEARE_HEAD

CONFIG = str(REPO / "configs" / "shakespeare_char.py")
FLAG = "--xla_force_host_platform_device_count"


def shakespeare(**overrides):
    return load_config(CONFIG, [f"{k}={v}" for k, v in overrides.items()])


# -- host device count ----------------------------------------------------------------------------
def test_device_count_is_the_most_cores_that_divide_the_batches():
    cfg = shakespeare()  # batch 12, eval batch 96, mesh (-1, 1, 1)
    assert [host_devices.device_count_for(cfg, c) for c in (1, 2, 3, 5, 8, 16)] == [
        1,
        2,
        3,
        4,
        6,
        12,
    ]
    cfg.mesh.shape = (-1, 1, 2)  # tensor 2: data shards are half the devices
    assert host_devices.device_count_for(cfg, 8) == 8
    cfg.mesh.shape = (2, 1, 1)  # a fixed mesh needs exactly its size
    assert host_devices.device_count_for(cfg, 8) == 2
    assert host_devices.device_count_for(shakespeare(**{"mesh.num_devices": 3}), 2) == 3


def test_user_flags_are_kept_and_extended_never_replaced(monkeypatch):
    monkeypatch.setattr(host_devices, "host_cores", lambda: 4)
    monkeypatch.setattr(host_devices, "_accelerator_present", lambda: False)
    cfg = shakespeare()
    env = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
    assert host_devices.apply_default(cfg, env) == 4
    assert env["XLA_FLAGS"] == f"--xla_cpu_enable_fast_math=false {FLAG}=4"
    env = {}
    assert host_devices.apply_default(cfg, env) == 4 and env["XLA_FLAGS"] == f"{FLAG}=4"
    env = {"XLA_FLAGS": f"{FLAG}=1"}  # the user decided
    assert host_devices.apply_default(cfg, env) is None and env == {"XLA_FLAGS": f"{FLAG}=1"}
    env = {"JAX_PLATFORMS": "cuda"}  # not a CPU run
    assert host_devices.apply_default(cfg, env) is None and "XLA_FLAGS" not in env
    env = {"JAX_PLATFORMS": "cpu"}
    assert host_devices.apply_default(cfg, env) == 4


# -- warmup longer than the run -------------------------------------------------------------------
def test_warmup_longer_than_the_run_is_clipped_to_it():
    cfg = shakespeare(**{"train.steps": 10, "optim.warmup_steps": 20})
    validate(cfg, 1)  # refused before: warmup_steps=20 must be between 0 and train.steps=10
    o = cfg.optim
    lr = np.array([float(lr_schedule(o, 10)(s)) for s in range(11)])
    np.testing.assert_allclose(lr, o.lr * np.arange(11) / 10, rtol=1e-6)  # peak at the last step
    assert warmup_note(o, 10) == (
        "optim: warmup_steps=20 is longer than the run (train.steps=10); warming up over 10 steps"
    )
    assert warmup_note(shakespeare().optim, 2000) == ""  # in range: unchanged, nothing said
    full = shakespeare()
    ref = [float(lr_schedule(full.optim, 2000)(s)) for s in (0, 50, 100)]
    np.testing.assert_allclose(ref, [0.0, 5e-4, 1e-3], rtol=1e-6)  # warmup 100 kept
    c = shakespeare(**{"optim.warmup_steps": -1})
    with pytest.raises(ConfigError, match="warmup_steps=-1 must be >= 0"):
        validate(c, 1)


# -- the command end to end -----------------------------------------------------------------------
def run_train(tmp_path, name: str, xla_flags: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    small = {
        "data.path": SHAKESPEARE_HEAD, "data.seq_len": 32, "model.max_seq_len": 32,
        "model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2, "model.n_kv_heads": 2,
        "model.d_ff": 64, "train.steps": 4, "train.steps_per_dispatch": 1, "train.log_every": 2,
        "train.eval_every": 1000, "train.eval_batch_size": 12, "train.eval_batches": 1,
        "train.checkpoint_every": 2, "train.samples": 0, "train.compile_ahead": False,
        "train.compilation_cache_dir": "",
    }  # fmt: skip
    cmd = [sys.executable, "-m", "lmtrain", "train", "--config", CONFIG]
    cmd += ["--workdir", str(tmp_path / name), *(f"--config.{k}={v}" for k, v in small.items())]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout + run.stderr


def test_train_uses_every_core_by_default_and_keeps_the_users_flag(tmp_path):
    """One run with no XLA_FLAGS (the shakespeare config's warmup of 100 on a 4-step run) and one
    with the user's own device count."""
    cfg = shakespeare(**{"train.eval_batch_size": 12})
    n = host_devices.device_count_for(cfg, host_devices.host_cores())
    out = run_train(tmp_path, "default", None)
    model_line = next(ln for ln in out.splitlines() if ln.startswith("model:"))
    assert f"| {n} devices |" in model_line
    if n > 1:
        assert f"(CPU: {n} emulated devices for {host_devices.host_cores()} cores;" in model_line
    assert out.count("warmup_steps=100 is longer than the run (train.steps=4)") == 1
    assert "Type handler registry" not in out and "overriding" not in out
    assert os.path.isdir(tmp_path / "default" / "checkpoints" / "4")  # saves went through Orbax

    out = run_train(tmp_path, "user", f"{FLAG}=1")
    model_line = next(ln for ln in out.splitlines() if ln.startswith("model:"))
    assert "| 1 devices |" in model_line and "emulated devices" not in model_line
