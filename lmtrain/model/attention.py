"""Grouped-query attention with rotary embeddings, packed-segment masks and a KV cache.

Masking is by *slot* (the index in the sequence or cache) and *segment id*: a query attends to a
key iff the key's slot is not after the query's and both carry the same non-zero segment. Packed
documents (segments 1, 2, ...) never see each other, left padding (segment 0) is never attended,
and the same rule serves training and cached decoding.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmtrain.model.config import ModelConfig

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape (B, T, head_dim/2) for integer positions (B, T)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BTHD: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (the Hugging Face Llama layout, so imported weights need no permutation).

    Written as ``x * cos + flip(x) * signed_sin`` over a (2, D/2) view: elementwise ops and a
    reverse that XLA fuses, instead of a concatenate whose gradient is a pad (slow on CPU).
    """
    x = x_BTHD.astype(jnp.float32)
    *lead, d = x.shape
    x2 = x.reshape(*lead, 2, d // 2)
    c = cos[:, :, None, None, :]
    s = sin[:, :, None, None, :] * jnp.asarray([-1.0, 1.0], jnp.float32)[:, None]
    out = x2 * c + jnp.flip(x2, axis=-2) * s
    return out.reshape(x.shape).astype(x_BTHD.dtype)


def attention_mask(
    q_slot_T: jax.Array, k_slot_S: jax.Array, q_seg_BT: jax.Array, k_seg_BS: jax.Array
) -> jax.Array:
    """Boolean (B, 1, 1, T, S) mask: causal by slot, same non-zero segment."""
    causal = k_slot_S[None, :] <= q_slot_T[:, None]
    same = (q_seg_BT[:, :, None] == k_seg_BS[:, None, :]) & (k_seg_BS[:, None, :] != 0)
    return (causal[None] & same)[:, None, None]


def dot_product_attention(
    q_BTKGD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, mask: jax.Array
) -> jax.Array:
    """Reference XLA attention; softmax in float32. Returns (B, T, K, G, D)."""
    scale = q_BTKGD.shape[-1] ** -0.5
    scores = jnp.einsum(
        "btkgd,bskd->bkgts", q_BTKGD * jnp.asarray(scale, q_BTKGD.dtype), k_BSKD,
        preferred_element_type=jnp.float32,
    )
    scores = jnp.where(mask, scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKD.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v_BSKD)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, kv_cache=None, cache_offset=None):
        cfg = self.cfg
        H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.kv_dim
        def kernel(name, heads, axes):
            return self.param(
                name,
                nn.with_logical_partitioning(nn.initializers.normal(stddev=cfg.d_model**-0.5), axes),
                (cfg.d_model, heads, D),
                cfg.params_dtype,
            )

        wq = kernel("q_kernel", H, ("embed", "heads", "kv"))
        wk = kernel("k_kernel", K, ("embed", "kv_heads", "kv"))
        wv = kernel("v_kernel", K, ("embed", "kv_heads", "kv"))
        # One matmul for q, k and v (params stay separate, so checkpoints map 1:1 to HF layouts).
        w = jnp.concatenate([wq, wk, wv], axis=1).astype(cfg.compute_dtype)
        qkv = jnp.einsum("btd,dhe->bthe", x_BTD.astype(cfg.compute_dtype), w)
        if cfg.qkv_bias:  # Qwen2-style biases on q, k and v.

            def bias(name, heads, head_axis):
                init = nn.with_logical_partitioning(nn.initializers.zeros, (head_axis, "kv"))
                return self.param(name, init, (heads, D), cfg.params_dtype)

            b = [bias("q_bias", H, "heads"), bias("k_bias", K, "kv_heads"), bias("v_bias", K, "kv_heads")]
            qkv = qkv + jnp.concatenate(b, axis=0).astype(cfg.compute_dtype)
        q, k, v = qkv[:, :, :H], qkv[:, :, H : H + K], qkv[:, :, H + K :]
        cos, sin = rope_tables(positions_BT, D, cfg.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        T = x_BTD.shape[1]
        q_slot = jnp.arange(T)
        if kv_cache is None:
            k_all, v_all, k_seg, k_slot = k, v, segment_ids_BT, q_slot
            new_cache = None
        else:
            k_all = jax.lax.dynamic_update_slice_in_dim(kv_cache["k"], k.astype(kv_cache["k"].dtype), cache_offset, 1)
            v_all = jax.lax.dynamic_update_slice_in_dim(kv_cache["v"], v.astype(kv_cache["v"].dtype), cache_offset, 1)
            k_seg = kv_cache["seg"]
            k_slot = jnp.arange(k_all.shape[1])
            q_slot = q_slot + cache_offset
            new_cache = {"k": k_all, "v": v_all}
        mask = attention_mask(q_slot, k_slot, segment_ids_BT, k_seg)
        B = x_BTD.shape[0]
        q = q.reshape(B, T, K, H // K, D)
        out = dot_product_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask)
        out = out.reshape(B, T, H, D)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
        from jax.ad_checkpoint import checkpoint_name

        out = checkpoint_name(out, "attn_out")
        wo = self.param(
            "o_kernel",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=(H * D) ** -0.5 / (2 * cfg.n_layers) ** 0.5),
                ("heads", "kv", "embed"),
            ),
            (H, D, cfg.d_model),
            cfg.params_dtype,
        )
        y = jnp.einsum("bthe,hed->btd", out, wo.astype(cfg.compute_dtype))
        return y, new_cache
