"""Online RL objectives over the one train step: GRPO (with Dr.GRPO / DAPO / GSPO as configs) and PPO.

The rollout phase (lmtrain/train/rollout.py) samples completions, scores them and writes a batch
in the LM layout (``inputs, targets, loss_mask, positions, segment_ids``; ``loss_mask`` is 1 on
completion tokens up to and including EOS) plus, per token (B, T):

* ``advantages`` — GRPO: the group-normalised reward broadcast over the row; PPO: GAE;
* ``old_logps`` — log-probs of the rollout policy (only when ``rl.num_iterations`` > 1; with one
  iteration the old policy *is* the current one, so ``stop_gradient(logp)`` is used and the
  ratio is exactly 1);
* ``ref_logps`` — reference log-probs (only when ``rl.beta`` > 0);
* PPO only: ``old_values`` and ``returns``.

Per completion token, with ``r = exp(logp - old_logp)`` (``rl.importance_level='sequence'``:
GSPO's ``exp(mean over the row's tokens of logp - old_logp)``, the same for every token)::

    loss_t = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * k3_t
    k3_t   = exp(ref_logp - logp) - (ref_logp - logp) - 1            (Schulman's k3, >= 0)

aggregated by ``rl.loss_norm`` (the objective contract: a sum and its weight):

* ``sequence`` (GRPO): each row's mean over its completion tokens, averaged over rows;
* ``token`` (DAPO / BNPO): the mean over all completion tokens of the batch;
* ``constant`` (Dr.GRPO): each row's sum divided by ``rl.max_new_tokens``, averaged over rows.

PPO adds the clipped value loss ``vf_coef * 0.5 * max((V - R)^2, (clip(V, V_old +- eps_v) - R)^2)``
per completion token, aggregated the same way. These are TRL's ``GRPOTrainer`` / ``PPOTrainer``
formulas; tests/unit/train/test_objectives_rl.py checks them against closed forms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmtrain.model.reward_head import init_reward_head
from lmtrain.train.objectives import LossContext, register, token_cross_entropy

VALUE_KEY = "value_head"


def init_value_head(d_model: int, rng: jax.Array, *, boxed: bool = False) -> dict:
    """Same shape as the reward head: ``{"kernel": [D], "bias": []}``."""
    return init_reward_head(d_model, rng, boxed=boxed)


def split_value_head(params) -> tuple[dict, dict | None]:
    """``(policy params, value head or None)``."""
    if VALUE_KEY not in params:
        return params, None
    return {k: v for k, v in params.items() if k != VALUE_KEY}, params[VALUE_KEY]


def token_values(head, hidden_BTD: jax.Array) -> jax.Array:
    """(B, T) float32 value estimates ``hidden @ kernel + bias`` at every position."""
    return hidden_BTD.astype(jnp.float32) @ head["kernel"].astype(jnp.float32) + head["bias"]


def policy_forward(params, batch, ctx: LossContext, rng=None, with_values: bool = False):
    """(token log-probs (B, T), entropy (B, T), values (B, T) or None) of the targets."""
    policy, head = split_value_head(params)
    full = ctx.model_params(policy, rng)
    out = ctx.model.apply(
        {"params": full},
        batch["inputs"],
        batch.get("positions"),
        batch.get("segment_ids"),
        return_hidden=with_values,
    )
    if with_values:
        # One pass: the hidden states feed both the value head and the LM head (float32).
        hidden = out
        if "lm_head" in full:
            logits = hidden @ full["lm_head"].astype(jnp.float32)
        else:  # tied embeddings
            logits = hidden @ full["embedding"].astype(jnp.float32).T
        values = token_values(head, hidden)
    else:
        logits, values = out, None
    nll, _ = token_cross_entropy(logits, batch["targets"])
    logp_all = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return -nll, jax.lax.stop_gradient(entropy), values


def k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Per-token k3 estimate of KL(pi || ref): ``exp(ref - logp) - (ref - logp) - 1``."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def importance_log_ratio(logp, old_logp, mask, level: str) -> jax.Array:
    """Token-level ``logp - old`` or GSPO's per-row mean over completion tokens (B, 1)."""
    log_ratio = logp - old_logp
    if level == "sequence":
        n = jnp.maximum(mask.sum(-1, keepdims=True), 1.0)
        return (log_ratio * mask).sum(-1, keepdims=True) / n
    return log_ratio


