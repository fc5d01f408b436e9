"""The one train step: microbatched gradients, one normalisation, clipping, AdamW, finite guard.

``make_train_step`` returns a function jitted with explicit in/out shardings and the state
donated. Every objective (lm, sft, dpo, reward, distill) runs through it. Its ``multi`` runs
several steps in one call (``lax.scan`` over stacked batches): the same updates, one dispatch.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmtrain.model.sharding import mesh_platform, mesh_rules, shard_map
from lmtrain.train.objectives import OBJECTIVES, LossContext
from lmtrain.train.optim import apply_adamw
from lmtrain.train.state import TrainState


def _split_microbatches(batch: dict, m: int, constrain: bool = True) -> dict:
    """(B, ...) → (M, B/M, ...) taking rows m, m+M, ...: each microbatch spans every data shard."""

    def split(x):
        b = x.shape[0]
        y = x.reshape(b // m, m, *x.shape[1:])
        y = jnp.swapaxes(y, 0, 1)
        if not constrain:  # inside shard_map: already this shard's rows
            return y
        spec = PartitionSpec(None, ("data", "fsdp"), *([None] * (x.ndim - 1)))
        return jax.lax.with_sharding_constraint(y, spec)

    return jax.tree.map(split, batch)


def compute_grads(
    loss_fn, params, batch, rng, ctx: LossContext, microbatches: int, constrain: bool = True
):
    """Sums of loss, weight, metrics and grads over microbatches (not yet normalised)."""

    def f(p, mb, r):
        loss_sum, weight, metrics = loss_fn(p, mb, r, ctx)
        return loss_sum, (weight, metrics)

    grad_fn = jax.value_and_grad(f, has_aux=True)
    if microbatches == 1:
        (loss_sum, (weight, metrics)), grads = grad_fn(params, batch, rng)
        return loss_sum, weight, metrics, grads

    mbs = _split_microbatches(batch, microbatches, constrain)
    rngs = jax.random.split(rng, microbatches)
    first = jax.tree.map(lambda x: x[0], mbs)
    (l0, (w0, m0)), g0 = jax.eval_shape(grad_fn, params, first, rngs[0])
    zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), t)  # noqa: E731
    carry0 = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros(m0), zeros(g0))

    def body(carry, xs):
        mb, r = xs
        (ls, (w, m)), g = grad_fn(params, mb, r)
        acc_l, acc_w, acc_m, acc_g = carry
        add = lambda a, b: jax.tree.map(lambda x, y: x + y.astype(jnp.float32), a, b)  # noqa: E731
        return (acc_l + ls, acc_w + w, add(acc_m, m), add(acc_g, g)), None

    (loss_sum, weight, metrics, grads), _ = jax.lax.scan(body, carry0, (mbs, rngs))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return loss_sum, weight, metrics, grads


BATCH_AXES = ("data", "fsdp")


def uses_flat_grad_sync(config, mesh: Mesh) -> bool:
    """Whether gradients are summed over data shards as one flat buffer (``train.grad_sync``).

    ``auto`` picks it on CPU under pure data parallelism: XLA:CPU's all-reduce has a fixed cost per
    operand, so one flat buffer beats one per parameter (docs/performance.md). On GPU
    and TPU the SPMD reduction stays: XLA overlaps its per-layer all-reduces with the backward.
    """
    mode = config.train.get("grad_sync", "auto")
    data_only = mesh.shape["fsdp"] == 1 and mesh.shape["tensor"] == 1 and mesh.shape["data"] > 1
    if mode == "spmd" or not data_only or config.model.attention != "xla":
        return False
    return mode == "flat" or mesh_platform(mesh) == "cpu"


def compute_grads_flat(
    loss_fn, params, batch, rng, ctx: LossContext, microbatches: int, mesh: Mesh
):
    """``compute_grads`` per data shard (shard_map), then one psum of everything as one vector.

    Params (and frozen trees) are replicated under pure data parallelism; each shard differentiates
    its rows, and loss, weight, metrics and grads are raveled into a single float32 buffer so the
    reduction is one collective. Dropout keys differ per shard (the shard index is folded in).
    """

    def local(params, batch, rng, frozen):
        shard = jax.lax.axis_index(BATCH_AXES)
        local_ctx = dataclasses.replace(ctx, frozen=frozen)
        with nn.logical_axis_rules(()):  # no sharding constraints inside the manual region
            sums = compute_grads(
                loss_fn,
                params,
                batch,
                jax.random.fold_in(rng, shard),
                local_ctx,
                microbatches,
                False,
            )
        flat, unravel = ravel_pytree(sums)
        return unravel(jax.lax.psum(flat.astype(jnp.float32), BATCH_AXES).astype(flat.dtype))

    replicated, rows = PartitionSpec(), PartitionSpec(BATCH_AXES)
    return shard_map(
        local, mesh, in_specs=(replicated, rows, replicated, replicated), out_specs=replicated
    )(params, batch, rng, ctx.frozen)


def make_train_step(
    model,
    schedule: optax.Schedule,
    config,
    mesh: Mesh,
    state_shardings,
    batch_shardings,
    frozen_shardings=None,
    extras=None,
):
    """The jitted step; ``.multi`` runs several steps (stacked batches) in one call.

    The optimizer is config.optim's AdamW (:func:`lmtrain.train.optim.apply_adamw`), over a state
    made by ``make_optimizer(config.optim, ...)``'s ``tx.init``. ``extras``: static helpers for the
    objective (``LossContext.extras``), e.g. a teacher model.
    """
    loss_fn = OBJECTIVES[config.objective]
    microbatches = config.train.microbatches
    flat = uses_flat_grad_sync(config, mesh)

    def step(state: TrainState, batch: dict, frozen=None):
        ctx = LossContext(model=model, config=config, frozen=frozen, extras=extras)
        rng, step_rng = jax.random.split(state.rng)
        step_rng = jax.random.fold_in(step_rng, state.step)
        if flat:
            sums = compute_grads_flat(
                loss_fn, state.params, batch, step_rng, ctx, microbatches, mesh
            )
        else:
            sums = compute_grads(loss_fn, state.params, batch, step_rng, ctx, microbatches)
        return _update(state, rng, *sums, config.optim, schedule)

    return _jit_train_step(step, config, mesh, state_shardings, batch_shardings, frozen_shardings)


def _update(state: TrainState, rng, loss_sum, weight, metrics, grads, optim_cfg, schedule):
    """Normalise the summed loss and grads, clip, AdamW; (new state, per-step metrics)."""
    denom = jnp.maximum(weight, 1.0)
    loss = loss_sum / denom
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    # A non-finite loss or gradient skips the update (params and optimizer state untouched).
    new_params, new_opt = apply_adamw(
        optim_cfg, schedule, grads, grad_norm, state.opt_state, state.params, ok
    )
    nonfinite = jnp.where(ok, 0, state.nonfinite_in_a_row + 1)
    new_state = state.replace(
        step=state.step + 1,
        params=new_params,
        opt_state=new_opt,
        rng=rng,
        nonfinite_in_a_row=nonfinite,
        nonfinite_total=state.nonfinite_total + (1 - ok.astype(jnp.int32)),
    )
    out = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": schedule(state.step),
        "tokens": weight,
        "skipped": 1.0 - ok.astype(jnp.float32),
    }
    for name, (s, w) in metrics.items():
        out[name] = s / jnp.maximum(w, 1.0)
    if "nll" in out:
        out["perplexity"] = jnp.exp(out["nll"])
    return new_state, out


def _jit_train_step(step, config, mesh: Mesh, state_shardings, batch_shardings, frozen_shardings):
    """``step`` jitted (state donated) as ``run``, with ``run.multi`` (a scan over stacked
    batches) and ``run.compile_for`` (compile either without running)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    options = cpu_compiler_options(config, mesh)

    def jit(fn, batches_sharding):  # the state donated: updated in place
        return jax.jit(
            fn,
            in_shardings=(state_shardings, batches_sharding, frozen_shardings),
            out_shardings=(state_shardings, replicated),
            donate_argnums=(0,),
            compiler_options=options,
        )

    jitted = jit(step, batch_shardings)

    def run(state, batch, frozen=None):
        with mesh_rules(mesh):
            return jitted(state, batch, frozen)

    def steps(state: TrainState, batches: dict, frozen=None):
        return jax.lax.scan(lambda s, b: step(s, b, frozen), state, batches)

    jitted_multi = jit(steps, stacked_shardings(batch_shardings))

    def multi(state, batches, frozen=None):
        """k steps on batches stacked as (k, B, ...); metrics come back as (k,) arrays."""
        with mesh_rules(mesh):
            return jitted_multi(state, batches, frozen)

    def compile_for(state, batch, frozen=None, steps: int = 1, compiler_options=None):
        """Compiles, without running, the call ``run`` (or ``multi`` over a stack of ``steps``
        batches) makes with arguments of these shapes; that call then finds it in JAX's cache.
        ``compiler_options`` (XLA flags for this compile only) give a program the run would not
        find in the cache: ``lmtrain compile`` uses them to measure, not to train."""
        with mesh_rules(mesh):
            if steps == 1:
                return jitted.lower(state, batch, frozen).compile(compiler_options)
            sharding = stacked_shardings(batch_shardings)  # one NamedSharding for every field
            stacked = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct((steps, *x.shape), x.dtype, sharding=sharding),
                batch,
            )
            return jitted_multi.lower(state, stacked, frozen).compile(compiler_options)

    run.jitted = jitted
    run.multi = multi
    run.compile_for = compile_for
    return run


