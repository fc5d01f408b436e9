"""Grouped-query attention with rotary embeddings, packed-segment masks and a KV cache.

Masking is by *slot* (the index in the sequence or cache) and *segment id*: a query attends to a
key iff the key's slot is not after the query's and both carry the same non-zero segment. Packed
documents (segments 1, 2, ...) never see each other, left padding (segment 0) is never attended,
and the same rule serves training and cached decoding.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from lmtrain.model import matmul
from lmtrain.model.attention_kernels import (  # noqa: F401 (re-exported)
    _MASK_VALUE,
    attention_mask,
    causal_self_attention,
    dot_product_attention,
    xla_attention_head_major,
)
from lmtrain.model.config import ModelConfig


def rope_tables(
    positions: jax.Array, head_dim: int, theta: float, table_len: int = 0
) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape (B, T, head_dim/2) for integer positions (B, T).

    With ``table_len`` the values are gathered from constant (table_len, head_dim/2) tables:
    computed in the graph, XLA fuses sin/cos into every consumer and evaluates them once per
    (head, element) instead of once per position (on CPU the q/k rotations and their backward
    were then the slowest fusions of a small model's step). Positions outside the table read
    NaN, so misuse shows up in the loss instead of as a silently wrong rotation.
    """
    if 0 < table_len and table_len * head_dim <= _MAX_ROPE_TABLE:
        tables = _rope_constants(table_len, head_dim, theta)
        return tuple(
            jnp.take(jnp.asarray(t), positions, axis=0, mode="fill", fill_value=jnp.nan)
            for t in tables
        )
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


_MAX_ROPE_TABLE = 1 << 20  # table_len * head_dim: two float32 tables of at most 2 MiB each


