"""Direct Preference Optimization (Rafailov et al. 2023), conservative DPO and IPO.

With ``h = (log pi(y_c|x) - log pi(y_r|x)) - (log ref(y_c|x) - log ref(y_r|x))``:

* ``sigmoid``: ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)`` (eps = label
  smoothing; eps = 0 is DPO, eps > 0 is conservative DPO), with sequence log-probs summed over
  the response tokens (where ``loss_mask`` is 1);
* ``ipo``: ``(h - 1 / (2 beta))^2`` (Azar et al. 2023) with each log-prob *averaged* over its
  response's tokens, as TRL does (``all_logps / loss_mask.sum(-1)`` for ``loss_type='ipo'`` in
  its DPOTrainer), so ``beta`` means what it means there. The implicit rewards and the
  ``logps/*`` metrics then use the averaged log-probs too (as in TRL); ``nll/chosen`` does not
  change.

Optional NLL on the chosen response (RPO, Pang et al. 2024 "Iterative Reasoning Preference
Optimization"; ``config.dpo.nll_weight`` = w, default 0): each pair's loss gains
``w * (-log pi(y_c|x) / |y_c|)``, the chosen response's mean per-token NLL, so the pair-averaged
loss is ``dpo + w * mean over pairs of the chosen per-token NLL``. DPO alone only moves the
chosen-vs-rejected *difference* and often lowers the chosen likelihood too (hurting greedy
exact match when the rejected answers are near-misses); the NLL term anchors the chosen answer.

Chosen and rejected rows go through one forward pass (concatenated on the batch axis). Reference
log-probs come from, in order: the batch (``reference_chosen_logps`` / ``reference_rejected_logps``,
written by a pass over the data when ``config.dpo.reference='precomputed'``), frozen reference
params (``frozen["reference"]``) or, with LoRA, the frozen base (adapters off, as TRL does).

Implicit rewards are ``beta * (log pi - log ref)``; metrics: rewards/chosen, rewards/rejected,
rewards/accuracy (chosen strictly above rejected), rewards/margin, logps/chosen, logps/rejected.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from lmtrain.errors import ConfigError
from lmtrain.train.objectives import LossContext, register, token_cross_entropy

log = logging.getLogger(__name__)
FIELDS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")


def sequence_logps(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """Sum of ``log p(target)`` over positions where ``mask`` is 1: (B,) float32."""
    nll, _ = token_cross_entropy(logits_BTV, targets_BT)
    return -(nll * mask_BT.astype(jnp.float32)).sum(axis=-1)


def stacked_pairs(batch: Mapping) -> dict:
    """``chosen_*`` and ``rejected_*`` rows → one batch of 2B rows (chosen first)."""
    return {
        k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0) for k in FIELDS
    }


def pair_logps(model, params, batch: Mapping) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) sequence log-probs, (B,) each, from one forward over 2B rows."""
    rows = stacked_pairs(batch)
    logits = model.apply({"params": params}, rows["inputs"], rows["positions"], rows["segment_ids"])
    lp = sequence_logps(logits, rows["targets"], rows["loss_mask"])
    b = batch["chosen_inputs"].shape[0]
    return lp[:b], lp[b:]


def reference_logps(batch: Mapping, ctx: LossContext) -> tuple[jax.Array, jax.Array]:
    if "reference_chosen_logps" in batch:
        return batch["reference_chosen_logps"], batch["reference_rejected_logps"]
    frozen = ctx.frozen or {}
    ref = frozen.get("reference", frozen.get("base"))
    if ref is None:
        raise ConfigError(
            "DPO needs reference log-probs: pass frozen={'reference': params} (the loop does this "
            "for config.dpo.reference='params') or precompute them into the batch"
        )
    c, r = pair_logps(ctx.model, ref, batch)
    return jax.lax.stop_gradient(c), jax.lax.stop_gradient(r)


def per_token_mean(logps: jax.Array, tokens: jax.Array) -> jax.Array:
    """Sequence log-probs divided by their response token counts (0 tokens: left as is, 0)."""
    return logps / jnp.maximum(tokens, 1).astype(jnp.float32)


