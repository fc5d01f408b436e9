"""The one train step: mesh equivalence, exact gradient accumulation, overfitting, config errors."""

import jax
import numpy as np
import pytest

from lmtrain.config import apply_overrides, base_config
from lmtrain.errors import ConfigError
from lmtrain.train.config_check import validate
from lmtrain.train.loop import build, to_global
from lmtrain.train.state import init_state
from lmtrain.train.step import make_train_step


def packed_padded_batch(rng, batch, seq, vocab):
    """Rows of 1-3 packed documents and a padded tail whose length differs from row to row."""
    tokens = rng.integers(3, vocab, (batch, seq + 1))
    seg = np.zeros((batch, seq), np.int32)
    pos = np.zeros((batch, seq), np.int32)
    for r in range(batch):
        real = seq - (r * 5) % (seq - 4)  # padding 0 .. seq-5 tokens
        cuts = (
            sorted(rng.choice(np.arange(2, real - 1), size=r % 3, replace=False))
            if real > 4
            else []
        )
        bounds = [0, *cuts, real]
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
            seg[r, a:b] = s
            pos[r, a:b] = np.arange(b - a)
    # A target counts when it is in the same document as its input (no cross-document targets).
    same_doc = np.concatenate([seg[:, 1:] == seg[:, :-1], np.zeros((batch, 1), bool)], axis=1)
    loss_mask = ((seg > 0) & same_doc).astype(np.int32)
    return {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "loss_mask": loss_mask,
        "segment_ids": seg,
        "positions": pos,
    }


def run_steps(cfg, workdir, batches, **overrides):
    cfg = cfg.copy_and_resolve_references()
    apply_overrides(cfg, [f"{k}={v}" for k, v in overrides.items()])
    setup = build(cfg, str(workdir))
    state, shardings = init_state(setup.model, setup.tx, cfg.data.seq_len, cfg.seed, setup.mesh)
    step = make_train_step(
        setup.model, setup.schedule, cfg, setup.mesh, shardings, setup.batch_sharding
    )
    losses = []
    for b in batches:
        state, m = step(state, to_global(b, setup.batch_sharding))
        losses.append(float(m["loss"]))
    return losses, jax.device_get(state.params), setup


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-5), ("bfloat16", 2e-2)])
def test_loss_after_three_steps_is_the_same_on_every_mesh(tiny_cfg, tmp_path, dtype, tol):
    rng = np.random.default_rng(0)
    batches = [packed_padded_batch(rng, 16, 32, 60) for _ in range(3)]
    base = {"model.dtype": dtype, "model.vocab_size": 128}
    ref, ref_params, _ = run_steps(
        tiny_cfg, tmp_path, batches, **base, **{"mesh.shape": "(1,1,1)", "mesh.num_devices": 1}
    )
    for shape in ("(8,1,1)", "(1,8,1)", "(1,1,8)", "(2,2,2)"):
        losses, params, setup = run_steps(
            tiny_cfg, tmp_path, batches, **base, **{"mesh.shape": shape}
        )
        assert setup.mesh.devices.size == 8
        np.testing.assert_allclose(losses, ref, rtol=tol, err_msg=f"mesh {shape}")
    assert ref[2] < ref[0]


def test_gradient_accumulation_equals_the_big_batch_with_padding_and_packing(tiny_cfg, tmp_path):
    rng = np.random.default_rng(1)
    batch = packed_padded_batch(rng, 32, 32, 60)
    base = {"model.vocab_size": 128, "optim.clip_norm": 0.0, "train.global_batch_size": 32}
    one, params_one, setup = run_steps(tiny_cfg, tmp_path, [batch], **base)
    four, params_four, _ = run_steps(
        tiny_cfg, tmp_path, [batch], **base, **{"train.microbatches": 4}
    )
    np.testing.assert_allclose(four, one, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_four)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

    # Independent reference: mean NLL over every real target token of the whole batch (numpy).
    state, _ = init_state(setup.model, setup.tx, 32, 0, setup.mesh)
    logits = np.asarray(
        setup.model.apply(
            {"params": jax.device_get(state.params)},
            batch["inputs"],
            batch["positions"],
            batch["segment_ids"],
        ),
        np.float64,
    )
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"]
    want = (nll * mask).sum() / mask.sum()
    np.testing.assert_allclose(one[0], want, rtol=1e-5)
    # ... which is not the mean of the four microbatch means (rows m, m+4, ... form microbatch m).
    means = [(nll[m::4] * mask[m::4]).sum() / mask[m::4].sum() for m in range(4)]
    assert abs(np.mean(means) - want) > 1e-3


def test_model_overfits_one_batch(tiny_cfg, tmp_path):
    batch = packed_padded_batch(np.random.default_rng(2), 8, 16, 30)
    overrides = {
        "model.vocab_size": 128,
        "data.seq_len": 16,
        "train.global_batch_size": 8,
        "optim.lr": 1e-2,
        "optim.schedule": "constant",
        "optim.warmup_steps": 0,
        "optim.weight_decay": 0.0,
        "model.d_model": 64,
    }
    losses, _, _ = run_steps(tiny_cfg, tmp_path, [batch] * 150, **overrides)
    assert losses[-1] < 0.1, losses[-10:]


def test_schedule_warms_up_then_decays_to_min_lr(tiny_cfg, tmp_path):
    setup = build(tiny_cfg, str(tmp_path))
    lrs = [float(setup.schedule(s)) for s in range(9)]
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(3e-3) and lrs[8] == pytest.approx(3e-4)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


