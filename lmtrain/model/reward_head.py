"""Scalar reward head on the Transformer's final hidden state (reward models, Bradley–Terry).

Kept outside the Transformer so the language-model param tree is untouched: a reward model's
params are the backbone tree plus one top-level key ``"reward_head"`` = ``{"kernel": [D],
"bias": []}``. The score of a sequence is read at its last real (non-padding) input position.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

HEAD_KEY = "reward_head"


def init_reward_head(d_model: int, rng: jax.Array, *, boxed: bool = False) -> dict:
    """Small random kernel (std 1/sqrt(D)) and zero bias; ``boxed`` adds logical axis names."""
    kernel = jax.random.normal(rng, (d_model,), jnp.float32) * d_model**-0.5
    if boxed:
        kernel = nn.Partitioned(kernel, names=("embed",))
    return {"kernel": kernel, "bias": jnp.zeros((), jnp.float32)}


def split_head(params: Mapping) -> tuple[dict, dict]:
    """``(backbone params, head params)``; raises KeyError naming the key when the head is absent."""
    if HEAD_KEY not in params:
        raise KeyError(f"params have no {HEAD_KEY!r}; objective 'reward' adds it at init")
    return {k: v for k, v in params.items() if k != HEAD_KEY}, params[HEAD_KEY]


def last_positions(segment_ids_BT: jax.Array) -> jax.Array:
    """Index of the last non-padding position of each row (rows hold one sequence)."""
    return jnp.maximum(jnp.sum(segment_ids_BT > 0, axis=1) - 1, 0)


def reward_scores(head: Mapping, hidden_BTD: jax.Array, segment_ids_BT: jax.Array) -> jax.Array:
    """(B,) float32 scores: ``hidden[last] @ kernel + bias`` (one-hot pick, shard-friendly)."""
    T = hidden_BTD.shape[1]
    pick = jax.nn.one_hot(last_positions(segment_ids_BT), T, dtype=jnp.float32)
    last = jnp.einsum("bt,btd->bd", pick, hidden_BTD.astype(jnp.float32))
    return last @ head["kernel"].astype(jnp.float32) + head["bias"]
