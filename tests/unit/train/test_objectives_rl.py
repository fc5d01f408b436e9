"""GRPO / PPO losses, advantages and KL against closed forms, finite differences and numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain.config import base_config
from lmtrain.train import advantages as adv_lib
from lmtrain.train.losses import rl
from lmtrain.train.objectives import LossContext
from lmtrain.train.rollout import build_rows, completion_tokens, token_logps
from tests.support.finetune_fixtures import SEQ, TOK, init_params, tiny_model


def rl_config(objective="grpo", **rl_kw):
    c = base_config()
    c.objective = objective
    ppo = rl_kw.pop("ppo", {})
    c.rl.update(**rl_kw)
    c.rl.ppo.update(**ppo)
    return c


def tiny_batch(seed=0, B=4):
    """Rows of prompt + completion of differing lengths, with random old/ref log-probs."""
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(3, TOK.vocab_size, n)) for n in (3, 5, 4, 6)][:B]
    comps = [list(rng.integers(3, TOK.vocab_size, n)) for n in (4, 2, 6, 3)][:B]
    batch = build_rows(prompts, comps, SEQ, TOK.pad_id)
    mask = batch["loss_mask"].astype(np.float32)
    batch["advantages"] = (rng.normal(size=(B, 1)) * mask).astype(np.float32)
    return batch, mask, rng


# ---- closed forms of the pieces ----------------------------------------------------------------


def test_k3_closed_form_and_clipped_loss_by_hand():
    logp = jnp.array([[np.log(0.5), np.log(0.2)]])
    ref = jnp.array([[np.log(0.25), np.log(0.4)]])
    # k3 = ref/p - log(ref/p) - 1
    want = [0.5 - np.log(0.5) - 1, 2.0 - np.log(2.0) - 1]
    np.testing.assert_allclose(rl.k3(logp, ref)[0], want, rtol=1e-6)
    # ratios e^0.5 (above 1.2) and e^-0.5 (below 0.8); advantages +1 and -1
    lp, old = jnp.array([[0.5, -0.5, 0.1]]), jnp.zeros((1, 3))
    adv, mask = jnp.array([[1.0, -1.0, 2.0]]), jnp.ones((1, 3))
    loss, r, low, high = rl.clipped_policy_loss(lp, old, adv, mask, 0.2, 0.28, "token")
    # token 0: min(e^.5, 1.28) * 1 -> -1.28 (clipped high); token 1: A<0, min(-e^-.5, -0.8) =
    # -0.8 -> +0.8 (clipped low); token 2: ratio e^.1 inside -> -2 e^.1
    np.testing.assert_allclose(loss[0], [-1.28, 0.8, -2 * np.exp(0.1)], rtol=1e-6)
    assert list(high[0]) == [True, False, False] and list(low[0]) == [False, True, False]
    # GSPO: one ratio per row, exp(mean log-ratio over masked tokens)
    _, r_seq, _, _ = rl.clipped_policy_loss(lp, old, adv, mask, 0.2, 0.2, "sequence")
    np.testing.assert_allclose(r_seq[0], [np.exp(0.1 / 3)] * 3, rtol=1e-6)


def test_aggregation_modes():
    per_token = jnp.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    s, w = rl.aggregate(per_token, mask, "sequence", 8)
    assert float(s / w) == pytest.approx((2.0 + 4.0) / 2)
    s, w = rl.aggregate(per_token, mask, "token", 8)
    assert float(s / w) == pytest.approx(10.0 / 4)
    s, w = rl.aggregate(per_token, mask, "constant", 8)
    assert float(s / w) == pytest.approx((6.0 / 8 + 4.0 / 8) / 2)


def test_group_advantages_closed_form():
    r = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0, 1.0])
    a = adv_lib.group_advantages(r[:8], 4)
    s = np.sqrt(1.0 / 3.0)  # unbiased std of (1, 0, 0, 1)
    np.testing.assert_allclose(a[:4], np.array([0.5, -0.5, -0.5, 0.5]) / (s + 1e-4), rtol=1e-5)
    np.testing.assert_array_equal(a[4:], 0.0)  # a group with equal rewards carries no signal
    np.testing.assert_allclose(adv_lib.group_advantages(r[8:], 2, scale=False), [1.0, -1.0])


def test_gae_equals_direct_recursion():
    rng = np.random.default_rng(3)
    B, T = 5, 9
    mask = np.zeros((B, T), np.float32)
    for i, (s, n) in enumerate([(2, 4), (0, 9), (5, 1), (3, 6), (1, 0)]):
        mask[i, s : s + n] = 1
    values = rng.normal(size=(B, T)).astype(np.float32)
    scores = rng.normal(size=B).astype(np.float32)
    rewards = adv_lib.sequence_rewards_on_last_token(scores, mask)
    rewards += rng.normal(size=(B, T)).astype(np.float32) * mask  # per-token terms as well
    for gamma, lam in ((1.0, 0.95), (0.9, 0.5)):
        adv, ret = adv_lib.gae(rewards, values, mask, gamma, lam)
        for i in range(B):
            idx = np.flatnonzero(mask[i])
            want = np.zeros(len(idx))
            nxt_a, nxt_v = 0.0, 0.0
            for j in reversed(range(len(idx))):
                t = idx[j]
                delta = rewards[i, t] + gamma * nxt_v - values[i, t]
                nxt_a = delta + gamma * lam * nxt_a
                nxt_v = values[i, t]
                want[j] = nxt_a
            np.testing.assert_allclose(adv[i, idx], want, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(ret[i, idx], want + values[i, idx], rtol=1e-5, atol=1e-6)
        assert np.all(adv[mask == 0] == 0)
    assert scores[0] == rewards[0, 5] - (rewards[0, 5] - scores[0])  # score on the last token
    w = adv_lib.whiten(adv, mask)
    assert abs(w[mask > 0].mean()) < 1e-5 and abs(w[mask > 0].std() - 1) < 1e-4


def test_rows_mask_the_completion_up_to_eos_only():
    comp = completion_tokens([7, 8], "eos", TOK.eos_id, [])
    assert comp == [7, 8, TOK.eos_id]
    assert completion_tokens([7, 8, 9], "length", TOK.eos_id, [5]) == [7, 8, 9]
    assert completion_tokens([7], "stop", TOK.eos_id, [5, 6]) == [7, 5, 6]
    rows = build_rows([[3, 4, 5]], [comp], 10, TOK.pad_id)
    # targets 8.. : positions 2, 3, 4 predict 7, 8, EOS; nothing after EOS is trained
    np.testing.assert_array_equal(rows["loss_mask"][0], [0, 0, 1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(rows["targets"][0, 2:5], [7, 8, TOK.eos_id])
    np.testing.assert_array_equal(rows["segment_ids"][0], [1] * 5 + [0] * 5)


# ---- the registered objectives -----------------------------------------------------------------


def directional_check(loss, params, rng, h=1e-3):
    """<grad, d> against the central difference along a random unit direction d."""
    leaves, tree = jax.tree.flatten(params)
    f = jax.jit(loss)
    grads = jax.jit(jax.grad(loss))(params)
    # half along the gradient (a derivative well above float32 noise), half random
    g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
    d = [rng.normal(size=np.shape(x)) for x in leaves]
    gn, dn = (np.sqrt(sum((x**2).sum() for x in t)) for t in (g, d))
    d = [a / gn + b / dn for a, b in zip(g, d)]
    dirs = jax.tree.unflatten(tree, [x.astype(np.float32) for x in d])
    fd = (
        float(f(jax.tree.map(lambda p, v: p + h * v, params, dirs)))
        - float(f(jax.tree.map(lambda p, v: p - h * v, params, dirs)))
    ) / (2 * h)
    analytic = sum(
        float(jnp.vdot(g, v)) for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(dirs))
    )
    np.testing.assert_allclose(analytic, fd, rtol=2e-2, atol=1e-3)
    assert abs(analytic) > 1e-3  # the check is not trivially 0 = 0
    return grads


def _expected_grpo(batch, mask, logp, cfg):
    """The GRPO loss written out in numpy from the token log-probs."""
    r = cfg.rl
    old, ref, adv = batch["old_logps"], batch["ref_logps"], batch["advantages"]
    lr = logp - old
    if r.importance_level == "sequence":
        lr = np.broadcast_to(
            (lr * mask).sum(-1, keepdims=True) / mask.sum(-1, keepdims=True), lr.shape
        )
    ratio = np.exp(lr)
    clipped = np.clip(ratio, 1 - r.epsilon_low, 1 + r.epsilon_high)
    per = -np.minimum(ratio * adv, clipped * adv) + r.beta * (np.exp(ref - logp) - (ref - logp) - 1)
    if r.loss_norm == "token":
        return (per * mask).sum() / mask.sum()
    if r.loss_norm == "constant":
        return ((per * mask).sum(-1) / r.max_new_tokens).mean()
    return ((per * mask).sum(-1) / mask.sum(-1)).mean()


@pytest.mark.parametrize(
    "kw",
    [
        dict(loss_norm="sequence", beta=0.04, fd=True),
        dict(loss_norm="token", beta=0.1, epsilon_high=0.28),  # DAPO
        dict(loss_norm="constant", beta=0.0, max_new_tokens=8, scale_rewards=False),  # Dr.GRPO
        dict(loss_norm="sequence", importance_level="sequence", beta=0.02),  # GSPO
    ],
)
def test_grpo_loss_equals_closed_form_and_finite_differences(kw):
    model = tiny_model()
    params = init_params(model)
    batch, mask, rng = tiny_batch()
    logp = np.asarray(jax.jit(lambda p: token_logps(model, p, batch))(params))
    batch["old_logps"] = ((logp + rng.normal(size=logp.shape) * 0.3) * mask).astype(np.float32)
    batch["ref_logps"] = ((logp + rng.normal(size=logp.shape) * 0.3) * mask).astype(np.float32)
    fd = kw.pop("fd", False)
    cfg = rl_config("grpo", **kw)
    ctx = LossContext(model=model, config=cfg)
    if cfg.rl.beta == 0:  # beta = 0: no reference log-probs in the batch (no reference pass)
        del batch["ref_logps"]

    def loss(p):
        s, w, _ = rl.grpo_loss(p, batch, None, ctx)
        return s / w

    with_ref = dict(batch, ref_logps=batch.get("ref_logps", np.zeros_like(logp)))
    want = _expected_grpo(with_ref, mask, logp, cfg)
    np.testing.assert_allclose(float(jax.jit(loss)(params)), want, rtol=2e-5, atol=1e-6)
    if fd:  # one variant: each check compiles the model's gradient again
        directional_check(loss, params, rng)


def test_beta_zero_one_iteration_is_the_advantage_weighted_logprob_gradient():
    model = tiny_model()
    params = init_params(model)
    batch, mask, _ = tiny_batch(1)
    cfg = rl_config("grpo", beta=0.0, num_iterations=1, loss_norm="sequence")
    ctx = LossContext(model=model, config=cfg)
    s, w, metrics = jax.jit(lambda p: rl.grpo_loss(p, batch, None, ctx))(params)
    assert float(metrics["ratio"][0] / metrics["ratio"][1]) == 1.0
    assert float(metrics["clip_fraction"][0]) == 0.0 and "kl" not in metrics

    def pg(p):
        lp = token_logps(model, p, batch)
        per_row = (batch["advantages"] * lp * mask).sum(-1) / mask.sum(-1)
        return -per_row.mean()

    # the value is -mean over rows of the row's mean advantage (ratio 1); the gradient is pg's
    want = -((batch["advantages"] * mask).sum(-1) / mask.sum(-1)).mean()
    np.testing.assert_allclose(float(s / w), want, rtol=1e-5, atol=1e-7)
    got = jax.jit(jax.grad(lambda p: (lambda o: o[0] / o[1])(rl.grpo_loss(p, batch, None, ctx))))(
        params
    )
    want = jax.jit(jax.grad(pg))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_ppo_loss_equals_closed_form_and_finite_differences():
    model = tiny_model()
    params = init_params(model)
    params[rl.VALUE_KEY] = rl.init_value_head(32, jax.random.PRNGKey(4))
    batch, mask, rng = tiny_batch(2)
    cfg = rl_config("ppo", beta=0.05, loss_norm="token", ppo=dict(vf_coef=0.3, cliprange_value=0.1))
    ctx = LossContext(model=model, config=cfg)
    logp, _, values = rl.policy_forward(params, batch, ctx, None, with_values=True)
    logp, values = np.asarray(logp), np.asarray(values)
    np.testing.assert_allclose(
        logp * mask, np.asarray(token_logps(model, params, batch)) * mask, rtol=1e-4, atol=1e-5
    )
    batch["old_logps"] = ((logp + rng.normal(size=logp.shape) * 0.2) * mask).astype(np.float32)
    batch["ref_logps"] = ((logp + rng.normal(size=logp.shape) * 0.2) * mask).astype(np.float32)
    batch["old_values"] = ((values + rng.normal(size=logp.shape) * 0.3) * mask).astype(np.float32)
    batch["returns"] = (rng.normal(size=logp.shape) * mask).astype(np.float32)
    batch["advantages"] = (rng.normal(size=logp.shape) * mask).astype(np.float32)

    def loss(p):
        s, w, _ = rl.ppo_loss(p, batch, None, ctx)
        return s / w

    policy = _expected_grpo(batch, mask, logp, cfg) * mask.sum()
    ov, ret = batch["old_values"], batch["returns"]
    vclip = ov + np.clip(values - ov, -0.1, 0.1)
    vf = 0.5 * np.maximum((values - ret) ** 2, (vclip - ret) ** 2)
    want = (policy + 0.3 * (vf * mask).sum()) / mask.sum()
    np.testing.assert_allclose(float(jax.jit(loss)(params)), want, rtol=2e-5)
    grads = directional_check(loss, params, rng)
    assert float(jnp.abs(grads[rl.VALUE_KEY]["kernel"]).sum()) > 0  # the value head learns
