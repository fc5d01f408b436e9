"""The train step's fused AdamW against optax's own chain, and its skip of non-finite steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmtrain.config import base_config
from lmtrain.train.optim import apply_adamw, make_optimizer


def _params(rng):
    return {
        "embed": {"embedding": rng.normal(size=(11, 8)).astype(np.float32)},
        "layer": {
            "kernel": rng.normal(size=(8, 3, 4)).astype(np.float32),
            "attn_norm": {"scale": np.ones(8, np.float32)},
            "bias": rng.normal(size=(4,)).astype(np.float32),
        },
    }


def _grads(rng, params, scale):
    return jax.tree.map(lambda p: (scale * rng.normal(size=p.shape)).astype(np.float32), params)


def _optim(clip_norm):
    o = base_config().optim
    o.update(lr=1e-2, warmup_steps=3, min_lr=1e-3, b2=0.99, clip_norm=clip_norm)
    return o


def _optax_step(tx, grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


@jax.jit
def _norm_and_ok(grads):
    norm = optax.global_norm(grads)
    return norm, jnp.isfinite(norm)


@pytest.mark.parametrize("clip_norm", [1.0, 0.0])
def test_fused_adamw_equals_the_optax_chain(clip_norm):
    o = _optim(clip_norm)
    tx, schedule = make_optimizer(o, total_steps=20)
    rng = np.random.default_rng(0)
    params = _params(rng)
    ref_p, ref_s = params, tx.init(params)
    p, s = params, tx.init(params)
    fused = jax.jit(lambda g, n, s, p, ok: apply_adamw(o, schedule, g, n, s, p, ok))
    reference = jax.jit(lambda g, s, p: _optax_step(tx, g, s, p))
    clipped = 0
    for step in range(8):
        grads = _grads(rng, params, scale=0.05 if step % 2 else 3.0)  # clipping on and off
        norm, ok = _norm_and_ok(grads)
        clipped += bool(norm > 1.0)
        ref_p, ref_s = reference(grads, ref_s, ref_p)
        p, s = fused(grads, norm, s, p, ok)
        assert jax.tree.structure(s) == jax.tree.structure(ref_s)  # checkpoints stay compatible
        for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((ref_p, ref_s)), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-8)
    assert clipped == 4
    # weight decay reached the matrices only: the masked leaves moved by Adam alone
    assert not np.allclose(p["layer"]["kernel"], params["layer"]["kernel"])


def test_non_finite_gradient_leaves_params_and_state_untouched():
    o = _optim(1.0)
    tx, schedule = make_optimizer(o, total_steps=20)
    rng = np.random.default_rng(1)
    params = _params(rng)
    fused = jax.jit(lambda g, n, ok, s, p: apply_adamw(o, schedule, g, n, s, p, ok))
    good = [_grads(rng, params, 0.1) for _ in range(3)]
    bad = _grads(rng, params, 0.1)
    bad["layer"]["kernel"][0, 0, 0] = np.nan
    bad["embed"]["embedding"][1, 2] = np.inf

    def step(g, s, p):
        return fused(g, *_norm_and_ok(g), s, p)

    p, s = step(good[0], tx.init(params), params)
    before = jax.device_get((p, s))
    assert not bool(_norm_and_ok(bad)[1])
    p, s = step(bad, s, p)
    after = jax.device_get((p, s))
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
        assert np.array_equal(a, b)  # bitwise: no NaN leaked, no count advanced
    for g in good[1:]:
        p, s = step(g, s, p)

    # the run that never saw the bad batch
    ref_p, ref_s = params, tx.init(params)
    for g in good:
        ref_p, ref_s = _optax_step(tx, g, ref_s, ref_p)
    for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((ref_p, ref_s)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-8)


def test_state_without_adam_is_refused():
    o = _optim(1.0)
    _, schedule = make_optimizer(o, total_steps=20)
    params = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="ScaleByAdamState"):
        apply_adamw(o, schedule, params, 1.0, optax.sgd(0.1).init(params), params, True)
