"""Loss functions, chosen by ``config.objective``: every way to train is a loss over one step.

An objective is ``fn(params, batch, rng, ctx) -> (loss_sum, weight, metrics)``:

* ``loss_sum`` — the *sum* of per-unit losses in this (micro)batch (units: target tokens for LM and
  SFT, pairs for DPO/reward);
* ``weight`` — how many units that sum covers;
* ``metrics`` — a dict of ``(sum, weight)`` pairs for logging.

The step divides once by the weight summed over all microbatches, so accumulating 4 microbatches
gives exactly the loss of the 4x batch: the mean over its real target tokens, not a mean of means.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lmtrain.model.lora import apply_adapters

ONE_HOT_MAX_VOCAB = 2048  # below this, the target logit is picked by a one-hot contraction

OBJECTIVES: dict[str, Callable] = {}


@dataclasses.dataclass(frozen=True)
class LossContext:
    """What a loss needs besides params: the model, frozen trees (reference/teacher) and config."""

    model: Any
    config: Any
    frozen: Any = None  # e.g. DPO reference params, distillation teacher params, LoRA base
    extras: Any = None  # static helpers an objective needs, e.g. {"teacher_model": Transformer}
    train: bool = True  # False in evaluation: no dropout (e.g. LoRA dropout)

    def model_params(self, params, rng=None):
        """The model's full params: with LoRA, the trainable adapters folded into the frozen base
        (``frozen["base"]``; see lmtrain/model/lora.py); otherwise ``params`` unchanged."""
        lora_cfg = self.config.get("lora") if hasattr(self.config, "get") else None
        if lora_cfg is None or not lora_cfg.rank:
            return params
        return apply_adapters(
            self.frozen["base"],
            params,
            lora_cfg.alpha / lora_cfg.rank,
            dropout=lora_cfg.dropout if self.train else 0.0,
            rng=rng,
        )


def register(name: str):
    def wrap(fn):
        OBJECTIVES[name] = fn
        return fn

    return wrap


def token_cross_entropy(
    logits_BTV: jax.Array, targets_BT: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood and log-partition (for z-loss), both float32."""
    logits = logits_BTV.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    if logits.shape[-1] <= ONE_HOT_MAX_VOCAB:
        # Small vocabularies: a one-hot contraction has a dense gradient (no scatter), which is
        # much faster on CPU. Large vocabularies keep the gather (no extra B x T x V buffer).
        onehot = jax.nn.one_hot(targets_BT, logits.shape[-1], dtype=logits.dtype)
        target_logit = jnp.sum(logits * onehot, axis=-1)
    else:
        target_logit = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    return lse - target_logit, lse


def apply_model(params, batch, ctx: LossContext, rng=None, **kwargs):
    return ctx.model.apply(
        {"params": ctx.model_params(params, rng)},
        batch["inputs"],
        batch.get("positions"),
        batch.get("segment_ids"),
        **kwargs,
    )


@register("lm")
def lm_loss(params, batch, rng, ctx: LossContext):
    """Causal LM: mean NLL over target tokens whose ``loss_mask`` is 1, plus optional z-loss."""
    del rng
    logits = apply_model(params, batch, ctx)
    nll, lse = token_cross_entropy(logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    n = mask.sum()
    nll_sum = (nll * mask).sum()
    loss_sum = nll_sum
    metrics = {"nll": (nll_sum, n)}
    z = ctx.config.train.z_loss
    if z:
        z_sum = (z * jnp.square(lse) * mask).sum()
        loss_sum = loss_sum + z_sum
        metrics["z_loss"] = (z_sum, n)
    return loss_sum, n, metrics


# Fine-tuning objectives register themselves on import (sft, dpo, reward, distill, grpo, ppo).
from lmtrain.train.losses import distill, dpo, reward, rl, sft  # noqa: E402, F401
