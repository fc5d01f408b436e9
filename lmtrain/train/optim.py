"""AdamW with warmup + cosine/linear decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import optax


def effective_warmup(o: ml_collections.ConfigDict, total_steps: int) -> int:
    """``optim.warmup_steps`` clipped to the run (or to ``decay_steps`` when that is longer), so
    a smoke test such as ``--config.train.steps=10`` runs any config, as in nanoGPT and MaxText."""
    return min(o.warmup_steps, max(total_steps, o.decay_steps))


def warmup_note(o: ml_collections.ConfigDict, total_steps: int) -> str:
    """The console line saying the warmup was clipped ('' when it was not)."""
    w = effective_warmup(o, total_steps)
    if w == o.warmup_steps:
        return ""
    return (
        f"optim: warmup_steps={o.warmup_steps} is longer than the run (train.steps={total_steps}); "
        f"warming up over {w} steps"
    )


def lr_schedule(o: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    decay_steps = o.decay_steps or total_steps
    warmup = effective_warmup(o, total_steps)
    if o.schedule == "constant":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, o.lr, max(warmup, 1)),
                optax.constant_schedule(o.lr),
            ],
            [warmup],
        )
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, o.lr, warmup, max(decay_steps, warmup + 1), o.min_lr
        )
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, o.lr, max(warmup, 1)),
            optax.linear_schedule(o.lr, o.min_lr, max(decay_steps - warmup, 1)),
        ],
        [warmup],
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


def apply_adamw(
    o: ml_collections.ConfigDict,
    schedule: optax.Schedule,
    grads,
    grad_norm: jax.Array,
    opt_state,
    params,
    ok: jax.Array,
):
    """One AdamW step of :func:`make_optimizer`'s chain, or a no-op where ``ok`` is False.

    Returns ``(new_params, new_opt_state)``; the state keeps optax's structure (checkpoints and
    ``tx.init`` are shared). The same arithmetic as ``tx.update`` + ``optax.apply_updates``
    (tested against them), written as one elementwise expression per parameter and gated by
    scalars instead of a ``lax.cond``: the branch kept XLA from fusing the update with the
    gradient scaling, leaving many small kernels a step (docs/performance.md). When ``ok`` is False (a non-finite loss or gradient) the moments are carried over by
    coefficients (0, 1), the counts do not advance and the parameters get a zero update.
    """
    adam = _find_state(opt_state, optax.ScaleByAdamState)
    sched = _find_state(opt_state, optax.ScaleByScheduleState)
    f32 = jnp.float32
    count = jnp.where(ok, optax.safe_increment(adam.count), adam.count)
    lr = -1 * schedule(sched.count)
    # Python-float coefficients, as optax's own expressions give them (weak-typed, then float32).
    c1, d1 = jnp.where(ok, 1 - o.b1, 0.0).astype(f32), jnp.where(ok, o.b1, 1.0).astype(f32)
    c2, d2 = jnp.where(ok, 1 - o.b2, 0.0).astype(f32), jnp.where(ok, o.b2, 1.0).astype(f32)
    bias1, bias2 = 1 - o.b1**count, 1 - o.b2**count
    clip = o.clip_norm > 0
    trigger = grad_norm < o.clip_norm if clip else True
    decay = weight_decay_mask(params, o.wd_exclude)

    def leaf(g, m, v, p, wd):
        if clip:
            g = jax.lax.select(trigger, g, (g / grad_norm.astype(g.dtype)) * o.clip_norm)
        g = jnp.where(ok, g, jnp.zeros_like(g))  # a non-finite gradient must not reach m, v
        m = c1.astype(m.dtype) * g + d1.astype(m.dtype) * m
        v = c2.astype(v.dtype) * g**2 + d2.astype(v.dtype) * v
        u = (m / bias1.astype(m.dtype)) / (jnp.sqrt(v / bias2.astype(v.dtype) + 0.0) + o.eps)
        if wd and o.weight_decay:
            u = u + o.weight_decay * p
        u = jnp.array(lr, dtype=u.dtype) * u
        new_p = jnp.asarray(p + jnp.where(ok, u, jnp.zeros_like(u))).astype(p.dtype)
        return new_p, m, v

    out = jax.tree.map(leaf, grads, adam.mu, adam.nu, params, decay)
    pick = lambda i: jax.tree.map(lambda _, t: t[i], params, out)  # noqa: E731
    new_adam = adam._replace(count=count, mu=pick(1), nu=pick(2))
    new_sched = sched._replace(count=jnp.where(ok, optax.safe_increment(sched.count), sched.count))

    def swap(s):
        if isinstance(s, optax.ScaleByAdamState):
            return new_adam
        if isinstance(s, optax.ScaleByScheduleState):
            return new_sched
        return s

    is_state = lambda s: isinstance(s, (optax.ScaleByAdamState, optax.ScaleByScheduleState))  # noqa: E731
    return pick(0), jax.tree.map(swap, opt_state, is_leaf=is_state)


def _find_state(opt_state, kind):
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, kind))
        if isinstance(s, kind)
    ]
    if len(found) != 1:
        raise ValueError(f"expected one {kind.__name__} in the optimizer state, found {len(found)}")
    return found[0]
