"""Train state and its sharded initialisation (abstract shapes → shardings → jitted init)."""

from __future__ import annotations

from collections.abc import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmtrain.model.sharding import LOGICAL_RULES, logical_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays
    nonfinite_in_a_row: jax.Array
    nonfinite_total: jax.Array


def init_fn(
    model: nn.Module,
    tx: optax.GradientTransformation,
    seq_len: int,
    seed: int,
    boxed: bool,
    params_transform: Callable | None = None,
):
    def init():
        rng = jax.random.PRNGKey(seed)
        init_rng, train_rng = jax.random.split(rng)
        tokens = jnp.zeros((1, seq_len), jnp.int32)
        variables = model.init(init_rng, tokens)
        params = variables["params"]
        if params_transform is not None:
            params = params_transform(params, init_rng)
        if not boxed:
            params = nn.meta.unbox(params)
        opt_state = tx.init(params)
        zero = jnp.zeros((), jnp.int32)
        return TrainState(zero, params, opt_state, train_rng, zero, zero)

    return init


def state_shardings(model, tx, seq_len: int, seed: int, mesh: Mesh, params_transform=None):
    """(abstract state, NamedShardings) derived from the params' logical axis names."""
    boxed = jax.eval_shape(init_fn(model, tx, seq_len, seed, True, params_transform))
    shardings = logical_shardings(boxed, mesh, LOGICAL_RULES)
    abstract = nn.meta.unbox(boxed)
    return abstract, shardings


def init_state(
    model, tx, seq_len: int, seed: int, mesh: Mesh, params_transform=None, shardings=None
):
    """The initial state on ``mesh``; pass ``shardings`` when already known (saves a trace)."""
    if shardings is None:
        _, shardings = state_shardings(model, tx, seq_len, seed, mesh, params_transform)
    init = jax.jit(
        init_fn(model, tx, seq_len, seed, False, params_transform), out_shardings=shardings
    )
    with mesh:
        state = init.lower().compile(
            compiler_options=_INIT_COMPILER_OPTIONS.get(jax.default_backend())
        )()
    return state, shardings


# Init runs once, so its compile time matters more than its run time: on CPU, LLVM's -O1 compiles
# the many unrolled threefry fusions of an init faster than -O2 and gives bitwise the same values
# (docs/performance.md).
_INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 1}}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
