"""DPO / IPO / conservative DPO against closed forms, finite differences and their metrics."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain.data.formats import PreferencePair
from lmtrain.train.losses.dpo import DegenerateRunMonitor, dpo_losses, pair_logps, sequence_logps
from lmtrain.train.objectives import OBJECTIVES, LossContext
from tests.support.finetune_fixtures import config, init_params, preference_batch, tiny_model


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    return model, init_params(model, 0), preference_batch()


def mean_loss(params, batch, ctx):
    s, w, m = OBJECTIVES["dpo"](params, batch, None, ctx)
    return s / w, m


def test_sequence_logps_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 5))
    mask = np.array([[0, 1, 1, 0, 1], [1, 1, 1, 1, 1]])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = (np.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask).sum(-1)
    np.testing.assert_allclose(sequence_logps(jnp.asarray(logits), targets, mask), want, rtol=1e-5)


def test_loss_is_ln2_when_policy_equals_reference(setup):
    model, params, batch = setup
    ctx = LossContext(model, config("dpo", beta=0.3), frozen={"reference": params})
    loss, m = mean_loss(params, batch, ctx)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
    assert float(m["rewards/chosen"][0]) == 0.0 and float(m["rewards/rejected"][0]) == 0.0
    assert float(m["rewards/accuracy"][0]) == 0.0  # ties are not correct: strict >


def test_gradient_matches_finite_difference(setup):
    model, params, batch = setup
    ctx = LossContext(model, config("dpo", beta=0.5), frozen={"reference": params})
    rng = iter(jax.random.split(jax.random.PRNGKey(7), 64))
    # Move the policy off the reference so both terms of the gradient matter.
    policy = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(rng), p.shape), params)
    direction = jax.tree.map(lambda p: jax.random.normal(next(rng), p.shape), params)

    def f(p):
        return mean_loss(p, batch, ctx)[0]

    grad = jax.grad(f)(policy)
    analytic = sum(
        float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction))
    )
    eps = 1e-3
    plus = f(jax.tree.map(lambda p, d: p + eps * d, policy, direction))
    minus = f(jax.tree.map(lambda p, d: p - eps * d, policy, direction))
    numeric = float(plus - minus) / (2 * eps)
    assert abs(analytic) > 1e-2
    assert analytic == pytest.approx(numeric, rel=2e-2)


def test_sigmoid_label_smoothing_and_ipo_match_hand_computation():
    pc, pr, rc, rr = (jnp.asarray([v]) for v in (-3.0, -5.0, -4.0, -4.5))
    h = (-3.0 + 5.0) - (-4.0 + 4.5)  # 1.5
    beta, eps = 0.5, 0.1

    def logsig(x):
        return -math.log1p(math.exp(-x))

    loss, r_c, r_r = dpo_losses(pc, pr, rc, rr, beta=beta)
    assert float(loss[0]) == pytest.approx(-logsig(beta * h), rel=1e-6)
    loss, _, _ = dpo_losses(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    assert float(loss[0]) == pytest.approx(
        -(1 - eps) * logsig(0.75) - eps * logsig(-0.75), rel=1e-6
    )
    loss, _, _ = dpo_losses(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    assert float(loss[0]) == pytest.approx((1.5 - 1 / (2 * 0.5)) ** 2, rel=1e-6)  # 0.25
    assert float(r_c[0]) == pytest.approx(0.5) and float(r_r[0]) == pytest.approx(-0.25)


def test_metrics_on_a_moved_policy(setup):
    model, params, batch = setup
    ctx = LossContext(model, config("dpo", beta=0.2), frozen={"reference": params})
    policy = jax.tree.map(lambda p: p * 1.1, params)
    s, w, m = OBJECTIVES["dpo"](policy, batch, None, ctx)
    pc, pr = pair_logps(model, policy, batch)
    rc, rr = pair_logps(model, params, batch)
    chosen, rejected = 0.2 * (pc - rc), 0.2 * (pr - rr)
    assert float(w) == 4
    np.testing.assert_allclose(m["rewards/chosen"][0] / w, chosen.mean(), rtol=1e-4)
    np.testing.assert_allclose(m["rewards/rejected"][0] / w, rejected.mean(), rtol=1e-4)
    np.testing.assert_allclose(
        m["rewards/margin"][0] / w, (chosen - rejected).mean(), rtol=1e-4, atol=1e-6
    )
    assert float(m["rewards/accuracy"][0] / w) == pytest.approx(float(jnp.mean(chosen > rejected)))
    np.testing.assert_allclose(s / w, jnp.mean(-jax.nn.log_sigmoid(chosen - rejected)), rtol=1e-5)


def test_precomputed_reference_equals_frozen_reference(setup):
    model, params, batch = setup
    policy = jax.tree.map(lambda p: p * 0.9, params)
    rc, rr = pair_logps(model, params, batch)
    pre = dict(
        batch, reference_chosen_logps=np.asarray(rc), reference_rejected_logps=np.asarray(rr)
    )
    a = OBJECTIVES["dpo"](
        policy, batch, None, LossContext(model, config("dpo"), frozen={"reference": params})
    )
    b = OBJECTIVES["dpo"](policy, pre, None, LossContext(model, config("dpo"), frozen=None))
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)


def test_padding_pairs_do_not_count(setup):
    model, params, batch = setup
    padded = {k: np.concatenate([v, np.zeros_like(v[:2])]) for k, v in batch.items()}
    ctx = LossContext(
        model, config("dpo"), frozen={"reference": jax.tree.map(lambda p: p * 0.9, params)}
    )
    a, b = OBJECTIVES["dpo"](params, batch, None, ctx), OBJECTIVES["dpo"](params, padded, None, ctx)
    assert float(b[1]) == 4
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5)


def test_degenerate_run_monitor_warns_once_per_kind():
    seen = []
    mon = DegenerateRunMonitor(patience=3, warn=seen.append)
    stuck = {"loss": 0.693, "rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margin": 0.0}
    assert mon.update(1, stuck) == [] and mon.update(2, stuck) == []
    out = mon.update(3, {f"train/{k}": v for k, v in stuck.items()})
    assert len(out) == 1 and "stuck at zero" in out[0] and seen == out
    assert mon.update(4, stuck) == []  # once
    healthy = {"loss": 0.5, "rewards/chosen": 0.2, "rewards/rejected": -0.1, "rewards/margin": 0.3}
    collapsed = {
        "loss": 1e-4,
        "rewards/chosen": 30.0,
        "rewards/rejected": -40.0,
        "rewards/margin": 70.0,
    }
    assert mon.update(5, collapsed) == [] and mon.update(6, healthy) == []  # streak resets
    mon.update(7, collapsed), mon.update(8, collapsed)
    out = mon.update(9, collapsed)
    assert len(out) == 1 and "over-optimisation" in out[0]


def test_nll_weight_adds_mean_per_token_nll_of_chosen(setup):
    """RPO: loss = dpo + w * mean over pairs of (-log pi(chosen) / chosen tokens)."""
    model, params, batch = setup
    policy = jax.tree.map(lambda p: p * 1.1, params)
    beta, w = 0.2, 0.7
    pc, pr = (np.asarray(x, np.float64) for x in pair_logps(model, policy, batch))
    rc, rr = (np.asarray(x, np.float64) for x in pair_logps(model, params, batch))
    n_chosen = batch["chosen_loss_mask"].sum(-1)
    assert n_chosen.min() > 0 and len(set(n_chosen.tolist())) > 1  # lengths differ: normalised
    h = (pc - pr) - (rc - rr)
    dpo = np.log1p(np.exp(-beta * h))  # -log sigmoid(beta h)
    want = np.mean(dpo + w * (-pc / n_chosen))
    ctx = LossContext(model, config("dpo", beta=beta, nll_weight=w), frozen={"reference": params})
    s, n, m = OBJECTIVES["dpo"](policy, batch, None, ctx)
    assert float(n) == 4
    assert float(s / n) == pytest.approx(want, rel=1e-5)
    assert float(m["nll/chosen"][0] / m["nll/chosen"][1]) == pytest.approx(
        np.mean(-pc / n_chosen), rel=1e-5
    )
    plain = OBJECTIVES["dpo"](
        policy,
        batch,
        None,
        LossContext(model, config("dpo", beta=beta), frozen={"reference": params}),
    )
    assert float(plain[0] / plain[1]) == pytest.approx(np.mean(dpo), rel=1e-5)


# Chosen and rejected of different lengths, so per-token means differ from sums side by side.
UNEQUAL = [
    PreferencePair([("user", "2+3=?")], "5", "5 is it"),
    PreferencePair([("user", "rev abc")], "cba", "abc cba"),
    PreferencePair([("user", "sort 312")], "1 2 3", "123"),
    PreferencePair([("user", "9+9=?")], "18", "19 or 20"),
]


def numpy_completion_logps(model, params, batch, side):
    """(sum of log p over the completion mask, mask count) per row, in float64 numpy."""
    logits = np.asarray(
        model.apply(
            {"params": params},
            batch[f"{side}_inputs"],
            batch[f"{side}_positions"],
            batch[f"{side}_segment_ids"],
        ),
        np.float64,
    )
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tok = np.take_along_axis(logp, batch[f"{side}_targets"][..., None], -1)[..., 0]
    mask = batch[f"{side}_loss_mask"]
    return (tok * mask).sum(-1), mask.sum(-1)


def trl_ipo(policy_logps, ref_logps, beta):
    """TRL's IPO (trl is not installed here, so its formula is written out in numpy).

    huggingface/trl, trl/trainer/dpo_trainer.py: ``concatenated_forward`` sums the per-token
    log-probs over the completion mask and, for ``loss_type='ipo'``, divides them by the mask
    count (``all_logps = all_logps / loss_mask.sum(-1)``), for the policy and the reference
    alike; ``dpo_loss`` takes ``logits = chosen_logratios - rejected_logratios`` with
    ``*_logratios = *_logps - ref_*_logps`` and returns ``(logits - 1 / (2 * beta)) ** 2``
    (eq. 17 of Azar et al. 2023), rewards ``beta * (chosen_logps - ref_chosen_logps)``.
    """
    (pc, nc), (pr, nr) = policy_logps
    (rc, _), (rr, _) = ref_logps
    pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
    losses = ((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2
    return losses, beta * (pc - rc), beta * (pr - rr)


def test_ipo_averages_log_ratios_over_completion_tokens_like_trl():
    model, beta = tiny_model(), 0.1
    params = init_params(model, 0)
    policy = jax.tree.map(lambda p: p * 1.1, params)
    batch = preference_batch(UNEQUAL)
    counts = [batch[f"{s}_loss_mask"].sum(-1) for s in ("chosen", "rejected")]
    assert (counts[0] != counts[1]).all()
    pol = [numpy_completion_logps(model, policy, batch, s) for s in ("chosen", "rejected")]
    ref = [numpy_completion_logps(model, params, batch, s) for s in ("chosen", "rejected")]
    want, want_rc, want_rr = trl_ipo(pol, ref, beta)
    ctx = LossContext(model, config("dpo", beta=beta, loss="ipo"), frozen={"reference": params})
    s, w, m = OBJECTIVES["dpo"](policy, batch, None, ctx)
    assert float(w) == 4
    assert float(s / w) == pytest.approx(want.mean(), rel=1e-5)
    assert float(m["rewards/chosen"][0] / w) == pytest.approx(want_rc.mean(), rel=1e-4, abs=1e-7)
    assert float(m["rewards/rejected"][0] / w) == pytest.approx(want_rr.mean(), rel=1e-4, abs=1e-7)
    # Summed log-ratios (the old behaviour) give another loss for the same beta.
    (pc, _), (pr, _) = pol
    (rc, _), (rr, _) = ref
    summed = ((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2
    assert np.abs(summed - want).max() > 1.0
    # Precomputed reference log-probs are sums; the loss averages them the same way.
    pre = dict(batch, reference_chosen_logps=ref[0][0], reference_rejected_logps=ref[1][0])
    pre = {
        k: np.asarray(v, np.float32) if k.startswith("reference_") else v for k, v in pre.items()
    }
    s2, w2, _ = OBJECTIVES["dpo"](
        policy, pre, None, LossContext(model, config("dpo", beta=beta, loss="ipo"), frozen=None)
    )
    assert float(s2 / w2) == pytest.approx(want.mean(), rel=1e-5)
    # At the reference the IPO loss is (1 / (2 beta))^2 whatever the lengths.
    s3, w3, _ = OBJECTIVES["dpo"](params, batch, None, ctx)
    assert float(s3 / w3) == pytest.approx((1 / (2 * beta)) ** 2, rel=1e-6)