def dpo_losses(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-pair losses and implicit rewards (chosen, rejected); see the module docstring."""
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - (
            label_smoothing * jax.nn.log_sigmoid(-beta * h)
        )
    elif loss_type == "ipo":
        losses = jnp.square(h - 1.0 / (2.0 * beta))
    else:
        raise ConfigError(f"config.dpo.loss={loss_type!r}: sigmoid or ipo")
    rewards_chosen = beta * (policy_chosen - ref_chosen)
    rewards_rejected = beta * (policy_rejected - ref_rejected)
    return losses, jax.lax.stop_gradient(rewards_chosen), jax.lax.stop_gradient(rewards_rejected)


def pair_metrics(rc: jax.Array, rr: jax.Array, valid: jax.Array, pc, pr) -> dict:
    """``(sum, weight)`` metrics over valid pairs; accuracy counts chosen strictly above rejected."""
    n = valid.sum()

    def s(x):
        return (jnp.sum(jnp.where(valid, x, 0.0)), n)

    return {
        "rewards/chosen": s(rc),
        "rewards/rejected": s(rr),
        "rewards/accuracy": s((rc > rr).astype(jnp.float32)),
        "rewards/margin": s(rc - rr),
        "logps/chosen": s(jax.lax.stop_gradient(pc)),
        "logps/rejected": s(jax.lax.stop_gradient(pr)),
    }


@register("dpo")
def dpo_loss(params, batch, rng, ctx: LossContext):
    """Sum of per-pair DPO/IPO losses (+ ``nll_weight`` x chosen per-token NLL) over valid pairs."""
    cfg = ctx.config.dpo
    pc, pr = pair_logps(ctx.model, ctx.model_params(params, rng), batch)
    rc_ref, rr_ref = reference_logps(batch, ctx)
    chosen_tokens = batch["chosen_loss_mask"].sum(-1)
    rejected_tokens = batch["rejected_loss_mask"].sum(-1)
    valid = (chosen_tokens > 0) & (rejected_tokens > 0)
    chosen_nll = -per_token_mean(pc, chosen_tokens)
    if cfg.loss == "ipo":  # per-token means; precomputed reference log-probs stay sums
        pc, rc_ref = per_token_mean(pc, chosen_tokens), per_token_mean(rc_ref, chosen_tokens)
        pr, rr_ref = per_token_mean(pr, rejected_tokens), per_token_mean(rr_ref, rejected_tokens)
    losses, rc, rr = dpo_losses(
        pc,
        pr,
        rc_ref,
        rr_ref,
        beta=cfg.beta,
        loss_type=cfg.loss,
        label_smoothing=cfg.label_smoothing,
    )
    if cfg.nll_weight:
        losses = losses + cfg.nll_weight * chosen_nll
    loss_sum = jnp.sum(jnp.where(valid, losses, 0.0))
    metrics = pair_metrics(rc, rr, valid, pc, pr)
    metrics["nll/chosen"] = (
        jnp.sum(jnp.where(valid, jax.lax.stop_gradient(chosen_nll), 0.0)),
        valid.sum(),
    )
    return loss_sum, valid.sum().astype(jnp.float32), metrics


class DegenerateRunMonitor:
    """Watches logged DPO metrics and warns once per kind when a run looks degenerate.

    * ``stuck``: |rewards/chosen| and |rewards/rejected| below ``zero_tol`` for ``patience``
      logged steps: the policy is not moving away from the reference (lr too low, frozen params,
      or reference == policy by mistake);
    * ``collapsed``: loss below ``loss_floor`` while |margin| exceeds ``margin_limit`` for
      ``patience`` steps: the policy is exploiting the loss (over-optimisation; raise beta, lower
      lr, or use label smoothing / IPO).
    """

    def __init__(
        self,
        patience: int = 50,
        zero_tol: float = 1e-4,
        loss_floor: float = 0.01,
        margin_limit: float = 20.0,
        warn=log.warning,
    ):
        self.patience, self.zero_tol = patience, zero_tol
        self.loss_floor, self.margin_limit = loss_floor, margin_limit
        self.warn = warn
        self.counts = {"stuck": 0, "collapsed": 0}
        self.warned: set[str] = set()

    def update(self, step: int, metrics: Mapping[str, float]) -> list[str]:
        """Feeds one step's metrics (keys with or without a ``train/`` prefix); returns warnings."""
        m = {k.removeprefix("train/"): float(v) for k, v in metrics.items()}
        stuck = (
            abs(m["rewards/chosen"]) < self.zero_tol and abs(m["rewards/rejected"]) < self.zero_tol
        )
        collapsed = m["loss"] < self.loss_floor and abs(m["rewards/margin"]) > self.margin_limit
        out = []
        for kind, now in (("stuck", stuck), ("collapsed", collapsed)):
            self.counts[kind] = self.counts[kind] + 1 if now else 0
            if self.counts[kind] >= self.patience and kind not in self.warned:
                self.warned.add(kind)
                out.append(self._message(kind, step, m))
        for msg in out:
            self.warn(msg)
        return out

    def _message(self, kind: str, step: int, m: Mapping[str, float]) -> str:
        if kind == "stuck":
            return (
                f"DPO run looks degenerate at step {step}: implicit rewards stuck at zero for "
                f"{self.patience} logged steps (rewards/chosen={m['rewards/chosen']:.2e}, "
                f"rewards/rejected={m['rewards/rejected']:.2e}); is the policy training (lr, "
                "trainable params) and is the reference a separate frozen copy?"
            )
        return (
            f"DPO run looks degenerate at step {step}: loss {m['loss']:.2e} with margin "
            f"{m['rewards/margin']:.1f} for {self.patience} logged steps (over-optimisation); "
            "raise config.dpo.beta, lower the lr, or use config.dpo.label_smoothing / loss=ipo"
        )
