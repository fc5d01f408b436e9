"""Reward model: Bradley–Terry pairwise loss on a scalar head over the final hidden state.

``loss = -log sigmoid(r(x, y_c) - r(x, y_r))`` per pair, on the preference batch layout
(``chosen_*`` / ``rejected_*`` rows). Params are the backbone plus ``"reward_head"``
(lmtrain/model/reward_head.py); with LoRA the backbone part is the adapter tree.
Metrics: accuracy (chosen scored strictly higher), margin, and the mean scores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmtrain.model.reward_head import reward_scores, split_head
from lmtrain.train.losses import dpo  # module import: objectives.py imports both at its end
from lmtrain.train.objectives import LossContext, register


def pair_scores(params, batch, ctx: LossContext, rng=None) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) scalar rewards, (B,) each, from one forward over 2B rows."""
    backbone, head = split_head(params)
    rows = dpo.stacked_pairs(batch)
    hidden = ctx.model.apply(
        {"params": ctx.model_params(backbone, rng)},
        rows["inputs"],
        rows["positions"],
        rows["segment_ids"],
        return_hidden=True,
    )
    r = reward_scores(head, hidden, rows["segment_ids"])
    b = batch["chosen_inputs"].shape[0]
    return r[:b], r[b:]


@register("reward")
def reward_loss(params, batch, rng, ctx: LossContext):
    rc, rr = pair_scores(params, batch, ctx, rng)
    valid = (batch["chosen_segment_ids"].sum(-1) > 0) & (batch["rejected_segment_ids"].sum(-1) > 0)
    n = valid.sum().astype(jnp.float32)
    losses = -jax.nn.log_sigmoid(rc - rr)

    def s(x):
        return (jnp.sum(jnp.where(valid, x, 0.0)), n)

    metrics = {
        "accuracy": s((rc > rr).astype(jnp.float32)),
        "margin": s(jax.lax.stop_gradient(rc - rr)),
        "reward/chosen": s(jax.lax.stop_gradient(rc)),
        "reward/rejected": s(jax.lax.stop_gradient(rr)),
    }
    return jnp.sum(jnp.where(valid, losses, 0.0)), n, metrics