def test_weight_decay_skips_norms_and_vectors(tiny_cfg, tmp_path):
    from lmtrain.train.optim import weight_decay_mask

    setup = build(tiny_cfg, str(tmp_path))
    mask = weight_decay_mask(setup.abstract_state.params, tiny_cfg.optim.wd_exclude)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat["['layers_0']['attn']['q_kernel']"] is True
    assert flat["['layers_0']['attn_norm']['scale']"] is False
    assert flat["['final_norm']['scale']"] is False


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.stepz=3", "train.stepz"),
        ("train.steps=many", "config.train.steps"),
        ("model.n_kv_heads=3", "config.model.n_heads"),
        ("mesh.shape=(3,1,1)", "config.mesh.shape"),
        ("train.global_batch_size=12", "config.train.global_batch_size"),
        ("model.matmul_dtype=int8", "config.model.matmul_dtype"),
        ("train.eval_batch_size=12", "config.train.eval_batch_size"),
    ],
)
def test_bad_config_fails_before_compile_naming_the_key(override, needle):
    cfg = base_config()
    cfg.data.path = "x.txt"
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        apply_overrides(cfg, [override])
        validate(cfg, 8)


def test_unknown_key_suggests_the_closest(tiny_cfg):
    with pytest.raises(ConfigError, match="did you mean train.steps"):
        apply_overrides(tiny_cfg, ["train.stepz=3"])


def test_cli_reports_bad_mesh_and_exits_2(tmp_path, tiny_text):
    import os
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmtrain",
            "train",
            "--config",
            "configs/shakespeare_char.py",
            "--workdir",
            str(tmp_path / "w"),
            f"--config.data.path={tiny_text}",
            "--config.mesh.shape=(3,1,1)",
        ],
        capture_output=True,
        text=True,
        env=os.environ
        | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"},
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert "config.mesh.shape=(3, 1, 1)" in out.stderr and "8" in out.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_several_steps_per_call_equal_one_step_per_call(tiny_cfg, tmp_path):
    """``multi`` (lax.scan over stacked batches) applies the same updates as k separate calls."""
    import jax.numpy as jnp

    from lmtrain.train.step import stacked_shardings

    rng = np.random.default_rng(3)
    batches = [packed_padded_batch(rng, 16, 32, 60) for _ in range(4)]
    cfg = tiny_cfg.copy_and_resolve_references()
    apply_overrides(cfg, ["model.vocab_size=128"])
    setup = build(cfg, str(tmp_path))

    def fresh():
        state, shardings = init_state(setup.model, setup.tx, cfg.data.seq_len, cfg.seed, setup.mesh)
        step = make_train_step(
            setup.model, setup.schedule, cfg, setup.mesh, shardings, setup.batch_sharding
        )
        return state, step

    state, step = fresh()
    singles = []
    for b in batches:
        state, m = step(state, to_global(b, setup.batch_sharding))
        singles.append(jax.device_get(m))
    one_params = jax.device_get(state.params)

    state, step = fresh()
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    state, m = step.multi(state, to_global(stacked, stacked_shardings(setup.batch_sharding)))
    m = jax.device_get(m)
    assert int(state.step) == 4
    for j, want in enumerate(singles):
        for k, v in want.items():
            np.testing.assert_allclose(m[k][j], v, rtol=1e-6, err_msg=f"step {j + 1} {k}")
    for a, b in zip(jax.tree.leaves(one_params), jax.tree.leaves(jax.device_get(state.params))):
        np.testing.assert_allclose(jnp.asarray(b), a, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("microbatches", [1, 2])
def test_flat_gradient_all_reduce_equals_the_spmd_reduction(tiny_cfg, tmp_path, microbatches):
    """One raveled psum over data shards (train.grad_sync=flat) gives XLA's SPMD gradients."""
    rng = np.random.default_rng(4)
    batches = [packed_padded_batch(rng, 16, 32, 60) for _ in range(3)]
    base = {"model.vocab_size": 128, "mesh.shape": "(8,1,1)", "train.microbatches": microbatches}
    spmd, spmd_params, _ = run_steps(
        tiny_cfg, tmp_path, batches, **base, **{"train.grad_sync": "spmd"}
    )
    flat, flat_params, _ = run_steps(
        tiny_cfg, tmp_path, batches, **base, **{"train.grad_sync": "flat"}
    )
    np.testing.assert_allclose(flat, spmd, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(spmd_params), jax.tree.leaves(flat_params)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_grad_sync_choice_and_its_config_errors(tiny_cfg):
    from lmtrain.model.sharding import make_mesh
    from lmtrain.train.step import uses_flat_grad_sync

    cfg = tiny_cfg.copy_and_resolve_references()
    assert uses_flat_grad_sync(cfg, make_mesh((8, 1, 1)))  # auto: CPU, pure data parallelism
    assert not uses_flat_grad_sync(cfg, make_mesh((2, 2, 2)))  # fsdp / tensor: SPMD reduction
    assert not uses_flat_grad_sync(cfg, make_mesh((1, 1, 1), jax.devices()[:1]))
    apply_overrides(cfg, ["train.grad_sync=spmd"])
    assert not uses_flat_grad_sync(cfg, make_mesh((8, 1, 1)))
    for overrides, message in [
        (["train.grad_sync=ring"], "auto, flat or spmd"),
        (["train.grad_sync=flat", "mesh.shape=(2,4,1)"], "needs pure data parallelism"),
        (["train.steps_per_dispatch=0"], "steps_per_dispatch=0 must be positive"),
    ]:
        bad = tiny_cfg.copy_and_resolve_references()
        apply_overrides(bad, overrides)
        with pytest.raises(ConfigError, match=message):
            validate(bad, 8)