def cpu_compiler_options(config, mesh: Mesh | None = None) -> dict | None:
    """XLA compile options of the train and eval steps: ``train.cpu_opt_level`` on CPU."""
    level = int(config.train.get("cpu_opt_level", -1))
    platform = mesh_platform(mesh) if mesh is not None else jax.default_backend()
    if level < 0 or platform != "cpu":
        return None
    return {"xla_backend_optimization_level": level}


def stacked_shardings(batch_shardings):
    """Batch shardings with a leading unsharded axis: k batches stacked for ``multi``."""
    return jax.tree.map(
        lambda s: NamedSharding(s.mesh, PartitionSpec(None, *s.spec)),
        batch_shardings,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def make_eval_step(
    model, config, mesh: Mesh, params_shardings, batch_shardings, frozen_shardings=None, extras=None
):
    """Sums of the objective's loss and weight over a batch (for exact full-split averages)."""
    loss_fn = OBJECTIVES[config.objective]

    def evaluate(params, batch, frozen=None):
        ctx = LossContext(model=model, config=config, frozen=frozen, extras=extras, train=False)
        loss_sum, weight, metrics = loss_fn(params, batch, jax.random.PRNGKey(0), ctx)
        return {"loss_sum": loss_sum, "weight": weight} | {
            f"{k}_sum": s for k, (s, _) in metrics.items()
        }

    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(
        evaluate,
        in_shardings=(params_shardings, batch_shardings, frozen_shardings),
        out_shardings=replicated,
        compiler_options=cpu_compiler_options(config, mesh),
    )

    def run(params, batch, frozen=None):
        with mesh_rules(mesh):
            return jitted(params, batch, frozen)

    def compile_for(params, batch, frozen=None, compiler_options=None):
        """Compiles, without running, ``run`` for arguments of these shapes (``compiler_options``
        as the train step's ``compile_for`` takes them)."""
        with mesh_rules(mesh):
            return jitted.lower(params, batch, frozen).compile(compiler_options)

    run.compile_for = compile_for
    return run
