"""Knowledge distillation: KL from a frozen teacher's softened logits, mixed with the LM loss.

Per target token (``loss_mask`` 1), with temperature T and mixing weight alpha::

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * NLL(student)

The T^2 factor (Hinton et al. 2015) keeps the soft-target gradients on the same scale as T
changes. The teacher (``frozen["teacher"]``, model in ``ctx.extras["teacher_model"]``) may have a
different size but must share the vocabulary; it works on SFT batches and LM token batches alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmtrain.train.objectives import LossContext, apply_model, register, token_cross_entropy


def token_kl(teacher_logits: jax.Array, student_logits: jax.Array, temperature: float) -> jax.Array:
    """Per-position ``KL(p_teacher || p_student)`` at ``temperature``, float32 (B, T)."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.sum(jnp.exp(t) * (t - s), axis=-1)


@register("distill")
def distill_loss(params, batch, rng, ctx: LossContext):
    cfg = ctx.config.distill
    student = apply_model(params, batch, ctx, rng)
    teacher_model = (ctx.extras or {}).get("teacher_model", ctx.model)
    teacher = teacher_model.apply(
        {"params": ctx.frozen["teacher"]},
        batch["inputs"],
        batch.get("positions"),
        batch.get("segment_ids"),
    )
    teacher = jax.lax.stop_gradient(teacher)
    mask = batch["loss_mask"].astype(jnp.float32)
    n = mask.sum()
    nll, _ = token_cross_entropy(student, batch["targets"])
    kl = token_kl(teacher, student, cfg.temperature)
    nll_sum, kl_sum = (nll * mask).sum(), (kl * mask).sum()
    loss_sum = cfg.alpha * cfg.temperature**2 * kl_sum + (1.0 - cfg.alpha) * nll_sum
    return loss_sum, n, {"nll": (nll_sum, n), "kl": (kl_sum, n)}
