"""Supervised fine-tuning: causal LM loss on response tokens only.

The batch is the LM layout (``inputs, targets, loss_mask, positions, segment_ids``) built by
lmtrain/data/sft.py, whose ``loss_mask`` is 1 on assistant content, its end marker and the final
EOS, so prompt tokens are context but never targets, and the model learns to stop.

``config.sft.average``: ``token`` weights every response token equally (long answers count more);
``sequence`` takes each sequence's (packed segment's) mean first, so every example counts once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmtrain.train.objectives import LossContext, apply_model, register, token_cross_entropy


def per_sequence_sums(values_BT: jax.Array, mask_BT: jax.Array, segment_ids_BT: jax.Array):
    """Per (row, segment) sums of ``values * mask`` and of ``mask``: two (B, T+1) arrays.

    Segment ids are at most T, so a one-hot over T+1 slots covers every segment of a packed row.
    """
    T = segment_ids_BT.shape[1]
    onehot = jax.nn.one_hot(segment_ids_BT, T + 1, dtype=jnp.float32)  # (B, T, T+1)
    m = mask_BT.astype(jnp.float32)
    sums = jnp.einsum("bt,bts->bs", values_BT * m, onehot)
    counts = jnp.einsum("bt,bts->bs", m, onehot)
    return sums, counts


@register("sft")
def sft_loss(params, batch, rng, ctx: LossContext):
    """Masked NLL; ``(sum, weight)`` over tokens or over sequences (``config.sft.average``)."""
    logits = apply_model(params, batch, ctx, rng)
    nll, lse = token_cross_entropy(logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    n_tokens = mask.sum()
    nll_sum = (nll * mask).sum()
    metrics = {"nll": (nll_sum, n_tokens)}
    if ctx.config.sft.average == "sequence":
        sums, counts = per_sequence_sums(nll, mask, batch["segment_ids"])
        has = counts > 0
        loss_sum = jnp.sum(jnp.where(has, sums / jnp.maximum(counts, 1.0), 0.0))
        weight = has.sum().astype(jnp.float32)
    else:
        loss_sum, weight = nll_sum, n_tokens
    z = ctx.config.train.z_loss
    if z:
        z_sum = (z * jnp.square(lse) * mask).sum()
        metrics["z_loss"] = (z_sum, n_tokens)
        loss_sum = loss_sum + (
            z_sum
            if ctx.config.sft.average == "token"
            else z_sum / jnp.maximum(n_tokens, 1.0) * weight
        )
    return loss_sum, weight, metrics
