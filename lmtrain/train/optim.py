"""AdamW with warmup + cosine/linear decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import re

import jax
import ml_collections
import optax


def lr_schedule(o: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    decay_steps = o.decay_steps or total_steps
    if o.schedule == "constant":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, o.lr, max(o.warmup_steps, 1)),
                optax.constant_schedule(o.lr),
            ],
            [o.warmup_steps],
        )
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, o.lr, o.warmup_steps, max(decay_steps, o.warmup_steps + 1), o.min_lr
        )
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, o.lr, max(o.warmup_steps, 1)),
            optax.linear_schedule(o.lr, o.min_lr, max(decay_steps - o.warmup_steps, 1)),
        ],
        [o.warmup_steps],
    )


def path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def weight_decay_mask(params, exclude_patterns) -> object:
    """True where weight decay applies: matrices and embeddings, not norms or biases."""
    pats = [re.compile(p) for p in exclude_patterns]

    def decide(path, leaf):
        name = path_name(path)
        return leaf.ndim >= 2 and not any(p.search(name) for p in pats)

    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(
    o: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = lr_schedule(o, total_steps)
    parts = []
    if o.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(o.clip_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=o.b1,
            b2=o.b2,
            eps=o.eps,
            weight_decay=o.weight_decay,
            mask=lambda p: weight_decay_mask(p, o.wd_exclude),
        )
    )
    return optax.chain(*parts), schedule