@functools.lru_cache(maxsize=16)
def _rope_constants(table_len: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """The in-graph formula's float32 angles; cos/sin correctly rounded from float64."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = np.float32(1.0) / (np.float32(theta) ** exponent)
    angles = (np.arange(table_len, dtype=np.float32)[:, None] * inv_freq[None, :]).astype(
        np.float64
    )
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(
    x: jax.Array, cos: jax.Array, sin: jax.Array, heads_first: bool = False
) -> jax.Array:
    """Rotate-half RoPE (the Hugging Face Llama layout, so imported weights need no permutation).

    ``x`` is (B, T, H, D), or (B, H, T, D) with ``heads_first``; cos/sin are (B, T, D/2).
    Written as ``x * cos + flip(x) * signed_sin`` over a (2, D/2) view: elementwise ops and a
    reverse that XLA fuses, instead of a concatenate whose gradient is a pad (slow on CPU).
    """
    xf = x.astype(jnp.float32)
    *lead, d = xf.shape
    x2 = xf.reshape(*lead, 2, d // 2)
    sign = jnp.asarray([-1.0, 1.0], jnp.float32)[:, None]
    if heads_first:
        c, s = cos[:, None, :, None, :], sin[:, None, :, None, :] * sign
    else:
        c, s = cos[:, :, None, None, :], sin[:, :, None, None, :] * sign
    out = x2 * c + jnp.flip(x2, axis=-2) * s
    return out.reshape(xf.shape).astype(x.dtype)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, kv_cache=None, cache_offset=None):
        cfg = self.cfg
        H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.kv_dim

        def kernel(name, heads, axes):
            return self.param(
                name,
                nn.with_logical_partitioning(
                    nn.initializers.normal(stddev=cfg.d_model**-0.5), axes
                ),
                (cfg.d_model, heads, D),
                cfg.params_dtype,
            )

        wq = kernel("q_kernel", H, ("embed", "heads", "kv"))
        wk = kernel("k_kernel", K, ("embed", "kv_heads", "kv"))
        wv = kernel("v_kernel", K, ("embed", "kv_heads", "kv"))
        # One matmul for q, k and v (params stay separate, so checkpoints map 1:1 to HF layouts).
        w = jnp.concatenate([wq, wk, wv], axis=1)
        qkv_bias = None
        if cfg.qkv_bias:  # Qwen2-style biases on q, k and v.

            def bias(name, heads, head_axis):
                init = nn.with_logical_partitioning(nn.initializers.zeros, (head_axis, "kv"))
                return self.param(name, init, (heads, D), cfg.params_dtype)

            b = [
                bias("q_bias", H, "heads"),
                bias("k_bias", K, "kv_heads"),
                bias("v_bias", K, "kv_heads"),
            ]
            qkv_bias = jnp.concatenate(b, axis=0).astype(cfg.compute_dtype)
        wo = self.param(
            "o_kernel",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=(H * D) ** -0.5 / (2 * cfg.n_layers) ** 0.5),
                ("heads", "kv", "embed"),
            ),
            (H, D, cfg.d_model),
            cfg.params_dtype,
        )
        # Without a cache, positions lie within the model's context (or the call's length); decoding
        # positions can run past it, so the cached path keeps the formula; so does a symbolic
        # length (shape-polymorphic export), which cannot size a table.
        T = x_BTD.shape[1]
        table_len = max(cfg.max_seq_len, T) if kv_cache is None and isinstance(T, int) else 0
        cos, sin = rope_tables(positions_BT, D, cfg.rope_theta, table_len)

        if kv_cache is None and cfg.attention == "xla":
            return _heads_first(cfg, x_BTD, w, qkv_bias, wo, cos, sin, segment_ids_BT), None
        return _general(
            cfg, x_BTD, w, qkv_bias, wo, cos, sin, segment_ids_BT, kv_cache, cache_offset
        )


def _heads_first(cfg: ModelConfig, x, w, qkv_bias, wo, cos, sin, segment_ids_BT):
    """Training / scoring fast path: heads-first (B, H, T, D) from the projection on, so the
    attention matmuls need no transposes. Same maths as :func:`_general`."""
    H, K = cfg.n_heads, cfg.n_kv_heads
    dt, mm, custom = cfg.compute_dtype, cfg.matmul_compute_dtype, cfg.custom_matmul_grads
    qkv = matmul.einsum("btd,dhe->bhte", x, w, mm, custom).astype(dt)
    if qkv_bias is not None:
        qkv = qkv + qkv_bias[None, :, None, :]
    # split (not slicing): its gradient is one concatenate, where slices' would be pads.
    q, k, v = jnp.split(qkv, [H, H + K], axis=1)
    q = apply_rope(q, cos, sin, heads_first=True)
    k = apply_rope(k, cos, sin, heads_first=True)
    out = xla_attention_head_major(q, k, v, segment_ids_BT, mm, custom)
    out = nn.with_logical_constraint(out, ("batch", "heads", "length", "kv"))
    out = checkpoint_name(out, "attn_out")
    return matmul.einsum("bhte,hed->btd", out, wo, mm, custom).astype(dt)


def _general(cfg: ModelConfig, x, w, qkv_bias, wo, cos, sin, segment_ids_BT, kv_cache,
             cache_offset):  # fmt: skip
    """Length-major attention: the fused kernels, and decoding with a KV cache (y, new cache)."""
    H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.kv_dim
    dt, mm, custom = cfg.compute_dtype, cfg.matmul_compute_dtype, cfg.custom_matmul_grads
    qkv = matmul.einsum("btd,dhe->bthe", x, w, mm, custom).astype(dt)
    if qkv_bias is not None:
        qkv = qkv + qkv_bias
    q, k, v = jnp.split(qkv, [H, H + K], axis=2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    B, T = x.shape[0], x.shape[1]
    q_slot = jnp.arange(T)
    if kv_cache is None:
        k_all, v_all, k_seg, k_slot = k, v, segment_ids_BT, q_slot
        new_cache = None
    else:
        k_all = jax.lax.dynamic_update_slice_in_dim(
            kv_cache["k"], k.astype(kv_cache["k"].dtype), cache_offset, 1
        )
        v_all = jax.lax.dynamic_update_slice_in_dim(
            kv_cache["v"], v.astype(kv_cache["v"].dtype), cache_offset, 1
        )
        k_seg = kv_cache["seg"]
        k_slot = jnp.arange(k_all.shape[1])
        q_slot = q_slot + cache_offset
        new_cache = {"k": k_all, "v": v_all}
    if kv_cache is None and cfg.attention != "xla":  # fused kernels: training and prefill
        out = causal_self_attention(cfg.attention, q, k, v, segment_ids_BT)
    else:
        mask = attention_mask(q_slot, k_slot, segment_ids_BT, k_seg)
        q = q.reshape(B, T, K, H // K, D)
        out = dot_product_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask)
        out = out.reshape(B, T, H, D)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    out = checkpoint_name(out, "attn_out")
    y = matmul.einsum("bthe,hed->btd", out, wo, mm, custom).astype(dt)
    return y, new_cache