def clipped_policy_loss(logp, old_logp, adv, mask, eps_low: float, eps_high: float, level: str):
    """Per-token ``-min(r A, clip(r) A)``, the ratio r, and low/high clip indicators (B, T)."""
    r = jnp.exp(importance_log_ratio(logp, old_logp, mask, level))
    r_clipped = jnp.clip(r, 1.0 - eps_low, 1.0 + eps_high)
    loss = -jnp.minimum(r * adv, r_clipped * adv)
    low = (r < 1.0 - eps_low) & (adv < 0)
    high = (r > 1.0 + eps_high) & (adv > 0)
    r = jnp.broadcast_to(r, logp.shape)
    return loss, r, low, high


def aggregate(per_token, mask, norm: str, max_new_tokens: int) -> tuple[jax.Array, jax.Array]:
    """``(sum, weight)`` of per-token losses under ``rl.loss_norm`` (see the module docstring)."""
    rows = (mask.sum(-1) > 0).astype(jnp.float32)
    if norm == "token":
        return (per_token * mask).sum(), mask.sum()
    if norm == "constant":
        return (per_token * mask).sum() / float(max_new_tokens), rows.sum()
    n = jnp.maximum(mask.sum(-1), 1.0)
    return ((per_token * mask).sum(-1) / n).sum(), rows.sum()


def _rl_loss(params, batch, rng, ctx: LossContext, with_values: bool):
    cfg = ctx.config.rl
    mask = batch["loss_mask"].astype(jnp.float32)
    logp, entropy, values = policy_forward(params, batch, ctx, rng, with_values)
    old = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logp)
    adv = batch["advantages"].astype(jnp.float32)
    pg, r, low, high = clipped_policy_loss(
        logp, old, adv, mask, cfg.epsilon_low, cfg.epsilon_high, cfg.importance_level
    )
    per_token = pg
    n_tok = mask.sum()
    metrics = {
        "pg_loss": ((pg * mask).sum(), n_tok),
        "clip_fraction": (((low | high) * mask).sum(), n_tok),
        "clip_fraction_low": ((low * mask).sum(), n_tok),
        "clip_fraction_high": ((high * mask).sum(), n_tok),
        "ratio": ((jax.lax.stop_gradient(r) * mask).sum(), n_tok),
        "entropy": ((entropy * mask).sum(), n_tok),
    }
    if "ref_logps" in batch:
        kl = k3(logp, batch["ref_logps"])
        per_token = per_token + cfg.beta * kl
        metrics["kl"] = ((jax.lax.stop_gradient(kl) * mask).sum(), n_tok)
    if with_values:
        ret, old_v = batch["returns"], batch["old_values"]
        v_clip = old_v + jnp.clip(values - old_v, -cfg.ppo.cliprange_value, cfg.ppo.cliprange_value)
        vf = 0.5 * jnp.maximum(jnp.square(values - ret), jnp.square(v_clip - ret))
        per_token = per_token + cfg.ppo.vf_coef * vf
        metrics["value_loss"] = ((jax.lax.stop_gradient(vf) * mask).sum(), n_tok)
        vclipped = (jnp.square(v_clip - ret) > jnp.square(values - ret)).astype(jnp.float32)
        metrics["value_clip_fraction"] = ((vclipped * mask).sum(), n_tok)
    loss_sum, weight = aggregate(per_token, mask, cfg.loss_norm, cfg.max_new_tokens)
    return loss_sum, weight, metrics


@register("grpo")
def grpo_loss(params, batch, rng, ctx: LossContext):
    """GRPO / Dr.GRPO / DAPO / GSPO: clipped ratio x group-normalised advantage + beta k3 KL."""
    return _rl_loss(params, batch, rng, ctx, with_values=False)


@register("ppo")
def ppo_loss(params, batch, rng, ctx: LossContext):
    """PPO: the same clipped policy loss and KL on GAE advantages, plus the clipped value loss."""
    return _rl_loss(params, batch, rng, ctx, with_values=True)
